"""Serving under load on loopback: the HAMburger server, the base server (same batching) and the
pyfunc under `mlflow models serve`, N concurrent clients for a fixed number of requests each.

    python bench/bench_serve.py [--layers 30] [--requests 16] [--max-tokens 32] [--concurrency 1,4,16]
    python bench/bench_serve.py --soak-s 600 [--skip-load]   # malformed, oversized, abandoned requests mixed in

The model is built here in seconds: SmolLM2-135M-Instruct (the embedded model; --layers keeps
its first L layers) as the base, and the same base with freshly initialised HAMburger modules
(untrained: its stop head says P(continue) ~ 0.5, so confidence 0.9 gives one-token segments,
pure serving overhead, and confidence 0.3 gives K-token segments, the mechanics' upper bound;
neither says anything about a trained model's speed or quality). Prompts: chatterbot-corpus
questions (the demo's data), chosen by a fixed hash. Every request decodes exactly --max-tokens
(`ignore_eos` on our servers; the pyfunc stops at EOS, its tokens/s counts what it generated).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402

SECTION = "Serving: OpenAI server with continuous batching vs base vs pyfunc (CPU)"
SLOTS_SECTION = "Serving: the slot engine (static) vs the eager batch (CPU)"


# ---------------------------------------------------------------------------- model and prompts
def build_models(work: Path, layers: int) -> dict[str, Path]:
    import mlflow.pyfunc
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from hamburger.assets import smollm2_dir
    from hamburger.model import HAMburgerConfig, HAMburgerModel, save_model
    from trainer.export.pyfunc import pyfunc_spec

    src = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(str(src))
    config = AutoConfig.from_pretrained(str(src))
    if hasattr(config, "quantization_config"):  # the cached conversion still names its GGUF source
        del config.quantization_config
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    base.load_state_dict(load_file(str(src / "model.safetensors")), strict=False)  # tied head not stored
    base.tie_weights()
    if layers < base.config.num_hidden_layers:
        base.model.layers = base.model.layers[:layers]
        base.config.num_hidden_layers = layers
        if getattr(base.config, "layer_types", None):
            base.config.layer_types = base.config.layer_types[:layers]
    eos = base.config.eos_token_id
    out = {"base": work / "base", "ham": work / "ham", "pyfunc": work / "pyfunc"}
    base.save_pretrained(out["base"])
    tok.save_pretrained(out["base"])
    (out["base"] / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos, "max_new_tokens": 256})
    )
    torch.manual_seed(0)
    ham = HAMburgerModel(base, HAMburgerConfig())
    save_model(ham, str(out["ham"]), tokenizer=tok)
    gen = {"eos_token_id": eos, "max_new_tokens": 256, "confidence": 0.9}
    (out["ham"] / "generation_config.json").write_text(json.dumps(gen))
    mlflow.pyfunc.save_model(str(out["pyfunc"]), **pyfunc_spec(out["ham"]), pip_requirements=["torch"])
    return out


def bench_prompts(n: int) -> list[str]:
    from data_prep.sources import chatterbot_records

    records, _ = chatterbot_records()
    ranked = sorted(records, key=lambda r: hashlib.sha256(f"{r[0]}|{r[1]}".encode()).hexdigest())
    prompts = [r[2]["instruction"] for r in ranked]
    return (prompts * (n // max(len(prompts), 1) + 1))[:n]


# ---------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SETTINGS = {"threads": "1"}
"""Torch threads per server (OMP_NUM_THREADS, --threads). One: on a shared 2-core machine, multi-threaded
kernels of small decode steps wait on a descheduled partner thread at every barrier."""


def env() -> dict:
    bindir = str(Path(sys.executable).parent)
    return {
        **{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
        "OMP_NUM_THREADS": SETTINGS["threads"],
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore",
    }


class Server:
    def __init__(
        self,
        kind: str,
        folder: Path,
        log: Path,
        max_batch: int = 16,
        cap: int = 400,
        decode: str = "auto",
        extra: tuple[str, ...] = (),
    ):
        self.kind, self.port = kind, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if kind == "pyfunc":
            cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", str(folder)]
            cmd += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(self.port)]
            self.health = "/ping"
        else:
            cmd = [sys.executable, "-m", "trainer.serve", str(folder), "--port", str(self.port)]
            cmd += ["--max-batch", str(max_batch), "--max-queue", "256", "--max-tokens-cap", str(cap)]
            cmd += ["--model-name", "bench", "--decode", decode, "--max-prompt-tokens", "256", *extra]
            self.health = "/health"
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=self.log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 300
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} server exited ({self.proc.returncode}); see {log}")
            try:
                if requests.get(self.url + self.health, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{kind} server not up after 300 s; see {log}")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# ---------------------------------------------------------------------------- one request
def ask_ours(url: str, prompt: str, max_tokens: int, confidence: float | None) -> dict:
    """Streamed chat completion: latency, time to first token, tokens, macro steps."""
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if confidence is not None:
        body["confidence"] = confidence
    t0 = time.perf_counter()
    ttft, tokens, steps = None, 0, 0
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=600) as r:
        if r.status_code != 200:
            return {"ok": False, "error": f"{r.status_code} {r.text[:200]}"}
        for line in r.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                return {"ok": False, "error": ev["error"]["message"]}
            if ttft is None and ev["choices"] and ev["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
            if ev.get("hamburger"):
                steps = ev["hamburger"]["macro_steps"]
    lat = time.perf_counter() - t0
    return {"ok": tokens == max_tokens, "latency": lat, "ttft": ttft or lat, "tokens": tokens, "steps": steps}


def ask_pyfunc(url: str, prompt: str, max_tokens: int, confidence: float | None) -> dict:
    row = {"prompt": prompt, "max_new_tokens": max_tokens}
    if confidence is not None:
        row["confidence"] = confidence
    t0 = time.perf_counter()
    r = requests.post(url + "/invocations", json={"dataframe_records": [row]}, timeout=600)
    lat = time.perf_counter() - t0
    if r.status_code != 200:
        return {"ok": False, "error": f"{r.status_code} {r.text[:200]}"}
    pred = r.json()["predictions"][0]
    return {"ok": True, "latency": lat, "ttft": lat, "tokens": pred["tokens"], "steps": pred["macro_steps"]}


def run_load(ask, url: str, prompts: list[str], concurrency: int, max_tokens: int, confidence) -> dict:
    results: list[dict] = []
    lock, it = threading.Lock(), iter(range(len(prompts)))

    def worker():
        while True:
            with lock:
                i = next(it, None)
            if i is None:
                return
            try:
                res = ask(url, prompts[i], max_tokens, confidence)
            except requests.RequestException as e:
                res = {"ok": False, "error": str(e)}
            with lock:
                results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    lat = sorted(r["latency"] for r in ok) or [float("nan")]
    ttft = sorted(r["ttft"] for r in ok) or [float("nan")]
    tokens, steps = sum(r["tokens"] for r in ok), sum(r["steps"] for r in ok)
    errors = sorted({r["error"][:120] for r in results if not r["ok"] and "error" in r})
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "tokens_per_s": tokens / wall,
        "p50": _pct(lat, 50),
        "p95": _pct(lat, 95),
        "p99": _pct(lat, 99),
        "ttft_p50": _pct(ttft, 50),
        "tokens_per_macro_step": tokens / steps if steps else float("nan"),
        "wall_s": wall,
        "errors": errors,
    }


def _pct(sorted_values: list[float], p: float) -> float:
    k = (len(sorted_values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


# ---------------------------------------------------------------------------- soak
BAD_REQUESTS = [  # (name, how to send it, expected status)
    ("malformed JSON", lambda u: requests.post(u + "/v1/completions", data=b"{oops", timeout=30), 400),
    ("2 MiB body", lambda u: requests.post(u + "/v1/completions", data=b"x" * (2 << 20), timeout=30), 413),
    ("max_tokens over the cap", lambda u: _post(u, {"prompt": "hi", "max_tokens": 10**9}), 400),
    ("prompt over the context", lambda u: _post(u, {"prompt": "hi " * 9000, "max_tokens": 8}), 400),
    ("temperature 0.8", lambda u: _post(u, {"prompt": "hi", "temperature": 0.8}), 400),
    ("prompt null", lambda u: _post(u, {"prompt": None}), 400),
    ("messages of the wrong type", lambda u: _post(u, {"messages": "hi"}, "/v1/chat/completions"), 400),
    ("confidence 7", lambda u: _post(u, {"prompt": "hi", "confidence": 7}), 400),
]


def _post(url: str, body: dict, path: str = "/v1/completions"):
    return requests.post(url + path, json=body, timeout=30)


def _abandon_stream(url: str) -> None:
    body = {"prompt": "Tell me a long story.", "max_tokens": 300, "stream": True, "ignore_eos": True}
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=30) as r:
        next(r.iter_lines())  # read one event, then hang up


def _abandon_wait(url: str) -> None:
    """A non-streaming client that gives up after 0.3 s."""
    body = {"prompt": "Tell me a long story.", "max_tokens": 300, "ignore_eos": True}
    try:
        requests.post(url + "/v1/completions", json=body, timeout=0.3)
    except requests.RequestException:
        pass


def soak(server: Server, prompts: list[str], seconds: float, max_tokens: int) -> dict:
    stats = {"valid_ok": 0, "valid_failed": 0, "bad_ok": 0, "bad_wrong": [], "abandoned": 0}
    lock, stop = threading.Lock(), time.monotonic() + seconds
    rss = [server.rss_mb()]
    start = time.monotonic()
    series = [(0.0, rss[0])]

    def valid(k: int):
        i = k
        while time.monotonic() < stop:
            res = ask_ours(server.url, prompts[i % len(prompts)], max_tokens, None)
            with lock:
                stats["valid_ok" if res["ok"] else "valid_failed"] += 1
            i += 3

    def abuse():
        i = 0
        while time.monotonic() < stop:
            kind = i % (len(BAD_REQUESTS) + 2)
            if kind < len(BAD_REQUESTS):
                name, send, status = BAD_REQUESTS[kind]
                r = send(server.url)
                good = r.status_code == status and r.json().get("error", {}).get("message")
                with lock:
                    if good:
                        stats["bad_ok"] += 1
                    else:
                        stats["bad_wrong"].append(f"{name}: {r.status_code} {r.text[:80]}")
            else:
                (_abandon_stream if kind == len(BAD_REQUESTS) else _abandon_wait)(server.url)
                with lock:
                    stats["abandoned"] += 1
            i += 1
            time.sleep(0.2)

    def sample():
        while time.monotonic() < stop:
            time.sleep(5)
            rss.append(server.rss_mb())
            series.append((time.monotonic() - start, rss[-1]))

    threads = [threading.Thread(target=valid, args=(k,)) for k in range(3)]
    threads += [threading.Thread(target=abuse), threading.Thread(target=sample)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(1.0)
    health = requests.get(server.url + "/health", timeout=10).json()
    rss.append(server.rss_mb())
    stats.update(
        seconds=seconds,
        rss_start_mb=rss[0],
        rss_end_mb=rss[-1],
        rss_max_mb=max(rss),
        rss_per_minute=[round(mb) for t, mb in series if t == 0 or int(t) % 60 < 5],
        idle_after={k: health[k] for k in ("running", "waiting")},
    )
    return stats


# ---------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30, help="keep the base's first L layers (SmolLM2 has 30)")
    ap.add_argument("--requests", type=int, default=16, help="requests per server and concurrency level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument(
        "--repeats", type=int, default=2, help="passes per row (order reversed each pass); best kept"
    )
    ap.add_argument("--confidences", default="0.9,0.3")
    ap.add_argument(
        "--decodes", default="static,eager", help="our servers' --decode values, each its own server"
    )
    ap.add_argument("--soak-s", type=float, default=0.0, help="then a soak of this many seconds")
    ap.add_argument("--threads", default="1", help="torch threads per server process")
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--skip-pyfunc", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--work", default="", help="folder for the models and logs (default: a temporary one)")
    args = ap.parse_args()
    SETTINGS["threads"] = str(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_serve-"))
    work.mkdir(parents=True, exist_ok=True)
    t0, load_start = time.time(), os.getloadavg()[0]
    folders = build_models(work, args.layers)
    print(f"[bench] models built in {time.time() - t0:.0f} s under {work}", flush=True)
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = bench_prompts(args.requests)
    rows, soak_stats = [], None
    confs = [float(c) for c in args.confidences.split(",")]
    decodes = args.decodes.split(",")
    plan = [(f"hamburger/{d}", folders["ham"], ask_ours, confs) for d in decodes]
    plan += [(f"base/{d}", folders["base"], ask_ours, [None]) for d in decodes]
    if not args.skip_pyfunc:
        plan += [("pyfunc", folders["pyfunc"], ask_pyfunc, [None])]
    servers: dict[str, Server] = {}
    try:
        # All servers up at once, then each concurrency level on every server in turn: a change in
        # the machine's load (it is shared) falls on all of them alike rather than on one.
        for kind, folder, ask, conf_list in [] if args.skip_load else plan:
            name, _, decode = kind.partition("/")
            servers[kind] = Server(name, folder, work / f"{name}-{decode}.log", decode=decode or "auto")
            ask(servers[kind].url, prompts[0], 4, conf_list[0])  # warm-up
        # --repeats passes, the order reversed every other pass; each row keeps its best pass.
        cases = [(kind, ask, conf) for kind, _folder, ask, conf_list in plan for conf in conf_list]
        for c in [] if args.skip_load else levels:
            best: dict[tuple, dict] = {}
            for rep in range(args.repeats):
                for kind, ask, conf in cases if rep % 2 == 0 else cases[::-1]:
                    res = run_load(ask, servers[kind].url, prompts, c, args.max_tokens, conf)
                    row = {"server": kind, "confidence": conf, "concurrency": c, **res}
                    print(json.dumps({k: v for k, v in row.items() if k != "errors"}), flush=True)
                    if (kind, conf) not in best or res["tokens_per_s"] > best[(kind, conf)]["tokens_per_s"]:
                        best[(kind, conf)] = row
            rows += [best[(kind, conf)] for kind, _ask, conf in cases]
        for kind in list(servers):
            servers.pop(kind).stop()
        if args.soak_s > 0:
            srv = Server("hamburger", folders["ham"], work / "soak.log")
            servers["soak"] = srv
            ask_ours(srv.url, prompts[0], 4, None)
            soak_stats = soak(srv, prompts, args.soak_s, 16)
            print(json.dumps(soak_stats), flush=True)
    finally:
        for s in servers.values():
            s.stop()
    args.load = (load_start, os.getloadavg()[0])
    body = report(rows, soak_stats, args)
    print(body)
    if not args.no_write:  # several --decodes: the slot engine against the eager batch
        write_section(SECTION if len(decodes) == 1 else SLOTS_SECTION, body)


def report(rows: list[dict], soak_stats: dict | None, args) -> str:
    lines = [
        f"SmolLM2-135M-Instruct ({args.layers} layers) on loopback, fp32, all servers up at once and each "
        f"concurrency level run on every server in turn, {args.repeats} passes (order reversed each pass), "
        f"best pass kept; {args.requests} requests per row, "
        f"{args.max_tokens} new tokens each (chatterbot questions through the chat template); servers with "
        f"--max-batch 16, {args.threads} torch thread(s) each. HAMburger = the same base + **untrained** HAMburger modules: confidence 0.9 gives "
        "one-token segments (serving overhead only), 0.3 gives K=4-token segments (the mechanics' upper bound, "
        "garbage text). The >= 1.1x-vs-base goal needs a trained model (none on this machine).",
        "",
    ]
    if rows:
        lines += [
            "| server/decode | confidence | concurrency | ok / failed | tokens/s | p50 s | p95 s | p99 s | TTFT p50 s "
            "| tokens per macro step | vs base (same decode) | vs its eager | vs pyfunc |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        ref = {
            (r["server"], r["confidence"], r["concurrency"]): r["tokens_per_s"]
            for r in rows
            if r["failed"] < r["requests"]
        }
        for r in rows:
            kind, _, dec = r["server"].partition("/")
            c = r["concurrency"]
            base = ref.get((f"base/{dec or 'static'}", None, c))
            eager = ref.get((f"{kind}/eager", r["confidence"], c)) if dec and dec != "eager" else None
            pyf = ref.get(("pyfunc", None, c))
            vs_base = f"{r['tokens_per_s'] / base:.2f}x" if base else ""
            vs_eager = f"{r['tokens_per_s'] / eager:.2f}x" if eager else ""
            vs_pyf = f"{r['tokens_per_s'] / pyf:.2f}x" if pyf else ""
            lines.append(
                f"| {r['server']} | {r['confidence'] or ''} | {r['concurrency']} | "
                f"{r['requests'] - r['failed']} / {r['failed']} | {r['tokens_per_s']:.1f} | {r['p50']:.2f} | "
                f"{r['p95']:.2f} | {r['p99']:.2f} | {r['ttft_p50']:.2f} | {r['tokens_per_macro_step']:.2f} | "
                f"{vs_base} | {vs_eager} | {vs_pyf} |"
            )
        errors = sorted({e for r in rows for e in r["errors"]})
        if errors:
            lines += ["", "Failed requests said: " + "; ".join(f"`{e}`" for e in errors[:5])]
        lines += [
            "",
            f"Load average of the (shared, 2-core) machine: {args.load[0]:.1f} at the start, {args.load[1]:.1f} "
            "at the end; other sessions ran beside this one, so single rows are noisy. "
            "Servers run one torch thread each (--threads): with two per server on this shared machine, the small "
            "kernels of a decode step waited on a descheduled partner thread at every barrier, and the base server "
            "ran several times slower than the same decoding in-process. "
            "TTFT of the pyfunc = its latency (no streaming). `mlflow models serve` (one worker) runs each "
            "request's predict on its own thread: concurrent requests decode side by side, each as a batch of one.",
        ]
    if soak_stats:
        s = soak_stats
        lines += [
            "",
            f"Soak ({s['seconds']:.0f} s, HAMburger server, 3 valid streaming clients + 1 client cycling through "
            f"{len(BAD_REQUESTS)} kinds of bad request and 2 kinds of abandoned request): valid requests "
            f"{s['valid_ok']} ok / {s['valid_failed']} failed; bad requests answered with the expected 4xx and a "
            f"message: {s['bad_ok']} (wrong: {len(s['bad_wrong'])}); abandoned: {s['abandoned']}; RSS start "
            f"{s['rss_start_mb']:.0f} MB, end {s['rss_end_mb']:.0f} MB, max {s['rss_max_mb']:.0f} MB "
            f"(each minute: {s['rss_per_minute']}); "
            f"after the soak: {s['idle_after']} (every slot freed).",
        ]
        if s["bad_wrong"]:
            lines += ["", "Wrong answers: " + "; ".join(s["bad_wrong"][:5])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
