"""Per-request sampling: temperature, nucleus (top-p) and one seeded generator per sequence.

Each sampled sequence draws from its own CPU generator, so its tokens depend only on its own
logits and its seed: not on what else is in the batch, the batch size, the order rows joined,
or which engine (eager continuous batch, static slots, CUDA graphs) ran it. Greedy rows
(temperature 0) take the argmax, as every decoder here always has.
"""

from __future__ import annotations

import hashlib

import torch

NUCLEUS_FIRST = 64
"""nucleus_probs sorts only this many most likely tokens when they hold top_p of the mass."""


def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """logits [..., V] -> softmax(logits / temperature) cut to the smallest set of most likely
    tokens whose probability reaches top_p (the most likely token is always kept), in fp32."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1:
        return probs
    # the nucleus is nearly always among the few most likely tokens: sort those, not the vocabulary
    top, order = probs.topk(min(NUCLEUS_FIRST, probs.shape[-1]), dim=-1)
    if not bool((top.sum(-1) >= top_p).all()):
        top, order = probs.sort(dim=-1, descending=True)
    before = top.cumsum(-1) - top  # mass of the strictly more likely tokens
    top = top.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, top)


def draw(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token from logits [V]: sampled on the CPU from `generator` (so a seed means the same
    draw on every device)."""
    probs = nucleus_probs(logits, temperature, top_p).cpu()
    return int(torch.multinomial(probs[None], 1, generator=generator))


def seeded_generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded by a hash of `parts` (e.g. (seed, shard, row)): the same parts
    always give the same stream, different parts independent ones."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def next_tokens(logits: torch.Tensor, rows: list) -> list[int]:
    """Each row's next token from logits [n, V]: the argmax for greedy rows, a draw for rows
    (Sequences) with temperature > 0 from their own generator."""
    tokens = logits.argmax(-1).tolist()
    for i, s in enumerate(rows):
        if s.temperature > 0:
            tokens[i] = draw(logits[i], s.temperature, s.top_p, s.generator)
    return tokens
