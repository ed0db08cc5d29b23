"""Batched greedy decoding: many prompts at once, each choosing its own segment lengths.

Sequences advance by different token counts per macro step, but each adds exactly one KV entry
per macro step, so the base cache stays rectangular: prompts are left-padded (masked), every
step appends one column, and finished sequences are retired from the batch (their cache rows
dropped). The micro decoder runs only on the sequences still inside their segment.

`base_generate_batch` is the comparison: the base model alone, greedy, one token per forward,
with the same padding, cache and retirement, so speed ratios compare like with like.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from transformers import DynamicCache

from .compat import cache_kwargs
from .decode import DecodeResult
from .hamburger import HAMburgerModel

DECODE_MODES = ("eager", "static", "graphed")
"""eager: this module (dynamic caches, finished rows retired); static: static_decode without
CUDA graphs; graphed: static_decode with CUDA graphs on a GPU (the same as static elsewhere)."""


def _check_mode(decode: str) -> str:
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    return decode


_DECODERS: dict[tuple, object] = {}
"""Recently used static decoders (their caches and CUDA graphs are built once per shape)."""
_KEEP_DECODERS = 16
_WIDTH_STEP = 32  # prompt widths are rounded up to this, so batches of similar prompts share one
_MIN_CAPACITY = 256  # graphed new-token capacity: at least this, else the next power of two


def _static_decoder(model, prompts: list[list[int]], max_new_tokens: int, decode: str):
    """A static decoder for this model, batch size, padded prompt width and new-token capacity
    (reused; graphed: a warm-up of 2 tokens builds the decoder, and captures the graphs, that
    the real runs of up to 256 tokens use)."""
    from .static_decode import StaticBaseDecoder, StaticHAMburgerDecoder

    width = -(-max(len(p) for p in prompts) // _WIDTH_STEP) * _WIDTH_STEP
    capacity = max_new_tokens  # static: building a decoder costs a few allocations
    if decode == "graphed":  # graphed: capturing costs, and attending to spare columns is cheap on a GPU
        capacity = max(_MIN_CAPACITY, 1 << (max_new_tokens - 1).bit_length())
    param = next(model.parameters())
    key = (id(model), param.dtype, param.device, decode, len(prompts), width, capacity)
    if key not in _DECODERS:
        while len(_DECODERS) >= _KEEP_DECODERS:
            _DECODERS.pop(next(iter(_DECODERS)))
        cls = StaticHAMburgerDecoder if isinstance(model, HAMburgerModel) else StaticBaseDecoder
        _DECODERS[key] = cls(model, len(prompts), width, capacity, graphs=decode == "graphed")
    return _DECODERS[key]


def _left_pad(
    prompts: list[list[int]], pad_id: int, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, device=device)
        mask[i, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@torch.no_grad()
def generate_batch(
    model: HAMburgerModel,
    prompts: list[list[int]],
    max_new_tokens: int = 128,
    confidence: float = 0.9,
    eos_token_ids: set[int] | None = None,
    pad_id: int = 0,
    decode: str = "eager",
) -> list[DecodeResult]:
    """One DecodeResult per prompt, equal to `generate` run on each prompt alone.

    decode: eager (here), or static / graphed (static shapes, CUDA graphs on a GPU; see
    static_decode), which give the same tokens.
    """
    model.eval()
    if _check_mode(decode) != "eager":
        dec = _static_decoder(model, prompts, max_new_tokens, decode)
        return dec.generate(prompts, eos_token_ids, confidence, max_new=max_new_tokens)
    base = model.base.model
    k = model.config.max_steps
    cache = DynamicCache(config=model.base.config)

    def run_base(**inputs):
        return base(**inputs, **cache_kwargs(base, cache), use_cache=True, output_hidden_states=True)

    def next_segments(out, budgets: list[int]):
        feats = torch.stack([h[:, -1] for h in model.features(out.hidden_states)], dim=1)  # [n, F, D]
        return _segments(model, feats, [min(k, b) for b in budgets], confidence, eos_token_ids or set())

    def feed(segs: list[list[int]], mask: torch.Tensor, positions: torch.Tensor):
        lens = torch.tensor([len(s) for s in segs], device=mask.device)
        seg_t = torch.tensor([s + [0] * (k - len(s)) for s in segs], device=mask.device)
        return run_base(
            inputs_embeds=model.smash(seg_t, lens)[:, None], attention_mask=mask, position_ids=positions
        )

    device = next(model.parameters()).device
    return _retiring_loop(
        prompts, max_new_tokens, eos_token_ids, pad_id, device, cache, run_base, next_segments, feed
    )


def _retiring_loop(
    prompts, max_new_tokens, eos_token_ids, pad_id, device, cache, prefill, next_segments, feed
):
    """The loop both decoders share. Prefill the left-padded prompts; then, every macro step,
    each row takes its next segment; finished rows (EOS or the budget) are recorded and retired
    (their cache rows dropped); the others feed their segment back as one new KV column at the
    position of its last token. prefill(input_ids=, attention_mask=, position_ids=) and
    feed(segments, mask, positions) return what next_segments(state, budgets) reads."""
    eos = eos_token_ids or set()
    ids, mask, positions = _left_pad(prompts, pad_id, device)
    state = prefill(input_ids=ids, attention_mask=mask, position_ids=positions)
    results = [DecodeResult(tokens=[], seg_lens=[], base_forwards=1) for _ in prompts]
    active = list(range(len(prompts)))  # original index of each batch row
    last_pos = torch.tensor([len(p) - 1 for p in prompts], device=device)
    while True:
        segs, by_head = next_segments(state, [max_new_tokens - len(results[i].tokens) for i in active])
        keep = []
        for row, i in enumerate(active):
            r = results[i]
            r.tokens += segs[row]
            r.seg_lens.append(len(segs[row]))
            r.forced_stop.append(not by_head[row])
            if segs[row][-1] in eos or len(r.tokens) >= max_new_tokens:
                r.kv_entries = int(mask[row].sum())
            else:
                keep.append(row)
        if not keep:
            return results
        if len(keep) < len(active):  # retire finished sequences
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            mask, last_pos = mask[sel], last_pos[sel]
            segs = [segs[row] for row in keep]
            active = [active[row] for row in keep]
        last_pos = last_pos + torch.tensor(
            [len(s) for s in segs], device=device
        )  # a segment sits at its last token
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        state = feed(segs, mask, last_pos[:, None])
        for i in active:
            results[i].base_forwards += 1


def _segments(
    model: HAMburgerModel, feats: torch.Tensor, budgets: list[int], confidence: float, eos: set[int]
):
    """One macro step's micro loop for every row at once. Returns (segments, stopped_by_head)."""
    n = feats.shape[0]
    tok, stop = model.first_token(feats[:, -1])
    segs = [[t] for t in tok.tolist()]
    by_head = [False] * n

    def still_going(rows: list[int], stops: torch.Tensor) -> list[int]:
        cont = (1 - torch.sigmoid(stops.float())).tolist()
        going = []
        for row, c in zip(rows, cont, strict=True):
            if segs[row][-1] in eos or len(segs[row]) >= budgets[row]:
                continue
            if c < confidence:
                by_head[row] = True
                continue
            going.append(row)
        return going

    live = still_going(list(range(n)), stop)
    cache, prev = None, []
    slots = model.micro.features_in(feats)
    while live:
        rows = torch.tensor(live, device=feats.device)
        last = model.embed_tokens(torch.tensor([segs[r][-1] for r in live], device=feats.device))[:, None]
        if cache is None:
            cache = DynamicCache(config=model.micro.config)
            x = torch.cat([slots[rows], last], dim=1)
        else:
            cache.batch_select_indices(torch.tensor([prev.index(r) for r in live], device=feats.device))
            x = last
        tok, stop = model.micro_step(x, cache)
        for r, t in zip(live, tok.tolist(), strict=True):
            segs[r].append(t)
        prev = live
        live = still_going(live, stop)
    return segs, by_head


@torch.no_grad()
def base_generate_batch(
    base_lm,
    prompts: list[list[int]],
    max_new_tokens: int = 128,
    eos_token_ids: set[int] | None = None,
    pad_id: int = 0,
    decode: str = "eager",
    pick: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[DecodeResult]:
    """The base model's own greedy decoding (one token per forward), same batching rules and
    the same `decode` modes as generate_batch. `pick` maps the last logits [n, V] of the rows
    still running to their next tokens [n] (default argmax: greedy); data_prep's
    self-distillation samples with it (eager mode only)."""
    base_lm.eval()
    if _check_mode(decode) != "eager":
        if pick is not None:
            raise ValueError(f"pick (e.g. sampling) needs decode='eager', got decode={decode!r}")
        dec = _static_decoder(base_lm, prompts, max_new_tokens, decode)
        return dec.generate(prompts, eos_token_ids, max_new=max_new_tokens)
    cache = DynamicCache(config=base_lm.config)

    def run_base(logits_to_keep: int = 0, **inputs):
        out = base_lm(**inputs, **cache_kwargs(base_lm, cache), use_cache=True, logits_to_keep=logits_to_keep)
        return out.logits[:, -1]

    def next_segments(logits: torch.Tensor, budgets: list[int]):
        toks = (logits.argmax(-1) if pick is None else pick(logits)).tolist()
        return [[t] for t in toks], [False] * len(toks)  # one token per forward, never the stop head

    def feed(segs: list[list[int]], mask: torch.Tensor, positions: torch.Tensor):
        toks = torch.tensor([s[0] for s in segs], device=mask.device)[:, None]
        return run_base(input_ids=toks, attention_mask=mask, position_ids=positions)

    device = next(base_lm.parameters()).device
    prefill = partial(run_base, 1)  # the prompt's last position only
    return _retiring_loop(
        prompts, max_new_tokens, eos_token_ids, pad_id, device, cache, prefill, next_segments, feed
    )
