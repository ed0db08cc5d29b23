"""Compositional embedder: one input embedding for a whole segment of 1..K tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CompositionalEmbedder(nn.Module):
    """Smashes a segment's token embeddings into one vector.

    A one-token segment passes through unchanged, so prompt tokens (never smashed) and the
    base model's own inputs are untouched. Longer segments: mean(e) plus one cross-attention
    read where the query comes from mean(e) and keys/values from [e_i ; p_i], p_i a learned
    slot-position vector, so the result knows the order of the tokens it fused.
    """

    def __init__(self, hidden_size: int, max_segment_len: int, head_dim: int = 32):
        super().__init__()
        if hidden_size % head_dim != 0:
            raise ValueError(
                f"hamburger.embedder_head_dim={head_dim} must divide the base hidden size {hidden_size}"
            )
        self.hidden_size = hidden_size
        self.max_segment_len = max_segment_len
        self.head_dim = head_dim
        self.num_heads = hidden_size // head_dim
        pos_dim = hidden_size // 2
        self.slot_pos = nn.Parameter(torch.zeros(max_segment_len, pos_dim))
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size + pos_dim, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size + pos_dim, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, tok_emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tok_emb [G, K, D] (slots past a group's length are ignored), lengths [G] -> [G, D]."""
        k = tok_emb.shape[1]
        valid = torch.arange(k, device=tok_emb.device)[None, :] < lengths[:, None]  # [G, K]
        summed = (tok_emb * valid[..., None].to(tok_emb.dtype)).sum(1)
        mean = summed / lengths[:, None].to(tok_emb.dtype)
        multi = (lengths > 1).nonzero().squeeze(1)
        if multi.numel() == 0:
            # Every rank must run the same modules under ZeRO-3 (each call gathers parameters
            # collectively), so run the read on one dummy group and add it with weight 0.
            dummy = self._read(tok_emb[:1], mean[:1], torch.ones_like(valid[:1]))
            return mean + 0.0 * dummy.sum()
        read = self._read(tok_emb[multi], mean[multi], valid[multi])
        delta = torch.zeros_like(mean).index_copy(0, multi, read)
        return mean + delta

    def forward_dense(self, tok_emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """As forward, with static shapes and no host sync (for graphed decoding): the read runs
        on every group and is kept only where a group has 2+ tokens."""
        k = tok_emb.shape[1]
        valid = torch.arange(k, device=tok_emb.device)[None, :] < lengths[:, None]
        mean = (tok_emb * valid[..., None].to(tok_emb.dtype)).sum(1) / lengths[:, None].to(tok_emb.dtype)
        read = self._read(tok_emb, mean, valid)
        return mean + torch.where((lengths > 1)[:, None], read, torch.zeros_like(read))

    def _read(self, e: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Cross-attention read for n groups: e [n, K, D], mean m [n, D], valid mask v [n, K]."""
        n, k, d = e.shape
        kv_in = torch.cat([e, self.slot_pos[:k].to(e.dtype).expand(n, k, -1)], dim=-1)
        q = self.q_proj(m).view(n, self.num_heads, 1, self.head_dim)
        keys = self.k_proj(kv_in).view(n, k, self.num_heads, self.head_dim).transpose(1, 2)
        vals = self.v_proj(kv_in).view(n, k, self.num_heads, self.head_dim).transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, keys, vals, attn_mask=v[:, None, None, :])
        return self.o_proj(attn.reshape(n, d))
