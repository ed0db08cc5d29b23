"""The server's options (`./launch.sh serve MODEL --max-batch 16 ...`), checked at start."""

from __future__ import annotations

from dataclasses import dataclass


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
