"""HAMburgerModel: compositional embedder -> base LLM -> micro-step decoder + stop head.

Read top to bottom: construction, the vectorised training forward, the pieces decoding needs,
then save/load. The base is any Hugging Face Llama-family causal LM (Llama, SmolLM2, Qwen2,
Mistral): anything with model.embed_tokens / model.layers / model.norm / model.rotary_emb /
lm_head. Its weights, embedding table and LM head are shared, not copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from . import packed_attention
from .batch import PackedBatch
from .chunked_loss import chunked_token_losses, chunks_for
from .config import HAMburgerConfig
from .embedder import CompositionalEmbedder
from .families import check_supported
from .micro_decoder import MicroDecoder, StopHead


@dataclass
class HAMburgerOutput(ModelOutput):
    """Loss terms and metrics of one forward. Metrics are detached means over the batch.

    A ModelOutput (a dict underneath) so that ZeRO-3's hooks can see the tensors in it.
    """

    loss: torch.Tensor | None = None
    ce: torch.Tensor | None = None
    stop_bce: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    align: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] | None = None
    logits: torch.Tensor | None = None  # [T, V] per response token, when asked for
    stop_logits: torch.Tensor | None = None  # [T]


def _check_base(base: nn.Module) -> None:
    inner = getattr(base, "model", None)
    needed = ["embed_tokens", "layers", "norm", "rotary_emb"]
    missing = [n for n in needed if inner is None or not hasattr(inner, n)]
    if missing or not hasattr(base, "lm_head"):
        raise TypeError(
            f"{type(base).__name__} is not a Llama-family causal LM: HAMburger needs "
            f"model.{{{', '.join(needed)}}} and lm_head (missing: {missing or ['lm_head']})"
        )
    check_supported(base.config)


class HAMburgerModel(nn.Module):
    def __init__(self, base: nn.Module, config: HAMburgerConfig, teacher: nn.Module | None = None):
        super().__init__()
        _check_base(base)
        config.validate()
        self.config = config
        self.base = base
        bcfg = base.config
        self.feature_layers = config.resolved_feature_layers(bcfg.num_hidden_layers)
        for idx in config.align_layers:
            if not 0 <= idx <= bcfg.num_hidden_layers:
                raise ValueError(
                    f"hamburger.align_layers entry {idx} is outside 0..{bcfg.num_hidden_layers} "
                    "(the base model's hidden states)"
                )
        d = bcfg.hidden_size
        self.embedder = CompositionalEmbedder(d, config.max_segment_len, config.embedder_head_dim)
        self.micro = MicroDecoder(
            bcfg,
            num_layers=config.micro_layers,
            num_features=len(self.feature_layers),
            layer_cls=type(base.model.layers[0]),
            norm_cls=type(base.model.norm),
            rotary_cls=type(base.model.rotary_emb),
        )
        self.stop_head = StopHead(d)
        packed_attention.prepare_base(base, config.packed_attention)
        if config.kl_weight > 0 and teacher is None:
            raise ValueError("hamburger.kl_weight > 0 needs a frozen teacher (pass the base model again)")
        # Kept out of state_dict/parameters() bookkeeping by freezing; never saved.
        self.teacher = teacher.eval().requires_grad_(False) if config.kl_weight > 0 else None
        self.init_new_modules()

    # ------------------------------------------------------------------ construction
    def base_top_params(self) -> list[nn.Parameter]:
        """The base parameters micro_init=base_top copies (a ZeRO-3 caller gathers these first)."""
        m = self.config.micro_layers
        return [p for layer in self.base.model.layers[-m:] for p in layer.parameters()] + list(
            self.base.model.norm.parameters()
        )

    @torch.no_grad()
    def copy_base_top_into_micro(self) -> None:
        """micro.layers[i] <- base layer L-m+i, micro.norm <- the base's final norm: the decoder
        starts as the model's own top, which already maps hidden states to next-token space."""
        top = self.base.model.layers[-self.config.micro_layers :]
        if len(top) < self.config.micro_layers:
            raise ValueError(
                f"hamburger.micro_init=base_top needs micro_layers <= the base's {len(top)} layers"
            )
        for mine, theirs in zip(self.micro.layers, top, strict=True):
            mine.load_state_dict(theirs.state_dict())
        self.micro.norm.load_state_dict(self.base.model.norm.state_dict())

    @classmethod
    def from_base(
        cls,
        name_or_path: str,
        config: HAMburgerConfig | None = None,
        dtype: torch.dtype = torch.float32,
        **kw,
    ) -> HAMburgerModel:
        """Wrap a pretrained base: a hub name (cluster) or a local folder (here, and in tests)."""
        from transformers import AutoModelForCausalLM

        config = config or HAMburgerConfig()
        base = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kw)
        teacher = None
        if config.kl_weight > 0:
            teacher = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kw)
        return cls(base, config, teacher=teacher)

    def new_modules(self) -> list[nn.Module]:
        """The grafted modules (their own learning rate; everything else is the base)."""
        return [self.embedder, self.micro, self.stop_head]

    @torch.no_grad()
    def init_new_modules(self) -> None:
        """Initialise the grafted modules; the smashed embedding starts as mean(e) exactly.

        Under ZeRO-3 the caller gathers these parameters around this call (see trainer.train.strategy).
        """
        std = getattr(self.base.config, "initializer_range", 0.02)
        for module in self.new_modules():
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    sub.weight.normal_(0.0, std)
                    if sub.bias is not None:
                        sub.bias.zero_()
        self.embedder.slot_pos.normal_(0.0, std)
        self.embedder.o_proj.weight.zero_()

    # ------------------------------------------------------------------ shared pieces
    @property
    def embed_tokens(self) -> nn.Module:
        return self.base.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        return self.base.get_output_embeddings()

    def smash(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[G, K] token ids (+ lengths) -> [G, D] input embeddings."""
        return self.embedder(self.embed_tokens(tokens), lengths)

    def features(self, hidden_states: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """The base hidden states that feed the micro decoder; the last is the final output h_L."""
        return [hidden_states[i] for i in self.feature_layers]

    # ------------------------------------------------------------------ training forward
    def forward(self, batch: PackedBatch, return_logits: bool = False) -> HAMburgerOutput:
        """Losses and metrics for a packed batch, all segments at once.

        1. smash every base input (prompt tokens pass through) and lay them out in rows;
        2. one base forward, token-coordinate positions, block-diagonal causal mask;
        3. micro-step outputs o_j for every response token: o_1 = h_L at the predicting
           position, o_j (j>1) = micro decoder at the slot of e(t_{j-1}). The decoder runs once
           per segment length (<= K-1 calls), so there are no padded slots and one-token
           segments cost no decoder compute;
        4. LM head and stop head on all o_j; CE + stop_weight * BCE (+ kl_weight * KL), the LM
           head's logits loss_chunk_tokens tokens at a time when there are more.
        """
        k = self.config.max_segment_len
        rows, width = batch.seq_ids.shape
        x = self.smash(batch.group_tokens, batch.group_lens)
        d = x.shape[-1]
        inputs = x.new_zeros(rows * width, d).index_copy(0, batch.group_pos, x).view(rows, width, d)
        flex = self.base.config._attn_implementation == packed_attention.IMPL and packed_attention.use_flex(
            self.config.packed_attention, inputs.device
        )
        out = self.base.model(
            inputs_embeds=inputs,
            attention_mask=packed_attention.packed_mask(batch.seq_ids, inputs.dtype, flex),
            position_ids=batch.position_ids,
            output_hidden_states=True,
            use_cache=False,
        )
        feats = torch.stack(
            [h.reshape(rows * width, d)[batch.tgt_src] for h in self.features(out.hidden_states)], dim=1
        )  # [S, F, D]
        o = self._micro_outputs(feats, batch.tgt_tokens, batch.tgt_lens)  # [S * K, D]

        valid = torch.arange(k, device=o.device)[None, :] < batch.tgt_lens[:, None]  # [S, K]
        flat_valid = valid.reshape(-1)
        o_tok = o[flat_valid]  # [T, D], response tokens in order
        targets = batch.tgt_tokens[valid]
        slots = torch.arange(k, device=o.device).expand_as(valid)[valid]
        stop_labels = (slots == (batch.tgt_lens[:, None].expand_as(valid)[valid] - 1)).float()

        stop_logits = self.stop_head(o_tok).float()
        needs_plain = self.teacher is not None or self.config.align_weight > 0
        plain = self._plain_states(batch) if needs_plain else None
        chunks = batch.loss_chunks or chunks_for(o_tok.shape[0], self.config.loss_chunk_tokens)
        logits = None
        if return_logits or chunks <= 1:  # the whole [T, V] at once
            logits = self.lm_head(o_tok).float()
            ce = F.cross_entropy(logits, targets)
            kl = self._kl_to_teacher(plain, batch, logits) if self.teacher is not None else None
            correct = logits.detach().argmax(-1) == targets
        else:  # `chunk` tokens' logits at a time (hamburger/model/chunked_loss.py)
            teacher = self.teacher
            ce, kl, correct = chunked_token_losses(
                self.lm_head,
                o_tok,
                targets,
                chunks,
                teacher.lm_head if teacher is not None else None,
                self._teacher_hidden(plain, batch) if teacher is not None else None,
                self.config.kl_temperature,
            )
        bce = F.binary_cross_entropy_with_logits(stop_logits, stop_labels)
        loss = ce + self.config.stop_weight * bce
        if kl is not None:
            loss = loss + self.config.kl_weight * kl
        align = None
        if self.config.align_weight > 0:
            align = self._align_to_plain(out.hidden_states, plain, batch)
            loss = loss + self.config.align_weight * align
        metrics = self._metrics(correct, slots, stop_logits, stop_labels, valid)
        return HAMburgerOutput(
            loss=loss,
            ce=ce,
            stop_bce=bce,
            kl=kl,
            align=align,
            metrics=metrics,
            logits=logits if return_logits else None,
            stop_logits=stop_logits if return_logits else None,
        )

    def _micro_outputs(self, feats: torch.Tensor, tgt_tokens: torch.Tensor, tgt_lens: torch.Tensor):
        """[S, F, D] features -> [S * K, D] micro-step outputs (zeros past each segment's end).

        One micro-decoder call for every segment of two or more tokens, each a row of F + K - 1
        slots [features, e(t_1..t_{K-1})]: under the causal mask a segment of L tokens reads
        only its first F + L - 1 slots, so the slots past them change nothing it computes
        (their outputs are dropped). One-token segments need no micro step (o_1 = h_L). With
        no such segment the call runs on one dummy row with weight 0: every rank makes the same
        module calls (ZeRO-3 gathers are collective) and backward matches.
        """
        s, f, d = feats.shape
        k = self.config.max_segment_len
        out = feats.new_zeros(s, k, d)
        out[:, 0] = feats[:, -1]  # o_1 = h_L
        if k == 1:
            return out.reshape(s * k, d)
        rows = (tgt_lens >= 2).nonzero().squeeze(1)
        dummy = rows.numel() == 0
        sel = rows if not dummy else torch.zeros(1, dtype=torch.long, device=feats.device)
        seq = torch.cat(
            [self.micro.features_in(feats[sel]), self.embed_tokens(tgt_tokens[sel, : k - 1])], dim=1
        )
        y = self.micro(seq)[:, f:]  # slots of e(t_1..t_{K-1}) -> o_2..o_K
        if dummy:
            return out.reshape(s * k, d) + 0.0 * y.sum()
        used = torch.arange(1, k, device=feats.device)[None] < tgt_lens[sel][:, None]  # o_j, j <= L
        out = out.index_put((sel,), torch.cat([out[sel, :1], y * used[..., None]], dim=1))
        return out.reshape(s * k, d)

    @torch.no_grad()
    def _plain_states(self, batch: PackedBatch) -> tuple[torch.Tensor, ...]:
        """The hidden states ([N * Lp, D] each, flat) of one no-grad forward over the plain
        tokens: the frozen teacher's when there is one, else the base's own. KL and alignment
        both read this one forward. Right padding sits after each sample; under a causal mask
        it is never read."""
        if batch.plain_input_ids is None:
            raise ValueError("kl_weight > 0 or align_weight > 0 needs batches collated with with_plain=True")
        ref = self.teacher if self.teacher is not None else self.base
        out = ref.model(
            input_ids=batch.plain_input_ids,
            output_hidden_states=self.config.align_weight > 0,
            use_cache=False,
        )
        states = out.hidden_states or (out.last_hidden_state,)
        return tuple(h.reshape(-1, h.shape[-1]) for h in states)

    def _teacher_hidden(self, plain: tuple[torch.Tensor, ...], batch: PackedBatch) -> torch.Tensor:
        """[T, D] the teacher's final hidden states at each response token's predicting position."""
        return plain[-1][batch.plain_resp_pos]

    def _align_to_plain(
        self, hidden_states, plain: tuple[torch.Tensor, ...], batch: PackedBatch
    ) -> torch.Tensor:
        """Relative squared error, averaged over align_layers, between the base's hidden state at
        each macro position that predicts a segment (batch.tgt_src) and the plain forward's at the
        position predicting the same token (the previous segment's last token). One-token
        segments make the two forwards the same, so it is then zero."""
        first = torch.cumsum(batch.tgt_lens, 0) - batch.tgt_lens  # each segment's first response token
        at_plain = batch.plain_resp_pos[first]
        layers = self.config.align_layers or self.feature_layers
        terms = []
        for i in layers:
            h = hidden_states[i].reshape(-1, hidden_states[i].shape[-1])[batch.tgt_src].float()
            p = plain[i][at_plain].float()
            terms.append((h - p).pow(2).sum() / p.pow(2).sum().clamp_min(1e-12))
        return torch.stack(terms).mean()

    def _kl_to_teacher(
        self, plain: tuple[torch.Tensor, ...], batch: PackedBatch, logits: torch.Tensor
    ) -> torch.Tensor:
        with torch.no_grad():
            t_logits = self.teacher.lm_head(self._teacher_hidden(plain, batch)).float()
        temp = self.config.kl_temperature
        t_logp = F.log_softmax(t_logits / temp, dim=-1)
        s_logp = F.log_softmax(logits / temp, dim=-1)
        return F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean") * temp**2

    @torch.no_grad()
    def _metrics(self, correct, slots, stop_logits, stop_labels, valid) -> dict[str, torch.Tensor]:
        """Per-slot token accuracy, stop accuracy, expected tokens per macro step.

        expected_tokens_per_step: mean over segments of sum_j prod_{i<j} P(continue after i),
        along the labelled segment (so it is capped by the labelled length): how many of the
        segment's tokens greedy decoding with this stop head would emit in one macro step.
        """
        k = self.config.max_segment_len
        correct = correct.float()
        m: dict[str, torch.Tensor] = {"token_acc": correct.mean()}
        for j in range(k):
            at = slots == j
            if at.any():
                m[f"token_acc_slot{j + 1}"] = correct[at].mean()
        m["stop_acc"] = ((stop_logits > 0).float() == stop_labels).float().mean()
        cont = torch.zeros(valid.shape, device=stop_logits.device)
        cont[valid] = 1 - torch.sigmoid(stop_logits)
        reach = torch.cumprod(torch.cat([torch.ones_like(cont[:, :1]), cont[:, :-1]], dim=1), dim=1)
        m["expected_tokens_per_step"] = (reach * valid).sum(1).mean()
        m["labelled_tokens_per_step"] = valid.sum(1).float().mean()
        return m

    # ------------------------------------------------------------------ decoding pieces
    def first_token(self, h_last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """o_1 = h_L: token 1 exactly as the base predicts it, and its stop logit."""
        return self.lm_head(h_last).argmax(-1), self.stop_head(h_last)

    def micro_step(self, x: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed new micro-decoder slots x [n, q, D]; read the token and stop logit at the last."""
        o = self.micro(x, cache=cache)[:, -1]
        return self.lm_head(o).argmax(-1), self.stop_head(o)

    # ------------------------------------------------------------------ weights
    def base_ties_embeddings(self) -> bool:
        return self.lm_head.weight is self.embed_tokens.weight
