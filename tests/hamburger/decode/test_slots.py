"""Continuous batching on the static decoder (hamburger/decode/slots.py): requests joining and
leaving fixed slots at macro-step boundaries get the tokens each prompt gets decoded alone, for
HAMburger and for the plain base, through KV-column compaction, with per-request budgets,
confidences and ignore_eos."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import sharp_model

from hamburger.decode import base_generate_batch, generate
from hamburger.decode.continuous import BaseStepper, ContinuousBatch, HAMburgerStepper, Sequence, decode_all
from hamburger.decode.sampling import seeded_generator
from hamburger.decode.slots import SlotBatch

EOS = 2


def requests(n: int, seed: int = 0) -> list[Sequence]:
    rng = random.Random(seed)
    return [
        Sequence(
            prompt_ids=[rng.randrange(3, 90) for _ in range(rng.randint(1, 9))],
            max_new_tokens=rng.randint(1, 10),
            confidence=rng.choice([0.3, 0.5, 0.9]),
            ignore_eos=rng.random() < 0.3,
        )
        for _ in range(n)
    ]


def run(batch, seqs: list[Sequence], slots: int, rng: random.Random) -> int:
    """Join a random number of waiting requests at each boundary (as the scheduler does)."""
    waiting, steps = list(seqs), 0
    while waiting or len(batch):
        free = slots - len(batch)
        take = rng.randint(0, free) if len(batch) else max(1, rng.randint(0, free))
        batch.join(waiting[:take])
        waiting = waiting[take:]
        batch.step()
        steps += 1
    return steps


def fields(s: Sequence):
    return s.tokens, s.seg_lens, s.finish_reason, s.macro_steps


def test_slots_give_each_prompt_its_own_tokens_with_joins_leaves_and_compaction():
    model = sharp_model()
    seqs = requests(80)
    # max_new 10: the cache holds 9 + 20 columns, so 80 requests pass through compaction
    batch = SlotBatch(model, slots=3, max_prompt=9, max_new=10, eos={EOS})
    steps = run(batch, seqs, 3, random.Random(1))
    assert steps > 40
    ref = requests(80)
    cont = ContinuousBatch(HAMburgerStepper(model), {EOS})
    run(cont, ref, 3, random.Random(1))
    assert [fields(s) for s in seqs] == [fields(s) for s in ref]
    for s in seqs:  # and each equals the prompt decoded alone
        if not s.ignore_eos:
            alone = generate(model, s.prompt_ids, s.max_new_tokens, s.confidence, {EOS})
            assert (s.tokens, s.seg_lens) == (alone.tokens, alone.seg_lens)
    assert all(s.finish_reason in ("stop", "length") for s in seqs)
    assert batch.compactions > 0 and batch.col < batch.dec.length and len(batch) == 0


def test_base_slots_equal_the_base_decoder():
    model = sharp_model()
    seqs = [Sequence(prompt_ids=s.prompt_ids, max_new_tokens=s.max_new_tokens) for s in requests(12, seed=3)]
    batch = SlotBatch(model.base, slots=4, max_prompt=9, max_new=10, eos={EOS})
    run(batch, seqs, 4, random.Random(2))
    for s in seqs:
        alone = base_generate_batch(model.base, [s.prompt_ids], s.max_new_tokens, {EOS})[0]
        assert s.tokens == alone.tokens and s.seg_lens == [1] * len(s.tokens)


def sampled(n: int, seed: int) -> list[Sequence]:
    """Base requests, every other one sampled (temperature 1, nucleus 0.9) from its own seed."""
    return [
        Sequence(
            prompt_ids=s.prompt_ids,
            max_new_tokens=s.max_new_tokens,
            temperature=1.0 if i % 2 == 0 else 0.0,
            top_p=0.9,
            generator=seeded_generator(seed, i) if i % 2 == 0 else None,
        )
        for i, s in enumerate(requests(n, seed=4))
    ]


def test_seeded_sampling_gives_each_request_its_tokens_in_any_batch():
    """A sampled request draws from its own generator: the slot engine, the eager continuous
    batch (other joins and leaves) and the request decoded alone give the same tokens."""
    base = sharp_model().base
    slots = sampled(16, seed=7)
    run(SlotBatch(base, slots=4, max_prompt=9, max_new=10, eos={EOS}), slots, 4, random.Random(5))
    eager = sampled(16, seed=7)
    run(ContinuousBatch(BaseStepper(base), {EOS}), eager, 3, random.Random(6))
    alone = sampled(16, seed=7)
    for s in alone:
        decode_all(ContinuousBatch(BaseStepper(base), {EOS}), [s], max_batch=1)
    assert [s.tokens for s in slots] == [s.tokens for s in eager] == [s.tokens for s in alone]
    greedy = [base_generate_batch(base, [s.prompt_ids], s.max_new_tokens, {EOS})[0].tokens for s in slots]
    assert all(s.tokens == g for s, g in zip(slots[1::2], greedy[1::2], strict=True))  # greedy rows
    assert [s.tokens for s in slots[::2]] != greedy[::2]  # the sampled rows did sample
    reseeded = sampled(16, seed=8)
    decode_all(ContinuousBatch(BaseStepper(base), {EOS}), reseeded, max_batch=4)
    assert [s.tokens for s in reseeded[::2]] != [s.tokens for s in slots[::2]]


def test_hamburger_refuses_sampling():
    model = sharp_model()
    seq = Sequence(prompt_ids=[5, 6], max_new_tokens=4, temperature=0.7, generator=seeded_generator(0))
    with pytest.raises(ValueError, match="greedily"):
        SlotBatch(model, slots=2, max_prompt=9, max_new=10, eos={EOS}).join([seq])
    batch = ContinuousBatch(HAMburgerStepper(model), {EOS})
    batch.join([seq])
    with pytest.raises(ValueError, match="greedily"):
        batch.step()


def test_cancelled_rows_leave_and_oversized_requests_are_refused():
    model = sharp_model()
    batch = SlotBatch(model, slots=2, max_prompt=9, max_new=10, eos={EOS})
    a, b = requests(2, seed=5)
    a.max_new_tokens = b.max_new_tokens = 10
    a.ignore_eos = b.ignore_eos = True
    batch.join([a, b])
    batch.step()
    a.cancel("deadline")
    assert batch.drop_cancelled() == [a] and a.finish_reason == "deadline" and batch.rows == [b]
    while len(batch):
        batch.step()
    alone = generate(model, b.prompt_ids, 10, b.confidence, set())
    assert b.tokens == alone.tokens
    with pytest.raises(ValueError, match="holds prompts of <= 9 tokens and <= 10 new tokens"):
        batch.join([Sequence(prompt_ids=list(range(3, 13)), max_new_tokens=4)])
    batch.join(requests(1))
    batch.fail_all("boom")
    assert len(batch) == 0


def test_graphed_slots_run_the_captured_steps():
    """On CPU graphs are not captured; the static path is what a GPU replays (test_static_decode
    rehearses the capture)."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a GPU")
    model = sharp_model().cuda()
    seqs = requests(8)
    run(SlotBatch(model, 2, 9, 10, {EOS}, graphs=True), seqs, 2, random.Random(1))
    for s in seqs:
        if not s.ignore_eos:
            alone = generate(model, s.prompt_ids, s.max_new_tokens, s.confidence, {EOS})
            assert s.tokens == alone.tokens


def test_a_segment_cap_holds_in_the_slots():
    model = sharp_model()
    seqs = requests(10, seed=7)
    run(SlotBatch(model, 3, 9, 10, {EOS}, max_segment_len=2), seqs, 3, random.Random(4))
    assert max(n for s in seqs for n in s.seg_lens) <= 2 and all(
        sum(s.seg_lens) == len(s.tokens) for s in seqs
    )


def test_forced_lengths_in_the_slots_equal_the_eager_batch_with_plain_rows_beside_them():
    """The benchmark switch: a forced row's segment t has its drawn length, min the cap (fewer
    only at EOS or its budget) in both batches; a row without them keeps its stop head's."""
    from hamburger.decode.forced import forced_lengths

    def forced(n: int) -> list[Sequence]:
        seqs = requests(n, seed=11)
        for i, s in enumerate(seqs):
            s.max_new_tokens += 8
            if i % 3:
                s.forced_lens = forced_lengths(2.0, 4, seed=i, n=7)
        return seqs

    model = sharp_model()
    for cap in (None, 2):
        seqs, ref = forced(14), forced(14)
        run(SlotBatch(model, 3, 9, 18, {EOS}, max_segment_len=cap), seqs, 3, random.Random(5))
        run(
            ContinuousBatch(HAMburgerStepper(model), {EOS}, max_segment_len=cap or 0),
            ref,
            3,
            random.Random(5),
        )
        assert [fields(s) for s in seqs] == [fields(s) for s in ref]
        for s in seqs:
            if s.forced_lens:
                at = 0
                for t, n in enumerate(s.seg_lens):
                    seg, at = s.tokens[at : at + n], at + n
                    want = min(s.forced_len(t), cap or 4)
                    last = t == len(s.seg_lens) - 1
                    assert n == want or (n < want and (seg[-1] == EOS or last)), (t, n, want)
            elif not s.ignore_eos and cap is None:
                alone = generate(model, s.prompt_ids, s.max_new_tokens, s.confidence, {EOS})
                assert (s.tokens, s.seg_lens) == (alone.tokens, alone.seg_lens)
