"""Cross-entropy (and KL to the frozen teacher) over response tokens without materialising the
vocabulary for all of them at once.

The full-logits loss holds [T, V] fp32 logits, their softmax and their gradient: 10.6 GiB of a
53 GiB peak for one 8192-position row of a 128k-vocabulary model, 85-90 GB at 8 rows. Here the
tokens go through the LM head `chunk` at a time, each chunk under activation checkpointing: its
logits live only while its loss is computed, and again, one chunk at a time, in backward. The
sums equal the full-logits ones (same per-token terms; tests compare loss and gradients).

The heads are called as modules, never through their `.weight`: under ZeRO-3 a weight is only
whole inside its module's forward (DeepSpeed gathers it there, in the recompute too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_terms(
    head: nn.Module,
    teacher_head: nn.Module | None,
    temperature: float,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CE sum, KL sum, correct flags) of one chunk; the KL sum is 0 without a teacher."""
    logits = head(hidden).float()
    ce = F.cross_entropy(logits, targets, reduction="sum")
    with torch.no_grad():
        correct = logits.argmax(-1) == targets
    kl = logits.new_zeros(())
    if teacher_head is not None:
        with torch.no_grad():
            t_logp = F.log_softmax(teacher_head(teacher_hidden).float() / temperature, dim=-1)
        s_logp = F.log_softmax(logits / temperature, dim=-1)
        kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="sum")
    return ce, kl, correct


def chunks_for(tokens: int, chunk_tokens: int) -> int:
    """LM-head calls for `tokens` response tokens at most `chunk_tokens` at a time (0: one)."""
    return max(1, -(-tokens // chunk_tokens)) if chunk_tokens > 0 else 1


def chunked_token_losses(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunks: int,
    teacher_head: nn.Module | None = None,
    teacher_hidden: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Mean CE over the T response tokens, KL(teacher || model) as F.kl_div's batchmean times
    temperature^2 (None without a teacher), and the per-token argmax-correct flags [T].

    hidden: [T, D] micro-step outputs; teacher_hidden: [T, D_teacher] the teacher's final hidden
    states at the same tokens (its LM head is applied per chunk, under no_grad). Exactly
    `chunks` head calls are made, the last ones empty when T < chunks (ZeRO-3 ranks must agree)."""
    t = hidden.shape[0]
    chunk = max(1, -(-t // chunks))
    ce_sum = hidden.new_zeros((), dtype=torch.float32)
    kl_sum = hidden.new_zeros((), dtype=torch.float32)
    correct = []
    for i in range(chunks):
        sl = slice(i * chunk, (i + 1) * chunk)
        ce, kl, ok = checkpoint(
            _chunk_terms,
            head,
            teacher_head,
            temperature,
            hidden[sl],
            targets[sl],
            None if teacher_hidden is None else teacher_hidden[sl],
            use_reentrant=False,
        )
        ce_sum, kl_sum = ce_sum + ce, kl_sum + kl
        correct.append(ok)
    kl = None if teacher_head is None else kl_sum / t * temperature**2
    return ce_sum / t, kl, torch.cat(correct)
