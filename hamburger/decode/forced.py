"""Forced segment lengths: the benchmark switch that replaces the stop head by drawn lengths.

A random-weight or barely trained model's stop head says little about how a trained one would
segment, so the decoding benchmarks force segment lengths instead: each row draws its own
length for every macro step from one distribution with a chosen mean tau (rows differ, as a
trained model's do): a geometric one with the demo's labelled mean, tilted to mean tau (the GPU
check's decode section tilts the labelled histogram of its --manifest instead). Benchmarks and tests only: a forced row never asks
its stop head, so its text means nothing.
"""

from __future__ import annotations

import math
import random

DEMO_COMPRESSION = 1.58
"""Tokens per segment of the demo's labelled data (docs/BENCHMARKS.md, demo prep): the mean of
the geometric distribution forced lengths are tilted from."""


def geometric(k: int, mean: float = DEMO_COMPRESSION) -> list[float]:
    """P(length = 1..k): geometric on 1..inf with this mean, cut at k."""
    q = 1 - 1 / mean
    probs = [(1 - q) * q ** (n - 1) for n in range(1, k + 1)]
    return [p / sum(probs) for p in probs]


def tilted(probs: list[float], mean: float) -> list[float]:
    """The distribution p_n * exp(lam * n) with the given mean (same shape, shifted by lam)."""
    lo, hi = -30.0, 30.0
    for _ in range(100):
        lam = (lo + hi) / 2
        top = max(lam * (n + 1) for n in range(len(probs)))  # exponents shifted: no overflow at large K
        w = [p * math.exp(lam * (n + 1) - top) for n, p in enumerate(probs)]
        m = sum((n + 1) * x for n, x in enumerate(w)) / sum(w)
        lo, hi = (lam, hi) if m < mean else (lo, lam)
    return [x / sum(w) for x in w]


def draw(rng: random.Random, probs: list[float], n: int) -> list[int]:
    """n lengths in 1..len(probs), drawn with these probabilities."""
    return rng.choices(range(1, len(probs) + 1), weights=probs, k=n)


def forced_lengths(tau: float, k: int, seed: int, n: int = 512) -> list[int]:
    """One row's forced lengths (macro step t uses entry t % n): mean tau over 1..k, seeded."""
    if not 1.0 <= tau <= k:
        raise ValueError(f"forced-tau must be in [1, {k}] (segments of 1..{k} tokens), got {tau}")
    return draw(random.Random(seed), tilted(geometric(k), tau), n)
