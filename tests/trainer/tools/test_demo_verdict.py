"""The demo's one-line verdict: faster than the base at the base's quality, per batch size."""

from __future__ import annotations

from trainer.tools.demo import verdict


def run(bs, conf, speedup, agree, tau=1.5):
    return {
        "decoder": "hamburger",
        "batch_size": bs,
        "confidence": conf,
        "speedup": speedup,
        "agreement_prefix": agree,
        "tokens_per_macro_step": tau,
    }


def test_verdict_picks_the_fastest_run_at_equal_quality():
    report = {
        "runs": [
            {"decoder": "base", "batch_size": 1, "speedup": 1.0},
            run(1, 0.5, 1.4, 0.60),  # fastest, but below equal quality: not counted
            run(1, 0.7, 1.2, 0.86),
            run(1, 0.9, 1.1, 0.95),
            run(8, 0.5, 1.3, 0.50),
            run(8, 0.9, 0.9, 0.90),
        ]
    }
    line = verdict(report)
    assert "batch 1: yes, 1.20x the base at c=0.7 (agreement_prefix 0.86" in line
    assert "batch 8: no, 0.90x the base at c=0.9" in line


def test_verdict_when_no_confidence_matches_the_base():
    line = verdict({"runs": [run(1, 0.5, 1.4, 0.3), run(1, 0.9, 1.0, 0.7)]})
    assert "batch 1: no (no confidence reaches agreement_prefix 0.85; best 0.70 at c=0.9)" in line
