"""Self-distillation (`responses: regenerate`): the base model writes every response first.

Fine-tuning on the base's own outputs teaches the grafted modules to reproduce the base,
instead of pulling the base toward another distribution. The prompts of one shard are decoded
together by the project's batched decoder (`base_generate_batch`: left padding, one KV cache,
finished rows retired), in batches of similar prompt length so padding stays small. A shard is
the unit of resume: its responses are a pure function of its prompts and the settings (greedy,
or sampling from a generator seeded by (seed, shard)), so a shard redone after a kill writes
exactly what the first try would have written.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch

from .config import GenerateConfig


@dataclass
class Generated:
    tokens: list[int]
    """The response: ends with EOS, unless it was cut at max_new_tokens."""
    cut: bool
    """True when the response reached max_new_tokens without EOS."""


def sampler(temperature: float, top_p: float, generator: torch.Generator):
    """logits [n, V] -> next tokens [n]: softmax(logits / temperature), nucleus-cut at top_p
    (the smallest set of most likely tokens whose probability reaches top_p; the most likely
    token is always kept), drawn with `generator`."""

    def pick(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        if top_p < 1:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            before = sorted_p.cumsum(-1) - sorted_p  # mass of the strictly more likely tokens
            sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)

    return pick


def shard_generator(seed: int, shard: str) -> torch.Generator:
    """A CPU generator seeded by (seed, shard name): the same shard always samples the same."""
    digest = hashlib.sha256(f"{seed}|{shard}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


class Regenerator:
    """Writes responses with `model` (a causal LM) under GenerateConfig; counts what it did."""

    def __init__(self, model, cfg: GenerateConfig, eos_id: int, pad_id: int):
        context = getattr(model.config, "max_position_embeddings", None)
        if context is not None and cfg.max_new_tokens >= context:
            raise ValueError(
                f"generate.max_new_tokens ({cfg.max_new_tokens}) cannot fit in the model's context "
                f"({context} positions) with any prompt; lower generate.max_new_tokens"
            )
        self.model = model
        self.cfg = cfg
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.seconds = 0.0
        self.tokens = 0

    def responses(self, prompts: list[list[int]], shard: str) -> list[Generated]:
        """One response per prompt (in the given order), decoded `batch_size` prompts at a time,
        shortest prompts together."""
        # lazy: the model package (and transformers) load only when a prep regenerates
        from hamburger.decode.batched import base_generate_batch

        t0 = time.perf_counter()
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        extra = {}
        if self.cfg.temperature > 0:
            gen = shard_generator(self.cfg.seed, shard)
            extra["pick"] = sampler(self.cfg.temperature, self.cfg.top_p, gen)
        out: list[Generated | None] = [None] * len(prompts)
        for start in range(0, len(order), self.cfg.batch_size):
            idx = order[start : start + self.cfg.batch_size]
            results = base_generate_batch(
                self.model,
                [prompts[i] for i in idx],
                max_new_tokens=self.cfg.max_new_tokens,
                eos_token_ids={self.eos_id},
                pad_id=self.pad_id,
                decode=self.cfg.decode,
                **extra,
            )
            for i, r in zip(idx, results, strict=True):
                out[i] = Generated(r.tokens, cut=r.tokens[-1] != self.eos_id)
                self.tokens += len(r.tokens)
        self.seconds += time.perf_counter() - t0
        return out  # type: ignore[return-value]
