"""The scheduler: one thread owns the model and the running batch; requests wait in a bounded queue.

At every macro-step boundary it (1) cancels rows past their deadline and drops cancelled rows
(deadline, client gone), (2) expires queued requests the same way, (3) admits waiting requests
into the free slots (prefill + merge, see hamburger/decode/continuous.py) and (4) runs one macro step. A
freed slot is therefore refilled within one macro step. Submitting past `max_queue` raises
QueueFull (the HTTP layer answers 429); an exception inside the model fails the running batch
and the joining requests, with the message, and the scheduler carries on with an empty batch.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque

from hamburger.decode.continuous import ContinuousBatch, Sequence
from trainer.serve.metrics import ServeMetrics


class QueueFull(RuntimeError):
    pass


class Scheduler:
    def __init__(self, batch: ContinuousBatch, max_batch: int = 16, max_queue: int = 64):
        self.batch, self.max_batch, self.max_queue = batch, max_batch, max_queue
        self._waiting: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.macro_steps = 0
        self.finished = 0
        self.metrics = ServeMetrics()
        self._thread = threading.Thread(target=self._run, name="hamburger-scheduler", daemon=True)

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def submit(self, seq: Sequence) -> None:
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(
                    f"the queue is full ({self.max_queue} requests waiting, {len(self.batch)} running); "
                    "retry later"
                )
            self.metrics.submitted(seq)
            inner = seq.on_finish

            def on_finish(s: Sequence) -> None:  # every way a request ends is counted once
                self.metrics.ended(s)
                if inner is not None:
                    inner(s)

            seq.on_finish = on_finish
            self._waiting.append(seq)
            self._cond.notify()

    def prometheus(self) -> str:
        """GET /metrics (trainer/serve/metrics.py)."""
        micro = getattr(self.batch, "micro_calls", 0)
        return self.metrics.render(
            len(self.batch), len(self._waiting), self.max_batch, self.macro_steps, micro
        )

    def stats(self) -> dict:
        return {
            "running": len(self.batch),
            "waiting": len(self._waiting),
            "macro_steps": self.macro_steps,
            "finished": self.finished,
        }

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not len(self.batch):
                    self._cond.wait()
                if self._closed:
                    break
            now = time.monotonic()
            for s in self.batch.rows:
                if now > s.deadline:
                    s.cancel("deadline")
            self.finished += len(self.batch.drop_cancelled())
            new = self._admit(now)
            try:
                self.batch.join(new)
                self.finished += len(self.batch.step())
                self.macro_steps += 1
                self.metrics.stepped(self.batch.rows)
            except Exception as e:  # noqa: BLE001 - keep serving; the rows it hit get the error
                message = f"decoding failed: {type(e).__name__}: {e}"
                traceback.print_exc()
                for s in new:
                    s.finish("error", message)
                self.finished += len(self.batch)
                self.batch.fail_all(message)
        for s in list(self._waiting) + self.batch.rows:
            s.finish("cancelled", "the server shut down")

    def _admit(self, now: float) -> list[Sequence]:
        """Expire cancelled / overdue queued requests, then take as many as there are free slots."""
        with self._cond:
            kept: deque[Sequence] = deque()
            for s in self._waiting:
                if s.cancel_reason is None and now > s.deadline:
                    s.cancel("deadline")
                if s.cancel_reason is not None:
                    s.finish(s.cancel_reason)
                    self.finished += 1
                else:
                    kept.append(s)
            self._waiting = kept
            free = self.max_batch - len(self.batch)
            return [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
