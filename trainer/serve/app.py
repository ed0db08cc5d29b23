"""`./launch.sh serve MODEL [--host 127.0.0.1 --port 8000 ...]`: an OpenAI-compatible HTTP server.

MODEL is a HAMburger export folder, a plain HF causal-LM folder (`export --base-only`: the base
server, batched the same way) or an MLflow URI (models:/NAME/VERSION). Endpoints:

    POST /v1/completions        {"prompt", "max_tokens", "stop", "temperature": 0, "stream", "confidence"}
    POST /v1/chat/completions   {"messages", ...same...} through the model's chat template
    GET  /v1/models, GET /health

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
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request  # module level: the endpoints' annotations are resolved by name

from hamburger.decode.continuous import Sequence
from trainer.serve.loader import LoadedModel, load_for_serving
from trainer.serve.scheduler import QueueFull, Scheduler

MAX_BODY_BYTES = 1 << 20
MAX_STOPS = 4
# Fields OpenAI clients may send that greedy decoding honours only at their neutral value.
NEUTRAL = {
    "n": (1,),
    "best_of": (1,),
    "top_p": (1, 1.0),
    "echo": (False,),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
}
IGNORED = {"user", "seed", "model", "stream_options", "response_format"}


@dataclass
class ServeConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16
    max_queue: int = 64
    max_tokens_cap: int = 1024
    timeout_s: float = 300.0
    confidence: float | None = None
    """Default confidence (HAMburger); None: the export's generation_config.json, else 0.9."""
    model_name: str = ""
    dtype: str = "float32"
    device: str = ""
    threads: int = 0
    """torch threads (0: torch's default). On a CPU shared with other work, 1 avoids threads
    waiting on a descheduled partner at every barrier of the small decode kernels."""

    def validate(self) -> None:
        checks = {
            "max_batch": self.max_batch >= 1,
            "max_queue": self.max_queue >= 0,
            "max_tokens_cap": self.max_tokens_cap >= 1,
            "timeout_s": self.timeout_s > 0,
            "port": 0 <= self.port < 65536,
            "confidence": self.confidence is None or 0 < self.confidence <= 1,
            "dtype": self.dtype in ("float32", "bfloat16", "float16"),
            "threads": self.threads >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"serve: invalid value for {bad[0]}: {getattr(self, bad[0])!r}")


class APIError(Exception):
    """An OpenAI-style error: status, message, the offending field."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}
        }


# ---------------------------------------------------------------------------- request parsing
@dataclass
class Params:
    prompt_ids: list[int]
    max_tokens: int
    stops: list[str]
    confidence: float | None
    stream: bool
    include_usage: bool
    timeout_s: float
    ignore_eos: bool = False


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_params(
    body: dict, prompt_ids: list[int], loaded: LoadedModel, cfg: ServeConfig, known: set[str]
) -> Params:
    """Validate the fields shared by both endpoints; every error names its field."""
    unknown = sorted(set(body) - known - set(NEUTRAL) - IGNORED - COMMON)
    if unknown:
        raise APIError(400, f"{unknown[0]}: unknown field", unknown[0])
    for key, allowed in NEUTRAL.items():
        if key in body and body[key] not in allowed:
            raise APIError(400, f"{key}: only {allowed[0]!r} is supported (greedy decoding)", key)
    temperature = body.get("temperature", 0)
    if temperature is not None and (not _is_number(temperature) or temperature != 0):
        raise APIError(400, "temperature: only 0 (greedy decoding) is supported", "temperature")
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(max_key)
    if max_tokens is None:
        max_tokens = min(loaded.default_max_tokens, cfg.max_tokens_cap)
    if not _is_int(max_tokens) or max_tokens < 1:
        raise APIError(400, f"{max_key}: must be an integer >= 1, got {max_tokens!r}", max_key)
    if max_tokens > cfg.max_tokens_cap:
        raise APIError(
            400, f"{max_key}: {max_tokens} is over this server's cap of {cfg.max_tokens_cap}", max_key
        )
    if len(prompt_ids) + max_tokens > loaded.max_positions:
        raise APIError(
            400,
            f"{max_key}: prompt ({len(prompt_ids)} tokens) + {max_tokens} new tokens exceeds the model's "
            f"context of {loaded.max_positions}",
            max_key,
        )
    stops = body.get("stop")
    stops = [] if stops is None else [stops] if isinstance(stops, str) else stops
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise APIError(400, f"stop: a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    confidence = body.get("confidence")
    if confidence is not None:
        if loaded.kind != "hamburger":
            raise APIError(
                400, "confidence: this server serves a base model, which has no stop head", "confidence"
            )
        if not _is_number(confidence) or not 0 < confidence <= 1:
            raise APIError(400, f"confidence: must be a number in (0, 1], got {confidence!r}", "confidence")
    elif loaded.kind == "hamburger":
        confidence = cfg.confidence if cfg.confidence is not None else loaded.default_confidence
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream: must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "stream_options: must be an object", "stream_options")
    timeout = body.get("timeout", cfg.timeout_s)
    if not _is_number(timeout) or not 0 < timeout <= cfg.timeout_s:
        raise APIError(400, f"timeout: seconds in (0, {cfg.timeout_s}], got {timeout!r}", "timeout")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise APIError(400, "ignore_eos: must be true or false", "ignore_eos")
    return Params(
        prompt_ids,
        max_tokens,
        stops,
        confidence,
        stream,
        bool(options.get("include_usage")),
        timeout,
        ignore_eos,
    )


COMMON = {
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "temperature",
    "confidence",
    "stream",
    "timeout",
    "ignore_eos",
}


def completion_prompt(body: dict, loaded: LoadedModel) -> list[int]:
    """`prompt`: a string (tokenized as is), a list holding one string, or a list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = loaded.tokenizer(prompt)["input_ids"]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        vocab = len(loaded.tokenizer)
        if not all(0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt: token ids must lie in [0, {vocab})", "prompt")
        ids = list(prompt)
    elif prompt is None:
        raise APIError(400, "prompt: required (a string)", "prompt")
    else:
        raise APIError(
            400,
            "prompt: a string, a list of one string, or a list of token ids (one prompt per request)",
            "prompt",
        )
    if not ids:
        raise APIError(400, "prompt: empty after tokenization", "prompt")
    return list(ids)


def chat_prompt(body: dict, loaded: LoadedModel) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages: required, a non-empty list of {role, content}", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}]: an object with a string role", f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}]")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content: must be a string", f"messages[{i}]")
        clean.append({"role": m["role"], "content": content})
    if not getattr(loaded.tokenizer, "chat_template", None):
        raise APIError(400, "messages: this model has no chat template; use /v1/completions", "messages")
    try:
        out = loaded.tokenizer.apply_chat_template(
            clean, add_generation_prompt=True, tokenize=True, return_dict=True
        )
    except Exception as e:  # noqa: BLE001 - templates raise their own errors on odd roles
        raise APIError(400, f"messages: the chat template refused them ({e})", "messages") from None
    return list(out["input_ids"])


# ---------------------------------------------------------------------------- one running request
class Job:
    """Bridges a Sequence on the scheduler thread to the request's asyncio task.

    Text is re-decoded from all tokens after each segment; stop strings cut it (and finish the
    sequence); a stream sends only text that can no longer change (not a possible prefix of a
    stop string, no trailing partial character), so the streamed text equals the final text."""

    def __init__(self, loaded: LoadedModel, params: Params, loop: asyncio.AbstractEventLoop):
        self.loaded, self.params, self.loop = loaded, params, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.text, self.sent = "", 0
        self.seq = Sequence(
            prompt_ids=params.prompt_ids,
            max_new_tokens=params.max_tokens,
            confidence=params.confidence if params.confidence is not None else 1.0,
            on_step=self._on_step,
            on_finish=self._on_finish,
            deadline=time.monotonic() + params.timeout_s,
            ignore_eos=params.ignore_eos,
        )

    def _push(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown)
            pass

    def _on_step(self, seq: Sequence, seg: list[int]) -> str | None:
        if not self.params.stream and not self.params.stops:
            return None  # nothing to look at before the end: decode once, in _on_finish
        text = self.loaded.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        reason, hold = None, 0
        for stop in self.params.stops:
            at = text.find(stop)
            if at >= 0:
                text, reason = text[:at], "stop"
        if reason is None:
            hold = max((_overlap(text, s) for s in self.params.stops), default=0)
            hold = len(text) - len(text[: len(text) - hold].rstrip("\ufffd"))  # + a partial character
        self.text = text
        if self.params.stream and len(text) - hold > self.sent:
            self._push(("delta", text[self.sent : len(text) - hold]))
            self.sent = len(text) - hold
        return reason

    def _on_finish(self, seq: Sequence) -> None:
        if not self.params.stream and not self.params.stops:
            self.text = self.loaded.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        if self.params.stream and len(self.text) > self.sent:
            self._push(("delta", self.text[self.sent :]))
            self.sent = len(self.text)
        self._push(("done", seq))

    def finish_reason(self) -> str:
        return "stop" if self.seq.finish_reason == "stop" else "length"

    def check_failed(self) -> None:
        seq = self.seq
        if seq.finish_reason == "deadline":
            raise APIError(
                504,
                f"the request passed its deadline of {self.params.timeout_s:g} s after {len(seq.tokens)} tokens",
                "timeout",
                "timeout_error",
            )
        if seq.finish_reason in ("error", "cancelled"):
            raise APIError(
                500 if seq.finish_reason == "error" else 503, seq.error or "cancelled", None, "server_error"
            )

    def usage(self) -> dict:
        n = len(self.seq.tokens)
        return {
            "prompt_tokens": len(self.params.prompt_ids),
            "completion_tokens": n,
            "total_tokens": n + len(self.params.prompt_ids),
        }

    def stats(self) -> dict:
        return {
            "macro_steps": self.seq.macro_steps,
            "tokens_per_macro_step": round(self.seq.tokens_per_step, 4),
            "confidence": self.params.confidence,
        }


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


# ---------------------------------------------------------------------------- the app
def create_app(loaded: LoadedModel, cfg: ServeConfig, scheduler: Scheduler):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="HAMburger server")
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(404)
    async def _not_found(request, _e):
        return JSONResponse(APIError(404, f"no route {request.url.path}", None).body(), status_code=404)

    @app.exception_handler(405)
    async def _bad_method(request, _e):
        return JSONResponse(
            APIError(405, f"{request.method} not allowed on {request.url.path}").body(), status_code=405
        )

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": loaded.name,
            "kind": loaded.kind,
            **scheduler.stats(),
            "max_batch": cfg.max_batch,
            "max_queue": cfg.max_queue,
        }

    @app.get("/v1/models")
    async def models():
        card = {"id": loaded.name, "object": "model", "created": created, "owned_by": "hamburger-trainer"}
        return {"object": "list", "data": [card]}

    async def read_body(request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise APIError(413, f"request body of {size} bytes is over the limit of {MAX_BODY_BYTES} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():  # also bounds a body sent without a Content-Length
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise APIError(413, f"request body is over the limit of {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != loaded.name:
            raise APIError(
                404,
                f"model: {model!r} is not served here (this server serves {loaded.name!r})",
                "model",
                "not_found_error",
            )
        return body

    async def run(request: Request, body: dict, prompt_ids: list[int], known: set[str], chat: bool):
        params = parse_params(body, prompt_ids, loaded, cfg, known)
        job = Job(loaded, params, asyncio.get_running_loop())
        try:
            scheduler.submit(job.seq)
        except QueueFull as e:
            raise APIError(429, str(e), None, "rate_limit_error") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if params.stream:
            return StreamingResponse(stream(request, job, rid, chat), media_type="text/event-stream")
        try:
            await next_event(request, job, want="done")
        finally:
            job.seq.cancel("disconnected")  # no-op once finished
        job.check_failed()
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": job.text},
                "finish_reason": job.finish_reason(),
            }
        else:
            choice = {"index": 0, "text": job.text, "finish_reason": job.finish_reason(), "logprobs": None}
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": loaded.name,
            "choices": [choice],
            "usage": job.usage(),
            "hamburger": job.stats(),
        }

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
                    job.seq.cancel("disconnected")
                    raise asyncio.CancelledError
            if kind is not None and (want is None or kind == want):
                return kind, value

    async def stream(request: Request, job: Job, rid: str, chat: bool):
        def chunk(delta: str | None, finish: str | None, role: bool = False, **extra) -> str:
            if chat:
                d = {} if delta is None else {"content": delta}
                if role:
                    d["role"] = "assistant"
                choice = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            obj = {
                "id": rid,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()),
                "model": loaded.name,
                "choices": [choice],
                **extra,
            }
            return f"data: {json.dumps(obj)}\n\n"

        try:
            if chat:
                yield chunk("", None, role=True)
            while True:
                kind, value = await next_event(request, job)
                if kind == "delta":
                    yield chunk(value, None)
                    continue
                try:
                    job.check_failed()
                except APIError as e:
                    yield f"data: {json.dumps(e.body())}\n\n"
                    break
                yield chunk(None if chat else "", job.finish_reason(), hamburger=job.stats())
                if job.params.include_usage:
                    obj = {
                        "id": rid,
                        "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": int(time.time()),
                        "model": loaded.name,
                        "choices": [],
                        "usage": job.usage(),
                    }
                    yield f"data: {json.dumps(obj)}\n\n"
                break
            yield "data: [DONE]\n\n"
        finally:
            job.seq.cancel("disconnected")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        return await run(request, body, completion_prompt(body, loaded), {"prompt"}, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        return await run(request, body, chat_prompt(body, loaded), {"messages"}, chat=True)

    return app


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    cfg.validate()
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    loaded = load_for_serving(cfg.model, cfg.dtype, cfg.device, cfg.model_name)
    scheduler = Scheduler(loaded.batch(), cfg.max_batch, cfg.max_queue).start()
    app = create_app(loaded, cfg, scheduler)
    print(
        f"[serve] {loaded.kind} model {loaded.name!r} on http://{cfg.host}:{cfg.port} "
        f"(max_batch {cfg.max_batch}, max_queue {cfg.max_queue}, max_tokens cap {cfg.max_tokens_cap})",
        flush=True,
    )
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        scheduler.close()


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
    ):
        value = getattr(defaults, name)
        ap.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    ap.add_argument("--confidence", type=float, default=None, help="default confidence (HAMburger)")
    args = vars(ap.parse_args(argv))
    cfg = ServeConfig(**args)
    try:
        cfg.validate()
        if "://" not in cfg.model and not cfg.model.startswith(("models:/", "runs:/")):
            _check_folder(cfg.model)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"[serve] error: {e}") from None
    serve(cfg)


def _check_folder(path: str) -> None:
    if not (Path(path) / "config.json").is_file() and not (Path(path) / "MLmodel").is_file():
        raise FileNotFoundError(
            f"{path}: not a model folder (no config.json) nor an MLflow model (no MLmodel)"
        )


if __name__ == "__main__":
    main()
