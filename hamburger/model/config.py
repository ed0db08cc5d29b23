"""The HAMburger architecture settings. Every paper default is a field here, never a constant."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import ClassVar

from hamburger.choice import Choice

DEFAULT_CONFIDENCE = 0.9
"""The stop head's default confidence threshold when a caller gives none (the paper's decoding
setting); every decoder, the export's generation_config.json and the server start from it."""


def is_confidence(value) -> bool:
    """The one rule for a stop-head confidence, wherever it is written or read: a number in
    (0, 1]. Outside it every segment is one token (above 1) or always K (0 or below)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return ok and 0 < value <= 1


def check_confidence(value, where: str) -> float:
    """`value` as a float, or ValueError naming `where` when it breaks `is_confidence`."""
    if not is_confidence(value):
        raise ValueError(f"{where}: confidence must be a number in (0, 1], got {value!r}")
    return float(value)


class PackedAttention(Choice):
    auto = "auto"
    dense = "dense"
    flex = "flex"


class MicroInit(Choice):
    random = "random"
    base_top = "base_top"


@dataclass
class HAMburgerConfig:
    """Shape of the modules grafted onto the base LLM (defaults: arXiv 2505.20438)."""

    RENAMED: ClassVar[dict[str, str]] = {"max_steps": "max_segment_len"}
    """Old key -> its new name: an old config or model folder fails naming the new key."""

    max_segment_len: int = 4
    """K: the most tokens one macro step may emit (and one KV entry may hold)."""
    micro_layers: int = 4
    """Decoder layers in the micro-step decoder (built from the base model's own layer class)."""
    feature_layers: list[int] = field(default_factory=list)
    """Indices into the base's hidden states (0 = embeddings, n = final normed output) fed to the
    micro decoder. Empty = `num_features` evenly spaced layers, the last being the final output."""
    num_features: int = 4
    """How many evenly spaced base layers feed the micro decoder when feature_layers is empty."""
    embedder_head_dim: int = 32
    """Head width of the compositional embedder's cross-attention."""
    stop_weight: float = 0.5
    """Weight of the stop-head binary cross-entropy in the total loss."""
    kl_weight: float = 0.0
    """Weight of KL(frozen base || model) on response tokens; 0 disables the teacher entirely."""
    kl_temperature: float = 1.0
    """Softmax temperature for the KL term."""
    align_weight: float = 0.0
    """Weight of the feature-alignment loss: at every macro position that predicts a segment, the
    base's hidden states (at align_layers) against those of a no-grad plain forward at the same
    prediction (the previous segment's last token), as a relative squared error. It teaches the
    embedder to write segments the base reads like their tokens; 0 = off. The plain forward is
    the frozen teacher's when kl_weight > 0, else the base's own."""
    align_layers: list[int] = field(default_factory=list)
    """Hidden-state indices the alignment compares (0 = embeddings); empty = the feature layers."""
    loss_chunk_tokens: int = 2048
    """Response tokens per LM-head chunk in the loss: CE and KL never hold more than this many
    tokens' fp32 logits (the full [T, V] is 10.6 GiB for one 8192-position row of a 128k
    vocabulary). Same loss and gradients; 0 = all tokens at once."""
    packed_attention: PackedAttention = PackedAttention.auto
    """Training attention over packed rows: dense (block-diagonal SDPA mask, O(L^2) memory),
    flex (FlexAttention block mask from the sample ids; CUDA only for training), or auto (flex
    on CUDA, dense elsewhere). Same results; needs model.attn_implementation sdpa for flex."""
    micro_init: MicroInit = MicroInit.random
    """random (the paper) or base_top: the micro decoder's layers and final norm start as copies of
    the base's top micro_layers layers and its final norm (gathered first under ZeRO-3)."""

    def validate(self) -> None:
        """Fail early with the field's name, before any weights are built."""
        if self.max_segment_len < 1:
            raise ValueError(f"hamburger.max_segment_len must be >= 1, got {self.max_segment_len}")
        if self.micro_layers < 1:
            raise ValueError(f"hamburger.micro_layers must be >= 1, got {self.micro_layers}")
        if not self.feature_layers and self.num_features < 1:
            raise ValueError(f"hamburger.num_features must be >= 1, got {self.num_features}")
        if self.embedder_head_dim < 1:
            raise ValueError(f"hamburger.embedder_head_dim must be >= 1, got {self.embedder_head_dim}")
        for name in ("stop_weight", "kl_weight", "align_weight"):
            if not getattr(self, name) >= 0:  # NaN fails too
                raise ValueError(f"hamburger.{name} must be >= 0, got {getattr(self, name)}")
        if self.packed_attention not in ("auto", "dense", "flex"):
            raise ValueError(
                f"hamburger.packed_attention must be auto, dense or flex, got {self.packed_attention!r}"
            )
        if not isinstance(self.loss_chunk_tokens, int) or self.loss_chunk_tokens < 0:
            raise ValueError(
                f"hamburger.loss_chunk_tokens must be an integer >= 0 (0: no chunking), got {self.loss_chunk_tokens!r}"
            )
        if not self.kl_temperature > 0:
            raise ValueError(f"hamburger.kl_temperature must be > 0, got {self.kl_temperature}")

    def resolved_feature_layers(self, num_hidden_layers: int) -> list[int]:
        """Hidden-state indices for the micro decoder; the last one is always the final output."""
        # Evenly spaced; a base shallower than num_features gets each of its layers once.
        layers = list(self.feature_layers) or sorted(
            {max(1, round((i + 1) * num_hidden_layers / self.num_features)) for i in range(self.num_features)}
        )
        for idx in layers:
            if not 1 <= idx <= num_hidden_layers:
                raise ValueError(
                    f"hamburger.feature_layers entry {idx} is outside 1..{num_hidden_layers} "
                    "(the base model's layer count)"
                )
        if layers[-1] != num_hidden_layers:
            raise ValueError(
                f"hamburger.feature_layers must end with {num_hidden_layers} (the final normed output, "
                f"which predicts each segment's first token), got {layers}"
            )
        return layers

    @property
    def needs_plain(self) -> bool:
        """Whether batches must carry the plain token layout (KL and alignment read it)."""
        return self.kl_weight > 0 or self.align_weight > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HAMburgerConfig:
        known = set(cls.__dataclass_fields__)
        for old, new in cls.RENAMED.items():
            if old in data:
                raise ValueError(
                    f"hamburger config key {old!r} was renamed to {new!r} (K, the most tokens per segment); "
                    f"rename it in the config (a model folder written before the rename: its config.json)"
                )
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown hamburger config keys: {unknown} (known: {sorted(known)})")
        return cls(**data)
