"""Conversation rows: OpenAI {role, content} or ShareGPT {from, value} turns, as the chat
template's roles; how many rows a conversation gives (one per assistant turn learned)."""

from __future__ import annotations

from .config import SourceConfig
from .records import DataError, field_of

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
"""ShareGPT's `from` values (and OpenAI's roles) -> the chat template's roles."""


def chat_turns(rec: dict, key: str, where: str) -> list[dict]:
    """A conversation field as [{role, content}]: OpenAI {role, content} or ShareGPT {from,
    value} turns; every malformed turn is named."""
    turns = field_of(rec, key, where)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of turns")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise DataError(f"{where}: field {key!r}[{i}] must be an object, got {type(t).__name__}")
        role, content = (t.get("role"), t.get("content")) if "role" in t else (t.get("from"), t.get("value"))
        if role is None or not isinstance(content, str):
            raise DataError(
                f"{where}: field {key!r}[{i}] needs a role and string content ({{role, content}} or "
                "ShareGPT's {from, value})"
            )
        if role not in ROLE_ALIASES:
            raise DataError(
                f"{where}: field {key!r}[{i}]: unknown role {role!r} (known: {sorted(ROLE_ALIASES)})"
            )
        out.append({"role": ROLE_ALIASES[role], "content": content})
    return out


def assistant_turns(rec: dict, cfg: SourceConfig) -> int:
    """How many rows a conversation record gives: one per assistant turn (turns: all), else one."""
    if not cfg.messages_field or cfg.turns == "last":
        return 1
    return sum(t["role"] == "assistant" for t in chat_turns(rec, cfg.messages_field, "row"))
