"""Batched decoding equals one-at-a-time decoding, sequence by sequence."""

from __future__ import annotations

import torch
from conftest import sharp_model

from hamburger.decode import base_generate_batch, generate, generate_batch

PROMPTS = [[5, 17, 33, 8, 61, 12], [9, 4], [70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80], [44, 3, 90]]


def test_batched_equals_single_per_sequence():
    model = sharp_model()
    for conf in (0.3, 0.6):
        for max_new in (7, 30):
            batched = generate_batch(model, PROMPTS, max_new, conf, eos_token_ids={2})
            for p, b in zip(PROMPTS, batched, strict=True):
                single = generate(model, p, max_new, conf, eos_token_ids={2})
                assert (b.tokens, b.seg_lens, b.forced_stop) == (
                    single.tokens,
                    single.seg_lens,
                    single.forced_stop,
                )
                assert b.macro_steps == single.macro_steps == len(b.seg_lens)
                assert b.kv_entries == single.kv_entries == len(p) + len(b.seg_lens) - 1


def test_sequences_finishing_at_different_steps():
    model = sharp_model()
    # make one prompt's continuation hit EOS: pick the token the model emits early as "EOS"
    first = generate(model, PROMPTS[1], 12, 0.6)
    eos = {first.tokens[3]}
    singles = [generate(model, p, 12, 0.6, eos) for p in PROMPTS]
    lengths = {len(s.tokens) for s in singles}
    assert len(lengths) > 1, "the test needs sequences that finish at different macro steps"
    batched = generate_batch(model, PROMPTS, 12, 0.6, eos)
    for s, b in zip(singles, batched, strict=True):
        assert (b.tokens, b.seg_lens) == (s.tokens, s.seg_lens)
        assert b.kv_entries == s.kv_entries


def test_base_batch_matches_plain_greedy():
    model = sharp_model()
    base = model.base
    results = base_generate_batch(base, PROMPTS, 9, eos_token_ids={2})
    for p, r in zip(PROMPTS, results, strict=True):
        ids = list(p)
        for _ in range(len(r.tokens)):
            logits = base(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
        assert r.tokens == ids[len(p) :]
        assert r.macro_steps == len(r.tokens) and r.kv_entries == len(p) + len(r.tokens) - 1
