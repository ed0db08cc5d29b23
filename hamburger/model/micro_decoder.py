"""Micro-step decoder and stop head: emit tokens 2..K of a segment from one base position."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .compat import cache_kwargs


def causal_additive_mask(q_len: int, kv_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[1, 1, q, kv] additive mask for queries that are the last q of kv positions.

    Explicit because a decoder layer used on its own is causal only under sdpa with no mask;
    eager attention would silently attend to the future.
    """
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = torch.zeros(q_len, kv_len, dtype=dtype, device=device)
    mask.masked_fill_(k_pos > q_pos, torch.finfo(dtype).min)
    return mask[None, None]


class MicroDecoder(nn.Module):
    """A few decoder layers of the base model's own class, width and attention settings.

    Its sequence for one macro position is [f_1, ..., f_F, e(t_1), ..., e(t_{k-1})]: F feature
    vectors (base hidden states from several depths, each RMS-normed since the residual stream
    grows with depth) then the segment's own token embeddings. The output at the slot of
    e(t_{j-1}) is normed and read by the base LM head to give t_j.
    """

    def __init__(self, base_config, num_layers: int, num_features: int, layer_cls, norm_cls, rotary_cls):
        super().__init__()
        cfg = copy.deepcopy(base_config)
        cfg.num_hidden_layers = num_layers
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = ["full_attention"] * num_layers
        if hasattr(cfg, "use_cache"):
            cfg.use_cache = True
        self.config = cfg
        self.num_features = num_features
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.feature_norms = nn.ModuleList(norm_cls(d, eps=eps) for _ in range(num_features))
        self.layers = nn.ModuleList(layer_cls(cfg, layer_idx=i) for i in range(num_layers))
        self.norm = norm_cls(d, eps=eps)
        self.rotary_emb = rotary_cls(config=cfg)

    def features_in(self, features: torch.Tensor) -> torch.Tensor:
        """[n, F, D] raw base hidden states -> the decoder's first F input slots."""
        return torch.stack([norm(features[:, i]) for i, norm in enumerate(self.feature_norms)], dim=1)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        """x [n, q, D] new slots (following the cache's slots, if any) -> normed outputs [n, q, D]."""
        past = cache.get_seq_length() if cache is not None else 0
        q = x.shape[1]
        position_ids = torch.arange(past, past + q, device=x.device)[None].expand(x.shape[0], -1)
        position_embeddings = self.rotary_emb(x, position_ids)
        mask = causal_additive_mask(q, past + q, x.dtype, x.device)
        for layer in self.layers:
            x = layer(
                x,
                attention_mask=mask,
                position_ids=position_ids,
                **cache_kwargs(layer, cache),
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
            )
        return self.norm(x)


class StopHead(nn.Module):
    """MLP (D -> D -> D -> 1, SiLU) on a micro-step output: logit of 'the segment ends here'."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)
