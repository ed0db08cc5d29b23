"""The OpenAI protocol as this server speaks it: request bodies in (validated, every error
naming its field) and response bodies out. Pure functions: no model, no I/O, no asyncio.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from trainer.serve.config import ServeConfig
from trainer.serve.loader import LoadedModel

MAX_BODY_BYTES = 1 << 20
MAX_DEPTH = 32  # an OpenAI body nests 4 levels (messages, parts); deeper is malformed
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
def parse_body(raw: bytes) -> dict:
    """The request's JSON object, or a 400 naming what is wrong: not JSON, not UTF-8, nested
    past MAX_DEPTH, a string that is not valid Unicode (an unpaired surrogate such as "\\ud800",
    which the tokenizer cannot encode), or not an object."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(400, f"the body is nested too deeply (more than {MAX_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    check_json_values(body)
    return body


def check_json_values(body: dict) -> None:
    """Walk the parsed body once (no recursion): bounded depth, every string encodable."""
    todo: list[tuple[object, str, int]] = [(body, "", 0)]
    while todo:
        value, where, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise APIError(
                400, f"the body is nested too deeply (more than {MAX_DEPTH} levels)", where or None
            )
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise APIError(
                    400,
                    f"{where}: not valid Unicode ({value[e.start]!r} at character {e.start} is an "
                    "unpaired surrogate)",
                    where,
                ) from None
        elif isinstance(value, dict):
            for k, v in value.items():
                todo.append((k, f"{where}.{k}".lstrip(".") if isinstance(k, str) else where, depth + 1))
                todo.append((v, f"{where}.{k}".lstrip("."), depth + 1))
        elif isinstance(value, list):
            todo.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value))


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
    if loaded.serving_mode(cfg.decode) != "eager" and len(prompt_ids) > cfg.max_prompt_tokens:
        raise APIError(
            400,
            f"the prompt has {len(prompt_ids)} tokens; this server's slots hold prompts of at most "
            f"{cfg.max_prompt_tokens} (--max-prompt-tokens)",
            "prompt" if "prompt" in known else "messages",
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


# ---------------------------------------------------------------------------- response bodies
def envelope(rid: str, model: str, chat: bool, choices: list[dict], chunk: bool = False, **extra) -> dict:
    """The object every response and stream chunk is wrapped in."""
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        **extra,
    }


def choice(chat: bool, text: str, finish_reason: str) -> dict:
    """The one choice of a finished (non-streamed) response."""
    if chat:
        message = {"role": "assistant", "content": text}
        return {"index": 0, "message": message, "finish_reason": finish_reason}
    return {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}


def delta_choice(chat: bool, delta: str | None, finish_reason: str | None, role: bool = False) -> dict:
    """The one choice of a stream chunk: new text, or (delta None) only the finish reason."""
    if chat:
        d = {} if delta is None else {"content": delta}
        if role:
            d["role"] = "assistant"
        return {"index": 0, "delta": d, "finish_reason": finish_reason}
    return {"index": 0, "text": delta or "", "finish_reason": finish_reason, "logprobs": None}


def sse(obj: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
