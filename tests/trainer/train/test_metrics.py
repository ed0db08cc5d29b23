"""A step's metrics: token-weighted means over micro-batches and ranks, read back in one transfer."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import random_sample

from trainer.train.metrics import reduce_outputs, response_tokens


class OneRank:
    calls = 0

    def all_reduce_sum(self, values):
        self.calls += 1
        return list(values)


def test_reduce_outputs_is_the_token_weighted_mean_of_device_values():
    records = [
        ({"loss": torch.tensor(2.0), "token_acc_slot2": torch.tensor(0.5)}, 10, 1.0),
        ({"loss": torch.tensor(4.0)}, 30, 1.0),  # no slot-2 tokens in this micro-batch
        ({"loss": torch.tensor(100.0), "token_acc_slot2": torch.tensor(1.0)}, 5, 0.0),  # a weight-0 repeat
    ]
    strategy = OneRank()
    out = reduce_outputs(strategy, records)
    assert out == pytest.approx({"loss": (2 * 10 + 4 * 30) / 40, "token_acc_slot2": 0.5}, rel=1e-12)
    assert strategy.calls == 1


def test_response_tokens_come_from_the_samples_without_a_device_sync():
    from hamburger.model import collate

    rng = random.Random(0)
    samples = [random_sample(rng, 96, 4, rng.randint(2, 9), rng.randint(1, 30), sid=i) for i in range(5)]
    assert response_tokens(samples) == collate(samples, 4).num_response_tokens
