"""The server's options (`./launch.sh serve MODEL --max-batch 16 ...`), checked at start."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hamburger.model.config import is_confidence


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
    """Default confidence (HAMburger); None: the export's generation_config.json, else DEFAULT_CONFIDENCE."""
    model_name: str = ""
    dtype: str = "float32"
    device: str = ""
    threads: int = 0
    """torch threads (0: torch's default). On a CPU shared with other work, 1 avoids threads
    waiting on a descheduled partner at every barrier of the small decode kernels."""
    decode: str = "auto"
    """auto (graphed on a GPU, eager on CPU), graphed, static: fixed slots with static KV caches
    (hamburger/decode/slots.py; graphed replays CUDA graphs); eager: dynamic caches. On CPU a
    static step computes every slot whatever the load: 2-3.5x slower than eager there."""
    max_prompt_tokens: int = 1024
    """static/graphed: the longest prompt a slot holds (its KV caches are preallocated for
    max_prompt_tokens + 2 x max_tokens_cap columns per slot); longer prompts get a 400."""
    batch_aware: bool = False
    """HAMburger: the micro loop ends the segments of the few rows still going when another
    micro step would cost more than it yields (the step costs it measures)."""
    max_segment_len: int = 0
    """HAMburger: segments of at most this many tokens (0: the model's K)."""
    forced_tau: float = 0.0
    """Benchmarks only (HAMburger): every request's segments get drawn lengths with this
    mean (hamburger/decode/forced.py), its stop head not asked, so its text means nothing."""

    def validate(self) -> None:
        """Refuse at start what would make every request fail (a queue of 0 answers only 429s)."""
        rules = {
            "max_batch": (self.max_batch >= 1, "an integer >= 1"),
            "max_queue": (self.max_queue >= 1, "an integer >= 1 (0 would refuse every request with 429)"),
            "max_tokens_cap": (self.max_tokens_cap >= 1, "an integer >= 1"),
            "timeout_s": (self.timeout_s > 0 and math.isfinite(self.timeout_s), "a number of seconds > 0"),
            "port": (0 <= self.port < 65536, "in 0..65535"),
            "confidence": (self.confidence is None or is_confidence(self.confidence), "a number in (0, 1]"),
            "dtype": (self.dtype in ("float32", "bfloat16", "float16"), "float32, bfloat16 or float16"),
            "threads": (self.threads >= 0, "an integer >= 0 (0: torch's default)"),
            "decode": (
                self.decode in ("auto", "graphed", "static", "eager"),
                "auto, graphed, static or eager",
            ),
            "max_prompt_tokens": (self.max_prompt_tokens >= 1, "an integer >= 1"),
            "max_segment_len": (self.max_segment_len >= 0, "an integer >= 0 (0: the model's K)"),
        }
        for name, (ok, must) in rules.items():
            if not ok:
                option = "--" + name.replace("_", "-")
                raise ValueError(f"serve {option}: must be {must}, got {getattr(self, name)!r}")
