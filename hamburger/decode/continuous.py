"""Continuous batching: sequences join and leave a running batch at every macro-step boundary.

The running batch keeps one base KV cache, left-padded and masked, exactly like
`hamburger.model.generate_batch`; every row adds one KV entry per macro step, so the cache stays
rectangular. What is new here is the *join*: waiting sequences are prefilled as their own
left-padded batch, then the two caches are left-padded to the same width and concatenated along
the batch. Positions are explicit per row, so padding never moves a token. Rows that finish,
pass their deadline or lose their client leave at the next boundary (their cache rows dropped),
and columns that became padding for every row are trimmed.

Two steppers share the batching: `HAMburgerStepper` (a segment of 1..K tokens per macro step,
per-row confidence) and `BaseStepper` (a plain HF causal LM, one greedy token per forward), so
the HAMburger server and the base server batch the same way. Greedy output of a sequence does not
depend on what else runs (unless the batch-aware micro loop is on) (tests/test_server.py checks it against `generate`).

`decode_all` runs a list of sequences to completion on one thread (the MLflow pyfunc uses it);
trainer/serve/app.py drives the same `ContinuousBatch` from a scheduler thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hamburger.decode.eager import DecodeResult
from hamburger.decode.micro_rule import MicroRule
from hamburger.decode.steppers import BaseStepper, HAMburgerStepper, left_pad  # noqa: F401 - re-exported
from hamburger.model.config import DEFAULT_CONFIDENCE


@dataclass
class Sequence(DecodeResult):
    """One request's decode state: its DecodeResult (tokens, segments, macro steps) as it grows,
    and what the batch needs to run it. `cancel` may be called from any thread; the batch honours
    it at the next macro-step boundary."""

    prompt_ids: list[int]
    max_new_tokens: int
    confidence: float = DEFAULT_CONFIDENCE
    finish_reason: str | None = None
    """'stop' (EOS or a stop string), 'length', or why it was cut: 'deadline', 'cancelled', 'error'."""
    error: str = ""
    on_step: Callable[[Sequence, list[int]], str | None] | None = None
    """Called (on the decoding thread) with each new segment; a returned reason finishes the sequence."""
    on_finish: Callable[[Sequence], None] | None = None
    cancel_reason: str | None = None
    ignore_eos: bool = False
    """Benchmarks: decode exactly max_new_tokens (EOS still ends a segment, not the sequence)."""
    deadline: float = float("inf")
    """time.monotonic() after which the scheduler cancels it ('deadline')."""
    temperature: float = 0.0
    """0: greedy. > 0 (base models): sample from softmax(logits / temperature) (decode/sampling.py)."""
    top_p: float = 1.0
    """Sampling only: the nucleus kept (the smallest set of tokens whose probability reaches it)."""
    generator: torch.Generator | None = None
    """Sampling only: this sequence's own CPU generator (sampling.seeded_generator)."""
    forced_lens: list[int] | None = None
    """Benchmarks only (hamburger/decode/forced.py): segment t has forced_lens[t % len] tokens
    (fewer only at EOS, the budget or a batch-aware cut), the stop head not asked. HAMburger,
    in both batches (ContinuousBatch and SlotBatch)."""

    def forced_len(self, t: int) -> int | None:
        """Segment t's forced length (benchmarks), None when the stop head decides."""
        return self.forced_lens[t % len(self.forced_lens)] if self.forced_lens else None

    def cancel(self, reason: str = "cancelled") -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason

    def after_segment(self, seg: list[int], eos: set[int]) -> str | None:
        """Why the sequence ends after this new segment (None: it goes on): EOS or a stop string
        ('stop'), its budget ('length'), what on_step said, or a pending cancel."""
        said = self.on_step(self, seg) if self.on_step is not None else None
        if (seg[-1] in eos and not self.ignore_eos) or said == "stop":
            return "stop"
        if len(self.tokens) >= self.max_new_tokens:
            return "length"
        return said or self.cancel_reason

    def finish(self, reason: str, error: str = "") -> None:
        if self.finish_reason is not None:
            return
        self.finish_reason, self.error = reason, error
        if self.on_finish is not None:
            self.on_finish(self)


PAD_SHARE = 1.25
"""A prefill batch's padded tokens may be at most this multiple of its real ones."""


def prefill_groups(seqs: list[Sequence]) -> list[list[Sequence]]:
    """`seqs` cut, in order, into groups whose left-padded prefill computes at most PAD_SHARE
    times their real prompt tokens (a prefill's cost is its padded tokens: one short prompt
    beside a long one would cost the long one's length)."""
    groups: list[list[Sequence]] = []
    for s in seqs:
        trial = (groups[-1] if groups else []) + [s]
        width = max(len(x.prompt_ids) for x in trial)
        if groups and width * len(trial) <= PAD_SHARE * sum(len(x.prompt_ids) for x in trial):
            groups[-1] = trial
        else:
            groups.append([s])
    return groups


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class ContinuousBatch:
    """The running batch: rows (sequences), one base KV cache, its mask, each row's last position
    and the stepper's state for the next micro loop. Used from one thread only."""

    def __init__(
        self,
        stepper,
        eos: set[int],
        pad_id: int = 0,
        device: str | torch.device = "cpu",
        batch_aware: bool = False,
        max_segment_len: int = 0,
    ):
        """batch_aware: HAMburger's micro loop knows its batch (hamburger/decode/micro_rule.py);
        max_segment_len caps every segment below the model's K (0: K)."""
        self.stepper, self.eos, self.pad_id, self.device = stepper, set(eos), pad_id, torch.device(device)
        self.k = min(stepper.max_segment_len, max_segment_len or stepper.max_segment_len)
        self.rule = MicroRule(self.device) if batch_aware and stepper.max_segment_len > 1 else None
        self.rows: list[Sequence] = []
        self.micro_calls = 0
        """Micro-decoder calls the batch has made (for /metrics): each appends one token to every
        row still in its segment, so a macro step makes (its longest segment - 1) of them."""
        self.cache = None
        self.mask = self.last_pos = self.state = None

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def join(self, seqs: list[Sequence]) -> None:
        """Prefill `seqs` and merge them into the running batch: consecutive prompts of similar
        length as one left-padded batch (prefill_groups), so padding costs little compute."""
        for group in prefill_groups(seqs):
            self._join(group)

    def _join(self, seqs: list[Sequence]) -> None:
        ids, mask, positions = left_pad([s.prompt_ids for s in seqs], self.pad_id, self.device)
        cache = self.stepper.new_cache()
        state = self.stepper.prefill(ids, mask, positions, cache)
        last_pos = torch.tensor([len(s.prompt_ids) - 1 for s in seqs], device=self.device)
        for s in seqs:
            s.macro_steps = 1
        if not self.rows:
            self.rows, self.cache, self.mask, self.last_pos, self.state = seqs, cache, mask, last_pos, state
            return
        width = max(self.mask.shape[1], mask.shape[1])
        merged = self.stepper.new_cache()
        for idx, (a, b) in enumerate(zip(self.cache.layers, cache.layers, strict=True)):
            keys = torch.cat([_pad_left(a.keys, width, 2), _pad_left(b.keys, width, 2)])
            values = torch.cat([_pad_left(a.values, width, 2), _pad_left(b.values, width, 2)])
            merged.update(keys, values, idx)
        self.cache = merged
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.last_pos = torch.cat([self.last_pos, last_pos])
        self.state = torch.cat([self.state, state])
        self.rows = self.rows + seqs

    def drop_cancelled(self) -> list[Sequence]:
        """Finish and remove the rows whose cancel() was called (deadline, disconnect)."""
        gone = [s for s in self.rows if s.cancel_reason is not None]
        if gone:
            for s in gone:
                s.finish(s.cancel_reason)
            self._keep([i for i, s in enumerate(self.rows) if s.cancel_reason is None])
        return gone

    @torch.no_grad()
    def step(self) -> list[Sequence]:
        """One macro step for every row: emit a segment each, retire the finished, feed the rest."""
        if not self.rows:
            return []
        budgets = [min(self.k, s.max_new_tokens - len(s.tokens)) for s in self.rows]
        confs = [s.confidence for s in self.rows]
        for row, s in enumerate(self.rows):
            if s.forced_lens:  # the forced length is the budget, and the stop head never stops
                budgets[row] = min(budgets[row], s.forced_len(len(s.seg_lens)))
                confs[row] = 0.0
        segs, by_head = self.stepper.segments(self.state, budgets, confs, self.eos, self.rows, self.rule)
        self.micro_calls += max(len(seg) for seg in segs) - 1
        keep, finished = [], []
        for row, s in enumerate(self.rows):
            seg = segs[row]
            s.tokens += seg
            s.seg_lens.append(len(seg))
            s.forced_stop.append(not by_head[row])
            reason = s.after_segment(seg, self.eos)
            if reason is None:
                keep.append(row)
            else:
                finished.append(s)
                s.finish(reason)
        segs = [segs[row] for row in keep]
        self._keep(keep)
        if self.rows:
            lens = torch.tensor([len(seg) for seg in segs], device=self.device)
            self.last_pos = self.last_pos + lens  # a smashed segment sits at its last token's position
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
            self.state = self.stepper.advance(segs, self.mask, self.last_pos[:, None], self.cache, self.rule)
            for s in self.rows:
                s.macro_steps += 1
        return finished

    def fail_all(self, message: str) -> None:
        """After an exception inside the model: finish every row with the error, start empty."""
        for s in self.rows:
            s.finish("error", message)
        self._keep([])

    def _keep(self, rows: list[int]) -> None:
        if len(rows) == len(self.rows):
            return
        if not rows:
            self.rows, self.cache = [], None
            self.mask = self.last_pos = self.state = None
            return
        sel = torch.tensor(rows, device=self.device)
        self.cache.batch_select_indices(sel)
        self.mask, self.last_pos, self.state = self.mask[sel], self.last_pos[sel], self.state[sel]
        self.rows = [self.rows[r] for r in rows]
        self._trim()

    def _trim(self) -> None:
        """Drop leading cache columns that are padding for every remaining row."""
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start == 0:
            return
        trimmed = self.stepper.new_cache()
        for idx, layer in enumerate(self.cache.layers):
            trimmed.update(
                layer.keys[:, :, start:].contiguous(), layer.values[:, :, start:].contiguous(), idx
            )
        self.cache = trimmed
        self.mask = self.mask[:, start:]


def decode_all(batch: ContinuousBatch, seqs: list[Sequence], max_batch: int = 16) -> list[Sequence]:
    """Decode `seqs` to the end on this thread, at most max_batch at a time, joining as rows leave."""
    waiting = list(seqs)
    while waiting or len(batch):
        free = max_batch - len(batch)
        if free > 0 and waiting:
            batch.join(waiting[:free])
            waiting = waiting[free:]
        batch.step()
    return seqs
