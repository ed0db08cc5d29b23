"""`./launch.sh serve MODEL [--host 127.0.0.1 --port 8000 ...]`: an OpenAI-compatible HTTP server.

MODEL is a HAMburger export folder, a plain HF causal-LM folder (`export --base-only`: the base
server, batched the same way) or an MLflow URI (models:/NAME/VERSION). Endpoints:

    POST /v1/completions        {"prompt", "max_tokens", "stop", "temperature": 0, "stream", "confidence"}
    POST /v1/chat/completions   {"messages", ...same...} through the model's chat template
    GET  /v1/models, GET /health, GET /metrics (Prometheus: trainer/serve/metrics.py)

Decoding is greedy (temperature 0; anything else is a 400). `confidence` (HAMburger only, in
(0, 1]) is the stop threshold of the micro decoder. Every response carries `usage` and a
`hamburger` object: macro steps (base forward passes) and tokens per macro step. Extensions:
`confidence`, `timeout` (seconds, at most --timeout-s), `ignore_eos` (benchmarks: decode
exactly max_tokens).

Requests are continuously batched by trainer/serve/scheduler.py. Bounds: --max-batch rows,
--max-queue waiting (then 429), --max-tokens-cap (over it: 400), --timeout-s per request (then
the slot is freed within one macro step and the client gets a 504), and a client that
disconnects frees its slot.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import uuid
import zlib
from pathlib import Path

from fastapi import Request  # module level: the endpoints' annotations are resolved by name
from fastapi.responses import JSONResponse, Response, StreamingResponse

from hamburger.decode.forced import forced_lengths
from trainer.serve.config import ServeConfig
from trainer.serve.job import Job
from trainer.serve.loader import LoadedModel, load_for_serving
from trainer.serve.protocol import (
    MAX_BODY_BYTES,
    SSE_DONE,
    APIError,
    chat_prompt,
    choice,
    completion_prompt,
    delta_choice,
    envelope,
    parse_body,
    parse_params,
    sse,
)
from trainer.serve.scheduler import QueueFull, Scheduler


# ---------------------------------------------------------------------------- the routes
def create_app(loaded: LoadedModel, cfg: ServeConfig, scheduler: Scheduler):
    from fastapi import FastAPI

    app = FastAPI(title="HAMburger server")
    created = int(time.time())

    def error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(_request, e: APIError):
        return error(e)

    @app.exception_handler(404)
    async def _not_found(request, _e):
        return error(APIError(404, f"no route {request.url.path}", None))

    @app.exception_handler(405)
    async def _bad_method(request, _e):
        return error(APIError(405, f"{request.method} not allowed on {request.url.path}"))

    @app.get("/health")
    async def health():
        stats = {"model": loaded.name, "kind": loaded.kind, **scheduler.stats()}
        return {"status": "ok", **stats, "max_batch": cfg.max_batch, "max_queue": cfg.max_queue}

    @app.get("/metrics")
    async def metrics():
        return Response(scheduler.prometheus(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        card = {"id": loaded.name, "object": "model", "created": created, "owned_by": "hamburger-trainer"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        async with one_line_errors(request):
            body = await read_body(request, loaded)
            prompt_ids = completion_prompt(body, loaded)
            return await complete(request, body, prompt_ids, {"prompt"}, False, loaded, cfg, scheduler)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        async with one_line_errors(request):
            body = await read_body(request, loaded)
            prompt_ids = chat_prompt(body, loaded)
            return await complete(request, body, prompt_ids, {"messages"}, True, loaded, cfg, scheduler)

    return app


@contextlib.asynccontextmanager
async def one_line_errors(request: Request):
    """A request that fails in a way no check foresaw still gets an OpenAI-style JSON 500 (never
    starlette's plain-text one), and the log one line naming the route and the error."""
    try:
        yield
    except (APIError, asyncio.CancelledError):
        raise
    except Exception as e:  # noqa: BLE001 - the catch-all of one request; the server carries on
        detail = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        print(f"[serve] error: {request.method} {request.url.path}: {detail}", flush=True)
        raise APIError(500, f"internal error ({detail})", None, "server_error") from None


async def read_body(request: Request, loaded: LoadedModel) -> dict:
    """The JSON object of a request, bounded in size, for the model this server serves."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise APIError(413, f"request body of {size} bytes is over the limit of {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():  # also bounds a body sent without a Content-Length
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"request body is over the limit of {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    body = parse_body(b"".join(chunks))
    asked = body.get("model")
    if asked is not None and asked != loaded.name:
        raise APIError(
            404,
            f"model: {asked!r} is not served here (this server serves {loaded.name!r})",
            "model",
            "not_found_error",
        )
    return body


async def complete(
    request: Request,
    body: dict,
    prompt_ids: list[int],
    known: set[str],
    chat: bool,
    loaded: LoadedModel,
    cfg: ServeConfig,
    scheduler: Scheduler,
):
    """Run one request: queue it, then answer with one body or a stream of chunks."""
    params = parse_params(body, prompt_ids, loaded, cfg, known)
    job = Job(loaded, params, asyncio.get_running_loop())
    if cfg.forced_tau:  # benchmarks: drawn lengths, seeded by the prompt (the same on every run)
        seed = zlib.crc32(str(prompt_ids).encode())
        job.seq.forced_lens = forced_lengths(cfg.forced_tau, segment_cap(cfg, loaded), seed)
    try:
        scheduler.submit(job.seq)
    except QueueFull as e:
        raise APIError(429, str(e), None, "rate_limit_error") from None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    if params.stream:
        events = stream(request, job, rid, chat, loaded.name)
        return StreamingResponse(events, media_type="text/event-stream")
    try:
        await next_event(request, job, want="done")
    except ClientGone:
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
    finally:
        release(request, job)
    job.check_failed()
    choices = [choice(chat, job.text, job.finish_reason())]
    return envelope(rid, loaded.name, chat, choices, usage=job.usage(), hamburger=job.stats())


async def next_event(request: Request, job: Job, want: str | None = None):
    """The job's next event (or its 'done' event). The client is checked every 0.25 s, also
    while events flow: one that disconnected cancels the job (its slot frees at the next
    macro-step boundary)."""
    checked = time.monotonic()
    while True:
        try:
            kind, value = await asyncio.wait_for(job.events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            kind = None
        if time.monotonic() - checked >= 0.25:
            checked = time.monotonic()
            if await request.is_disconnected():
                release(request, job)
                raise ClientGone
        if kind is not None and (want is None or kind == want):
            return kind, value


class ClientGone(Exception):
    """The client hung up before its answer was complete."""


def release(request: Request, job: Job) -> None:
    """Free the job's slot (a no-op once it finished); a client that left first is one log line."""
    if job.seq.finish_reason is None and job.seq.cancel_reason is None:
        print(f"[serve] client disconnected from {request.url.path}; its request was cancelled", flush=True)
    job.seq.cancel("disconnected")


async def stream(request: Request, job: Job, rid: str, chat: bool, model: str):
    """Server-sent events: text as it becomes final, then the finish reason (+ usage), then DONE."""

    def chunk(choices: list[dict], **extra) -> str:
        return sse(envelope(rid, model, chat, choices, chunk=True, **extra))

    try:
        if chat:
            yield chunk([delta_choice(chat, "", None, role=True)])
        while True:
            kind, value = await next_event(request, job)
            if kind == "delta":
                yield chunk([delta_choice(chat, value, None)])
                continue
            try:
                job.check_failed()
            except APIError as e:
                yield sse(e.body())
                break
            yield chunk([delta_choice(chat, None, job.finish_reason())], hamburger=job.stats())
            if job.params.include_usage:
                yield chunk([], usage=job.usage())
            break
        yield SSE_DONE
    except ClientGone:
        return
    finally:
        release(request, job)


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    cfg.validate()
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    loaded = load_for_serving(cfg.model, cfg.dtype, cfg.device, cfg.model_name)
    check_forcing(cfg, loaded)
    batch = loaded.batch(
        cfg.decode,
        cfg.max_batch,
        cfg.max_prompt_tokens,
        cfg.max_tokens_cap,
        cfg.batch_aware,
        cfg.max_segment_len,
    )
    scheduler = Scheduler(batch, cfg.max_batch, cfg.max_queue).start()
    app = create_app(loaded, cfg, scheduler)
    print(
        f"[serve] {loaded.kind} model {loaded.name!r} on http://{cfg.host}:{cfg.port} "
        f"(max_batch {cfg.max_batch}, max_queue {cfg.max_queue}, max_tokens cap {cfg.max_tokens_cap}, "
        f"decode {cfg.decode}: {type(batch).__name__})",
        flush=True,
    )
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        scheduler.close()


def check_forcing(cfg: ServeConfig, loaded: LoadedModel) -> None:
    """--forced-tau (benchmarks) needs what it forces: HAMburger segments."""
    if not cfg.forced_tau:
        return
    if loaded.kind != "hamburger":
        raise ValueError("--forced-tau needs a HAMburger model")
    try:
        forced_lengths(cfg.forced_tau, segment_cap(cfg, loaded), seed=0, n=1)
    except ValueError as e:
        raise ValueError(f"--{e}") from None


def segment_cap(cfg: ServeConfig, loaded: LoadedModel) -> int:
    """The longest segment this server decodes: the model's K, or --max-segment-len below it."""
    k = loaded.stepper.max_segment_len
    return min(k, cfg.max_segment_len or k)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="export folder (HAMburger or --base-only) or models:/NAME/VERSION")
    defaults = ServeConfig(model="")
    for name in (
        "host",
        "port",
        "max_batch",
        "max_queue",
        "max_tokens_cap",
        "timeout_s",
        "model_name",
        "dtype",
        "device",
        "threads",
        "decode",
        "max_prompt_tokens",
        "max_segment_len",
        "forced_tau",
    ):
        value = getattr(defaults, name)
        ap.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    ap.add_argument("--confidence", type=float, default=None, help="default confidence (HAMburger)")
    ap.add_argument("--batch-aware", action="store_true", help="HAMburger: the micro loop knows its batch")
    args = vars(ap.parse_args(argv))
    cfg = ServeConfig(**args)
    try:
        cfg.validate()
        if "://" not in cfg.model and not cfg.model.startswith(("models:/", "runs:/")):
            _check_folder(cfg.model)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"[serve] error: {e}") from None
    try:
        serve(cfg)
    except (ValueError, FileNotFoundError) as e:  # an MLflow model whose folder is incomplete
        raise SystemExit(f"[serve] error: {e}") from None


def _check_folder(path: str) -> None:
    """Before the server starts: a model folder whole (folder_check), or an MLflow model folder."""
    from hamburger.model.folder_check import check_model_folder

    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such model folder")
    if (Path(path) / "config.json").is_file() or not (Path(path) / "MLmodel").is_file():
        check_model_folder(path)


if __name__ == "__main__":
    main()
