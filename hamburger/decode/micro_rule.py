"""The eager batch's batch-aware micro loop: one more micro step, or end the segments now?

In a batch the micro loop runs while any row is still in its segment, so with lengths that
differ by row most micro steps serve a few rows while the whole batch waits. After each micro
step the rows still going (`live` of the batch's `n`) either get one more micro step, which
yields `live` tokens in t_micro(live), or end their segments here, which brings the next macro
step (n tokens in t_macro(n)) that much sooner. So the micro step pays while

    live / t_micro(live) >= n / t_macro(n)

The static decoder (static.py) has one t_micro whatever the live rows, and its rule reduces to
live / n >= t_micro / t_macro. The eager batch computes only the live rows, so both costs are
kept per row count, measured on the batch's own calls as it decodes (a running mean; a row
count not yet measured goes on, so it gets measured). A row cut short just ends its segment:
its next token comes from the base head, as after any segment, so a cut never lengthens a
segment (its tokens then depend on what runs beside it, which without the rule they never do).
"""

from __future__ import annotations

import time

import torch

from hamburger.decode.timing import sync

SMOOTHING = 0.2
"""Weight of a new measurement in the running mean of a step's cost."""


class MicroRule:
    """Step costs per row count, and the decision they imply. The batch records what its calls
    took: "base" (the base step that feeds the segments back), "head" (the base head's first
    token and stop logit) and "micro" (one micro step); a macro step is base + head."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.costs: dict[str, dict[int, float]] = {"base": {}, "head": {}, "micro": {}}

    def goes_on(self, live: int, n: int) -> bool:
        """Whether `live` of the batch's `n` rows get one more micro step (see the module doc)."""
        base, micro = self.costs["base"].get(n), self.costs["micro"].get(live)
        if base is None or micro is None or live >= n:
            return True
        return live * (base + self.costs["head"].get(n, 0.0)) >= n * micro

    def record(self, kind: str, rows: int, seconds: float) -> None:
        old = self.costs[kind].get(rows)
        self.costs[kind][rows] = seconds if old is None else (1 - SMOOTHING) * old + SMOOTHING * seconds

    def timer(self) -> _Timer:
        return _Timer(self.device)


class _Timer:
    """Seconds since it was made, the device's queued work included."""

    def __init__(self, device: torch.device):
        self.device = device
        sync(device)
        self.start = time.perf_counter()

    def seconds(self) -> float:
        sync(self.device)
        return time.perf_counter() - self.start
