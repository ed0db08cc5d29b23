"""Labelling throughput against a plain forward of the same model over the same batches.

SmolLM2-135M-Instruct (the embedded default) on the embedded corpora, fp32 on CPU.
    python bench/bench_label.py [--rows 96] [--batch-tokens 4096]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402

from data_prep.config import LabelConfig, SourceConfig  # noqa: E402
from data_prep.label import Scorer, difficulty, length_batches  # noqa: E402
from data_prep.sources import load_source  # noqa: E402
from data_prep.strategies import segment  # noqa: E402
from data_prep.tokenize import ChatTokenizer  # noqa: E402
from hamburger.assets import smollm2_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(smollm2_dir())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    chat = ChatTokenizer(tok)
    convs = load_source(SourceConfig(path="builtin:chatterbot")).rows[: args.rows // 2]
    convs += load_source(SourceConfig(path="builtin:humaneval")).rows[: args.rows // 2]
    samples = [chat.encode(c) for c in convs]
    scorer = Scorer(model, torch.device("cpu"), pad_id=tok.eos_token_id)
    label_cfg = LabelConfig()

    def run_label() -> float:
        t0 = time.perf_counter()
        scores = scorer.score(samples, args.batch_tokens)
        for s in scores:
            segment(difficulty(s, "entropy"), label_cfg, model.config.vocab_size)
        return time.perf_counter() - t0

    batches = length_batches([len(ids) for ids, _ in samples], args.batch_tokens)

    @torch.no_grad()
    def run_plain() -> float:
        t0 = time.perf_counter()
        for idx in batches:
            width = max(len(samples[i][0]) for i in idx)
            ids = torch.full((len(idx), width), tok.eos_token_id)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(idx):
                ids[r, : len(samples[i][0])] = torch.tensor(samples[i][0])
                mask[r, : len(samples[i][0])] = 1
            model(input_ids=ids, attention_mask=mask).logits.sum()
        return time.perf_counter() - t0

    run_label()  # warm-up
    times = {"label": [], "plain": []}
    for _ in range(2):
        times["plain"].append(run_plain())
        times["label"].append(run_label())
    tokens = sum(len(ids) for ids, _ in samples)
    scorer.stats.real_tokens = scorer.stats.padded_tokens = 0
    scorer.score(samples, args.batch_tokens)
    pad = 1 - scorer.stats.real_tokens / scorer.stats.padded_tokens
    best = {k: min(v) for k, v in times.items()}
    body = "\n".join(
        [
            f"{len(samples)} samples ({args.rows // 2} chatterbot + {args.rows // 2} HumanEval), {tokens} tokens, "
            f"SmolLM2-135M-Instruct fp32, batch budget {args.batch_tokens} padded tokens; best of 2.",
            "Labelling = teacher-forced forward + entropy/probability of every response token + decreasing_v2; "
            "plain = the model's ordinary forward (full logits) over the same batches.",
            "",
            "| variant | s | tokens/s | vs plain |",
            "|---|---|---|---|",
            f"| plain forward | {best['plain']:.2f} | {tokens / best['plain']:.0f} | 1.00x |",
            f"| labelling | {best['label']:.2f} | {tokens / best['label']:.0f} | {best['plain'] / best['label']:.2f}x |",
            "",
            f"Padding waste of the length-sorted batches: {pad:.1%} of positions.",
        ]
    )
    print(body)
    if not args.no_write:
        write_section("data_prep: labelling throughput", body)


if __name__ == "__main__":
    main()
