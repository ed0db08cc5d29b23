"""Segment strategies: one sample's per-token difficulty values -> segment lengths (1..K each).

Pure functions over a 1-D sequence of values (entropy, or surprisal -log p, in nats), one per
response token. Every strategy returns lengths that sum to len(values), each in 1..K. A
token either *joins* the current segment or *starts* a new one; each strategy is the rule
that decides, token by token, as documented on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


def confidence_entropy(confidence: float, vocab_size: int) -> float:
    """Entropy (nats) of a distribution over `vocab_size` tokens whose top token has probability
    `confidence` and whose remaining mass is spread evenly over the other tokens: the reference's
    threshold for "the model is about this confident" (4.139 nats at 0.7 for a 128,256-token
    vocabulary, 0.787 at 0.95)."""
    p, rest = confidence, 1.0 - confidence
    return -(p * math.log(p) + rest * math.log(rest / (vocab_size - 1)))


def _segments(values: Sequence[float], joins: Callable[[list[float], float], bool], k: int) -> list[int]:
    lengths: list[int] = []
    current: list[float] = []
    for v in values:
        if current and len(current) < k and joins(current, float(v)):
            current.append(float(v))
        else:
            if current:
                lengths.append(len(current))
            current = [float(v)]
    if current:
        lengths.append(len(current))
    return lengths


def decreasing_v2(values: Sequence[float], k: int = 4, min_threshold: float = 0.05, ratio: float = 0.3, **_):
    """Join if v < min_threshold or v < ratio * (largest value in the segment): each segment
    opens with its hard token and carries only easy ones. The paper's default."""
    return _segments(values, lambda seg, v: v < min_threshold or v < ratio * max(seg), k)


def decreasing(values: Sequence[float], k: int = 4, ratio: float = 0.3, **_):
    """Join while v <= ratio * (the segment's first value): every token of a segment is much
    easier than the one that opened it (the reference's rule)."""
    return _segments(values, lambda seg, v: v <= ratio * seg[0], k)


def sliding(values: Sequence[float], k: int = 4, sliding_confidence: float = 0.7, vocab_size: int = 2, **_):
    """Join while v is under the entropy of a sliding_confidence distribution over the
    vocabulary (see confidence_entropy)."""
    thr = confidence_entropy(sliding_confidence, vocab_size)
    return _segments(values, lambda seg, v: v < thr, k)


def small_group(
    values: Sequence[float], k: int = 4, small_group_confidence: float = 0.95, vocab_size: int = 2, **_
):
    """Easy tokens (v under the small_group_confidence entropy over the vocabulary) group
    together; a hard token stands alone (it neither joins a segment nor lets the next token join it)."""
    thr = confidence_entropy(small_group_confidence, vocab_size)
    return _segments(values, lambda seg, v: v < thr and seg[0] < thr, k)


def fixed(values: Sequence[float], k: int = 4, fixed_k: int = 2, **_):
    """Segments of fixed_k tokens regardless of difficulty (the last may be shorter): a baseline."""
    return _segments(values, lambda seg, v: len(seg) < fixed_k, k)


STRATEGIES: dict[str, Callable[..., list[int]]] = {
    "decreasing_v2": decreasing_v2,
    "decreasing": decreasing,
    "sliding": sliding,
    "small_group": small_group,
    "fixed": fixed,
}


def segment(values: Sequence[float], label_cfg, vocab_size: int) -> list[int]:
    """Apply the configured strategy with every threshold from the config; vocab_size is the
    scoring model's (the confidence thresholds of sliding and small_group depend on it)."""
    fn = STRATEGIES[label_cfg.strategy]
    return fn(
        values,
        vocab_size=vocab_size,
        k=label_cfg.max_segment_len,
        min_threshold=label_cfg.min_threshold,
        ratio=label_cfg.ratio,
        sliding_confidence=label_cfg.sliding_confidence,
        small_group_confidence=label_cfg.small_group_confidence,
        fixed_k=label_cfg.fixed_k,
    )
