"""The GPU check's sections: correctness checks, decode step costs and speed, labelling, training.

Each section_* function measures one part on one device and returns its numbers as a dict;
bench/gpu_check.py decides which run, in what order and under which deadline, and writes the
report. Imports only torch, transformers and the repo at load time: data_prep's scorer and the
DeepSpeed trainer are imported inside the sections that use them.
"""

from __future__ import annotations

import math
import random
import time
import traceback
from pathlib import Path

import torch
from gpu_check_models import (  # first: it puts the repo root on sys.path
    draw,
    free,
    llama_config,
    peak_gib,
    peak_tflops,
    random_base,
    random_hamburger,
    reset_peak,
    segment_distribution,
    tilted,
)

from hamburger.decode.static import StaticBaseDecoder, StaticHAMburgerDecoder
from hamburger.decode.step_costs import decode_costs, speed_bound
from hamburger.decode.timing import sync
from hamburger.model import HAMburgerConfig, Sample, collate


# ---------------------------------------------------------------- checks
def section_checks(args, device) -> dict:
    """Correctness on this device: flex == dense (losses; gradients where flex has a backward),
    graphed == eager decoding token for token (float64, sharpened weights: no near-ties)."""
    out = check_flex(device)
    out.update(check_graphed(device))
    out["ok"] = (
        out["flex_loss_rel_diff"] < 1e-4
        and out.get("flex_grad_rel_diff", 0.0) < 1e-2  # flex kernels may use TF32 on a GPU
        and out["graphed_equals_eager"]
        and out["graphed_equals_eager_base"]
    )
    if not out["ok"]:
        raise AssertionError(f"correctness checks failed: {out}")
    return out


def check_flex(device) -> dict:
    model = random_hamburger("tiny", device, torch.float32, packed_attention="flex", micro_layers=2)
    rng = random.Random(0)
    samples = [
        Sample([rng.randrange(3, 500) for _ in range(p + r)], p, s, i)
        for i, (p, r, s) in enumerate([(5, 7, [3, 1, 3]), (3, 9, [4, 4, 1]), (8, 4, [2, 2])])
    ]
    batch = collate(samples, 4, row_capacity=48).to(device)
    grads_ok = device.type == "cuda"  # FlexAttention has no backward on CPU
    params = [p for p in model.parameters() if p.requires_grad]
    res = {}
    for mode in ("flex", "dense"):
        model.config.packed_attention = mode
        with torch.set_grad_enabled(grads_ok):
            loss = model(batch).loss
        res[mode] = (float(loss), torch.autograd.grad(loss, params, allow_unused=True) if grads_ok else [])
    out = {"flex_loss_rel_diff": abs(res["flex"][0] - res["dense"][0]) / abs(res["dense"][0])}
    if grads_ok:
        pairs = [(a, b) for a, b in zip(res["flex"][1], res["dense"][1], strict=True) if b is not None]
        out["flex_grad_rel_diff"] = max(
            (a - b).abs().max().item() / b.abs().max().clamp(min=1e-12).item() for a, b in pairs
        )
    return out


def check_graphed(device) -> dict:
    from hamburger.decode import base_generate_batch, generate_batch

    model = random_hamburger("tiny", device, torch.float64, micro_layers=2)
    with torch.no_grad():
        for p in model.base.parameters():
            p.mul_(3.0)
        torch.manual_seed(5)
        for layer in model.stop_head.net:  # stop decisions that vary from token to token
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0, 0.5)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (5, 9, 3, 7)]
    eager = generate_batch(model, prompts, 16, 0.5)
    graphed = generate_batch(model, prompts, 16, 0.5, decode="graphed")
    base_eager = base_generate_batch(model.base, prompts, 16)
    base_graphed = base_generate_batch(model.base, prompts, 16, decode="graphed")
    return {
        "graphed_equals_eager": [(r.tokens, r.seg_lens) for r in eager]
        == [(r.tokens, r.seg_lens) for r in graphed],
        "graphed_tokens_per_macro_step": sum(len(r.tokens) for r in graphed)
        / sum(len(r.seg_lens) for r in graphed),
        "graphed_equals_eager_base": [r.tokens for r in base_eager] == [r.tokens for r in base_graphed],
    }


# ---------------------------------------------------------------- decode
def forced_table(case: str, tau: float, batch: int, probs: list[float], rng: random.Random) -> torch.Tensor:
    """[batch, 512] forced segment lengths with mean tau: equal rows, or drawn per row and step;
    drawn_k2 is drawn capped at 2 tokens (a batch-aware rule: a smaller K for larger batches)."""
    if case == "equal":
        lo = math.floor(tau)
        pattern = [lo] if tau == lo else [lo, lo + 1]  # 1.5 -> 1,2,1,2...; 2.5 -> 2,3,...
        return torch.tensor([pattern * (512 // len(pattern))] * batch)
    table = torch.tensor([draw(rng, tilted(probs, tau), 512) for _ in range(batch)])
    return table.clamp(max=2) if case == "drawn_k2" else table


def eager_base_speed(model, prompts, max_new: int, device) -> float:
    """tokens/s of the base through the eager decoder (batched_decode), for reference."""
    from hamburger.decode import base_generate_batch

    base_generate_batch(model.base, prompts, 4)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    base_generate_batch(model.base, prompts, max_new)
    sync(device)
    return len(prompts) * max_new / (time.perf_counter() - t0)


def decode_rows(args, device, model, shape, batch, prompts, graphs, probs, rng) -> list[dict]:
    """One batch size in one mode: per-step costs, the base's speed, every forced case."""
    mode = "graphed" if graphs else "static"
    rows = []
    base_dec = StaticBaseDecoder(model.base, batch, args.prompt_len, args.max_new, graphs)
    ham_dec = StaticHAMburgerDecoder(model, batch, args.prompt_len, args.max_new, graphs)
    base_dec.generate(prompts)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    base_dec.generate(prompts)
    sync(device)
    base_tps = batch * args.max_new / (time.perf_counter() - t0)
    costs = decode_costs(model, base_dec, ham_dec, graphs, device, min(32, args.max_new - 1))
    # drawn_aware: the drawn lengths through the batch-aware micro loop (its cutoff measured here)
    cutoff = ham_dec.measure_cutoff() if batch > 1 else 0.0
    tables = {}  # drawn_aware decodes drawn's very tables
    for case in ("equal", "drawn", "drawn_k2", "drawn_aware") if batch > 1 else ("equal", "drawn"):
        for tau in args.taus:
            key = (case.removesuffix("_aware"), tau)
            if key not in tables:
                tables[key] = forced_table(key[0], tau, batch, probs, rng)
            table = tables[key]
            run = dict(forced_seg_lens=table, micro_cutoff=cutoff if case == "drawn_aware" else 0.0)
            ham_dec.generate(prompts, **run)  # warm-up
            ham_dec.micro_calls = ham_dec.macro_steps = 0
            sync(device)
            t0 = time.perf_counter()
            res = ham_dec.generate(prompts, **run)
            sync(device)
            seconds = time.perf_counter() - t0
            m = ham_dec.micro_calls / ham_dec.macro_steps
            tau_run = sum(len(r.tokens) / len(r.seg_lens) for r in res) / batch
            bound = speed_bound(tau_run, m, costs["t_base"], costs["t_embed"], costs["t_micro"])
            tps = batch * args.max_new / seconds
            rows.append(
                {
                    "model": shape,
                    "batch": batch,
                    "mode": mode,
                    "case": case,
                    "tau": tau,
                    "tau_measured": tau_run,
                    "m": m,
                    "tokens_per_s": tps,
                    "base_tokens_per_s": base_tps,
                    "speedup": tps / base_tps,
                    "bound": bound,
                    "speedup_over_bound": tps / base_tps / bound,
                    "micro_cutoff": run["micro_cutoff"],
                    **costs,
                }
            )
    return rows


def section_decode(args, device, shape: str) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_hamburger(shape, device, dtype)
    k = model.config.max_segment_len
    probs = segment_distribution(args.manifest, k)
    rng = random.Random(0)
    vocab = model.base.config.vocab_size
    rows, errors = [], []
    for batch in args.batch_sizes:
        prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(batch)]
        eager_base_tps = eager_base_speed(model, prompts, args.max_new, device)
        for graphs in (False, True):
            if graphs and device.type != "cuda":
                continue  # no CUDA graphs on CPU: "graphed" is the static path itself
            mode = "graphed" if graphs else "static"
            try:
                rows += decode_rows(args, device, model, shape, batch, prompts, graphs, probs, rng)
            except Exception as exc:  # keep the other batches and modes
                traceback.print_exc()
                errors.append(f"batch {batch} {mode}: {type(exc).__name__}: {exc}")
            free(device)
            for row in rows:
                row.setdefault("eager_base_tokens_per_s", eager_base_tps)
    del model
    free(device)
    return {
        "rows": rows,
        "errors": errors,
        "segment_distribution": probs,
        "prompt_len": args.prompt_len,
        "max_new": args.max_new,
    }


# ---------------------------------------------------------------- label
def section_label(args, device, shape: str) -> dict:
    from data_prep.label import Scorer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = random_base(shape, device, dtype)
    rng = random.Random(0)
    vocab = base.config.vocab_size
    length, prompt = args.label_len, args.label_len // 4
    n = max(2, 2 * args.label_batch_tokens // length)  # two full batches
    samples = [([rng.randrange(3, vocab) for _ in range(length)], prompt) for _ in range(n)]
    weights = sum(p.numel() * p.element_size() for p in base.parameters()) / 2**30
    scorer = Scorer(base, device, pad_id=0)
    with torch.no_grad():
        scorer.score(samples[:2], args.label_batch_tokens)  # warm-up
        free(device)
        reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        scorer.score(samples, args.label_batch_tokens)
        sync(device)
        label_s = time.perf_counter() - t0
        label_peak = peak_gib(device)
        per_batch = max(1, args.label_batch_tokens // length)
        plain = {"batch_tokens": per_batch * length}
        try:
            free(device)
            reset_peak(device)
            plain_s = _plain_forward(base, samples, per_batch, device)
        except torch.cuda.OutOfMemoryError:  # full-vocabulary logits of the whole batch
            free(device)
            per_batch = max(1, 8192 // length)
            plain = {"batch_tokens": per_batch * length, "note": "the paper batch ran out of memory"}
            reset_peak(device)
            plain_s = _plain_forward(base, samples, per_batch, device)
        plain["peak_gib"] = peak_gib(device)
    tokens = n * length
    out = {
        "model": shape,
        "batch_tokens": args.label_batch_tokens,
        "vocab": vocab,
        "tokens": tokens,
        "weights_gib": weights,
        "label_tokens_per_s": tokens / label_s,
        "label_peak_gib": label_peak,
        "plain_forward_tokens_per_s": tokens / plain_s,
        "plain_forward": plain,
        "ratio": plain_s / label_s,
    }
    del base, scorer
    free(device)
    return out


def _plain_forward(base, samples, per_batch: int, device) -> float:
    """Seconds for a plain forward (full-vocabulary logits) over all samples, per_batch at a time."""
    ids = torch.tensor([s for s, _ in samples], device=device)
    _ = base(input_ids=ids[:1]).logits  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(ids), per_batch):
        _ = base(input_ids=ids[i : i + per_batch]).logits
    sync(device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------- train
def train_samples(k: int, capacity: int, probs: list[float], vocab: int, seed: int) -> list[Sample]:
    """Samples filling one row of `capacity` macro positions (K=1: every segment one token)."""
    rng = random.Random(seed)
    out: list[Sample] = []
    used = 0
    while True:
        n = rng.randint(max(8, capacity // 16), max(16, capacity // 4))
        prompt = max(1, n // 4)
        segs = draw(rng, probs, n) if k > 1 else [1] * n
        segs = _cut(segs, n - prompt)
        s = Sample([rng.randrange(3, vocab) for _ in range(prompt + sum(segs))], prompt, segs, len(out))
        if used + s.macro_len > capacity:
            return out or [s]
        out.append(s)
        used += s.macro_len


def _cut(segs: list[int], total: int) -> list[int]:
    """Segments whose lengths sum to exactly total (the last one shortened)."""
    out, left = [], total
    for s in segs:
        if left <= 0:
            break
        out.append(min(s, left))
        left -= out[-1]
    return out


def model_flops(cfg, hcfg: HAMburgerConfig, samples: list[Sample], k: int) -> float:
    """Training FLOPs (3x forward) of one step: matmuls of the base layers, attention within each
    sample, LM head and stop head on every response token, micro-decoder layers and attention."""
    d, ff, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q_dim, kv_dim = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_layer = 2 * (d * q_dim + 2 * d * kv_dim + q_dim * d + 3 * d * ff)  # forward FLOPs per position

    def attn(n: int) -> float:  # forward attention FLOPs of one causal sequence of n positions
        return 4 * q_dim * n * (n + 1) / 2

    macro = sum(s.macro_len for s in samples)
    resp = sum(len(s.input_ids) - s.prompt_len for s in samples)
    fwd = layers * (per_layer * macro + sum(attn(s.macro_len) for s in samples))
    fwd += resp * (2 * d * cfg.vocab_size + (k > 1) * 2 * (2 * d * d + d))
    if k > 1:
        f = len(hcfg.resolved_feature_layers(layers))
        for s in samples:
            for n in s.seg_lens:
                if n > 1:
                    fwd += hcfg.micro_layers * (per_layer * (f + n - 1) + attn(f + n - 1))
    return 3 * fwd


def section_train(args, device, shape: str) -> dict:
    """HAMburger (K=4) vs plain SFT (K=1) through the trainer's strategy: args.train_steps timed
    steps cycling over args.train_batches different packed rows (so no one batch's shape is
    timed alone), one DeepSpeed engine per row of the table, freed before the next (its peak
    memory is its own), and a profiler summary of one step."""
    from trainer.train.config import TrainConfig
    from trainer.train.strategy import DeepSpeedStrategy

    base_dir = Path(args.work) / f"base-{shape}"
    if not (base_dir / "config.json").exists():
        random_base(
            shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32
        ).save_pretrained(base_dir)
        free(device)
    cfg = llama_config(shape)
    probs = segment_distribution(args.manifest, 4)
    attentions = ["dense", "flex"] if device.type == "cuda" else ["dense"]  # flex: no CPU backward
    peak = peak_tflops(device)
    rows, errors, profiles = [], [], {}
    for k in (4, 1):
        sample_sets = [
            train_samples(k, args.row_capacity, probs, cfg.vocab_size, seed=1 + i)
            for i in range(args.train_batches)
        ]
        batches = [collate(samples, k, row_capacity=args.row_capacity) for samples in sample_sets]
        tokens = sum(len(s.input_ids) for samples in sample_sets for s in samples) / len(sample_sets)
        for attention in attentions:
            free(device)
            reset_peak(device)
            start_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
            tcfg = TrainConfig()
            tcfg.model.hamburger.max_segment_len = k
            tcfg.model.hamburger.packed_attention = attention
            tcfg.precision = "bf16" if device.type == "cuda" else "fp32"
            tcfg.optim.warmup_steps = 0
            st = DeepSpeedStrategy(tcfg)
            st.setup_distributed()
            try:
                model = st.build_model(str(base_dir))
                st.prepare(model, total_steps=1000)
                st.train()
                flops = sum(model_flops(cfg, st.model.config, s, k) for s in sample_sets) / len(sample_sets)
                for i in range(args.train_warmup):
                    _train_step(st, batches[i % len(batches)])
                times = []
                for i in range(args.train_steps):
                    batch = batches[i % len(batches)]
                    sync(device)
                    t0 = time.perf_counter()
                    _train_step(st, batch)
                    sync(device)
                    times.append(time.perf_counter() - t0)
                profiles[f"K={k} {attention}"] = profile_step(st, batches[0], device)
            except Exception as exc:  # keep the other runs (flex last: a failure cannot spoil dense)
                traceback.print_exc()
                errors.append(f"K={k} {attention}: {type(exc).__name__}: {exc}")
                st.release()
                continue
            seconds = sum(times) / len(times)
            rows.append(
                {
                    "model": shape,
                    "K": k,
                    "attention": attention,
                    "row_capacity": args.row_capacity,
                    "batches": len(batches),
                    "steps": len(times),
                    "tokens": tokens,
                    "step_s": seconds,
                    "step_s_p50": sorted(times)[len(times) // 2],
                    "step_s_max": max(times),
                    "tokens_per_s": tokens / seconds,
                    "peak_gib": peak_gib(device),
                    "allocated_before_build_gib": start_gib,
                    "model_tflops_per_step": flops / 1e12,
                    "mfu": flops / seconds / (peak * 1e12) if peak else None,
                }
            )
            st.release()  # this engine's partitions, optimiser state and hooks go before the next row
            del model
            free(device)
    from hamburger.model.packed_attention import COMPILE_FAILURES

    return {
        "rows": rows,
        "errors": errors,
        "profiles": profiles,
        "peak_bf16_tflops": peak,
        "segment_distribution": probs,
        "flex_compile_failures": COMPILE_FAILURES,
    }


def profile_step(st, batch, device, top: int = 12) -> dict:
    """One training step under torch.profiler: wall time, the device's busy time and the host's
    share of the step (what the GPU waits on), and the kernels (or, on CPU, operators) that
    take the most self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        _train_step(st, batch)
        sync(device)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    if device.type == "cuda":
        key = (
            "self_device_time_total"
            if hasattr(events[0], "self_device_time_total")
            else "self_cuda_time_total"
        )
        kernels = [e for e in events if getattr(e, key, 0) > 0]
        busy = sum(getattr(e, key) for e in kernels) / 1e6
    else:
        key = "self_cpu_time_total"
        kernels = [e for e in events if e.self_cpu_time_total > 0]
        busy = None
    kernels.sort(key=lambda e: getattr(e, key), reverse=True)
    return {
        "wall_s": wall,
        "device_busy_s": busy,
        "host_share": None if busy is None else max(0.0, 1 - busy / wall),
        "top": [
            {"name": e.key[:120], "calls": e.count, "self_ms": getattr(e, key) / 1e3} for e in kernels[:top]
        ],
    }


def _train_step(st, batch) -> None:
    out = st.forward(batch)
    st.backward(out.loss)
    st.step()
