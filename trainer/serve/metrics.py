"""`GET /metrics`: the server's counters in the Prometheus text format (version 0.0.4).

What a serving dashboard reads: running and waiting requests and slot occupancy, requests by
how they ended, generated tokens, tokens per macro step (HAMburger's compression as served),
and time to first token, inter-token latency and request latency as histograms. Written from
the scheduler thread (one lock), read by the HTTP thread. No client library: the format is a
few lines of text.
"""

from __future__ import annotations

import bisect
import threading
import time

from hamburger.decode.continuous import Sequence

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    """Cumulative buckets, a sum and a count, as Prometheus histograms are exposed."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts, self.sum, self.count = bounds, [0] * len(bounds), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts, strict=True):
            running += n
            out.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
        out += [
            f'{name}_bucket{{le="+Inf"}} {self.count}',
            f"{name}_sum {self.sum:.6f}",
            f"{name}_count {self.count}",
        ]
        return out


class ServeMetrics:
    """Per-request timings from submit, first segment and finish (scheduler thread)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._started: dict[int, tuple[float, float | None]] = {}  # id(seq) -> (submitted, first token)
        self.finished: dict[str, int] = {}
        self.tokens = 0
        self.request_macro_steps = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)

    def submitted(self, seq: Sequence) -> None:
        with self._lock:
            self._started[id(seq)] = (time.monotonic(), None)

    def stepped(self, seqs: list[Sequence]) -> None:
        """After a macro step: the rows that got their first tokens in it."""
        now = time.monotonic()
        with self._lock:
            for s in seqs:
                start = self._started.get(id(s))
                if start is not None and start[1] is None and s.tokens:
                    self._started[id(s)] = (start[0], now)
                    self.ttft.observe(now - start[0])

    def ended(self, seq: Sequence) -> None:
        """A request finished, for any reason (its Sequence.finish)."""
        self.stepped([seq])
        now = time.monotonic()
        with self._lock:
            submitted, first = self._started.pop(id(seq), (now, None))
            reason = seq.finish_reason or "unknown"
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.tokens += len(seq.tokens)
            self.request_macro_steps += len(seq.seg_lens)
            self.latency.observe(now - submitted)
            if first is not None and len(seq.tokens) > 1:
                self.itl.observe((now - first) / (len(seq.tokens) - 1))

    def render(
        self, running: int, waiting: int, max_batch: int, batch_macro_steps: int, batch_micro_calls: int = 0
    ) -> str:
        with self._lock:
            per_step = self.tokens / self.request_macro_steps if self.request_macro_steps else 0.0
            lines = [
                "# HELP hamburger_requests_running Requests in the running batch.",
                "# TYPE hamburger_requests_running gauge",
                f"hamburger_requests_running {running}",
                "# HELP hamburger_requests_waiting Requests queued for a slot.",
                "# TYPE hamburger_requests_waiting gauge",
                f"hamburger_requests_waiting {waiting}",
                "# HELP hamburger_slot_occupancy Running requests / --max-batch.",
                "# TYPE hamburger_slot_occupancy gauge",
                f"hamburger_slot_occupancy {running / max_batch:.6f}",
                "# HELP hamburger_requests_total Finished requests by how they ended.",
                "# TYPE hamburger_requests_total counter",
                *(
                    f'hamburger_requests_total{{finish_reason="{r}"}} {n}'
                    for r, n in sorted(self.finished.items())
                ),
                "# HELP hamburger_generated_tokens_total Tokens generated for finished requests.",
                "# TYPE hamburger_generated_tokens_total counter",
                f"hamburger_generated_tokens_total {self.tokens}",
                "# HELP hamburger_request_macro_steps_total Base forward passes of finished requests (one per segment).",
                "# TYPE hamburger_request_macro_steps_total counter",
                f"hamburger_request_macro_steps_total {self.request_macro_steps}",
                "# HELP hamburger_tokens_per_macro_step Generated tokens / macro steps of finished requests.",
                "# TYPE hamburger_tokens_per_macro_step gauge",
                f"hamburger_tokens_per_macro_step {per_step:.6f}",
                "# HELP hamburger_batch_macro_steps_total Macro steps the running batch has taken.",
                "# TYPE hamburger_batch_macro_steps_total counter",
                f"hamburger_batch_macro_steps_total {batch_macro_steps}",
                "# HELP hamburger_batch_micro_calls_total Micro-decoder calls the running batch has made.",
                "# TYPE hamburger_batch_micro_calls_total counter",
                f"hamburger_batch_micro_calls_total {batch_micro_calls}",
            ]
            for name, hist, what in (
                ("hamburger_time_to_first_token_seconds", self.ttft, "From submit to the first segment."),
                (
                    "hamburger_inter_token_latency_seconds",
                    self.itl,
                    "Per request: (finish - first token) / (tokens - 1).",
                ),
                ("hamburger_request_latency_seconds", self.latency, "From submit to finish."),
            ):
                lines += [f"# HELP {name} {what}", f"# TYPE {name} histogram", *hist.lines(name)]
        return "\n".join(lines) + "\n"
