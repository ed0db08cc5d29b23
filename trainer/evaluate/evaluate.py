"""`./launch.sh eval MODEL [key=value ...]`: fast-decode speed and quality against the base.

MODEL is an export folder, a `models:/NAME/VERSION` URI, or a training run / checkpoint folder
(exported first into output_dir/model). The same prompts are decoded by HAMburger (batched,
at each confidence level) and by the base model (greedy, one token per forward, same batch
size, KV cache and retirement rules), on the same hardware. Every metric's definition is
written next to its number, in the JSON and in the printed table.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from hamburger.assets import resolve_model
from hamburger.configio import Choice, check_range, load_config, to_flat_dict
from hamburger.decode import base_generate_batch, generate_batch
from hamburger.decode.step_costs import measure_step_costs, micro_calls, speed_bound
from hamburger.dtypes import DType, resolve_dtype
from hamburger.model import HAMburgerModel, Sample, collate, load_model
from trainer.train.config import MLflowConfig

DEFINITIONS = {
    "regime": "speed runs decode exactly max_new_tokens per prompt (EOS does not stop them, as in fixed-length "
    "speed benchmarks), so both models decode the same number of tokens; quality metrics read each output cut "
    "at its first EOS, which is what stopping there would give (decoding is greedy)",
    "tokens_per_macro_step": "generated tokens / base forward passes, prefill counted as one (summed over prompts)",
    "kv_entries_per_token": "base KV entries added after the prompt / generated tokens (summed over prompts)",
    "tokens_per_s": "generated tokens / wall-clock seconds of decoding all prompts, prefill included",
    "speedup": "HAMburger tokens_per_s / base tokens_per_s, same prompts, batch size and hardware",
    "ttft_s": "mean wall-clock seconds until the first token of a batch (decoding with max_new_tokens=1)",
    "agreement_exact": "share of prompts whose generated tokens equal the base model's greedy output",
    "agreement_prefix": "mean share of the base output reproduced before the first differing token",
    "pass_at_1": "share of code prompts whose generated function passes the task's tests (subprocess, timeout)",
    "exact_match": "share of prompts with an `answer` whose normalised answer appears in the output",
    "heldout_ce": "cross-entropy (nats/token) of the held-out reference responses, teacher-forced",
    "base_nll": "the base model's mean negative log-likelihood (nats/token) of the run's outputs (each cut at "
    "its first EOS), teacher-forced after its prompt: how natural the base finds them; summed over all output "
    "tokens of all prompts / their count. The base's own greedy outputs give the reference value",
    "micro_calls_per_macro_step": "m: micro-decoder calls / macro steps while decoding, summed over batches; "
    "a batch's micro loop runs until the step's longest segment ends, so at batch 1 m = tau - 1",
    "step_costs": "t_base_s, t_embed_s, t_micro_s: seconds of one base step, one embedder call, one micro step "
    "(a one-token step) at this batch size on this hardware, measured on the static decoders' steps (graphed "
    "when decode=graphed; eager decoding adds Python overhead on top of them); t_hamburger_step_s: HAMburger's "
    "macro base step (embedder + base step + first token)",
    "bound": "tau * t_base / (t_base + t_embed + m * t_micro), tau = the run's tokens_per_macro_step, m = its "
    "micro_calls_per_macro_step: the speed-up these step costs allow at most",
    "speedup_over_bound": "speedup / bound: the share of the attainable speed-up the decoder achieved",
}


class DecodeMode(Choice):
    eager = "eager"
    static = "static"
    graphed = "graphed"


@dataclass
class EvalConfig:
    model: str = ""
    """Export folder, models:/NAME/VERSION, or a training run / checkpoint folder."""
    base: str = ""
    """Base model to compare with (default: the one the model was trained from)."""
    data: str = ""
    """A prep folder (its held-out split; default: the model's training data) or a .jsonl of
    {"prompt", optional "answer", "test", "entry_point"} records."""
    split: str = "eval"
    """Split of a prep folder to take prompts from."""
    max_prompts: int = 32
    """How many prompts to decode."""
    batch_sizes: list[int] = field(default_factory=lambda: [8])
    """Decode batch sizes to measure (each with the base and every confidence)."""
    max_new_tokens: int = 128
    """Tokens decoded per prompt in the speed runs (fixed length)."""
    confidences: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9])
    """Confidence levels c: a segment ends once P(continue) < c."""
    code_timeout_s: float = 10.0
    """Time limit of one pass@1 test run."""
    decode: DecodeMode = DecodeMode.eager
    """Decoder for both models: eager, static (static KV caches, no host sync but the stop
    decisions) or graphed (static + CUDA graphs on a GPU; static on CPU). Same tokens."""
    dtype: DType = DType.auto
    """auto (bf16 on GPU, fp32 on CPU), float32 or bfloat16; both models use it."""
    output_dir: str = "outputs/eval"
    """Where eval.json, the plot and the default MLflow store go."""
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)

    def validate(self) -> None:
        if not self.model:
            raise ValueError("model: give an export folder, models:/NAME/VERSION or a run folder")
        if not self.confidences or any(not 0 < c <= 1 for c in self.confidences):
            raise ValueError(f"confidences must lie in (0, 1], got {self.confidences}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be >= 1, got {self.batch_sizes}")
        check_range("max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1, ">= 1")
        check_range("max_prompts", self.max_prompts, self.max_prompts >= 1, ">= 1")
        check_range("code_timeout_s", self.code_timeout_s, self.code_timeout_s > 0, "> 0")


@dataclass
class Prompt:
    ids: list[int]
    meta: dict
    reference: list[int] | None = None
    seg_lens: list[int] | None = None


# ---------------------------------------------------------------- inputs
def resolve_model_folder(spec: str, output_dir: Path) -> Path:
    p = Path(spec)
    if spec.startswith("models:/") or spec.startswith("runs:/"):
        from trainer.serve.loader import load

        return load(spec).path
    if (p / "config.json").is_file():
        return p
    from trainer.export.export import export

    out = output_dir / "model"
    return Path(export(spec, str(out), overwrite=True)["path"])


def load_prompts(cfg: EvalConfig, tokenizer, default_data: str) -> list[Prompt]:
    data = cfg.data or default_data
    if not data:
        raise ValueError("data: no prompt file or prep folder given, and the model records none")
    if data.endswith(".jsonl"):
        out = []
        for _line, rec in read_prompt_records(Path(data)):
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": rec["prompt"]}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )
            out.append(Prompt(list(ids["input_ids"]), rec))
        return out[: cfg.max_prompts]
    from data_prep.shards import read_split

    rows = read_split(data, cfg.split).to_pylist()[: cfg.max_prompts]
    return [
        Prompt(
            r["input_ids"][: r["prompt_len"]],
            json.loads(r["meta"] or "{}"),
            r["input_ids"][r["prompt_len"] :],
            r["seg_lens"],
        )
        for r in rows
    ]


def read_prompt_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of a .jsonl prompt file; every malformed line is named."""
    if not path.is_file():
        raise ValueError(f"data={path}: no such prompt file")
    records = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: line {n}: not UTF-8 text (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n}: not JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}: line {n}: expected a JSON object, got {type(rec).__name__}")
            if not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
                raise ValueError(f"{path}: line {n}: field 'prompt' must be a non-empty string")
            for field_name in ("answer", "test", "entry_point"):
                if rec.get(field_name) is not None and not isinstance(rec[field_name], str):
                    raise ValueError(f"{path}: line {n}: field {field_name!r} must be a string")
            records.append((n, rec))
    if not records:
        raise ValueError(f"{path}: no prompts (the file has no records)")
    return records


# ---------------------------------------------------------------- quality
def extract_code(text: str) -> str:
    blocks = re.findall(r"```(?:python)?\n(.*?)(?:```|$)", text, flags=re.S)
    return blocks[0] if blocks else text


def passes_tests(code: str, test: str, entry_point: str, timeout_s: float) -> bool:
    """Run model-written code and the task's tests: this executes untrusted code, so it runs in
    a fresh isolated interpreter (-I), in a throw-away temporary folder that is its working and
    home directory, with an empty environment, a CPU-time and memory limit, and a wall-clock
    timeout after which its whole process group is killed (children included)."""
    program = f"{code}\n\n{test}\n\ncheck({entry_point})\n"
    with tempfile.TemporaryDirectory(prefix="hamburger-pass1-") as tmp:
        path = Path(tmp) / "candidate.py"
        path.write_text(program)
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": tmp,
            "TMPDIR": tmp,
            "no_proxy": "*",
            "NO_PROXY": "*",
        }
        proc = subprocess.Popen(
            [sys.executable, "-I", str(path)],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=lambda: _limit_resources(timeout_s),
        )
        try:
            return proc.wait(timeout=timeout_s) == 0
        except subprocess.TimeoutExpired:
            return False
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever it started dies with it
            except ProcessLookupError:
                pass
            proc.wait()


def _limit_resources(timeout_s: float) -> None:
    """In the child before exec: CPU seconds and address space (4 GiB) are capped."""
    import resource

    cpu = int(timeout_s) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def cut_at_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """The output up to and including its first EOS."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def quality(
    prompts: list[Prompt],
    texts: list[str],
    tokens: list[list[int]],
    base_tokens: list[list[int]],
    timeout_s: float,
) -> dict[str, float]:
    q: dict[str, float] = {}
    exact = [a == b for a, b in zip(tokens, base_tokens, strict=True)]
    q["agreement_exact"] = sum(exact) / len(exact)
    prefix = []
    for a, b in zip(tokens, base_tokens, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(len(b), 1))
    q["agreement_prefix"] = sum(prefix) / len(prefix)
    code = [
        (p, t) for p, t in zip(prompts, texts, strict=True) if "test" in p.meta and "entry_point" in p.meta
    ]
    if code:
        ok = [
            passes_tests(extract_code(t), p.meta["test"], p.meta["entry_point"], timeout_s) for p, t in code
        ]
        q["pass_at_1"] = sum(ok) / len(ok)
    answers = [(p, t) for p, t in zip(prompts, texts, strict=True) if "answer" in p.meta]
    if answers:
        q["exact_match"] = sum(normalise(str(p.meta["answer"])) in normalise(t) for p, t in answers) / len(
            answers
        )
    return q


@torch.no_grad()
def heldout_ce(model: HAMburgerModel, base, prompts: list[Prompt]) -> dict[str, float]:
    labelled = [p for p in prompts if p.reference and p.seg_lens]
    if not labelled:
        return {}
    ham_sum = base_sum = n = 0.0
    for p in labelled:
        s = Sample(p.ids + p.reference, len(p.ids), p.seg_lens)
        device = next(base.parameters()).device
        ham = model(collate([s], model.config.max_steps).to(device)).ce.item()
        logits = base(input_ids=torch.tensor([s.input_ids], device=device)).logits[0, len(p.ids) - 1 : -1]
        b = F.cross_entropy(logits.float(), torch.tensor(p.reference, device=device)).item()
        k = len(p.reference)
        ham_sum, base_sum, n = ham_sum + ham * k, base_sum + b * k, n + k
    return {"hamburger": ham_sum / n, "base": base_sum / n, "tokens": n}


@torch.no_grad()
def base_nll(base, prompts: list[list[int]], outputs: list[list[int]], batch_size: int = 8) -> float:
    """The base model's mean NLL (nats/token) of each output after its prompt, teacher-forced:
    batches of right-padded prompt+output rows (masked), the LM head applied only where an
    output token is predicted."""
    device = next(base.parameters()).device
    head = base.get_output_embeddings()
    total, count = 0.0, 0
    for i in range(0, len(prompts), batch_size):
        rows = [p + o for p, o in zip(prompts[i : i + batch_size], outputs[i : i + batch_size], strict=True)]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
        pos = torch.arange(width)[None]
        starts = torch.tensor([len(p) for p in prompts[i : i + batch_size]])[:, None]
        ends = torch.tensor([len(r) for r in rows])[:, None]
        ids, mask = ids.to(device), (pos < ends).long().to(device)
        predicts = ((pos >= starts - 1) & (pos < ends - 1)).to(device)  # position q predicts token q + 1
        hidden = base.model(input_ids=ids, attention_mask=mask).last_hidden_state
        targets = ids[:, 1:][predicts[:, :-1]]
        logits = head(hidden[:, :-1][predicts[:, :-1]])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 kept
        total += F.cross_entropy(logits, targets, reduction="sum").item()
        count += targets.numel()
    return total / max(count, 1)


def micro_calls_per_macro_step(results: list, batch_size: int) -> float:
    """m of a run: micro-decoder calls / macro steps over its batches (results in batch order)."""
    calls = steps = 0
    for i in range(0, len(results), batch_size):
        c, s = micro_calls(results[i : i + batch_size])
        calls, steps = calls + c, steps + s
    return calls / steps


# ---------------------------------------------------------------- decoding runs
def run_decoder(fn, prompts: list[Prompt], batch_size: int) -> tuple[list, float, float]:
    """(results, seconds, mean TTFT seconds) over all prompts in batches, after a warm-up."""
    fn([p.ids for p in prompts[:batch_size]], 2)
    results, t0 = [], time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        results += fn([p.ids for p in prompts[i : i + batch_size]], None)
    seconds = time.perf_counter() - t0
    ttft = []
    for i in range(0, len(prompts), batch_size):
        t1 = time.perf_counter()
        fn([p.ids for p in prompts[i : i + batch_size]], 1)
        ttft.append(time.perf_counter() - t1)
    return results, seconds, sum(ttft) / len(ttft)


def speed(results, seconds: float, prompts: list[Prompt]) -> dict[str, float]:
    tokens = sum(len(r.tokens) for r in results)
    forwards = sum(r.base_forwards for r in results)
    kv_added = sum(r.kv_entries - len(p.ids) for r, p in zip(results, prompts, strict=True))
    return {
        "generated_tokens": tokens,
        "base_forwards": forwards,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "tokens_per_macro_step": tokens / forwards,
        "kv_entries_per_token": kv_added / max(tokens, 1),
    }


def evaluate(cfg: EvalConfig) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hamburger.model.folder import read_meta

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = resolve_model_folder(cfg.model, out_dir)
    meta = read_meta(folder)
    lineage = meta.get("lineage", {})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(cfg.dtype, device)
    model = load_model(str(folder), dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    base_name = cfg.base or lineage.get("base", "")
    if not base_name:
        raise ValueError("base: the model folder records no base model; set base=...")
    base = AutoModelForCausalLM.from_pretrained(resolve_model(base_name), dtype=dtype).to(device).eval()
    eos_id = tokenizer.eos_token_id
    eos = {eos_id}
    no_stop: set[int] = set()  # speed runs decode a fixed length (see DEFINITIONS["regime"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    prompts = load_prompts(cfg, tokenizer, lineage.get("data", ""))
    if not prompts:
        raise ValueError("no prompts to evaluate")
    report: dict = {
        "model": str(folder),
        "base": base_name,
        "prompts": len(prompts),
        "max_new_tokens": cfg.max_new_tokens,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "dtype": str(dtype),
        "definitions": DEFINITIONS,
        "runs": [],
    }
    report["heldout_ce"] = heldout_ce(model, base, prompts)

    def measure(
        decode_fn, bs: int, reference: list[list[int]] | None
    ) -> tuple[dict, list[list[int]], list[str], list]:
        """Speed and quality of one decoder over every prompt at one batch size."""
        res, seconds, ttft = run_decoder(decode_fn, prompts, bs)
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
        )
        report["runs"].append({"decoder": "base", "batch_size": bs, **base_run, **costs})
        for conf in cfg.confidences:
            run, _, texts, res = measure(
                lambda ids, n, c=conf: generate_batch(
                    model, ids, n or cfg.max_new_tokens, c, no_stop, pad, cfg.decode
                ),
                bs,
                base_tokens,
            )
            report["runs"].append(
                {
                    "decoder": "hamburger",
                    "confidence": conf,
                    "batch_size": bs,
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


def bound_columns(run: dict, m: float, costs: dict[str, float], base_run: dict) -> dict[str, float]:
    """m, the speed bound of a HAMburger run (see DEFINITIONS) and the measured share of it."""
    tau = run["tokens_per_macro_step"]
    bound = speed_bound(tau, m, costs["t_base_s"], costs["t_embed_s"], costs["t_micro_s"])
    speedup = run["tokens_per_s"] / base_run["tokens_per_s"]
    return {"micro_calls_per_macro_step": m, "bound": bound, "speedup_over_bound": speedup / bound, **costs}


# ---------------------------------------------------------------- reporting
def table(report: dict) -> str:
    cols = [
        "decoder",
        "confidence",
        "batch_size",
        "tokens_per_macro_step",
        "kv_entries_per_token",
        "tokens_per_s",
        "speedup",
        "micro_calls_per_macro_step",
        "bound",
        "speedup_over_bound",
        "ttft_s",
        "agreement_exact",
        "agreement_prefix",
        "pass_at_1",
        "exact_match",
        "base_nll",
    ]
    rows = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in report["runs"]:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        rows.append(" | ".join(cells))
    lines = [
        f"Eval of {report['model']} against {report['base']} ({report['prompts']} prompts, "
        f"max {report['max_new_tokens']} new tokens)",
        "",
        *rows,
        "",
    ]
    for r in report["runs"]:
        if r["decoder"] == "base" and "t_base_s" in r:
            lines.append(
                f"step costs at batch {r['batch_size']}: t_base {1e3 * r['t_base_s']:.3f} ms, t_embed "
                f"{1e3 * r['t_embed_s']:.3f} ms, t_micro {1e3 * r['t_micro_s']:.3f} ms, HAMburger base step "
                f"{1e3 * r['t_hamburger_step_s']:.3f} ms"
            )
    ce = report.get("heldout_ce") or {}
    if ce:
        lines.append(
            f"heldout_ce: HAMburger {ce['hamburger']:.4f}, base {ce['base']:.4f} nats/token "
            f"over {int(ce['tokens'])} reference tokens"
        )
    lines += ["", "Definitions:"] + [f"  {k}: {v}" for k, v in DEFINITIONS.items()]
    return "\n".join(lines)


def quality_axes(runs: list[dict]) -> list[str]:
    """The quality measures to plot: pass@1 where every run has it and it is not zero everywhere
    (else agreement with the base's greedy output), and the base-judged NLL."""
    if all("pass_at_1" in r for r in runs) and any(r["pass_at_1"] > 0 for r in runs):
        return ["pass_at_1", "base_nll"]
    return ["agreement_prefix", "base_nll"]


def plot(report: dict, path: Path) -> None:
    fig = speed_quality_figure(report)  # selects the Agg backend first
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)


def speed_quality_figure(report: dict):
    """Speed-up (x) against each quality measure (one panel each). Points are labelled (c, batch,
    tau) in a column right of each panel, in the points' vertical order, with leader lines, so
    labels never overlap however close the points are; the base is the star at speed-up 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    measures = quality_axes(runs)
    per_panel = len(runs)
    panel_h = max(2.6, 0.22 * per_panel + 0.6)  # room for one label line per point
    fig, axes = plt.subplots(len(measures), 1, figsize=(8.5, panel_h * len(measures) + 0.8), sharex=True)
    for ax, qual in zip(axes, measures, strict=True):
        points = []  # (x, y, label)
        for bs in sorted({r["batch_size"] for r in runs}):
            ham = sorted(
                (r for r in runs if r["decoder"] == "hamburger" and r["batch_size"] == bs),
                key=lambda r: r["confidence"],
            )
            ax.plot([r["speedup"] for r in ham], [r[qual] for r in ham], "o-", label=f"HAMburger, batch {bs}")
            base = next(r for r in runs if r["decoder"] == "base" and r["batch_size"] == bs)
            ax.plot([1.0], [base[qual]], "k*", markersize=10, label=f"base, batch {bs}")
            points.append((1.0, base[qual], f"base, batch {bs}"))
            for r in ham:
                label = f"c={r['confidence']:g}, batch {bs}: tau {r['tokens_per_macro_step']:.2f}"
                if "bound" in r:
                    label += f", bound {r['bound']:.2f}x"
                points.append((r["speedup"], r[qual], label))
        _label_column(ax, points)
        ax.set_ylabel(qual)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[-1].set_xlabel("decode speed-up over the base (tokens/s ratio)")
    fig.suptitle(
        "HAMburger speed/quality across confidence levels (tau = tokens per macro step)", x=0.1, ha="left"
    )
    fig.subplots_adjust(left=0.1, right=0.62, top=0.93, bottom=0.08, hspace=0.25)
    return fig


def _label_column(ax, points: list[tuple[float, float, str]]) -> None:
    """One label per point, stacked evenly in the panel's height right of it (lowest point at the
    bottom), each joined to its point by a thin leader line."""
    order = sorted(range(len(points)), key=lambda i: (points[i][1], points[i][0]))
    for slot, i in enumerate(order):
        x, y, text = points[i]
        ax.annotate(
            text,
            (x, y),
            xytext=(1.03, (slot + 0.5) / len(points)),
            textcoords="axes fraction",
            fontsize=7,
            va="center",
            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5", "shrinkA": 0, "shrinkB": 2},
        )


def log_mlflow(cfg: EvalConfig, report: dict, out_dir: Path, lineage: dict) -> None:
    if not cfg.mlflow.enabled:
        return
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    import mlflow

    from trainer.train.tracking import default_tracking_uri, experiment_id, flatten_params

    uri = default_tracking_uri(str(out_dir), cfg.mlflow.tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=experiment_id(mlflow.MlflowClient(uri), cfg.mlflow.experiment, uri))
    with mlflow.start_run(run_name=cfg.mlflow.run_name or "eval") as run:
        mlflow.set_tags(
            {
                "stage": "eval",
                "source_run_id": str(lineage.get("source_run_id")),
                "model": report["model"],
                "base": report["base"],
            }
        )
        mlflow.log_params(flatten_params("", {k: v for k, v in to_flat_dict(cfg).items()}))
        for r in report["runs"]:
            prefix = "base" if r["decoder"] == "base" else f"ham_c{r['confidence']}"
            step = 0 if r["decoder"] == "base" else int(round(r["confidence"] * 100))
            mlflow.log_metrics(
                {
                    f"{prefix}/bs{r['batch_size']}/{k}": float(v)
                    for k, v in r.items()
                    if isinstance(v, float | int) and not isinstance(v, bool) and k != "batch_size"
                },
                step=step,
            )
        for k, v in (report.get("heldout_ce") or {}).items():
            mlflow.log_metric(f"heldout_ce/{k}", float(v))
        mlflow.log_artifact(str(out_dir / "eval.json"))
        mlflow.log_artifact(str(out_dir / "speed_quality.png"))
        report["mlflow_run_id"] = run.info.run_id
    (out_dir / "eval.json").write_text(json.dumps(report, indent=1))


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
