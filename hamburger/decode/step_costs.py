"""What one decode step costs, and the speed-up those costs allow.

HAMburger's macro step is one base step, one embedder call and m micro-decoder calls, and emits
tau tokens per row; the base emits one token per base step. So on the same hardware, at the
same batch size, no HAMburger decoder can beat the ratio of tokens per second

    bound = tau * t_base / (t_base + t_embed + m * t_micro)

(t_* = seconds of one step of each kind). The GPU check (bench/gpu_check.py) and the eval stage
(trainer/evaluate/evaluate.py) both report measured speed-ups against this bound.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hamburger.decode.eager import DecodeResult
from hamburger.decode.static import Step
from hamburger.decode.timing import timed


def speed_bound(tau: float, m: float, t_base: float, t_embed: float, t_micro: float) -> float:
    """The highest tokens/s ratio over the base that tau tokens per macro step at m micro
    calls per macro step allow, given the measured step costs (see the module docstring)."""
    return tau * t_base / (t_base + t_embed + m * t_micro)


def micro_calls(batch: Sequence[DecodeResult]) -> tuple[int, int]:
    """(micro-decoder calls, macro steps) that decoding this batch together took.

    Both batched decoders (eager and static) run the micro loop of a macro step until the
    longest segment still being decoded ends: a segment of L tokens needs L - 1 micro calls
    (its first token comes from the base head), so step t costs max(L_t - 1) over the rows
    still running at step t; the batch runs as many macro steps as its longest row has
    segments. At batch 1 this is sum(L - 1) / steps = tau - 1 calls per step."""
    steps = max(len(r.seg_lens) for r in batch)
    calls = sum(max(r.seg_lens[t] - 1 for r in batch if t < len(r.seg_lens)) for t in range(steps))
    return calls, steps


def decode_costs(model, base_dec, ham_dec, graphs: bool, device: torch.device, n: int) -> dict[str, float]:
    """Seconds per call of: a base step, HAMburger's macro base step, a micro step, the embedder,
    on the static decoders `base_dec` (StaticBaseDecoder) and `ham_dec` (StaticHAMburgerDecoder)
    of one batch size, after base_dec has finished a generate (its rows are done, so its steps
    record nothing). Steps only rewrite columns past the prompt, so n <= the decoders' max_new."""
    m = model
    emb_out = torch.zeros(ham_dec.batch, m.base.config.hidden_size, dtype=ham_dec.dtype, device=device)

    def embed():
        emb_out.copy_(m.embedder.forward_dense(m.embed_tokens(ham_dec.seg_tok), ham_dec.seg_len))

    embed_step = Step(embed, graphs, device, prepare=lambda: None)  # stateless: reads seg_tok, writes emb_out
    steps = [
        ("t_base", base_dec, base_dec.step),
        ("t_hamburger_step", ham_dec, ham_dec.base_step),
        ("t_embed", ham_dec, embed_step),
    ]
    if ham_dec.micro_steps:  # K = 1 has no micro decoder calls
        steps.append(("t_micro", ham_dec, ham_dec.micro_steps[min(1, len(ham_dec.micro_steps) - 1)]))
    costs = {"t_micro": 0.0}
    ham_dec.done.fill_(True)  # no live row: timed micro steps leave every segment as it is
    ham_dec.live.zero_()
    for name, dec, fn in steps:
        dec.col.fill_(dec.width)  # every row is done: steps only rewrite columns past the prompt
        fn()
        dec.col.fill_(dec.width)
        costs[name] = timed(fn, n, device)
    return costs


def measure_step_costs(
    model, prompts: list[list[int]], max_new: int, graphs: bool, n: int = 32
) -> dict[str, float]:
    """decode_costs at this batch size and prompt width, on the static decoders that
    generate_batch / base_generate_batch use in static (graphs=False) or graphed mode (reused
    when they exist: no second CUDA-graph capture)."""
    from hamburger.decode.batched import _static_decoder

    mode = "graphed" if graphs else "static"
    base_dec = _static_decoder(model.base, prompts, max_new, mode)
    ham_dec = _static_decoder(model, prompts, max_new, mode)
    base_dec.generate(prompts, max_new=min(2, max_new))  # warm-up; leaves every row done
    device = next(model.parameters()).device
    return decode_costs(
        model, base_dec, ham_dec, graphs, device, max(1, min(n, base_dec.max_new, ham_dec.max_new))
    )
