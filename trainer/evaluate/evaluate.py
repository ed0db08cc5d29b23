"""`./launch.sh eval MODEL [key=value ...]`: fast-decode speed and quality against the base.

MODEL is an export folder, a `models:/NAME/VERSION` URI, or a training run / checkpoint folder
(exported first into output_dir/model). The same prompts are decoded by HAMburger (batched,
at each confidence level) and by the base model (greedy, one token per forward, same batch
size, KV cache and retirement rules), on the same hardware. Every metric's definition is
written next to its number, in the JSON and in the printed table. This module is the stage
itself (load, decode, assemble the report) and its command line; the settings, prompts,
metrics and outputs live in the sibling modules config, prompts, quality, speed and report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from hamburger.assets import resolve_model
from hamburger.configio import load_config
from hamburger.decode import base_generate_batch, generate_batch
from hamburger.decode.step_costs import measure_step_costs
from hamburger.dtypes import resolve_dtype
from hamburger.model import load_model
from trainer.evaluate.config import DEFINITIONS, DecodeMode, EvalConfig
from trainer.evaluate.prompts import check_lengths, load_prompts, resolve_model_folder
from trainer.evaluate.quality import base_nll, cut_at_eos, heldout_ce, quality
from trainer.evaluate.report import log_mlflow, plot, table
from trainer.evaluate.speed import bound_columns, micro_calls_per_macro_step, run_decoder, speed


def evaluate(cfg: EvalConfig) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hamburger.model.folder import read_meta
    from hamburger.model.folder_check import check_model_folder, check_tokenizer

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = resolve_model_folder(cfg.model, out_dir)
    meta = read_meta(folder)  # checks the folder whole but for the tokenizer, read here too
    check_tokenizer(folder)
    lineage = meta.get("lineage", {})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(cfg.dtype, device)
    model = load_model(str(folder), dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    base_name = cfg.base or lineage.get("base", "")
    if not base_name:
        raise ValueError("base: the model folder records no base model; set base=...")
    check_model_folder(resolve_model(base_name), tokenizer=False)
    base = AutoModelForCausalLM.from_pretrained(resolve_model(base_name), dtype=dtype).to(device).eval()
    eos_id = tokenizer.eos_token_id
    eos = {eos_id}
    no_stop: set[int] = set()  # speed runs decode a fixed length (see DEFINITIONS["regime"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    prompts = load_prompts(cfg, tokenizer, lineage.get("data", ""))
    if not prompts:
        raise ValueError("no prompts to evaluate")
    context = min(getattr(m.config, "max_position_embeddings", 1 << 30) for m in (model.base, base))
    check_lengths(prompts, cfg.max_new_tokens, context)
    report: dict = {
        "model": str(folder),
        "base": base_name,
        "prompts": len(prompts),
        "max_new_tokens": cfg.max_new_tokens,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "dtype": str(dtype),
        "batch_aware": cfg.batch_aware,
        "definitions": DEFINITIONS,
        "runs": [],
    }
    report["heldout_ce"] = heldout_ce(model, base, prompts)

    def measure(
        decode_fn, bs: int, reference: list[list[int]] | None, desc: str
    ) -> tuple[dict, list[list[int]], list[str], list]:
        """Speed and quality of one decoder over every prompt at one batch size."""
        res, seconds, ttft = run_decoder(decode_fn, prompts, bs, desc)
        tokens = [cut_at_eos(r.tokens, eos) for r in res]
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
        quality_ = quality(prompts, texts, tokens, reference or tokens, cfg.code_timeout_s)
        quality_["base_nll"] = base_nll(base, [p.ids for p in prompts], tokens, bs)
        return {**speed(res, seconds, prompts), "ttft_s": ttft, **quality_}, tokens, texts, res

    for bs in cfg.batch_sizes:
        costs = measure_step_costs(
            model, [p.ids for p in prompts[:bs]], cfg.max_new_tokens, cfg.decode == DecodeMode.graphed
        )
        costs = {f"{k}_s": v for k, v in costs.items()}
        base_run, base_tokens, _, _ = measure(
            lambda ids, n: base_generate_batch(base, ids, n or cfg.max_new_tokens, no_stop, pad, cfg.decode),
            bs,
            None,
            f"base, batch {bs}",
        )
        report["runs"].append({"decoder": "base", "batch_size": bs, **base_run, **costs})
        cap = cfg.max_segment_len_by_batch.get(bs)  # None: the model's K
        for conf in cfg.confidences:
            run, _, texts, res = measure(
                lambda ids, n, c=conf, cap=cap: generate_batch(
                    model,
                    ids,
                    n or cfg.max_new_tokens,
                    c,
                    no_stop,
                    pad,
                    cfg.decode,
                    cfg.batch_aware,
                    cap,
                ),
                bs,
                base_tokens,
                f"hamburger c={conf}, batch {bs}",
            )
            report["runs"].append(
                {
                    "decoder": "hamburger",
                    "confidence": conf,
                    "batch_size": bs,
                    "max_segment_len": cfg.max_segment_len_by_batch.get(bs, model.config.max_segment_len),
                    **run,
                    "speedup": run["tokens_per_s"] / base_run["tokens_per_s"],
                    **bound_columns(run, micro_calls_per_macro_step(res, bs), costs, base_run),
                    "samples": texts[:3],
                }
            )
    (out_dir / "eval.json").write_text(json.dumps(report, indent=1))
    plot(report, out_dir / "speed_quality.png")
    print(table(report))
    log_mlflow(cfg, report, out_dir, lineage)
    return report


def main(argv: list[str] | None = None) -> dict:
    args = sys.argv[1:] if argv is None else argv
    if not args or "=" in args[0]:
        raise SystemExit("usage: ./launch.sh eval MODEL [key=value ...]")
    try:
        cfg = load_config(EvalConfig, None, [f"model={args[0]}", *args[1:]])
    except ValueError as e:
        raise SystemExit(f"[eval] config error: {e}") from None
    from trainer.export.export import ExportError

    try:
        with torch.no_grad():  # scoped: main() is also called in-process (tests), never leak grad mode
            return evaluate(cfg)
    except (
        ValueError,
        FileNotFoundError,
        ExportError,
    ) as e:  # bad inputs: the message names file, line, field
        raise SystemExit(f"[eval] error: {e}") from None


if __name__ == "__main__":
    main()
