"""Timing a device step: the host waits for the device before and after (CUDA is asynchronous)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], n: int, device: torch.device) -> float:
    """Mean seconds per call of fn over n calls (after the caller's warm-up)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n
