"""Score samples with the base model, teacher-forced: per response token, the entropy of the
predictive distribution and the probability of the actual token.

Batches are sorted by length so that padding stays small; the LM head runs only on response
positions (the prompt's logits are never needed), a chunk of positions at a time: the fp32
logits of a whole batch would not fit (65,536 tokens x a 128k vocabulary is 31 GiB per
tensor), while a chunk of `chunk_elements` logits bounds the extra memory whatever the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Scores:
    entropy: np.ndarray  # [R] nats
    prob: np.ndarray  # [R] probability of the actual token


@dataclass
class BatchStats:
    real_tokens: int = 0
    padded_tokens: int = 0


def length_batches(lengths: list[int], batch_tokens: int, max_padding: float = 0.1) -> list[list[int]]:
    """Indices grouped longest first so that (count x longest) <= batch_tokens and padding stays
    under max_padding of each batch's positions (a short sample never waits behind a long one)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    longest = real = 0
    for i in order:
        n = lengths[i]
        if current:
            slots = longest * (len(current) + 1)
            if slots > batch_tokens or slots - (real + n) > max_padding * slots:
                batches.append(current)
                current, longest, real = [], 0, 0
        current.append(i)
        longest, real = max(longest, n), real + n
    if current:
        batches.append(current)
    return batches


CHUNK_ELEMENTS = 1 << 24  # fp32 logits per chunk: 64 MiB (128 positions at a 128k vocabulary)


def entropy_and_prob(
    hidden: torch.Tensor, lm_head, targets: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: entropy of softmax(lm_head(h)) and the probability of its target, in fp32.

    Positions go through the LM head `chunk_elements // vocab` at a time (a loop over chunks,
    not tokens), so peak extra memory is a few chunk-sized tensors, independent of batch size."""
    vocab = lm_head.weight.shape[0]
    rows = max(1, chunk_elements // vocab)
    entropy = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    prob = torch.empty_like(entropy)
    for start in range(0, hidden.shape[0], rows):
        z = lm_head(hidden[start : start + rows]).float()
        lse = torch.logsumexp(z, dim=-1)
        p = torch.exp(z - lse[:, None])
        entropy[start : start + rows] = lse - torch.einsum("ij,ij->i", p, z)
        picked = z.gather(1, targets[start : start + rows, None]).squeeze(1)
        prob[start : start + rows] = torch.exp(picked - lse)
        del z, p
    return entropy, prob


class Scorer:
    def __init__(self, model, device: torch.device, pad_id: int = 0, chunk_elements: int = CHUNK_ELEMENTS):
        self.model = model.eval()
        self.device = device
        self.pad_id = pad_id
        self.chunk_elements = chunk_elements
        self.stats = BatchStats()

    @torch.no_grad()
    def score(self, samples: list[tuple[list[int], int]], batch_tokens: int) -> list[Scores]:
        """samples: (ids, prompt_len) -> per-sample Scores over the response tokens."""
        out: list[Scores | None] = [None] * len(samples)
        for idx in length_batches([len(s[0]) for s in samples], batch_tokens):
            for i, sc in zip(idx, self._score_batch([samples[i] for i in idx]), strict=True):
                out[i] = sc
        return out  # type: ignore[return-value]

    def _score_batch(self, batch: list[tuple[list[int], int]]) -> list[Scores]:
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        rows, cols, targets = [], [], []
        for r, (x, p) in enumerate(batch):
            ids[r, : len(x)] = torch.tensor(x)
            mask[r, : len(x)] = 1
            rows.append(torch.full((len(x) - p,), r))
            cols.append(torch.arange(p - 1, len(x) - 1))  # position t-1 predicts token t
            targets.append(torch.tensor(x[p:]))
        self.stats.real_tokens += int(mask.sum())
        self.stats.padded_tokens += ids.numel()
        hidden = self.model.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False
        ).last_hidden_state
        r, c = torch.cat(rows).to(self.device), torch.cat(cols).to(self.device)
        entropy, prob = entropy_and_prob(
            hidden[r, c], self.model.lm_head, torch.cat(targets).to(self.device), self.chunk_elements
        )
        entropy, prob = entropy.cpu().numpy(), prob.cpu().numpy()
        out, start = [], 0
        for x, p in batch:
            n = len(x) - p
            out.append(Scores(entropy[start : start + n], prob[start : start + n]))
            start += n
        return out


def difficulty(scores: Scores, metric: str) -> np.ndarray:
    """The values strategies cut on: entropy, or surprisal -log p(actual token), both in nats."""
    if metric == "entropy":
        return scores.entropy
    return -np.log(np.clip(scores.prob, 1e-12, 1.0))
