"""LoRA on the base (peft, in place): step 0 is the base exactly, only adapters train, and the
merge an export writes gives the adapted model's own outputs."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import random_sample, tiny_hamburger

from hamburger.decode import generate
from hamburger.model import HAMburgerConfig, HAMburgerModel, collate
from hamburger.model.lora import LoraSettings, add_lora, merged_state


def _batch(seed: int = 0):
    rng = random.Random(seed)
    return collate([random_sample(rng, 96, 4, 6, 30, sid=i) for i in range(3)], 4)


def test_adapters_start_as_the_base_and_only_they_train():
    model = tiny_hamburger(seed=1)
    batch = _batch()
    with torch.no_grad():
        before = model(batch, return_logits=True).logits
    lora = add_lora(model.base, LoraSettings(rank=4, alpha=8))
    with torch.no_grad():
        torch.testing.assert_close(model(batch, return_logits=True).logits, before, atol=0, rtol=0)
    trainable = {n for n, p in model.base.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(lora) == len(trainable) == 2 * 7 * model.base.config.num_hidden_layers
    model(batch).loss.backward()
    assert all(p.grad is None for n, p in model.base.named_parameters() if n not in trainable)


def test_the_merged_state_is_the_adapted_model():
    """After some training of the adapters, folding them into the weights (as export does) gives
    a plain HAMburger model with the same logits and the same greedy tokens."""
    torch.manual_seed(0)
    model = tiny_hamburger(seed=2).double()
    settings = LoraSettings(rank=4, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    lora = add_lora(model.base, settings)
    opt = torch.optim.SGD(lora, lr=0.5)
    for i in range(3):
        opt.zero_grad()
        model(_batch(i)).loss.backward()
        opt.step()
    assert any(".lora_B." in n and p.abs().max() > 0 for n, p in model.base.named_parameters())
    merged = merged_state(model.state_dict(), settings.to_dict())
    plain = tiny_hamburger(seed=7).double()
    missing, unexpected = plain.load_state_dict({k: v.contiguous() for k, v in merged.items()}, strict=True)
    assert not missing and not unexpected
    model.eval()
    plain.eval()
    with torch.no_grad():
        batch = _batch(5)
        torch.testing.assert_close(
            plain(batch, return_logits=True).logits,
            model(batch, return_logits=True).logits,
            atol=1e-9,
            rtol=0,
        )
        prompt = [5, 17, 33, 8, 61, 12]
        assert generate(plain, prompt, 16, 0.5).tokens == generate(model, prompt, 16, 0.5).tokens


def test_rslora_scales_by_the_square_root_of_the_rank():
    assert LoraSettings(rank=16, alpha=32).scaling == 2.0
    assert LoraSettings(rank=16, alpha=32, rslora=True).scaling == 8.0


def test_an_adapter_on_a_tied_lm_head_is_refused():
    from conftest import tiny_base

    base = tiny_base(0, tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"\['lm_head'\]: this base ties its LM head"):
        add_lora(base, LoraSettings(target_modules=["q_proj", "lm_head"]))


@pytest.mark.parametrize(
    "settings, fragment",
    [
        (dict(rank=0), "model.lora.rank must be >= 1"),
        (dict(alpha=0.0), "model.lora.alpha must be a finite number > 0"),
        (dict(dropout=1.0), r"model.lora.dropout must be in \[0, 1\)"),
        (dict(target_modules=[]), "must name at least one linear layer"),
        (dict(target_modules=["q_proj", "qkv"]), r"\['qkv'\]: no linear layer of LlamaForCausalLM"),
    ],
)
def test_bad_lora_settings_are_named(settings, fragment):
    model = HAMburgerModel(tiny_hamburger().base, HAMburgerConfig(embedder_head_dim=16, micro_layers=1))
    with pytest.raises(ValueError, match=fragment):
        add_lora(model.base, LoraSettings(**settings))


def test_carried_state_maps_a_checkpoint_onto_a_model_with_or_without_adapters():
    """init_from between phases: plain -> LoRA (the weight goes to base_layer, adapters start
    fresh), LoRA -> LoRA (adapters carried), LoRA -> plain (folded in); a missing tensor is named."""
    from hamburger.model.lora import carried_state

    settings = LoraSettings(rank=2, alpha=4, target_modules=["q_proj"])
    plain = tiny_hamburger(seed=1)
    adapted = tiny_hamburger(seed=2)
    add_lora(adapted.base, settings)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if ".lora_B." in n:
                p.normal_()
    lora_names = [n for n, _ in adapted.named_parameters()]
    plain_names = [n for n, _ in plain.named_parameters()]
    q = "base.model.layers.0.self_attn.q_proj"

    to_lora = carried_state(lora_names, plain.state_dict(), None)
    assert torch.equal(to_lora[f"{q}.base_layer.weight"], plain.state_dict()[f"{q}.weight"])
    assert f"{q}.lora_B.default.weight" not in to_lora  # fresh: B = 0 keeps the checkpoint's model
    carried = carried_state(lora_names, adapted.state_dict(), settings.to_dict())
    assert torch.equal(
        carried[f"{q}.lora_B.default.weight"], adapted.state_dict()[f"{q}.lora_B.default.weight"]
    )
    folded = carried_state(plain_names, adapted.state_dict(), settings.to_dict())
    sd = adapted.state_dict()
    want = (
        sd[f"{q}.base_layer.weight"]
        + 2.0 * sd[f"{q}.lora_B.default.weight"] @ sd[f"{q}.lora_A.default.weight"]
    )
    torch.testing.assert_close(folded[f"{q}.weight"].contiguous(), want)
    partial = {k: v for k, v in plain.state_dict().items() if not k.startswith("stop_head.")}
    with pytest.raises(ValueError, match=r"ckpt has no weights for \['stop_head"):
        carried_state(plain_names, partial, None, where="ckpt")
