"""One running request: the bridge between its Sequence on the scheduler thread and the
request's asyncio task (text so far, stop strings, the events a stream sends)."""

from __future__ import annotations

import asyncio
import time

from hamburger.decode.continuous import Sequence
from trainer.serve.loader import LoadedModel
from trainer.serve.protocol import APIError, Params


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
            "tokens_per_macro_step": round(self.seq.tokens_per_macro_step, 4),
            "confidence": self.params.confidence,
        }


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
