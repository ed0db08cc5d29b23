"""Self-distillation (`responses: regenerate`): the base model writes every response first.

Fine-tuning on the base's own outputs teaches the grafted modules to reproduce the base,
instead of pulling the base toward another distribution. The prompts of one shard run through
one continuous batch of `batch_size` rows (shortest prompts first): a row that ends (EOS or
max_new_tokens) leaves at once and the next prompt joins in its place, so the batch stays full
until the shard's last prompts (a fixed batch would run at the pace of its longest response
with rows idling). On CPU that batch is the eager one (hamburger/decode/continuous.py); with
`decode: static | graphed` (auto: graphed on a GPU) it is the slot engine
(hamburger/decode/slots.py), CUDA graphs on a GPU. A shard is the unit of resume: greedy
responses are a pure function of the prompts and the settings, and a sampled response draws
from its own generator seeded by (seed, shard, row), so a shard redone after a kill writes
exactly what the first try would have written, whatever the batch size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .config import GenerateConfig

PROMPT_STEP = 64
"""The slot engine's prompt area is rounded up to this many tokens, so shards of similar prompts
share one engine."""


@dataclass
class Generated:
    tokens: list[int]
    """The response: ends with EOS, unless it was cut at max_new_tokens."""
    cut: bool
    """True when the response reached max_new_tokens without EOS."""


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
        self._device = next(model.parameters()).device
        self._slots = None  # the slot engine, when decode is static or graphed

    def responses(self, prompts: list[list[int]], shard: str) -> list[Generated]:
        """One response per prompt (in the given order); see the module docstring."""
        # lazy: the model package (and transformers) load only when a prep regenerates
        from hamburger.decode.continuous import Sequence, decode_all
        from hamburger.decode.sampling import seeded_generator

        t0 = time.perf_counter()
        cfg = self.cfg
        seqs = [
            Sequence(
                tokens=[],
                seg_lens=[],
                prompt_ids=p,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                generator=seeded_generator(cfg.seed, shard, i) if cfg.temperature > 0 else None,
            )
            for i, p in enumerate(prompts)
        ]
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        batch = self._batch(max(len(p) for p in prompts))
        decode_all(batch, [seqs[i] for i in order], max_batch=cfg.batch_size)
        out = [Generated(s.tokens, cut=s.tokens[-1] != self.eos_id) for s in seqs]
        self.tokens += sum(len(g.tokens) for g in out)
        self.seconds += time.perf_counter() - t0
        return out

    def _batch(self, longest_prompt: int):
        """The continuous batch for prompts of up to `longest_prompt` tokens: eager, or slots
        (kept while the prompts fit: building one captures its CUDA graphs)."""
        from hamburger.decode.batched import resolve_mode
        from hamburger.decode.continuous import BaseStepper, ContinuousBatch
        from hamburger.decode.slots import SlotBatch

        mode = resolve_mode(self.cfg.decode, self.model, cpu="eager")
        eos = {self.eos_id}
        if mode == "eager":
            return ContinuousBatch(BaseStepper(self.model), eos, self.pad_id, self._device)
        width = -(-longest_prompt // PROMPT_STEP) * PROMPT_STEP
        if self._slots is None or self._slots.max_prompt < width:
            self._slots = SlotBatch(
                self.model, self.cfg.batch_size, width, self.cfg.max_new_tokens, eos, graphs=mode == "graphed"
            )
        return self._slots
