"""Self-distillation (`responses: regenerate`): the base model writes every response first.

Fine-tuning on the base's own outputs teaches the grafted modules to reproduce the base,
instead of pulling the base toward another distribution. The prompts of one shard run through
one continuous batch of `batch_size` rows (shortest prompts first): a row that ends (EOS or
max_new_tokens) leaves at once and the next prompt joins in its place, and once a shard's
prompts have all joined the next shard's start, so the batch stays full until a rank's last
prompts (a fixed batch would run at the pace of its longest response with rows idling). On
CPU that batch is the eager one (hamburger/decode/continuous.py); with `decode: static |
graphed` (auto: graphed on a GPU) it is the slot engine (hamburger/decode/slots.py), CUDA graphs
on a GPU. A shard is the unit of resume: greedy responses are a pure function of the prompts and
the settings, and a sampled response draws from its own generator seeded by (seed, shard, row),
so a shard redone after a kill writes exactly what the first try would have written, whatever
the batch size.
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
        self._live = None  # the batch, while it holds rows of the next shard
        self._carried: dict[str, list] = {}  # the next shard's sequences, started ahead
        self._joined: set[int] = set()  # ids of the carried sequences that joined the batch

    def responses(
        self, prompts: list[list[int]], shard: str, upcoming: tuple[str, list[list[int]]] | None = None
    ) -> list[Generated]:
        """One response per prompt (in the given order); see the module docstring.

        upcoming: the next shard's (name, prompts). Once every prompt of this shard has joined,
        its free rows start on those, so the batch does not drain at each shard's end; the next
        call, which must be for that shard, finishes them (a shard's responses do not depend on
        when they started, so a resumed run writes the same)."""
        if not prompts:
            return []
        t0 = time.perf_counter()
        mine = self._carried.pop(shard, None)
        if self._carried or (mine is not None and [s.prompt_ids for s in mine] != prompts):
            raise RuntimeError(f"regenerate: shard {shard} is not the shard started ahead")
        mine = mine or self._sequences(prompts, shard)
        batch = self._live if self._live is not None else self._batch(max(map(len, prompts)))
        later: list = []
        if upcoming is not None and upcoming[1] and self._fits(batch, upcoming[1]):
            later = self._carried[upcoming[0]] = self._sequences(upcoming[1], upcoming[0])
        queue = [s for s in self._by_length(mine) + self._by_length(later) if id(s) not in self._joined]
        while any(s.finish_reason is None for s in mine):
            free = self.cfg.batch_size - len(batch)
            if free > 0 and queue:
                batch.join(queue[:free])
                self._joined.update(id(s) for s in queue[:free])
                queue = queue[free:]
            batch.step()
        self._live = batch if len(batch) else None
        self._joined = {id(s) for s in later if id(s) in self._joined}
        out = [Generated(s.tokens, cut=s.tokens[-1] != self.eos_id) for s in mine]
        self.tokens += sum(len(g.tokens) for g in out)
        self.seconds += time.perf_counter() - t0
        return out

    def _sequences(self, prompts: list[list[int]], shard: str) -> list:
        from hamburger.decode.continuous import Sequence
        from hamburger.decode.sampling import seeded_generator

        cfg = self.cfg
        return [
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

    @staticmethod
    def _by_length(seqs: list) -> list:
        """Shortest prompts first (joiners of similar length prefill together)."""
        return sorted(seqs, key=lambda s: len(s.prompt_ids))

    def _fits(self, batch, prompts: list[list[int]]) -> bool:
        """Whether `batch` can take these prompts (a slot engine holds prompts up to its width)."""
        return not hasattr(batch, "max_prompt") or max(map(len, prompts)) <= batch.max_prompt

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
