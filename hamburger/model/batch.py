"""Packed training batches: several samples per row, macro positions in token coordinates.

One *sample* is (input_ids, prompt_len, seg_lens): a prompt followed by a response cut into
segments of 1..K tokens. The base model sees one *macro position* per prompt token and one per
response segment (each smashed into one embedding). The last segment predicts nothing, so it is
not fed. Every segment is a *target*, predicted from the macro position before it: the last
prompt token predicts segment 1, segment j predicts segment j+1.

Building a batch loops over samples (in the data loader, not the training step); within a
sample everything is array arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch


@dataclass
class Sample:
    """One labelled sample: tokens = prompt + response, response cut into segments."""

    input_ids: list[int]
    prompt_len: int
    seg_lens: list[int]
    sample_id: int = -1

    @property
    def response_len(self) -> int:
        """Response tokens (the ones learned), known on the host without a batch."""
        return len(self.input_ids) - self.prompt_len

    def check(self, max_segment_len: int) -> None:
        """Reject a malformed sample with a message naming it, before it can corrupt a batch."""
        resp = self.response_len
        where = f"sample {self.sample_id}"
        if self.prompt_len < 1:
            raise ValueError(f"{where}: prompt_len must be >= 1 (the last prompt token predicts segment 1)")
        if resp < 1:
            raise ValueError(
                f"{where}: no response tokens (len(input_ids)={len(self.input_ids)}, "
                f"prompt_len={self.prompt_len})"
            )
        if sum(self.seg_lens) != resp:
            raise ValueError(f"{where}: seg_lens sum to {sum(self.seg_lens)}, response has {resp} tokens")
        if min(self.seg_lens) < 1 or max(self.seg_lens) > max_segment_len:
            raise ValueError(
                f"{where}: seg_lens must lie in 1..{max_segment_len}, got {sorted(set(self.seg_lens))}"
            )

    @property
    def macro_len(self) -> int:
        """Base positions this sample occupies: prompt tokens + all segments but the last."""
        return self.prompt_len + len(self.seg_lens) - 1


@dataclass
class PackedBatch:
    """Tensors for one training step. G groups (base inputs), S targets (segments), rows x L."""

    group_tokens: torch.Tensor  # [G, K] token ids of each base input (prompt tokens: 1 slot)
    group_lens: torch.Tensor  # [G]
    group_pos: torch.Tensor  # [G] flat index row * L + col of each group's macro position
    position_ids: torch.Tensor  # [rows, L] token-coordinate position of each macro position
    seq_ids: torch.Tensor  # [rows, L] which sample (batch-local index) owns it, -1 = padding
    tgt_tokens: torch.Tensor  # [S, K] each target segment's tokens (0 past its length)
    tgt_lens: torch.Tensor  # [S]
    tgt_src: torch.Tensor  # [S] flat macro position whose outputs predict the segment
    sample_ids: torch.Tensor  # [N] dataset ids of the samples, for error messages
    plain_input_ids: torch.Tensor | None = None  # [N, Lp] original tokens, right-padded
    plain_resp_pos: torch.Tensor | None = None  # [T] flat index into plain rows predicting each resp token
    loss_chunks: int = 0
    """LM-head calls the loss makes (hamburger/model/chunked_loss.py). Under ZeRO-3 every call
    gathers the head, so every rank must make the same number: the trainer sets it from every
    rank's batch (see trainer/train/data.py loss_chunks). 0: as many as this batch needs."""

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return PackedBatch(**moved)

    @property
    def num_response_tokens(self) -> int:
        return int(self.tgt_lens.sum())


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit packing of sample indices into rows of `capacity` positions, in input order.

    Deterministic (same input, same rows) so that resumed runs see the same batches.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"sample needs {n} macro positions, more than the row capacity {capacity}")
        for r, space in enumerate(free):
            if n <= space:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def collate(
    samples: list[Sample], max_segment_len: int, row_capacity: int | None = None, with_plain: bool = False
) -> PackedBatch:
    """Pack samples into rows (no attention across samples; the mask is built from seq_ids).

    row_capacity None puts every sample in its own row; otherwise rows hold up to that many
    macro positions (at least the longest sample). with_plain also lays out the original token
    sequence of each sample, for the frozen-teacher KL term and plain-SFT comparisons.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    for s in samples:
        s.check(max_segment_len)
    k = max_segment_len
    lengths = [s.macro_len for s in samples]
    if row_capacity is None:
        rows = [[i] for i in range(len(samples))]
        width = max(lengths)
    else:
        width = max(row_capacity, max(lengths))
        rows = pack_rows(lengths, width)
    position_ids = np.zeros((len(rows), width), dtype=np.int64)
    seq_ids = np.full((len(rows), width), -1, dtype=np.int64)
    g_tok, g_len, g_pos = [], [], []
    t_tok, t_len, t_src = [], [], []
    for r, members in enumerate(rows):
        col = 0
        for i in members:
            s = samples[i]
            x = np.asarray(s.input_ids, dtype=np.int64)
            p, seg = s.prompt_len, np.asarray(s.seg_lens, dtype=np.int64)
            ends = p + np.cumsum(seg)  # exclusive end of each segment, in token coordinates
            starts = ends - seg
            slot = np.arange(k)[None, :]
            idx = np.minimum(starts[:, None] + slot, len(x) - 1)
            seg_tok = np.where(slot < seg[:, None], x[idx], 0)  # [m, K]
            m = len(seg)
            # Base inputs: p prompt tokens (one slot each), then segments 1..m-1.
            prompt_tok = np.zeros((p, k), dtype=np.int64)
            prompt_tok[:, 0] = x[:p]
            g_tok.append(np.concatenate([prompt_tok, seg_tok[: m - 1]]))
            g_len.append(np.concatenate([np.ones(p, dtype=np.int64), seg[: m - 1]]))
            n = p + m - 1
            flat = r * width + col + np.arange(n)
            g_pos.append(flat)
            # A smashed segment sits at the position of its last token.
            position_ids[r, col : col + n] = np.concatenate([np.arange(p), ends[: m - 1] - 1])
            seq_ids[r, col : col + n] = i
            # Targets: segment j is predicted from macro position p-1+j (0-based j).
            t_tok.append(seg_tok)
            t_len.append(seg)
            t_src.append(flat[p - 1 : p - 1 + m])
            col += n
    batch = PackedBatch(
        group_tokens=torch.from_numpy(np.concatenate(g_tok)),
        group_lens=torch.from_numpy(np.concatenate(g_len)),
        group_pos=torch.from_numpy(np.concatenate(g_pos)),
        position_ids=torch.from_numpy(position_ids),
        seq_ids=torch.from_numpy(seq_ids),
        tgt_tokens=torch.from_numpy(np.concatenate(t_tok)),
        tgt_lens=torch.from_numpy(np.concatenate(t_len)),
        tgt_src=torch.from_numpy(np.concatenate(t_src)),
        sample_ids=torch.tensor([s.sample_id for s in samples], dtype=torch.long),
    )
    if with_plain:
        lp = max(len(s.input_ids) for s in samples)
        plain = np.zeros((len(samples), lp), dtype=np.int64)
        resp_pos = []
        for i, s in enumerate(samples):
            plain[i, : len(s.input_ids)] = s.input_ids
        for i in (i for members in rows for i in members):  # the targets' order: row by row
            s = samples[i]
            # Response token t is predicted by position t-1.
            resp_pos.append(i * lp + np.arange(s.prompt_len - 1, len(s.input_ids) - 1))
        batch.plain_input_ids = torch.from_numpy(plain)
        batch.plain_resp_pos = torch.from_numpy(np.concatenate(resp_pos))
    return batch


def packed_causal_mask(seq_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[rows, 1, L, L] additive mask: causal, and only within the same sample.

    Padding rows attend to themselves only (never NaN); their outputs are never read.
    """
    length = seq_ids.shape[1]
    idx = torch.arange(length, device=seq_ids.device)
    causal = idx[None, :] <= idx[:, None]
    same = seq_ids[:, :, None] == seq_ids[:, None, :]
    allowed = (causal[None] & same) | torch.eye(length, dtype=torch.bool, device=seq_ids.device)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seq_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
