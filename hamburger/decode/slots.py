"""Continuous batching on the static decoder: a fixed number of slots, CUDA graphs on a GPU.

`SlotBatch` has ContinuousBatch's interface (rows, join, step, drop_cancelled, fail_all), so the
server's scheduler and the pyfunc run on it unchanged, but every step is the static decoder's
(static.py): preallocated KV caches for `slots` rows, every step the same shapes (free slots
are masked rows), replayed as CUDA graphs when `graphs` is on. The host reads one small
transfer per macro step (each row's new tokens) plus the micro loop's stop decisions.

Slots and columns. All rows write the same KV column at each step (`col`), which starts at
`max_prompt`. A request joins a free slot at a macro-step boundary: its prompt is prefilled
(with the other joiners of similar length, right-padded) into columns [0, n) of its row
(n <= max_prompt, so always columns the shared pointer has passed); keys carry their positions (RoPE), so where a column sits does not matter, only the
row's valid mask. When `col` reaches the end of the cache, the columns past the prompt area
are shifted left by what no live row still needs (every live row's generated columns end at
`col`, so one uniform shift keeps them all); a row lives at most max_new macro steps, and the
cache holds 2 x max_new such columns, so the shift always frees at least max_new.

The tokens are those of each prompt decoded alone (tests): positions are per row and a row
attends only to its own valid columns.
"""

from __future__ import annotations

import torch

from hamburger.decode.continuous import Sequence, prefill_groups
from hamburger.decode.masks import additive_mask, prompt_mask
from hamburger.decode.sampling import draw, next_tokens
from hamburger.decode.static import (
    StaticBaseDecoder,
    StaticHAMburgerDecoder,
    StaticKV,
    Step,
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
            self.logits = torch.zeros(slots, model.config.vocab_size, dtype=dec.dtype, device=dec.device)
            self.base_step = Step(self._base_slot_step, graphs, dec.device, dec._rewind)
        self.max_prompt, self.max_new, self.eos = max_prompt, max_new, set(eos)
        self.micro_cutoff = dec.measure_cutoff() if batch_aware and self.ham and slots > 1 else 0.0
        self.k = dec.k if self.ham else 1
        self.slots: list[Sequence | None] = [None] * slots
        self.start_col = [max_prompt] * slots  # where each row's generated columns begin
        self.col = max_prompt
        self.emitted = [0] * slots
        self.compactions = 0
        self.forcing = False  # a request with forced lengths has joined (host copy: no sync)
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
            # forced lengths (benchmarks): the step after a macro step (t = 1 inside advance,
            # which step() resets to 0) reads column 1 of the table, written before each step
            dec.forcing.fill_(False)
            dec.forced_period.fill_(2)
            dec.forced_buf.fill_(int(dec.k_limit))

    # ---------------------------------------------------------------- the ContinuousBatch interface
    @property
    def rows(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    def __len__(self) -> int:
        return sum(s is not None for s in self.slots)

    @property
    def micro_calls(self) -> int:
        """Micro-decoder calls the batch has made (for /metrics); a base makes none."""
        return self.dec.micro_calls if self.ham else 0

    @torch.no_grad()
    def join(self, seqs: list[Sequence]) -> None:
        """Each request into a free slot; requests of similar prompt length are prefilled
        together, in one call (prefill_groups)."""
        for s in seqs:
            if len(s.prompt_ids) > self.max_prompt or s.max_new_tokens > self.max_new:
                raise ValueError(
                    f"this slot batch holds prompts of <= {self.max_prompt} tokens and <= {self.max_new} new "
                    f"tokens, got {len(s.prompt_ids)} and {s.max_new_tokens}"
                )
            if self.ham and s.temperature > 0:
                raise ValueError("HAMburger decodes greedily: temperature > 0 is for base models")
        if len(seqs) > self.slots.count(None):  # the scheduler admits only what fits
            raise ValueError(f"{len(seqs)} requests for {self.slots.count(None)} free slots")
        for group in prefill_groups(seqs):
            rows = []
            for s in group:
                free = self.slots.index(None)
                self.slots[free] = s
                self.start_col[free] = self.col
                self.emitted[free] = 0
                s.macro_steps = 1
                rows.append(free)
            self._prefill(rows, group)

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
            if self.forcing:  # each row's next forced length, for the cap advance computes
                nxt = [self._cap_of(s, len(s.seg_lens) + 1) if s else 1 for s in self.slots]
                dec.forced_buf[:, 1] = torch.tensor(nxt, device=dec.device)
            dec.advance()
            dec.t.zero_()  # the decoder's per-step logs are not used here: keep their index in range
        else:
            by_head = torch.zeros_like(dec.done)
            self.base_step()
            self._sample_pending()
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
        self.logits.copy_(dec.base_lm.lm_head(hs[-1][:, -1]))
        dec.tok.copy_(self.logits.argmax(-1)[:, None])

    def _sample_pending(self) -> None:
        """Sampled rows replace their pending (argmax) token by a draw from the same logits,
        from their own generator: the draws ContinuousBatch makes, in the same order."""
        for r, s in enumerate(self.slots):
            if s is not None and s.temperature > 0:
                self.dec.tok[r] = draw(self.logits[r], s.temperature, s.top_p, s.generator)

    def _prefill(self, rows: list[int], seqs: list[Sequence]) -> None:
        """The prompts together (right-padded, each causal over its own tokens), each into
        columns [0, n) of its row; the rows' state reset for them."""
        dec, n = self.dec, [len(s.prompt_ids) for s in seqs]
        dev, w, g = dec.device, max(n), len(seqs)
        cfg = dec.base_lm.config
        tmp = StaticKV(cfg, cfg.num_hidden_layers, g, w, dec.dtype, dev)
        q = tmp.cols = torch.arange(w, device=dev)
        ids = torch.zeros(g, w, dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : n[j]] = torch.tensor(s.prompt_ids)
        real = q[None, :] < torch.tensor(n, device=dev)[:, None]  # [g, w]
        x = dec.inner.embed_tokens(ids.to(dev))
        inner = dec.inner
        hs = run_stack(
            inner.layers,
            inner.rotary_emb,
            inner.norm,
            x,
            q[None].expand(g, w),
            additive_mask(prompt_mask(real), dec.dtype),
            tmp,
        )
        idx = torch.tensor(rows, device=dev)
        for layer in range(cfg.num_hidden_layers):
            dec.kv.k[layer][idx, :, :w] = tmp.k[layer]
            dec.kv.v[layer][idx, :, :w] = tmp.v[layer]
        dec.valid[idx] = False
        dec.valid[idx, :w] = real
        last = torch.tensor(n, device=dev) - 1
        dec.last_pos[idx] = last
        for t in (dec.emitted, dec.kv_entries, dec.out_tok):
            t[idx] = 0
        dec.forwards[idx] = 1
        dec.done[idx] = False
        dec.max_new_t[idx] = torch.tensor([s.max_new_tokens for s in seqs], device=dev)
        dec.ignore_eos[idx] = torch.tensor([s.ignore_eos for s in seqs], device=dev)
        at_last = torch.arange(g, device=dev), last
        if self.ham:
            dec.conf[idx] = torch.tensor([s.confidence for s in seqs], dtype=dec.conf.dtype, device=dev)
            feats = torch.stack([h[at_last] for h in dec.model.features(hs)], dim=1)
            for j, (r, s) in enumerate(zip(rows, seqs, strict=True)):
                if s.forced_lens:  # benchmarks: the forced length caps, the stop head never stops
                    self.forcing = True
                    dec.forcing.fill_(True)
                    dec.conf[r] = 0.0
                dec.cap[r] = self._cap_of(s, 0)
                self._head_row(r, feats[j : j + 1])
        else:
            logits = dec.base_lm.lm_head(hs[-1][at_last])
            dec.tok[idx, 0] = torch.tensor(next_tokens(logits, seqs), device=dev)

    def _cap_of(self, s: Sequence, t: int) -> int:
        """The most tokens sequence s's segment t may have: its forced length, else the cap."""
        cap = int(self.dec.k_limit)
        return min(cap, s.forced_len(t)) if s.forced_lens else cap

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
