"""Batched greedy decoding: many prompts at once, each choosing its own segment lengths.

Sequences advance by different token counts per macro step, but each adds exactly one KV entry
per macro step, so the base cache stays rectangular: prompts are left-padded (masked), every
step appends one column, and finished sequences are retired from the batch (their cache rows
dropped). The micro decoder runs only on the sequences still inside their segment.

`base_generate_batch` is the comparison: the base model alone, greedy, one token per forward,
with the same padding, cache and retirement, so speed ratios compare like with like.
"""

from __future__ import annotations

import torch

from hamburger.decode.eager import DecodeResult
from hamburger.decode.micro_rule import MicroRule
from hamburger.decode.steppers import BaseStepper, HAMburgerStepper, left_pad
from hamburger.model.config import DEFAULT_CONFIDENCE
from hamburger.model.hamburger import HAMburgerModel

DECODE_MODES = ("auto", "eager", "static", "graphed")
"""eager: this module (dynamic caches, finished rows retired); static: static_decode without
CUDA graphs; graphed: static_decode with CUDA graphs on a GPU (the same as static elsewhere);
auto: graphed on a GPU, static elsewhere (on CPU static and eager run at the same speed)."""


def resolve_mode(decode: str, model, cpu: str = "static") -> str:
    """The decoder a `decode` setting means for this model (auto: graphed on a GPU, else `cpu`:
    a fixed batch decodes as fast static as eager on CPU; a continuous one faster eager, since
    static slots compute every slot over every column whatever the load)."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    if decode == "auto":
        return "graphed" if next(model.parameters()).device.type == "cuda" else cpu
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
    from hamburger.decode.static import StaticBaseDecoder, StaticHAMburgerDecoder

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


@torch.no_grad()
def generate_batch(
    model: HAMburgerModel,
    prompts: list[list[int]],
    max_new_tokens: int = 128,
    confidence: float = DEFAULT_CONFIDENCE,
    eos_token_ids: set[int] | None = None,
    pad_id: int = 0,
    decode: str = "eager",
    batch_aware: bool = False,
    max_segment_len: int | None = None,
) -> list[DecodeResult]:
    """One DecodeResult per prompt, equal to `generate` run on each prompt alone.

    decode: eager (here), or static / graphed (static shapes, CUDA graphs on a GPU; see
    static_decode), which give the same tokens. batch_aware (batch > 1): the micro loop ends
    the segments of the few rows still in theirs when one more micro step for them costs more
    than it yields (StaticHAMburgerDecoder.generate; eager: hamburger/decode/micro_rule.py);
    outputs then differ from decoding each prompt alone (a cut row's next token comes from the
    base head, not the micro decoder). max_segment_len caps every segment below the model's K.
    """
    model.eval()
    decode = resolve_mode(decode, model)
    if decode != "eager":
        dec = _static_decoder(model, prompts, max_new_tokens, decode)
        cutoff = dec.measure_cutoff() if batch_aware and len(prompts) > 1 else 0.0  # once per decoder
        return dec.generate(
            prompts,
            eos_token_ids,
            confidence,
            max_new=max_new_tokens,
            micro_cutoff=cutoff,
            max_segment_len=max_segment_len,
        )
    confidences = [confidence] * len(prompts)
    stepper = HAMburgerStepper(model)
    aware = batch_aware and len(prompts) > 1
    rule = _RULES.setdefault((id(model), len(prompts)), MicroRule(stepper.device)) if aware else None
    k = min(stepper.max_segment_len, max_segment_len or stepper.max_segment_len)
    return _retiring_loop(stepper, prompts, max_new_tokens, confidences, eos_token_ids, pad_id, rule, k)


_RULES: dict[tuple[int, int], MicroRule] = {}
"""The eager batch-aware rule per (model, batch size): its measured costs carry over calls."""


def _retiring_loop(
    stepper, prompts, max_new_tokens, confidences, eos_token_ids, pad_id, rule=None, k=None
) -> list[DecodeResult]:
    """The loop both decoders share. Prefill the left-padded prompts; then, every macro step,
    each row takes its next segment (the stepper decides); finished rows (EOS or the budget) are
    recorded and retired (their cache rows dropped); the others feed their segment back as one
    new KV column at the position of its last token."""
    eos = eos_token_ids or set()
    device = stepper.device
    ids, mask, positions = left_pad(prompts, pad_id, device)
    cache = stepper.new_cache()
    state = stepper.prefill(ids, mask, positions, cache)
    results = [DecodeResult(tokens=[], seg_lens=[], macro_steps=1) for _ in prompts]
    active = list(range(len(prompts)))  # original index of each batch row
    last_pos = torch.tensor([len(p) - 1 for p in prompts], device=device)
    while True:
        budgets = [min(k or stepper.max_segment_len, max_new_tokens - len(results[i].tokens)) for i in active]
        segs, by_head = stepper.segments(state, budgets, [confidences[i] for i in active], eos, rule=rule)
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
        state = stepper.advance(segs, mask, last_pos[:, None], cache, rule)
        for i in active:
            results[i].macro_steps += 1


@torch.no_grad()
def base_generate_batch(
    base_lm,
    prompts: list[list[int]],
    max_new_tokens: int = 128,
    eos_token_ids: set[int] | None = None,
    pad_id: int = 0,
    decode: str = "eager",
) -> list[DecodeResult]:
    """The base model's own greedy decoding (one token per forward), same batching rules and
    the same `decode` modes as generate_batch."""
    base_lm.eval()
    decode = resolve_mode(decode, base_lm)
    if decode != "eager":
        dec = _static_decoder(base_lm, prompts, max_new_tokens, decode)
        return dec.generate(prompts, eos_token_ids, max_new=max_new_tokens)
    confidences = [1.0] * len(prompts)
    return _retiring_loop(BaseStepper(base_lm), prompts, max_new_tokens, confidences, eos_token_ids, pad_id)
