"""Segment strategies on hand-made difficulty sequences: the contract and the rule, token by token."""

from __future__ import annotations

import random

import pytest

from data_prep.config import LabelConfig
from data_prep.strategies import (
    STRATEGIES,
    confidence_entropy,
    decreasing,
    decreasing_v2,
    segment,
    sliding,
    small_group,
)

VOCAB = 128_256  # Llama-3.2's vocabulary, the reference's setting


def cuts(lengths: list[int]) -> list[list[int]]:
    out, start = [], 0
    for n in lengths:
        out.append(list(range(start, start + n)))
        start += n
    return out


def join_rule(name: str, cfg: LabelConfig):
    """The documented rule, restated independently: may token v join segment `seg` (its values)?"""
    k = cfg.max_segment_len
    if name == "decreasing_v2":
        return lambda seg, v: len(seg) < k and (v < cfg.min_threshold or v < cfg.ratio * max(seg))
    if name == "decreasing":
        return lambda seg, v: len(seg) < k and v <= cfg.ratio * seg[0]
    if name == "sliding":
        return lambda seg, v: len(seg) < k and v < confidence_entropy(cfg.sliding_confidence, VOCAB)
    if name == "small_group":
        t = confidence_entropy(cfg.small_group_confidence, VOCAB)
        return lambda seg, v: len(seg) < k and v < t and seg[0] < t
    if name == "fixed":
        return lambda seg, v: len(seg) < min(k, cfg.fixed_k)
    raise AssertionError(name)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_contract_and_rule_token_by_token(name):
    cfg = LabelConfig(strategy=name)
    may_join = join_rule(name, cfg)
    rng = random.Random(7)
    for trial in range(200):
        n = rng.randint(1, 40)
        values = [rng.choice([0.0, 0.01, 0.04, 0.2, 0.5, 1.0, 3.0]) * rng.random() * 3 for _ in range(n)]
        lengths = segment(values, cfg, VOCAB)
        assert sum(lengths) == n and all(1 <= x <= cfg.max_segment_len for x in lengths), (trial, lengths)
        segs = cuts(lengths)
        for si, seg in enumerate(segs):
            vals = [values[i] for i in seg]
            for j in range(1, len(vals)):  # every token inside a segment satisfied the rule
                assert may_join(vals[:j], vals[j]), (name, vals)
            if si > 0:  # every segment start failed it against the segment before
                prev = [values[i] for i in segs[si - 1]]
                assert not may_join(prev, vals[0]), (name, prev, vals[0])


def test_decreasing_v2_examples():
    # hard token opens, easy ones join; 0.04 < min_threshold joins even after a tiny opener
    assert decreasing_v2([2.0, 0.1, 0.5, 0.01, 3.0, 0.04]) == [4, 2]
    assert decreasing_v2([2.0, 0.7]) == [1, 1]  # 0.7 >= 0.3 * 2.0: a new segment


def test_decreasing_v2_boundaries_exact():
    assert decreasing_v2([2.0, 0.59]) == [2]  # 0.59 < 0.3 * 2.0
    assert decreasing_v2([2.0, 0.61]) == [1, 1]
    assert decreasing_v2([0.01] * 9) == [4, 4, 1]  # K caps a run of easy tokens
    assert decreasing_v2([0.1, 0.049]) == [2]  # under min_threshold always joins
    assert decreasing_v2([]) == []


def test_small_group_hard_tokens_stand_alone():
    assert small_group([0.01, 0.01, 2.0, 0.01, 0.01, 0.01, 0.01, 0.01], vocab_size=VOCAB) == [2, 1, 4, 1]


def test_reference_thresholds_computed_by_hand():
    # p = 0.7:  -(0.7 ln 0.7) - 0.3 ln(0.3 / 128255) = 0.24968 + 0.3 * 12.96584 = 4.13943
    assert confidence_entropy(0.7, VOCAB) == pytest.approx(4.13943, abs=1e-4)
    # p = 0.95: -(0.95 ln 0.95) - 0.05 ln(0.05 / 128255) = 0.04873 + 0.05 * 14.75738 = 0.78660
    assert confidence_entropy(0.95, VOCAB) == pytest.approx(0.78660, abs=1e-4)


def test_decreasing_compares_with_the_segment_first_value():
    # ratio 0.3 of the opener 2.0 is 0.6: 0.5, 0.4 and 0.59 all join (a previous-token rule would
    # have cut at 0.4 > 0.3 * 0.5); K = 4 then closes the segment and 1.0 opens the next.
    assert decreasing([2.0, 0.5, 0.4, 0.59, 1.0]) == [4, 1]
    # 0.6 <= 0.6 joins (the reference's <=); 0.61 > 0.6 opens a new segment, 0.1 <= 0.183 joins it
    assert decreasing([2.0, 0.6, 0.61, 0.1]) == [2, 2]


def test_sliding_uses_the_vocabulary_threshold():
    # threshold 4.139 nats at 0.7: 4.0 joins the opener, 4.2 does not; then 1.0 and 0.3 join 4.2
    assert sliding([5.0, 4.0, 4.2, 1.0, 0.3], vocab_size=VOCAB) == [2, 3]
    # threshold 0.787 at 0.95 for small_group: 0.7 is easy, 0.9 hard and alone
    assert small_group([0.5, 0.7, 0.9, 0.1, 0.2, 0.3, 0.1, 0.05], vocab_size=VOCAB) == [2, 1, 4, 1]


def test_label_config_rejects_bad_values():
    with pytest.raises(ValueError, match="label.strategy"):
        LabelConfig(strategy="greedy").validate()
    with pytest.raises(ValueError, match="label.ratio"):
        LabelConfig(ratio=1.5).validate()
    with pytest.raises(ValueError, match="label.fixed_k"):
        LabelConfig(fixed_k=9).validate()
