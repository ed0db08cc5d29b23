"""HAMburgerModel: the vectorised forward against a slow per-segment reference, and its contracts."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import random_sample, tiny_base, tiny_hamburger

from hamburger.decode import generate

# ---------------------------------------------------------------- slow, obviously-correct reference
from hamburger.model import HAMburgerConfig, HAMburgerModel, Sample, collate, load_model, save_model


# ---------------------------------------------------------------- slow, obviously-correct reference
def ref_smash(model: HAMburgerModel, tokens: list[int]) -> torch.Tensor:
    """One segment's input embedding, head by head, exactly as the method describes it."""
    emb = model.embed_tokens(torch.tensor(tokens))  # [k, D]
    if len(tokens) == 1:
        return emb[0]
    e = model.embedder
    mean = emb.mean(0)
    kv_in = torch.cat([emb, e.slot_pos[: len(tokens)]], dim=-1)
    q = e.q_proj(mean).view(e.num_heads, e.head_dim)
    keys = e.k_proj(kv_in).view(len(tokens), e.num_heads, e.head_dim)
    vals = e.v_proj(kv_in).view(len(tokens), e.num_heads, e.head_dim)
    heads = []
    for h in range(e.num_heads):
        w = torch.softmax(keys[:, h] @ q[h] / math.sqrt(e.head_dim), dim=0)
        heads.append(w @ vals[:, h])
    return mean + e.o_proj(torch.cat(heads))


def ref_forward(model: HAMburgerModel, samples: list[Sample]):
    """Per sample, per segment, per token: logits [T, V] and stop logits [T] in token order."""
    all_logits, all_stops, all_targets, all_labels = [], [], [], []
    for s in samples:
        p, ids = s.prompt_len, s.input_ids
        bounds = [p]
        for n in s.seg_lens:
            bounds.append(bounds[-1] + n)
        inputs = [model.embed_tokens(torch.tensor([t]))[0] for t in ids[:p]]
        positions = list(range(p))
        for j in range(len(s.seg_lens) - 1):
            inputs.append(ref_smash(model, ids[bounds[j] : bounds[j + 1]]))
            positions.append(bounds[j + 1] - 1)
        out = model.base.model(
            inputs_embeds=torch.stack(inputs)[None],
            position_ids=torch.tensor([positions]),
            output_hidden_states=True,
        )
        for j, n in enumerate(s.seg_lens):
            src = p - 1 + j
            feats = torch.stack([out.hidden_states[i][0, src] for i in model.feature_layers])  # [F, D]
            seg = ids[bounds[j] : bounds[j + 1]]
            outs = [feats[-1]]
            for t in range(1, n):  # recompute the whole micro sequence for every token
                slots = model.micro.features_in(feats[None])
                toks = model.embed_tokens(torch.tensor([seg[:t]]))
                y = model.micro(torch.cat([slots, toks], dim=1))
                outs.append(y[0, -1])
            for t, o in enumerate(outs):
                all_logits.append(model.lm_head(o))
                all_stops.append(model.stop_head(o))
                all_targets.append(seg[t])
                all_labels.append(1.0 if t == n - 1 else 0.0)
    logits = torch.stack(all_logits).float()
    stops = torch.stack(all_stops).float()
    ce = F.cross_entropy(logits, torch.tensor(all_targets))
    bce = F.binary_cross_entropy_with_logits(stops, torch.tensor(all_labels))
    return logits, stops, ce + model.config.stop_weight * bce


def mixed_samples(rng: random.Random, n: int = 4) -> list[Sample]:
    shapes = [(5, 11), (2, 7), (9, 14), (1, 5), (4, 1), (6, 10)]
    return [random_sample(rng, 96, 4, p, r, sid=i) for i, (p, r) in enumerate(shapes[:n])]


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("row_capacity", [None, 64])
def test_vectorised_forward_matches_reference(rng, row_capacity):
    model = tiny_hamburger()
    samples = mixed_samples(rng, 6)
    assert {n for s in samples for n in s.seg_lens} == {1, 2, 3, 4}
    batch = collate(samples, 4, row_capacity=row_capacity)
    if row_capacity:
        assert batch.seq_ids.shape[0] < len(samples)  # really packed several per row
    out = model(batch, return_logits=True)
    grads = torch.autograd.grad(out.loss, [p for p in model.parameters()], allow_unused=True)

    ref_logits, ref_stops, ref_loss = ref_forward(model, samples)
    ref_grads = torch.autograd.grad(ref_loss, [p for p in model.parameters()], allow_unused=True)

    torch.testing.assert_close(out.logits, ref_logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.stop_logits, ref_stops, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-5, rtol=1e-5)
    names = [n for n, _ in model.named_parameters()]
    for name, g, rg in zip(names, grads, ref_grads, strict=True):
        if rg is None:
            assert g is None or torch.count_nonzero(g) == 0, name
            continue
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert all(g is not None for n, g in zip(names, grads, strict=True) if not n.startswith("teacher"))


def test_no_leakage_between_packed_samples(rng):
    model = tiny_hamburger()
    samples = mixed_samples(rng, 3)
    batch = collate(samples, 4, row_capacity=200)
    assert batch.seq_ids.shape[0] == 1
    before = model(batch, return_logits=True).logits
    changed = [Sample(list(s.input_ids), s.prompt_len, list(s.seg_lens), s.sample_id) for s in samples]
    changed[1].input_ids = [(t * 7 + 3) % 93 + 3 for t in changed[1].input_ids]
    changed[1].seg_lens = [1] * (len(changed[1].input_ids) - changed[1].prompt_len)
    after = model(collate(changed, 4, row_capacity=200), return_logits=True).logits
    n0 = sum(samples[0].seg_lens)
    n1_old, n1_new = sum(samples[1].seg_lens), sum(changed[1].seg_lens)
    torch.testing.assert_close(after[:n0], before[:n0], atol=1e-6, rtol=0)
    torch.testing.assert_close(after[n0 + n1_new :], before[n0 + n1_old :], atol=1e-6, rtol=0)
    assert not torch.allclose(after[n0 : n0 + n1_new], before[n0 : n0 + n1_old], atol=1e-3)


@pytest.mark.parametrize("confidence", [0.3, 0.6])
def test_train_decode_consistency(confidence):
    """Decode, then feed the result teacher-forced: same tokens, same stop decisions everywhere."""
    model = tiny_hamburger(seed=3)
    with torch.no_grad():
        torch.manual_seed(5)
        for layer in model.stop_head.net:  # a stop head whose decisions vary from token to token
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0, 0.5)
        for p in model.base.parameters():  # a sharper random model gives varied tokens
            p.mul_(3.0)
    prompt = [5, 17, 33, 8, 61, 12]
    res = generate(model, prompt, max_new_tokens=40, confidence=confidence, eos_token_ids={2})
    assert len(set(res.seg_lens)) > 1, res.seg_lens  # the test must exercise several lengths
    assert res.macro_steps == len(res.seg_lens)
    sample = Sample(prompt + res.tokens, len(prompt), res.seg_lens)
    out = model(collate([sample], 4), return_logits=True)
    assert out.logits.argmax(-1).tolist() == res.tokens
    cont = 1 - torch.sigmoid(out.stop_logits)
    t = 0
    for n, forced in zip(res.seg_lens, res.forced_stop, strict=True):
        for j in range(n):
            if j < n - 1:
                assert cont[t] >= confidence, (t, res.seg_lens)
            elif not forced:
                assert cont[t] < confidence, (t, res.seg_lens)
            t += 1


def test_one_token_segments_equal_base_logits(rng):
    model = tiny_hamburger()
    s = random_sample(rng, 96, 1, 6, 12)
    out = model(collate([s], 4), return_logits=True)
    base_logits = model.base(input_ids=torch.tensor([s.input_ids])).logits[0]
    torch.testing.assert_close(out.logits, base_logits[s.prompt_len - 1 : -1].float(), atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(tmp_path, rng):
    model = tiny_hamburger()
    batch = collate(mixed_samples(rng, 4), 4, row_capacity=64)
    save_model(model, tmp_path / "m")
    loaded = load_model(str(tmp_path / "m")).eval()
    assert loaded.base_ties_embeddings()
    a, b = model(batch, return_logits=True), loaded(batch, return_logits=True)
    torch.testing.assert_close(b.logits, a.logits, atol=0, rtol=0)
    torch.testing.assert_close(b.stop_logits, a.stop_logits, atol=0, rtol=0)
    prompt = [4, 9, 22, 7]
    assert generate(model, prompt, 16, 0.5, {2}) == generate(loaded, prompt, 16, 0.5, {2})


def test_loading_an_exports_tokenizer_prints_no_model_type_warning(tmp_path, caplog):
    """transformers warned "You are using a model of type `hamburger` to instantiate a model of
    type ``... can yield errors" on every tokenizer load of an export: not a fault, so not said."""
    import logging

    from helpers import smollm2_tokenizer_dir
    from transformers import AutoTokenizer

    save_model(
        tiny_hamburger(),
        tmp_path / "m",
        tokenizer=AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir())),
    )
    with caplog.at_level(logging.WARNING):
        AutoTokenizer.from_pretrained(str(tmp_path / "m"))
        load_model(str(tmp_path / "m"))
    assert not [r for r in caplog.records if "model of type" in r.getMessage()]


def test_loss_falls_on_repeated_batch(rng):
    torch.manual_seed(0)
    model = tiny_hamburger(randomize=False).train()
    batch = collate(mixed_samples(rng, 4), 4, row_capacity=64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    assert out.metrics["token_acc"] > 0.9


def test_kl_term_against_frozen_teacher(rng):
    base = tiny_base(0)
    teacher = tiny_base(0)
    model = HAMburgerModel(
        base, HAMburgerConfig(embedder_head_dim=16, micro_layers=2, kl_weight=0.3), teacher=teacher
    )
    s = random_sample(rng, 96, 1, 5, 8)
    out = model(collate([s], 4, with_plain=True), return_logits=True)
    assert out.kl is not None and out.kl.abs() < 1e-5  # one-token segments: student == teacher
    s2 = random_sample(rng, 96, 4, 5, 8)
    out2 = model(collate([s2], 4, with_plain=True))
    assert out2.kl > 0
    torch.testing.assert_close(out2.loss, out2.ce + 0.5 * out2.stop_bce + 0.3 * out2.kl)
    assert all(not p.requires_grad for p in model.teacher.parameters())


def test_alignment_is_zero_for_one_token_segments_and_teaches_only_the_embedder(rng):
    """The feature-alignment loss: with every segment one token the HAMburger forward is the
    plain forward, so it is zero; with smashed segments its gradient, the base frozen (phase 1
    of the staged recipe), reaches the embedder and nothing else; at align_weight 0 it is absent."""
    hcfg = HAMburgerConfig(embedder_head_dim=16, micro_layers=2, align_weight=2.0, align_layers=[0, 2, 4])
    model = HAMburgerModel(tiny_base(0).double(), hcfg).double()
    one = random_sample(rng, 96, 1, 5, 12)
    out = model(collate([one], 4, with_plain=True))
    assert out.align is not None and float(out.align.detach()) < 1e-20
    model.base.requires_grad_(False)
    smashed = [random_sample(rng, 96, 4, 5, 20, sid=i) for i in range(2)]
    out = model(collate(smashed, 4, row_capacity=200, with_plain=True))
    assert out.align > 1e-3
    torch.testing.assert_close(out.loss, out.ce + 0.5 * out.stop_bce + 2.0 * out.align)
    out.align.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("embedder."))
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if not n.startswith("embedder."))
    off = HAMburgerModel(tiny_base(0), HAMburgerConfig(embedder_head_dim=16, micro_layers=2))
    assert off(collate(smashed, 4)).align is None  # no plain forward either: no plain batch needed


def test_kl_and_alignment_pair_each_token_with_its_own_sample_when_rows_reorder(rng):
    """Packing puts sample 2 beside sample 0 (rows [[0, 2], [1]]): the targets then run 0, 2, 1,
    and the plain positions the teacher and the alignment read must follow that order (they
    ran 0, 1, 2 and paired tokens with another sample's states). Same KL and alignment as with
    every sample in its own row, where no reordering happens."""
    hcfg = HAMburgerConfig(embedder_head_dim=16, micro_layers=1, kl_weight=0.5, align_weight=1.0)
    model = HAMburgerModel(tiny_base(0).double(), hcfg, teacher=tiny_base(1).double()).double()
    samples = [
        random_sample(rng, 96, 3, 6, 20, sid=0),
        random_sample(rng, 96, 3, 9, 30, sid=1),
        random_sample(rng, 96, 3, 4, 10, sid=2),
    ]
    lengths = [s.macro_len for s in samples]
    cap = max(lengths[0] + lengths[2], lengths[1])
    assert lengths[0] + lengths[1] > cap  # so sample 1 opens a second row and 2 joins the first
    packed = collate(samples, 4, row_capacity=cap, with_plain=True)
    assert packed.seq_ids.shape[0] == 2
    with torch.no_grad():
        a, b = model(packed), model(collate(samples, 4, with_plain=True))
    torch.testing.assert_close(a.kl, b.kl, atol=1e-7, rtol=1e-5)  # the loss runs in fp32
    torch.testing.assert_close(a.align, b.align, atol=1e-7, rtol=1e-5)


def test_alignment_layers_are_checked():
    with pytest.raises(ValueError, match="align_layers entry 9 is outside 0..4"):
        HAMburgerModel(tiny_base(0), HAMburgerConfig(embedder_head_dim=16, micro_layers=1, align_layers=[9]))
    with pytest.raises(ValueError, match="hamburger.align_weight must be >= 0"):
        HAMburgerConfig(align_weight=-1.0).validate()


def test_feature_layers_default_and_errors():
    assert HAMburgerConfig().resolved_feature_layers(16) == [4, 8, 12, 16]
    assert HAMburgerConfig().resolved_feature_layers(30) == [8, 15, 22, 30]  # round(7.5), 15, round(22.5), 30
    assert HAMburgerConfig().resolved_feature_layers(2) == [1, 2]  # a shallow base: each layer once
    with pytest.raises(ValueError, match="feature_layers"):
        HAMburgerConfig(feature_layers=[2, 3]).resolved_feature_layers(4)
    with pytest.raises(ValueError, match="max_segment_len"):
        HAMburgerConfig(max_segment_len=0).validate()
    with pytest.raises(ValueError, match="unknown hamburger config keys"):
        HAMburgerConfig.from_dict({"max_step": 3})


def test_bad_samples_are_named():
    with pytest.raises(ValueError, match="sample 7: seg_lens sum"):
        collate([Sample([1, 2, 3, 4], 2, [1], sample_id=7)], 4)
    with pytest.raises(ValueError, match="sample 8: seg_lens must lie in 1..4"):
        collate([Sample([1] * 8, 2, [5, 1], sample_id=8)], 4)


def test_rejects_non_llama_base():
    with pytest.raises(TypeError, match="not a Llama-family"):
        HAMburgerModel(torch.nn.Linear(2, 2), HAMburgerConfig())


def test_gradient_checkpointing_changes_nothing(rng):
    model = tiny_hamburger().train()
    batch = collate(mixed_samples(rng, 4), 4, row_capacity=64)
    out = model(batch)
    grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    model.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out2 = model(batch)
    grads2 = torch.autograd.grad(out2.loss, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(out2.loss, out.loss)
    for g, g2 in zip(grads, grads2, strict=True):
        if g is not None:
            torch.testing.assert_close(g2, g, atol=1e-6, rtol=1e-5)


def test_micro_decoder_can_start_as_the_base_top():
    model = tiny_hamburger()
    model.copy_base_top_into_micro()
    top = model.base.model.layers[-2:]
    for mine, theirs in zip(model.micro.layers, top, strict=True):
        for (n, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items(), strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)
    with pytest.raises(ValueError, match="micro_layers <= the base's"):
        HAMburgerModel(
            tiny_base(), HAMburgerConfig(embedder_head_dim=16, micro_layers=9)
        ).copy_base_top_into_micro()


def test_the_old_name_of_k_is_refused_naming_the_new_one():
    """`max_steps` meant K in model.hamburger and the step budget at the top of the same YAML;
    K is now `max_segment_len`, and an old config or model folder fails naming it."""
    from data_prep.config import PrepConfig
    from hamburger.configio import ConfigError, load_config
    from trainer.train.config import TrainConfig

    with pytest.raises(
        ConfigError, match=r"'model.hamburger.max_steps' was renamed: use 'model.hamburger.max_segment_len'"
    ):
        load_config(TrainConfig, None, ["model.hamburger.max_steps=3"])
    with pytest.raises(ConfigError, match=r"'label.max_steps' was renamed: use 'label.max_segment_len'"):
        load_config(PrepConfig, None, ["sources=[{path: x.jsonl}]", "label.max_steps=3"])
    with pytest.raises(ValueError, match="'max_steps' was renamed to 'max_segment_len'"):
        HAMburgerConfig.from_dict({"max_steps": 4})
    assert (
        load_config(
            PrepConfig, None, ["sources=[{path: x.jsonl}]", "label.max_segment_len=3"]
        ).label.max_segment_len
        == 3
    )


@pytest.mark.parametrize("kl_weight", [0.0, 0.3])
def test_chunked_loss_equals_the_full_logits_loss_and_gradients(rng, kl_weight):
    """loss_chunk_tokens bounds the fp32 logits held at once; loss, metrics and every gradient
    (base, embedder, micro decoder, stop head) are those of the whole-[T, V] loss, to float32
    rounding (the logits are fp32 in both paths; only the order of the sums differs)."""

    def run(chunk: int, calls: int = 0):
        torch.manual_seed(0)
        teacher = tiny_base(0) if kl_weight else None
        model = HAMburgerModel(
            tiny_base(0),
            HAMburgerConfig(
                embedder_head_dim=16, micro_layers=2, kl_weight=kl_weight, loss_chunk_tokens=chunk
            ),
            teacher=teacher,
        ).double()
        with torch.no_grad():
            model.embedder.o_proj.weight.normal_(0, 0.05)
        batch = collate(mixed_samples(random.Random(3), 6), 4, row_capacity=64, with_plain=kl_weight > 0)
        batch.loss_chunks = calls  # what a ZeRO-3 rank gets: the most any rank needs
        out = model(batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    whole, g_whole = run(0)
    assert whole.kl is None or whole.kl > 0
    for chunk, calls in ((1, 0), (7, 0), (16, 0), (16, 100)):  # 100 calls for 48 tokens: some empty
        part, g_part = run(chunk, calls)
        torch.testing.assert_close(part.loss, whole.loss, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(part.ce, whole.ce, rtol=1e-6, atol=1e-9)
        if kl_weight:
            torch.testing.assert_close(part.kl, whole.kl, rtol=1e-6, atol=1e-9)
        assert {k: float(v) for k, v in part.metrics.items()} == pytest.approx(
            {k: float(v) for k, v in whole.metrics.items()}, rel=1e-6
        )
        assert g_part.keys() == g_whole.keys()
        for name in g_whole:
            torch.testing.assert_close(g_part[name], g_whole[name], rtol=1e-5, atol=1e-8, msg=name)


def test_loss_chunk_tokens_is_checked():
    with pytest.raises(ValueError, match="loss_chunk_tokens must be an integer >= 0"):
        HAMburgerConfig(loss_chunk_tokens=-1).validate()


def test_the_micro_decoder_runs_once_per_forward_whatever_the_segment_lengths(rng):
    """One call for every segment of two or more tokens (rows of F + K - 1 slots), and one
    dummy call when every segment is one token: the same module calls on every ZeRO-3 rank."""
    model = tiny_hamburger()
    calls = []
    model.micro.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape))
    mixed = mixed_samples(rng, 6)
    model(collate(mixed, 4))
    assert len(calls) == 1 and calls[0][1] == model.micro.num_features + 3
    assert calls[0][0] == sum(n >= 2 for s in mixed for n in s.seg_lens)
    ones = [random_sample(rng, 96, 1, 3, 5, sid=i) for i in range(2)]
    calls.clear()
    out = model(collate(ones, 4))
    assert len(calls) == 1 and calls[0][0] == 1
    torch.autograd.grad(out.loss, [p for p in model.micro.parameters()], allow_unused=True)
