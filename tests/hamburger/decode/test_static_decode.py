"""Static-shape (graphable) decoding equals the eager decoders token for token."""

from __future__ import annotations

import pytest
import torch
from conftest import sharp_model

from hamburger.decode import base_generate_batch, generate_batch
from hamburger.decode.static import StaticHAMburgerDecoder

PROMPTS = [[5, 17, 33, 8, 61, 12], [9, 4], [70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80], [44, 3, 90]]


def fields(r):
    return r.tokens, r.seg_lens, r.forced_stop, r.macro_steps, r.kv_entries


# On CPU "graphed" is the static path itself (CUDA graphs need a GPU), so its case runs on a GPU
# only; test_capture_runs_stay_in_range_and_leave_no_trace rehearses the capture on CPU.
GRAPHED = pytest.param(
    "graphed",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(
            not torch.cuda.is_available(), reason="CUDA graphs need a GPU (on CPU graphed is static)"
        ),
    ],
)


@pytest.mark.parametrize("mode", ["static", GRAPHED])
def test_static_equals_eager(mode):
    model = sharp_model()
    if mode == "graphed":
        model = model.cuda()  # graphs are captured only for a model on a CUDA device
    early_eos = {generate_batch(model, PROMPTS[1:2], 12, 0.6)[0].tokens[3]}
    cases = 0
    for conf in (0.0, 0.3, 0.6, 1.0):
        for max_new, eos in ((7, set()), (25, {2}), (12, early_eos)):
            eager = generate_batch(model, PROMPTS, max_new, conf, eos)
            static = generate_batch(model, PROMPTS, max_new, conf, eos, decode=mode)
            assert [fields(r) for r in static] == [fields(r) for r in eager], (conf, max_new, eos)
            cases += len({len(r.tokens) for r in eager}) > 1
    assert cases > 0, "some case must have rows finishing at different steps"


def test_static_single_prompt_and_base():
    model = sharp_model()
    for prompts in (PROMPTS, PROMPTS[:1]):
        for eos in (set(), {2}):
            eager = base_generate_batch(model.base, prompts, 9, eos)
            static = base_generate_batch(model.base, prompts, 9, eos, decode="static")
            assert [fields(r) for r in static] == [fields(r) for r in eager]
        eager = generate_batch(model, prompts, 10, 0.5)
        assert [fields(r) for r in generate_batch(model, prompts, 10, 0.5, decode="static")] == [
            fields(r) for r in eager
        ]


def test_decoder_is_reusable_and_counts_micro_calls():
    model = sharp_model()
    dec = StaticHAMburgerDecoder(model, len(PROMPTS), 11, 10, graphs=False)
    first = dec.generate(PROMPTS, set(), 0.5)
    again = dec.generate(PROMPTS, set(), 0.5)
    assert [fields(r) for r in first] == [fields(r) for r in again]
    assert dec.macro_steps > 0 and dec.micro_calls >= 0
    shorter = dec.generate(PROMPTS, {2}, 0.5, max_new=6)  # one decoder serves shorter runs too
    assert [fields(r) for r in shorter] == [fields(r) for r in generate_batch(model, PROMPTS, 6, 0.5, {2})]
    with pytest.raises(ValueError, match="<= 10 new tokens"):
        dec.generate(PROMPTS, max_new=11)


def test_forced_segment_lengths():
    """The benchmark switch: every segment has the forced length (EOS and max_new aside)."""
    model = sharp_model()
    forced = torch.tensor([[2, 3], [1, 1], [4, 4], [3, 1]])
    dec = StaticHAMburgerDecoder(model, len(PROMPTS), 11, 13, graphs=False)
    res = dec.generate(PROMPTS, set(), forced_seg_lens=forced)
    for r, row in zip(res, forced.tolist(), strict=True):
        want = [row[t % 2] for t in range(len(r.seg_lens))]
        want[-1] = 13 - sum(want[:-1])
        assert r.seg_lens == want and len(r.tokens) == 13
    # micro calls per macro step: the longest segment of the step minus one
    steps = max(len(r.seg_lens) for r in res)
    per_step = [max(r.seg_lens[t] for r in res if t < len(r.seg_lens)) - 1 for t in range(steps)]
    assert dec.micro_calls == sum(per_step)
    with pytest.raises(ValueError, match="holds 4 prompts"):
        dec.generate(PROMPTS[:2])


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="decode must be one of"):
        generate_batch(sharp_model(), PROMPTS, 4, decode="compiled")


def test_eval_config_decode_field():
    from hamburger.configio import load_config
    from trainer.evaluate.config import EvalConfig

    assert load_config(EvalConfig, None, ["model=m", "decode=graphed"]).decode == "graphed"
    with pytest.raises(
        ValueError, match=r"'decode': Invalid value 'compiled', expected one of \[eager, static, graphed\]"
    ):
        load_config(EvalConfig, None, ["model=m", "decode=compiled"])


def test_speculative_advance_changes_nothing():
    """On a GPU the end of a macro step and the next base step are one graph, run even after the
    last step (its result unread): the same results as checking first, as on CPU."""
    model = sharp_model()
    for max_new, eos in ((9, set()), (14, {2})):
        dec = StaticHAMburgerDecoder(model, len(PROMPTS), 11, max_new, graphs=False)
        checked = dec.generate(PROMPTS, eos, 0.5)
        dec.speculative = True
        speculative = dec.generate(PROMPTS, eos, 0.5)
        assert [fields(r) for r in speculative] == [fields(r) for r in checked]
        assert [fields(r) for r in checked] == [
            fields(r) for r in generate_batch(model, PROMPTS, max_new, 0.5, eos)
        ]


def rehearse(fn, prepare, device):
    """What `capture` does to the decoder's state, on CPU: three runs (two warm-ups and the
    captured one), each from `prepare()`; returns no graph, so decoding then runs eagerly."""
    for _ in range(3):
        prepare()
        fn()


def test_capture_runs_stay_in_range_and_leave_no_trace(monkeypatch):
    """Capturing runs every step three times for real. Without a rewind before each run, three
    micro-step runs grew a segment past K, and the next step gathered outside it: a CUDA
    device-side assert on the first GPU run. Here the same runs happen on CPU (where an
    out-of-range index raises), and the decoder still decodes exactly as the eager one."""
    from hamburger.decode import static as static_decode

    monkeypatch.setattr(static_decode, "capture", rehearse)
    model = sharp_model()
    for max_new in (1, 9):
        dec = StaticHAMburgerDecoder(model, len(PROMPTS), 11, max_new, graphs=True)
        got = dec.generate(PROMPTS, {2}, 0.5)
        assert [fields(r) for r in got] == [
            fields(r) for r in generate_batch(model, PROMPTS, max_new, 0.5, {2})
        ]
        base = static_decode.StaticBaseDecoder(model.base, len(PROMPTS), 11, max_new, graphs=True)
        want = base_generate_batch(model.base, PROMPTS, max_new, {2})
        assert [fields(r) for r in base.generate(PROMPTS, {2})] == [fields(r) for r in want]


def test_batch_aware_micro_loop_ends_segments_few_rows_use():
    """Before each micro step, when fewer than `micro_cutoff` of the unfinished rows are still in
    their segment, those rows end it there: the next token comes from the base head, as if their
    segment had been that long. With more rows going on, nothing changes."""
    model = sharp_model()
    dec = StaticHAMburgerDecoder(model, len(PROMPTS), 11, 12, graphs=False)
    one_long = torch.tensor([[4], [1], [1], [1]])  # row 0 wants 4 tokens per segment, the rest 1
    plain = [fields(r) for r in dec.generate(PROMPTS, set(), forced_seg_lens=one_long)]
    assert dec.cuts == 0 and dec.micro_calls > 0
    for cutoff in (0.3, 0.5):  # 1 of 4 rows goes on: under the cutoff, so no micro step at all
        before = dec.micro_calls
        cut = dec.generate(PROMPTS, set(), forced_seg_lens=one_long, micro_cutoff=cutoff)
        assert dec.micro_calls == before and dec.cuts > 0
        ones = dec.generate(PROMPTS, set(), forced_seg_lens=torch.ones(4, 1, dtype=torch.long))
        assert [r.tokens for r in cut] == [r.tokens for r in ones]
        assert all(set(r.seg_lens) == {1} for r in cut)
    kept = dec.generate(PROMPTS, set(), forced_seg_lens=one_long, micro_cutoff=0.25)  # 1 >= 0.25 * 4
    assert [fields(r) for r in kept] == plain
    two_long = torch.tensor([[4], [4], [1], [1]])
    want = [fields(r) for r in dec.generate(PROMPTS, set(), forced_seg_lens=two_long)]
    assert [
        fields(r) for r in dec.generate(PROMPTS, set(), forced_seg_lens=two_long, micro_cutoff=0.5)
    ] == want


def test_batch_aware_generate_measures_its_cutoff_once_and_leaves_batch_1_alone():
    model = sharp_model()
    for prompts in (PROMPTS[:1], PROMPTS):
        aware = generate_batch(model, prompts, 10, 0.5, decode="static", batch_aware=True)
        for r, p in zip(aware, prompts, strict=True):
            assert sum(r.seg_lens) == len(r.tokens) == 10 and len(p) > 0
    assert [
        fields(r) for r in generate_batch(model, PROMPTS[:1], 10, 0.5, decode="static", batch_aware=True)
    ] == [fields(r) for r in generate_batch(model, PROMPTS[:1], 10, 0.5, decode="static")]
    from hamburger.decode.batched import _static_decoder

    dec = _static_decoder(model, PROMPTS, 10, "static")
    first = dec.cutoff
    assert first > 0  # t_micro / t_macro, measured on this decoder's own steps
    generate_batch(model, PROMPTS, 10, 0.5, decode="static", batch_aware=True)
    assert dec.cutoff == first  # measured once per decoder
    eager = generate_batch(model, PROMPTS, 10, 0.5, decode="eager", batch_aware=True)  # its own rule
    assert all(sum(r.seg_lens) == len(r.tokens) == 10 for r in eager)


def test_a_segment_cap_limits_every_segment_and_one_of_k_changes_nothing():
    """max_segment_len: a smaller K for a batch (e.g. large batches, where every extra micro
    step costs all rows); the model's own K is the same as no cap."""
    model = sharp_model()
    k = model.config.max_segment_len
    plain = generate_batch(model, PROMPTS, 12, 0.3, decode="static")
    assert max(n for r in plain for n in r.seg_lens) == k
    same = generate_batch(model, PROMPTS, 12, 0.3, decode="static", max_segment_len=k)
    assert [fields(r) for r in same] == [fields(r) for r in plain]
    capped = generate_batch(model, PROMPTS, 12, 0.3, decode="static", max_segment_len=2)
    assert max(n for r in capped for n in r.seg_lens) == 2
    assert all(sum(r.seg_lens) == len(r.tokens) == 12 for r in capped)
    eager = generate_batch(model, PROMPTS, 12, 0.3, decode="eager", max_segment_len=2)
    assert [fields(r) for r in eager] == [fields(r) for r in capped]  # the same cap in both decoders
