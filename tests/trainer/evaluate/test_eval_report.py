"""The eval report's quality/speed columns: base-judged NLL, micro calls per macro step, the
speed bound, and a speed/quality plot whose labels never overlap."""

from __future__ import annotations

import itertools
import json
import sqlite3

import pytest
import torch
from conftest import sharp_model
from helpers import tiny_model_dir, write_jsonl
from matplotlib.text import Text
from transformers import AutoTokenizer, LlamaForCausalLM

from hamburger.decode import DecodeResult, base_generate_batch, generate_batch
from hamburger.decode.static import StaticHAMburgerDecoder
from hamburger.decode.step_costs import measure_step_costs, micro_calls, speed_bound
from hamburger.model import HAMburgerConfig, HAMburgerModel, save_model
from trainer.evaluate.config import EvalConfig
from trainer.evaluate.evaluate import evaluate
from trainer.evaluate.prompts import Prompt
from trainer.evaluate.quality import base_nll, cut_at_eos
from trainer.evaluate.report import plot, quality_axes, speed_quality_figure
from trainer.evaluate.speed import bound_columns, micro_calls_per_macro_step, speed

PROMPTS = [[5, 9, 11], [7, 3, 30, 41, 12, 8], [60], [22, 23, 24, 25]]


def slow_nll(base, prompt: list[int], output: list[int]) -> tuple[float, int]:
    """Sum of -log p(token | everything before it), one full forward per output token."""
    total = 0.0
    for i, tok in enumerate(output):
        logits = base(input_ids=torch.tensor([prompt + output[:i]])).logits[0, -1]
        total -= torch.log_softmax(logits.double(), -1)[tok].item()
    return total, len(output)


def test_base_nll_of_the_base_greedy_outputs_equals_a_per_token_reference():
    base = sharp_model().base
    eos = {base.config.eos_token_id}
    outs = [cut_at_eos(r.tokens, eos) for r in base_generate_batch(base, PROMPTS, 7, set(), 0)]
    other = [[3, 4], [50, 51, 52, 53, 54], [9], [2]]  # not greedy: any output is judged
    for outputs in (outs, other):
        sums = [slow_nll(base, p, o) for p, o in zip(PROMPTS, outputs, strict=True)]
        want = sum(s for s, _ in sums) / sum(n for _, n in sums)
        for bs in (1, 3, 4):  # padding and batching change nothing
            assert base_nll(base, PROMPTS, outputs, bs) == pytest.approx(want, rel=1e-9)
    assert base_nll(base, PROMPTS, outs, 4) < base_nll(base, PROMPTS, [[o[0] + 1] for o in outs], 4)


def test_bound_and_micro_calls_on_known_numbers():
    assert speed_bound(2.0, 1.0, 0.010, 0.001, 0.002) == pytest.approx(0.020 / 0.013)
    # segments 3,1,2 and 4,4 decoded together: step 0 runs max(2, 3) micro calls, step 1
    # max(0, 3), step 2 (row 2 retired) 1
    batch = [
        DecodeResult(tokens=[9] * 6, seg_lens=[3, 1, 2], macro_steps=3),
        DecodeResult(tokens=[9] * 8, seg_lens=[4, 4], macro_steps=2),
    ]
    assert micro_calls(batch) == (7, 3)
    assert micro_calls_per_macro_step(batch, 1) == pytest.approx((2 + 0 + 1 + 3 + 3) / 5)
    assert micro_calls_per_macro_step(batch, 2) == pytest.approx(7 / 3)
    costs = {"t_base_s": 0.010, "t_embed_s": 0.001, "t_micro_s": 0.002, "t_hamburger_step_s": 0.011}
    run = {"tokens_per_macro_step": 2.0, "tokens_per_s": 120.0}
    cols = bound_columns(run, 1.0, costs, {"tokens_per_s": 100.0})
    assert cols["bound"] == pytest.approx(0.020 / 0.013)
    assert cols["speedup_over_bound"] == pytest.approx(1.2 / (0.020 / 0.013))
    assert cols["micro_calls_per_macro_step"] == 1.0 and cols["t_micro_s"] == 0.002


def _counting_micro_steps(model: HAMburgerModel, monkeypatch) -> list[int]:
    calls = [0]
    inner = model.micro_step

    def counted(*a, **kw):
        calls[0] += 1
        return inner(*a, **kw)

    monkeypatch.setattr(model, "micro_step", counted)
    return calls


def test_micro_calls_match_real_decoding(monkeypatch):
    model = sharp_model()
    prompts = [Prompt(p, {}) for p in PROMPTS]
    calls = _counting_micro_steps(model, monkeypatch)
    # batch 1: m = tau - 1, and it is the number of micro_step calls the eager decoder made
    res = [generate_batch(model, [p], 12, 0.5, set(), 0)[0] for p in PROMPTS]
    assert max(max(r.seg_lens) for r in res) > 1 and min(min(r.seg_lens) for r in res) == 1  # not trivial
    tau = speed(res, 1.0, prompts)["tokens_per_macro_step"]
    assert micro_calls_per_macro_step(res, 1) == pytest.approx(tau - 1)
    assert calls[0] == sum(micro_calls([r])[0] for r in res)
    # batch 4 (eager, rows retiring): the loop runs until the step's longest segment ends
    calls[0] = 0
    res = generate_batch(model, PROMPTS, 12, 0.5, set(), 0)
    assert calls[0] == micro_calls(res)[0]
    assert micro_calls_per_macro_step(res, 4) >= speed(res, 1.0, prompts)["tokens_per_macro_step"] - 1
    # the static decoder counts its own calls: the same
    monkeypatch.undo()
    dec = StaticHAMburgerDecoder(model, len(PROMPTS), 8, 12, graphs=False)
    sres = dec.generate(PROMPTS, set(), 0.5)
    assert [r.tokens for r in sres] == [r.tokens for r in res]
    assert (dec.micro_calls, dec.macro_steps) == micro_calls(sres)


def test_step_costs_are_measured_for_every_step():
    model = sharp_model()
    costs = measure_step_costs(model, PROMPTS[:2], 6, graphs=False, n=2)
    assert set(costs) == {"t_base", "t_hamburger_step", "t_embed", "t_micro"}
    assert all(v > 0 for v in costs.values())


def _report(pass_at_1: list[float] | None = None) -> dict:
    """Two batch sizes, three confidences, points packed close together."""
    runs = []
    for bs in (1, 8):
        runs.append({"decoder": "base", "batch_size": bs, "agreement_prefix": 1.0, "base_nll": 0.80})
        for i, c in enumerate((0.5, 0.7, 0.9)):
            runs.append(
                {
                    "decoder": "hamburger",
                    "batch_size": bs,
                    "confidence": c,
                    "speedup": 1.30 + 0.002 * i + 0.001 * bs,
                    "agreement_prefix": 0.90 + 0.001 * i,
                    "base_nll": 0.95 - 0.001 * i,
                    "tokens_per_macro_step": 1.6 - 0.01 * i,
                    "bound": 1.5,
                }
            )
    for r, p in zip(runs, pass_at_1 or [], strict=False):
        r["pass_at_1"] = p
    return {"runs": runs}


def test_plot_is_written_and_its_labels_do_not_overlap(tmp_path):
    report = _report()
    plot(report, tmp_path / "speed_quality.png")
    assert (tmp_path / "speed_quality.png").read_bytes()[:4] == b"\x89PNG"
    fig = speed_quality_figure(report)
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    assert [ax.get_ylabel() for ax in fig.axes] == ["agreement_prefix", "base_nll"]
    boxes = []
    for ax in fig.axes:
        anns = ax.texts
        assert len(anns) == len(report["runs"])  # every point, the bases included, is labelled
        assert any("tau 1.60" in a.get_text() for a in anns)
        for a in anns:
            box = Text.get_window_extent(a, renderer)  # the text itself (not its leader line)
            assert box.x0 >= ax.get_window_extent(renderer).x1  # beside the panel, off the data
            boxes.append(box)
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)


def test_plot_uses_pass_at_1_only_where_it_is_not_degenerate():
    assert quality_axes(_report([0.0] * 8)["runs"]) == ["agreement_prefix", "base_nll"]
    assert quality_axes(_report([0.0, 0.5] + [0.0] * 6)["runs"]) == ["pass_at_1", "base_nll"]


def test_eval_report_end_to_end(tmp_path):
    """A tiny exported model: eval.json, the table and MLflow carry the new columns."""
    base_dir = tiny_model_dir(tmp_path / "base", seed=0, layers=2)
    base = LlamaForCausalLM.from_pretrained(str(base_dir))
    model = HAMburgerModel(base, HAMburgerConfig(embedder_head_dim=16, micro_layers=1, max_segment_len=3))
    torch.manual_seed(7)
    with torch.no_grad():
        for layer in model.stop_head.net:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0, 0.5)
    save_model(model, str(tmp_path / "ham"), tokenizer=AutoTokenizer.from_pretrained(str(base_dir)))
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in ("Hi", "Count to 3.", "Why?")])
    cfg = EvalConfig(
        model=str(tmp_path / "ham"),
        base=str(base_dir),
        data=str(data),
        max_new_tokens=6,
        confidences=[0.5, 0.9],
        batch_sizes=[1, 2],
        output_dir=str(tmp_path / "eval"),
    )
    cfg.validate()
    evaluate(cfg)
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert {"base_nll", "bound", "micro_calls_per_macro_step", "step_costs"} <= set(saved["definitions"])
    for r in saved["runs"]:
        assert r["base_nll"] > 0 and r["t_base_s"] > 0
        if r["decoder"] == "hamburger":
            assert r["bound"] > 0 and r["speedup_over_bound"] == pytest.approx(r["speedup"] / r["bound"])
            if r["batch_size"] == 1:
                assert r["micro_calls_per_macro_step"] == pytest.approx(r["tokens_per_macro_step"] - 1)
    db = sqlite3.connect(tmp_path / "eval" / "mlflow.db")
    keys = {k for (k,) in db.execute("select key from metrics")}
    assert {"ham_c0.5/bs2/bound", "ham_c0.9/bs1/base_nll", "base/bs1/base_nll"} <= keys
