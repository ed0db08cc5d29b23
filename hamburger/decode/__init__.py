"""Every way this project decodes, for HAMburger and for its base, in one room.

- `eager`: one prompt, dynamic KV caches; the obviously-correct reference.
- `batched`: many prompts at once, left-padded, finished rows retired (eval, load().generate).
- `static`: preallocated caches and fixed shapes, optionally CUDA-graphed (eval on a GPU).
- `steppers`: one macro step for a plain LM and for HAMburger, shared by `batched` and
  `continuous`, so their decisions agree by construction.
- `continuous`: rows join and leave a running batch at macro-step boundaries (serving,
  self-distillation); `slots`: the same interface on the static decoder (CUDA graphs on a GPU).
- `sampling`: per-request temperature, top-p and seeded generator (self-distillation).
- `step_costs`: what a step costs, and the speed-up those costs allow.
"""

from .batched import base_generate_batch, generate_batch
from .eager import DecodeResult, generate

__all__ = ["DecodeResult", "base_generate_batch", "generate", "generate_batch"]
