"""Continuous batching on the static decoder: a fixed number of slots, CUDA graphs on a GPU.

`SlotBatch` has ContinuousBatch's interface (rows, join, step, drop_cancelled, fail_all), so the
server's scheduler and the pyfunc run on it unchanged, but every step is the static decoder's
(static.py): preallocated KV caches for `slots` rows, every step the same shapes (free slots
are masked rows), replayed as CUDA graphs when `graphs` is on. The host reads one small
transfer per macro step (each row's new tokens) plus the micro loop's stop decisions.

Slots and columns. All rows write the same KV column at each step (`col`), which starts at
`max_prompt`. A request joins a free slot at a macro-step boundary: its prompt is prefilled alone
into columns [0, n) of its row (n <= max_prompt, so always columns the shared pointer has
passed); keys carry their positions (RoPE), so where a column sits does not matter, only the
row's valid mask. When `col` reaches the end of the cache, the columns past the prompt area
are shifted left by what no live row still needs (every live row's generated columns end at
`col`, so one uniform shift keeps them all); a row lives at most max_new macro steps, and the
cache holds 2 x max_new such columns, so the shift always frees at least max_new.

The tokens are those of each prompt decoded alone (tests): positions are per row and a row
attends only to its own valid columns.
"""

from __future__ import annotations

import torch

from hamburger.decode.continuous import Sequence
from hamburger.decode.static import (
    StaticBaseDecoder,
    StaticHAMburgerDecoder,
    StaticKV,
    Step,
    additive_mask,
    run_stack,
)
from hamburger.model.hamburger import HAMburgerModel


class SlotBatch:
    def __init__(
        self,
        model,
        slots: int,
        max_prompt: int,
        max_new: int,
        eos: set[int],
        graphs: bool = False,
        batch_aware: bool = False,
        max_segment_len: int | None = None,
    ):
        """batch_aware: the micro loop knows its batch (StaticHAMburgerDecoder.generate), with
        the cutoff measured here at `slots` rows; max_segment_len caps every segment below K."""
        self.ham = isinstance(model, HAMburgerModel)
        cls = StaticHAMburgerDecoder if self.ham else StaticBaseDecoder
        self.dec = dec = cls(model, slots, max_prompt, 2 * max_new, graphs)
        if not self.ham:  # captured first: a capture runs the step from a rewound state
            self.base_step = Step(self._base_slot_step, graphs, dec.device, dec._rewind)
        self.max_prompt, self.max_new, self.eos = max_prompt, max_new, set(eos)
        self.micro_cutoff = dec.measure_cutoff() if batch_aware and self.ham and slots > 1 else 0.0
        self.k = dec.k if self.ham else 1
        self.slots: list[Sequence | None] = [None] * slots
        self.start_col = [max_prompt] * slots  # where each row's generated columns begin
        self.col = max_prompt
        self.emitted = [0] * slots
        self.compactions = 0
        dec.eos_table.zero_()
        if self.eos:
            dec.eos_table[torch.tensor(sorted(self.eos), device=dec.device)] = True
        dec.done.fill_(True)  # every slot free
        dec.valid.zero_()
        dec.col.fill_(max_prompt)
        for t in (dec.emitted, dec.out_tok, dec.last_pos):
            t.zero_()
        if self.ham:
            dec.live.zero_()
            dec.k_limit.fill_(min(dec.k, max_segment_len or dec.k))
            dec.cap.fill_(int(dec.k_limit))

    # ---------------------------------------------------------------- the ContinuousBatch interface
    @property
    def rows(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    def __len__(self) -> int:
        return sum(s is not None for s in self.slots)

    @torch.no_grad()
    def join(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            if len(s.prompt_ids) > self.max_prompt or s.max_new_tokens > self.max_new:
                raise ValueError(
                    f"this slot batch holds prompts of <= {self.max_prompt} tokens and <= {self.max_new} new "
                    f"tokens, got {len(s.prompt_ids)} and {s.max_new_tokens}"
                )
            free = self.slots.index(None)  # ValueError when full: the scheduler admits only what fits
            self._prefill(free, s)
            self.slots[free] = s
            self.start_col[free] = self.col
            self.emitted[free] = 0
            s.macro_steps = 1

    def drop_cancelled(self) -> list[Sequence]:
        gone = [s for s in self.rows if s.cancel_reason is not None]
        for s in gone:
            s.finish(s.cancel_reason)
            self._leave(self.slots.index(s))
        return gone

    def fail_all(self, message: str) -> None:
        for r, s in enumerate(self.slots):
            if s is not None:
                s.finish("error", message)
                self._leave(r)

    @torch.no_grad()
    def step(self) -> list[Sequence]:
        """One macro step for every occupied slot: emit a segment each, retire the finished."""
        if not len(self):
            return []
        if self.col + 1 > self.dec.length:
            self._compact()
        dec = self.dec
        if self.ham:
            dec.micro_loop(int(dec.live.sum()), len(self), self.micro_cutoff)
            by_head = dec.by_head.clone()
            dec.advance()
            dec.t.zero_()  # the decoder's per-step logs are not used here: keep their index in range
        else:
            by_head = torch.zeros_like(dec.done)
            self.base_step()
        before = torch.tensor(self.emitted, device=dec.device)
        idx = (before[:, None] + torch.arange(self.k, device=dec.device)[None]).clamp(
            max=dec.out_tok.shape[1] - 1
        )
        read = torch.cat([dec.emitted[:, None], by_head.long()[:, None], dec.out_tok.gather(1, idx)], 1)
        rows = read.tolist()
        self.col = int(dec.col)
        finished = []
        for r, s in enumerate(self.slots):
            if s is None:
                continue
            emitted, head, *toks = rows[r]
            seg = toks[: emitted - self.emitted[r]]
            self.emitted[r] = emitted
            s.tokens += seg
            s.seg_lens.append(len(seg))
            s.forced_stop.append(not head)
            reason = s.after_segment(seg, self.eos)
            if reason is None:
                s.macro_steps += 1
            else:
                finished.append(s)
                s.finish(reason)
                self._leave(r)
        return finished

    # ---------------------------------------------------------------- inside
    def _base_slot_step(self) -> None:
        """The base's macro step in the ContinuousBatch order: emit each row's pending token,
        then feed it (the next pending token comes from the new logits)."""
        dec = self.dec
        dec.record(dec.tok, dec.ones)
        dec.last_pos.add_(1)
        hs = dec.base_forward(dec.inner.embed_tokens(dec.tok), dec.last_pos[:, None])
        dec.tok.copy_(dec.base_lm.lm_head(hs[-1][:, -1]).argmax(-1)[:, None])

    def _prefill(self, r: int, s: Sequence) -> None:
        """The prompt alone, into columns [0, n) of row r; the row's state reset for it."""
        dec, n = self.dec, len(s.prompt_ids)
        dev = dec.device
        cfg = dec.base_lm.config
        tmp = StaticKV(cfg, cfg.num_hidden_layers, 1, n, dec.dtype, dev)
        tmp.cols = torch.arange(n, device=dev)
        q = torch.arange(n, device=dev)
        mask = additive_mask((q[None, :] <= q[:, None])[None], dec.dtype)
        x = dec.inner.embed_tokens(torch.tensor([s.prompt_ids], device=dev))
        inner = dec.inner
        hs = run_stack(inner.layers, inner.rotary_emb, inner.norm, x, q[None], mask, tmp)
        for layer in range(cfg.num_hidden_layers):
            dec.kv.k[layer][r, :, :n] = tmp.k[layer][0]
            dec.kv.v[layer][r, :, :n] = tmp.v[layer][0]
        dec.valid[r] = False
        dec.valid[r, :n] = True
        dec.last_pos[r] = n - 1
        for t in (dec.emitted, dec.kv_entries, dec.out_tok):
            t[r] = 0
        dec.forwards[r] = 1
        dec.done[r] = False
        dec.max_new_t[r] = s.max_new_tokens
        dec.ignore_eos[r] = s.ignore_eos
        if self.ham:
            dec.conf[r] = s.confidence
            self._head_row(r, torch.stack([h[:, -1] for h in dec.model.features(hs)], dim=1))
        else:
            dec.tok[r] = dec.base_lm.lm_head(hs[-1][:, -1]).argmax(-1)

    def _head_row(self, r: int, feats: torch.Tensor) -> None:
        """Token 1 of row r's first segment and its stop decision (StaticHAMburgerDecoder._head
        for one row)."""
        dec = self.dec
        dec.feats[r] = feats[0]
        tok, stop = dec.model.first_token(feats[:, -1])
        dec.seg_tok[r] = 0
        dec.seg_tok[r, 0] = tok[0]
        dec.seg_len[r] = 1
        dec.live[r] = True
        dec.by_head[r] = False
        dec._decide(tok, stop, 1, rows=slice(r, r + 1))

    def _leave(self, r: int) -> None:
        self.slots[r] = None
        self.dec.done[r] = True
        if self.ham:
            self.dec.live[r] = False

    def _compact(self) -> None:
        """Shift the columns past the prompt area left by what no live row needs any more."""
        dec, w = self.dec, self.max_prompt
        need = max(
            (self.col - self.start_col[r] for r, s in enumerate(self.slots) if s is not None), default=0
        )
        shift = self.col - (w + need)
        if shift <= 0:
            raise RuntimeError(f"slot batch: no KV column to free (a row has lived {need} macro steps)")
        for cache in (dec.kv.k, dec.kv.v):
            for t in cache:
                t[:, :, w : w + need] = t[:, :, w + shift : self.col].clone()
        dec.valid[:, w : w + need] = dec.valid[:, w + shift : self.col].clone()
        dec.valid[:, w + need :] = False
        self.col -= shift
        self.compactions += 1
        dec.col.fill_(self.col)
        self.start_col = [max(w, c - shift) for c in self.start_col]
