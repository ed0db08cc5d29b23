"""Static-shape batched greedy decoding for HAMburger and its base, optionally CUDA-graphed.

Same results as `batched_decode` token for token, built for speed on a GPU, where eager decoding
at small batch is bound by Python and kernel launches:
- every KV cache is preallocated ([B, H, L, hd], written in place at a device-side column), so
  every step has the same shapes and tensor addresses;
- rows never leave the batch: a finished row, or one whose segment has ended, keeps computing
  and its results are masked out, so each step is a fixed sequence of kernels;
- all bookkeeping (segment tokens, lengths, budgets, stop decisions, EOS, outputs) stays on the
  device; the host reads only the stop decisions (any row still in its segment? all done?);
- with `graphs=True` on CUDA each step (base step, each micro step, the end-of-step
  bookkeeping) is captured once as a CUDA graph and replayed. Without CUDA it runs the same
  code eagerly ("static" mode).

The base model goes through exactly the same machinery (`StaticBaseDecoder`), so speed ratios
compare like with like. Layers are driven one by one (as the micro decoder always was), with an
explicit additive mask, so no transformers mask or cache logic is involved.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hamburger.decode.eager import DecodeResult
from hamburger.decode.masks import additive_mask, prompt_mask
from hamburger.decode.timing import timed
from hamburger.model.compat import cache_kwargs
from hamburger.model.config import DEFAULT_CONFIDENCE
from hamburger.model.hamburger import HAMburgerModel


class StaticKV:
    """Preallocated keys and values of every layer; `update` writes at the columns `cols`.

    Duck-types the one method a Hugging Face attention layer calls on its cache, in every
    transformers version (extra arguments are ignored).
    """

    def __init__(self, config, layers: int, batch: int, length: int, dtype, device):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (batch, config.num_key_value_heads, length, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.cols = torch.zeros(1, dtype=torch.long, device=device)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.k[layer_idx].index_copy_(2, self.cols, key_states)
        self.v[layer_idx].index_copy_(2, self.cols, value_states)
        return self.k[layer_idx], self.v[layer_idx]


def run_stack(
    layers: nn.ModuleList, rotary: nn.Module, norm: nn.Module, x, position_ids, mask, cache
) -> list[torch.Tensor]:
    """Hidden states as transformers reports them: [input, layer 1, ..., norm(layer n)]."""
    pe = rotary(x, position_ids)
    hs = [x]
    for layer in layers:
        out = layer(
            x,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            position_embeddings=pe,
            **cache_kwargs(layer, cache),
        )
        x = out[0] if isinstance(out, tuple) else out
        hs.append(x)
    hs[-1] = norm(x)
    return hs


def capture(fn: Callable[[], None], prepare: Callable[[], None], device: torch.device):
    """fn as a CUDA graph (None off CUDA): two warm-up runs (allocator, lazy inits) on a side
    stream, then the captured run. Each run starts from `prepare()`: capturing runs the step
    three times for real, so the state it advances (columns, lengths) must start in range."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            prepare()
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    prepare()
    with torch.cuda.graph(graph):
        fn()
    return graph


class Step:
    """A function of device state only; replayed as a CUDA graph when `graphs` (on CUDA)."""

    @torch.no_grad()  # decoding never needs autograd, and a captured graph must not record it
    def __init__(
        self, fn: Callable[[], None], graphs: bool, device: torch.device, prepare: Callable[[], None]
    ):
        self.fn = fn
        self.graph = capture(fn, prepare, device) if graphs else None

    @torch.no_grad()
    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn()


class _Common:
    """State shared by both decoders: the base cache, prompts, outputs and stop bookkeeping."""

    def __init__(self, base_lm: nn.Module, batch: int, prompt_width: int, max_new: int, width_extra: int):
        p = next(base_lm.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.base_lm, self.inner = base_lm, base_lm.model
        cfg = base_lm.config
        self.batch, self.width, self.max_new = batch, prompt_width, max_new
        self.length = prompt_width + max_new  # KV columns: prompt + at most one per new token
        self.kv = StaticKV(cfg, cfg.num_hidden_layers, batch, self.length, self.dtype, self.device)
        dev, long = self.device, torch.long
        self.col = torch.zeros(1, dtype=long, device=dev)  # the column the next step writes
        self.kv.cols = self.col
        self.valid = torch.zeros(batch, self.length, dtype=torch.bool, device=dev)
        self.last_pos = torch.zeros(batch, dtype=long, device=dev)
        self.emitted = torch.zeros(batch, dtype=long, device=dev)
        self.done = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.forwards = torch.ones(batch, dtype=long, device=dev)
        self.kv_entries = torch.zeros(batch, dtype=long, device=dev)
        self.out_tok = torch.zeros(batch, max_new + 2 * width_extra, dtype=long, device=dev)
        self.junk = max_new + width_extra  # finished rows write here
        self.eos_table = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=dev)
        self.max_new_t = torch.full((batch,), max_new, device=dev)  # per row: slots differ (slots.py)
        self.ignore_eos = torch.zeros(batch, dtype=torch.bool, device=dev)  # EOS ends its segment only

    def reset(
        self, prompts: list[list[int]], eos: set[int], max_new: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero the state for new prompts (left-padded); returns (ids, positions) for prefill.

        max_new (default: the capacity) is device state, so one decoder (and its graphs) serves
        every length up to the capacity it was built for."""
        max_new = self.max_new if max_new is None else max_new
        if len(prompts) != self.batch or max(len(p) for p in prompts) > self.width or max_new > self.max_new:
            raise ValueError(
                f"this static decoder holds {self.batch} prompts of <= {self.width} tokens and "
                f"<= {self.max_new} new tokens, got {len(prompts)} of <= {max(len(p) for p in prompts)} "
                f"and {max_new}"
            )
        self.max_new_t.fill_(max_new)
        ids = torch.zeros(self.batch, self.width, dtype=torch.long)
        mask = torch.zeros(self.batch, self.width, dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, self.width - len(p) :] = torch.tensor(p)
            mask[i, self.width - len(p) :] = True
        ids, mask = ids.to(self.device), mask.to(self.device)
        self.valid.zero_()
        self.valid[:, : self.width] = mask
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        self.last_pos.copy_(positions[:, -1])
        self.col.fill_(self.width)
        for t in (self.emitted, self.done, self.kv_entries, self.out_tok, self.eos_table, self.ignore_eos):
            t.zero_()
        self.forwards.fill_(1)
        if eos:
            self.eos_table[torch.tensor(sorted(eos), device=self.device)] = True
        return ids, positions

    def prefill(self, x: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        """The prompt, eagerly (one call, its own shapes): causal within each row's real tokens."""
        w = self.width
        allowed = prompt_mask(self.valid[:, :w])
        allowed = torch.cat([allowed, allowed.new_zeros(self.batch, w, self.length - w)], dim=2)
        self.kv.cols = torch.arange(w, device=self.device)
        mask = additive_mask(allowed, self.dtype)
        hs = run_stack(self.inner.layers, self.inner.rotary_emb, self.inner.norm, x, positions, mask, self.kv)
        self.kv.cols = self.col
        return hs

    def base_forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> list[torch.Tensor]:
        """One step for every row: writes column `col`, attends to every valid column."""
        self.valid.index_fill_(1, self.col, True)
        mask = additive_mask(self.valid[:, None, :], self.dtype)
        hs = run_stack(
            self.inner.layers, self.inner.rotary_emb, self.inner.norm, x, position_ids, mask, self.kv
        )
        self.col.add_(1)
        self.forwards.add_((~self.done).long())
        return hs

    def record(self, seg_tok: torch.Tensor, seg_len: torch.Tensor) -> None:
        """Append each unfinished row's segment to its output; mark rows that end here."""
        active = ~self.done
        k = seg_tok.shape[1]
        start = torch.where(active, self.emitted, torch.full_like(self.emitted, self.junk))
        idx = start[:, None] + torch.arange(k, device=self.device)[None]
        self.out_tok.scatter_(1, idx, seg_tok)
        self.emitted.add_(torch.where(active, seg_len, torch.zeros_like(seg_len)))
        last = seg_tok.gather(1, (seg_len - 1)[:, None])[:, 0]
        fin = active & ((self.eos_table[last] & ~self.ignore_eos) | (self.emitted >= self.max_new_t))
        self.kv_entries.copy_(torch.where(fin, self.valid.sum(1), self.kv_entries))
        self.done.logical_or_(fin)

    def all_done(self) -> bool:
        return bool(self.done.all())  # host sync: a stop decision

    def _rewind(self) -> None:
        """The in-range state a CUDA-graph capture starts each of its runs from (column 0,
        nothing emitted); `reset` sets the real state before decoding."""
        for t in (self.col, self.emitted, self.last_pos, self.done):
            t.zero_()


class StaticBaseDecoder(_Common):
    """Greedy decoding with the base model alone (one token per step), static shapes."""

    def __init__(self, base_lm: nn.Module, batch: int, prompt_width: int, max_new: int, graphs: bool):
        super().__init__(base_lm, batch, prompt_width, max_new, width_extra=1)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.ones = torch.ones(batch, dtype=torch.long, device=self.device)
        self.step = Step(self._step, graphs, self.device, self._rewind)

    def _head(self, h_last: torch.Tensor) -> None:
        self.tok.copy_(self.base_lm.lm_head(h_last).argmax(-1)[:, None])
        self.record(self.tok, self.ones)

    def _step(self) -> None:
        self.last_pos.add_(1)
        x = self.inner.embed_tokens(self.tok)
        hs = self.base_forward(x, self.last_pos[:, None])
        self._head(hs[-1][:, -1])

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], eos: set[int] | None = None, max_new: int | None = None
    ) -> list[DecodeResult]:
        ids, positions = self.reset(prompts, eos or set(), max_new)
        hs = self.prefill(self.inner.embed_tokens(ids), positions)
        self._head(hs[-1][:, -1])
        while not self.all_done():
            self.step()
        return self.results([[1] * n for n in self.emitted.tolist()], None)

    def results(self, seg_lens: list[list[int]], by_head: list[list[bool]] | None) -> list[DecodeResult]:
        toks, fw, kv = self.out_tok.tolist(), self.forwards.tolist(), self.kv_entries.tolist()
        return [
            DecodeResult(
                tokens=toks[i][: sum(seg_lens[i])],
                seg_lens=seg_lens[i],
                forced_stop=[not b for b in by_head[i]] if by_head else [True] * len(seg_lens[i]),
                macro_steps=fw[i],
                kv_entries=kv[i],
            )
            for i in range(self.batch)
        ]


class StaticHAMburgerDecoder(StaticBaseDecoder):
    """HAMburger greedy decoding, static shapes: base step, micro steps 1..K-1, bookkeeping.

    `forced_seg_lens` (benchmarks and tests only) replaces the stop head by fixed segment
    lengths: row r's segment at macro step t has forced_seg_lens[r, t % S] tokens (fewer only
    when EOS or max_new cuts it).
    """

    def __init__(self, model: HAMburgerModel, batch: int, prompt_width: int, max_new: int, graphs: bool):
        k = model.config.max_segment_len
        _Common.__init__(self, model.base, batch, prompt_width, max_new, width_extra=k)
        self.model, self.k = model, k
        dev, long = self.device, torch.long
        f = model.micro.num_features
        self.micro_kv = StaticKV(
            model.micro.config, len(model.micro.layers), batch, f + k - 1, self.dtype, dev
        )
        self.seg_tok = torch.zeros(batch, k, dtype=long, device=dev)
        self.seg_len = torch.ones(batch, dtype=long, device=dev)
        self.live = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.by_head = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.cap = torch.full((batch,), k, dtype=long, device=dev)  # forced lengths, else k_limit
        self.k_limit = torch.full((), k, dtype=long, device=dev)  # at most this many tokens per segment
        self.conf = torch.zeros(batch, dtype=torch.float64, device=dev)  # per row: slots differ
        d = model.base.config.hidden_size
        self.feats = torch.zeros(batch, len(model.feature_layers), d, dtype=self.dtype, device=dev)
        # + 4: spare columns (the speculative last step of a graphed decode writes one more)
        self.seg_log = torch.zeros(batch, max_new + 4, dtype=long, device=dev)
        self.head_log = torch.zeros(batch, max_new + 4, dtype=torch.bool, device=dev)
        self.t = torch.zeros(1, dtype=long, device=dev)  # macro step index
        self.forced_buf = torch.ones(batch, max_new + 4, dtype=long, device=dev)  # benchmark switch
        self.forced_period = torch.ones((), dtype=long, device=dev)
        self.forcing = torch.zeros((), dtype=torch.bool, device=dev)
        # (all done, rows still in their segment, unfinished rows): read with one host sync
        self.flags = torch.zeros(3, dtype=long, device=dev)
        self.micro_calls = 0
        self.macro_steps = 0
        self.cuts = 0  # macro steps whose micro loop the batch-aware rule ended early
        self.cutoff: float | None = None  # measure_cutoff's result, once measured
        self.micro_plan = []
        for j in range(1, k):  # micro step j feeds [slots, e(t_1)] (j = 1) or e(t_j); emits t_{j+1}
            q = f + 1 if j == 1 else 1
            start = 0 if j == 1 else f + j - 1
            cols = torch.arange(start, start + q, device=dev)
            allowed = torch.arange(f + k - 1, device=dev)[None, :] <= cols[:, None]
            mask = additive_mask(allowed[None], self.dtype)
            self.micro_plan.append((j, cols, cols[None].expand(batch, -1), mask))
        self.speculative = graphs and dev.type == "cuda"  # see _advance
        self.base_step = Step(self._base_step, graphs, dev, self._rewind)  # alone: for benchmarks
        self.micro_steps = [
            Step(lambda p=p: self._micro(*p), graphs, dev, self._rewind) for p in self.micro_plan
        ]
        self.advance = Step(self._advance, graphs, dev, self._rewind)

    def _rewind(self) -> None:
        """In-range state for each run of a CUDA-graph capture: column 0, macro step 0, one-token
        segments, no live row. (Three micro-step runs from a live row would grow a segment past
        K and index outside it: a device-side assert on the GPU.)"""
        super()._rewind()
        self.t.zero_()
        self.seg_len.fill_(1)
        self.live.zero_()

    # ------------------------------------------------------------------ device-side steps
    def _head(self, feats: torch.Tensor) -> None:
        """Token 1 of each segment from h_L and its stop decision (features kept for micro step 1)."""
        m = self.model
        self.feats.copy_(feats)
        tok, stop = m.first_token(feats[:, -1])
        self.seg_tok.zero_()
        self.seg_tok[:, 0] = tok
        self.seg_len.fill_(1)
        self.live.copy_(~self.done)
        self.by_head.zero_()
        self._decide(tok, stop, 1)

    def _decide(self, tok: torch.Tensor, stop: torch.Tensor, n: int, rows: slice = slice(None)) -> None:
        """After a segment's n-th token: does each live row go on (as batched_decode decides)?
        rows: the rows tok and stop belong to (all; the slot batch decides for one joiner)."""
        budget = torch.minimum((self.max_new_t[rows] - self.emitted[rows]).clamp(max=self.k), self.cap[rows])
        cont = (1 - torch.sigmoid(stop.float())).double()
        forced = self.eos_table[tok] | (budget <= n)
        head_stops = ~forced & (cont < self.conf[rows])
        self.by_head[rows].logical_or_(self.live[rows] & head_stops)
        self.live[rows].logical_and_(~forced & ~head_stops)

    def _micro(self, j: int, cols: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> None:
        m = self.model
        emb = m.embed_tokens(self.seg_tok[:, j - 1 : j])
        x = torch.cat([m.micro.features_in(self.feats), emb], dim=1) if j == 1 else emb
        self.micro_kv.cols = cols
        mc = m.micro
        o = run_stack(mc.layers, mc.rotary_emb, mc.norm, x, positions, mask, self.micro_kv)[-1][:, -1]
        tok, stop = m.lm_head(o).argmax(-1), m.stop_head(o)
        self.seg_tok[:, j] = torch.where(self.live, tok, self.seg_tok[:, j])
        self.seg_len.add_(self.live.long())
        self._decide(tok, stop, j + 1)

    def _finish(self) -> None:
        active = ~self.done
        self.seg_log.index_copy_(1, self.t, torch.where(active, self.seg_len, 0)[:, None])
        self.head_log.index_copy_(1, self.t, (self.by_head & active)[:, None])
        self.record(self.seg_tok, self.seg_len)
        self.t.add_(1)

    def _cap_from_table(self) -> None:
        """This macro step's forced segment lengths (benchmark switch), else K."""
        forced = self.forced_buf.index_select(1, self.t % self.forced_period)[:, 0]
        self.cap.copy_(torch.where(self.forcing, forced, self.k_limit.expand_as(forced)))

    def _advance(self) -> None:
        """End this macro step and start the next: record the segments, feed them to the base,
        leave both stop decisions in `flags` (read with one host sync). Graphed (speculative),
        this is one graph and the base step runs even when every row is done (its result is
        never read); static, it is skipped then."""
        self._finish()
        if not self.speculative and bool(self.done.all()):
            self.flags.copy_(torch.tensor([1, 0, 0]))
            return
        self._cap_from_table()
        self._base_step()
        self._set_flags()

    def _set_flags(self) -> None:
        self.flags.copy_(torch.stack([self.done.all().long(), self.live.sum(), (~self.done).sum()]))

    def _base_step(self) -> None:
        m = self.model
        x = m.embedder.forward_dense(m.embed_tokens(self.seg_tok), self.seg_len)[:, None]
        self.last_pos.add_(self.seg_len)  # a smashed segment sits at the position of its last token
        hs = self.base_forward(x, self.last_pos[:, None])
        self._head(torch.stack([h[:, -1] for h in m.features(hs)], dim=1))

    def measure_cutoff(self, n: int = 8) -> float:
        """The batch-aware micro loop's threshold at this decoder's batch size (see generate):
        t_micro / t_macro, measured on its own steps (graphed if it is). A micro step for c of
        the batch's a unfinished rows yields c tokens in t_micro; ending their segments instead
        brings the next macro step (t_macro, a tokens) sooner. So the micro step pays while
        c / a >= t_micro / t_macro; at batch 1 (c = a) it always does, unless a micro step costs
        more than a whole macro step. Measured once per decoder (then cached); the first call
        leaves the state undefined: generate resets it."""
        if self.cutoff is not None:
            return self.cutoff
        if not self.micro_steps:
            self.cutoff = 0.0
            return self.cutoff
        self.done.fill_(True)  # no live row: timed steps leave every segment as it is
        self.live.zero_()
        n = max(1, min(n, self.max_new))
        costs = []
        for fn in (self.base_step, self.micro_steps[min(1, len(self.micro_steps) - 1)]):
            self.col.fill_(self.width)
            fn()
            self.col.fill_(self.width)
            costs.append(timed(fn, n, self.device))
        self.cutoff = costs[1] / costs[0]
        return self.cutoff

    # ------------------------------------------------------------------ host loop
    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        eos: set[int] | None = None,
        confidence: float = DEFAULT_CONFIDENCE,
        forced_seg_lens: torch.Tensor | None = None,
        max_new: int | None = None,
        micro_cutoff: float = 0.0,
        max_segment_len: int | None = None,
    ) -> list[DecodeResult]:
        """Greedy decode of one batch. micro_cutoff > 0 makes the micro loop know its batch: before
        each micro step, if fewer than micro_cutoff of the unfinished rows are still in their
        segment, those rows end their segments now (their next token then comes from the base
        head) instead of the whole batch paying for a micro step that few rows use. The
        worthwhile cutoff is t_micro / t_macro (measure_cutoff): one micro step then
        yields tokens at least as fast as the macro step that ending would bring forward.
        max_segment_len (<= K) caps every segment, e.g. a smaller K for larger batches."""
        ids, positions = self.reset(prompts, eos or set(), max_new)
        for t in (self.seg_log, self.head_log, self.t):
            t.zero_()
        self.conf.fill_(0.0 if forced_seg_lens is not None else confidence)
        self.k_limit.fill_(min(self.k, max_segment_len or self.k))
        self._load_forced(forced_seg_lens)
        self._cap_from_table()
        hs = self.prefill(self.inner.embed_tokens(ids), positions)
        self._head(torch.stack([h[:, -1] for h in self.model.features(hs)], dim=1))
        self._set_flags()
        _, live, active = self.flags.tolist()  # host syncs read only stop decisions
        while True:
            self.micro_loop(live, active, micro_cutoff)
            self.advance()
            self.macro_steps += 1
            all_done, live, active = self.flags.tolist()
            if all_done:
                break
        n_steps = int(self.t)
        seg = [[n for n in row if n] for row in self.seg_log[:, :n_steps].tolist()]
        head = self.head_log[:, :n_steps].tolist()
        return self.results(seg, [h[: len(s)] for h, s in zip(head, seg, strict=True)])

    def micro_loop(self, live: int, active: int, micro_cutoff: float) -> None:
        """The micro steps of one macro step, while any of the `active` unfinished rows is still
        in its segment (`live` of them now); see generate for micro_cutoff."""
        for j, micro in enumerate(self.micro_steps):
            if live and live < micro_cutoff * active:
                self.live.zero_()  # segments end here; by_head stays False for them
                self.cuts += 1
                live = 0
            if not live:
                break
            micro()
            self.micro_calls += 1
            if j + 1 < len(self.micro_steps):
                live = int(self.live.sum())

    def _load_forced(self, forced: torch.Tensor | None) -> None:
        """Macro step t forces forced[:, t % S]; steps never exceed max_new, so the table is cut
        to the buffer's width (a longer period repeats after the last step anyway)."""
        self.forcing.fill_(forced is not None)
        if forced is None:
            return
        if forced.shape[0] != self.batch or forced.ndim != 2 or int(forced.min()) < 1:
            raise ValueError(
                f"forced_seg_lens must be [{self.batch}, S] lengths >= 1, got {tuple(forced.shape)}"
            )
        width = min(forced.shape[1], self.forced_buf.shape[1])
        self.forced_buf[:, :width] = forced[:, :width].to(self.device, torch.long)
        self.forced_period.fill_(width)
