"""Greedy HAMburger decoding of one prompt, with KV caches for the base and the micro decoder.

Positions follow training exactly: prompt tokens at 0..P-1, each smashed segment at the
position of its last token. The batched decoder of the eval stage must agree with this one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from hamburger.model.compat import cache_kwargs
from hamburger.model.config import DEFAULT_CONFIDENCE
from hamburger.model.hamburger import HAMburgerModel


@dataclass(kw_only=True)
class DecodeResult:
    """One decoded sequence, from every decoder (eager, batched, static, continuous) and from
    `load().generate()`: the same fields under the same names everywhere."""

    tokens: list[int] = field(default_factory=list)
    seg_lens: list[int] = field(default_factory=list)
    forced_stop: list[bool] = field(default_factory=list)
    """Per segment: True when it ended by K, EOS or the length limit, not by the stop head."""
    macro_steps: int = 0
    """Base forward passes, the prefill counted as one."""
    kv_entries: int = 0
    """Base KV-cache entries of this sequence at the end: prompt + one per macro step after the
    prefill (the last segment is emitted but never fed back)."""
    text: str = ""
    """The tokens decoded to text, where the caller has a tokenizer (load().generate())."""

    @property
    def tokens_per_macro_step(self) -> float:
        """Generated tokens / base forward passes (the prefill counted as one)."""
        return len(self.tokens) / max(self.macro_steps, 1)


@torch.no_grad()
def generate(
    model: HAMburgerModel,
    prompt_ids: list[int],
    max_new_tokens: int = 128,
    confidence: float = DEFAULT_CONFIDENCE,
    eos_token_ids: set[int] | None = None,
) -> DecodeResult:
    """Emit segments until EOS or max_new_tokens; stop a segment once P(continue) < confidence."""
    model.eval()
    eos = eos_token_ids or set()
    k = model.config.max_segment_len
    device = next(model.parameters()).device
    base = model.base.model
    cache = DynamicCache(config=model.base.config)
    ids = torch.tensor([prompt_ids], device=device)
    out = base(
        input_ids=ids,
        position_ids=torch.arange(len(prompt_ids), device=device)[None],
        **cache_kwargs(base, cache),
        use_cache=True,
        output_hidden_states=True,
    )
    result = DecodeResult(tokens=[], seg_lens=[], macro_steps=1)
    pos = len(prompt_ids) - 1
    while True:
        feats = torch.stack([h[:, -1] for h in model.features(out.hidden_states)], dim=1)  # [1, F, D]
        budget = min(k, max_new_tokens - len(result.tokens))
        seg, by_head = _segment(model, feats, budget, confidence, eos)
        result.tokens += seg
        result.seg_lens.append(len(seg))
        result.forced_stop.append(not by_head)
        if seg[-1] in eos or len(result.tokens) >= max_new_tokens:
            result.kv_entries = cache.get_seq_length()
            return result
        pos += len(seg)
        seg_t = torch.tensor([seg + [0] * (k - len(seg))], device=device)
        x = model.smash(seg_t, torch.tensor([len(seg)], device=device))[:, None]
        out = base(
            inputs_embeds=x,
            position_ids=torch.tensor([[pos]], device=device),
            **cache_kwargs(base, cache),
            use_cache=True,
            output_hidden_states=True,
        )
        result.macro_steps += 1


def _segment(model: HAMburgerModel, feats: torch.Tensor, budget: int, confidence: float, eos: set[int]):
    """One macro step's micro loop. Returns (tokens, stopped_by_head)."""
    tok, stop = model.first_token(feats[:, -1])
    seg = [int(tok)]
    micro_cache = None
    pending = model.micro.features_in(feats)  # the F feature slots, fed with the first token
    while True:
        if seg[-1] in eos or len(seg) >= budget:
            return seg, False
        if 1 - torch.sigmoid(stop).item() < confidence:
            return seg, True
        if micro_cache is None:
            micro_cache = DynamicCache(config=model.micro.config)
        x = torch.cat([pending, model.embed_tokens(tok)[:, None]], dim=1)
        tok, stop = model.micro_step(x, micro_cache)
        pending = x[:, :0]
        seg.append(int(tok))
