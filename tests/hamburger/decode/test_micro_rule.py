"""The eager batch's batch-aware micro loop and its forced segment lengths (benchmark switch)."""

from __future__ import annotations

import pytest
from conftest import sharp_model

from hamburger.decode import generate
from hamburger.decode.continuous import ContinuousBatch, HAMburgerStepper, Sequence, decode_all
from hamburger.decode.forced import forced_lengths, geometric, tilted
from hamburger.decode.micro_rule import MicroRule

PROMPTS = [[5, 17, 33, 8, 61, 12], [9, 4], [70, 71, 72, 73, 74, 75, 76], [44, 3, 90]]


class FixedCosts(MicroRule):
    """A rule whose step costs are given, not measured, so its decisions are known."""

    def __init__(self, macro: float, micro: dict[int, float]):
        super().__init__()
        self.costs = {"base": {n: macro for n in range(1, 9)}, "head": {}, "micro": micro}

    def record(self, kind, rows, seconds) -> None:
        pass


def run(rule: MicroRule | None, forced: list[list[int]], max_new: int = 12) -> list[Sequence]:
    model = sharp_model()
    batch = ContinuousBatch(HAMburgerStepper(model), set())
    batch.rule = rule
    seqs = [
        Sequence(prompt_ids=p, max_new_tokens=max_new, ignore_eos=True, forced_lens=f)
        for p, f in zip(PROMPTS, forced, strict=True)
    ]
    return decode_all(batch, seqs, max_batch=len(seqs))


def test_the_rule_cuts_when_few_rows_go_on_and_not_when_most_do():
    rule = MicroRule()
    for n in (4, 8):
        rule.record("base", n, 1.0)
    rule.record("micro", 1, 0.3)  # one micro step costs 0.3 of a macro step at one row
    rule.record("micro", 3, 0.35)
    assert not rule.goes_on(1, 4)  # 1 token in 0.3 s < 4 tokens in 1 s
    assert rule.goes_on(3, 4)  # 3 tokens in 0.35 s > 4 in 1 s
    assert not rule.goes_on(1, 8) and rule.goes_on(3, 8)  # 3 / 0.35 > 8 / 1
    assert rule.goes_on(2, 4)  # not measured at 2 rows yet: it goes on, and gets measured
    assert rule.goes_on(1, 1)  # a batch of one never cuts


def test_cut_segments_end_early_and_are_never_longer():
    forced = [[4], [1], [1], [1]]  # one row wants 4 tokens per segment, three want 1
    free = run(None, forced)
    assert [s.seg_lens for s in free] == [[4, 4, 4], [1] * 12, [1] * 12, [1] * 12]
    cut = run(FixedCosts(1.0, {1: 0.5}), forced)  # 1 row of 4 going on: 1/0.5 < 4/1 -> cut
    assert cut[0].seg_lens == [1] * 12  # the long row's segments end after the base head's token
    for a, b in zip(cut, free, strict=True):
        assert all(x <= y for x, y in zip(a.seg_lens, b.seg_lens, strict=False))
    assert cut[0].forced_stop == [True] * 12  # a cut is not the stop head's decision
    most = run(FixedCosts(1.0, {3: 0.5}), [[4], [4], [4], [1]])  # 3 of 4 go on: 3/0.5 > 4/1
    assert [s.seg_lens for s in most][:3] == [[4, 4, 4]] * 3


def test_forced_lengths_replace_the_stop_head_and_a_batch_of_one_keeps_its_tokens():
    forced = [[3, 1, 2], [2], [1, 4], [4, 4, 1]]
    rule = MicroRule()
    seqs = run(rule, forced, max_new=10)  # timed costs; rows differ, so it may cut
    for s, f in zip(seqs, forced, strict=True):
        assert sum(s.seg_lens) == 10 and all(n <= f[t % len(f)] for t, n in enumerate(s.seg_lens))
    assert set(rule.costs["base"]) <= {1, 2, 3, 4} and rule.costs["micro"] and rule.costs["head"][4] > 0
    free = run(None, forced, max_new=10)
    for s, f in zip(free, forced, strict=True):  # without the rule: exactly the forced lengths
        want = [f[t % len(f)] for t in range(len(s.seg_lens))]
        assert s.seg_lens[:-1] == want[:-1] and s.seg_lens[-1] <= want[-1]
    model = sharp_model()  # one row alone: the rule never cuts, tokens are the reference's
    batch = ContinuousBatch(HAMburgerStepper(model), {2}, batch_aware=True)
    (alone,) = decode_all(batch, [Sequence(prompt_ids=PROMPTS[0], max_new_tokens=20, confidence=0.5)])
    ref = generate(model, PROMPTS[0], 20, 0.5, {2})
    assert (alone.tokens, alone.seg_lens) == (ref.tokens, ref.seg_lens)


def test_max_segment_len_caps_the_eager_batch():
    model = sharp_model()
    batch = ContinuousBatch(HAMburgerStepper(model), set(), max_segment_len=2)
    seqs = [Sequence(prompt_ids=p, max_new_tokens=9, confidence=0.0, ignore_eos=True) for p in PROMPTS]
    decode_all(batch, seqs)
    assert all(s.seg_lens == [2, 2, 2, 2, 1] for s in seqs)


def test_forced_lengths_have_the_mean_asked_for():
    probs = tilted(geometric(4), 2.0)
    assert sum((n + 1) * p for n, p in enumerate(probs)) == pytest.approx(2.0, abs=1e-6)
    lengths = forced_lengths(2.0, 4, seed=1, n=4000)
    assert set(lengths) == {1, 2, 3, 4} and sum(lengths) / len(lengths) == pytest.approx(2.0, abs=0.06)
    assert lengths == forced_lengths(2.0, 4, seed=1, n=4000)  # seeded
    with pytest.raises(ValueError, match=r"forced-tau must be in \[1, 4\]"):
        forced_lengths(5.0, 4, seed=1)
