"""A transformers KV cache that appends in place: the eager batches' cache.

transformers' DynamicCache appends a step's keys and values with `torch.cat` of the whole cache,
so every decode step copies every layer's entire cache: quadratic in the length. At batch 16 on
SmolLM2-135M that copying was a third of the CPU time of the continuous batch. `GrowingCache`
keeps each layer's keys and values in a buffer with spare columns (doubled when full, so each
column is copied O(1) times) and hands attention a view of the used columns. Same values, same
interface (it is a DynamicCache): the batches' joins, trims and row selection work unchanged.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_COLUMNS = 64


class GrowingLayer(DynamicLayer):
    """One layer: buffers [B, H, capacity, D]; `keys` / `values` are views of the used columns."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.used = 0
        self.k_buf = self.v_buf = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, q = self.used, key_states.shape[-2]
        if self.k_buf is None or n + q > self.k_buf.shape[-2]:
            self._grow(key_states, value_states, max(MIN_COLUMNS, 2 * (n + q)))
        self.k_buf[:, :, n : n + q] = key_states
        self.v_buf[:, :, n : n + q] = value_states
        self._set_used(n + q)
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, columns: int) -> None:
        b, h, _, d = key_states.shape
        k = key_states.new_zeros(b, h, columns, d)
        v = value_states.new_zeros(b, h, columns, value_states.shape[-1])
        if self.used:
            k[:, :, : self.used] = self.keys
            v[:, :, : self.used] = self.values
        self.k_buf, self.v_buf = k, v

    def _set_used(self, n: int) -> None:
        self.used = n
        self.keys, self.values = self.k_buf[:, :, :n], self.v_buf[:, :, :n]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized and self.used:
            self.k_buf, self.v_buf = self.k_buf[indices], self.v_buf[indices]
            self._set_used(self.used)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)  # checks the argument, slices keys / values
        if self.is_initialized and self.used:
            self._set_used(self.keys.shape[-2])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized and self.used:
            self.k_buf = self.k_buf.repeat_interleave(repeats, dim=0)
            self.v_buf = self.v_buf.repeat_interleave(repeats, dim=0)
            self._set_used(self.used)


class GrowingCache(DynamicCache):
    """DynamicCache with GrowingLayer layers (a config with sliding-window or other special
    layers keeps transformers' own; models with those are refused elsewhere anyway)."""

    def __init__(self, config):
        super().__init__(config=config)
        if self.layers and all(type(layer) is DynamicLayer for layer in self.layers):
            self.layers = [GrowingLayer() for _ in self.layers]
