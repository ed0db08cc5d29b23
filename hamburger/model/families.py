"""Which base families HAMburger runs exactly like the base itself, and the traits it refuses.

The model core reads the base's hidden states, calls its LM head directly, feeds its decoder
layers embeddings and builds its own packed causal mask. That reproduces the base exactly for
Llama, Qwen2/2.5 (qkv bias), Qwen3 (q/k norms, explicit head_dim), Mistral without a binding
sliding window and Phi-3 without one (tests/hamburger/model/test_families.py). A base with any
trait below would train and decode silently differently from itself, so it is refused when the
model is built, naming the trait and the family.
"""

from __future__ import annotations


class UnsupportedBase(ValueError):
    """The base has a trait HAMburger does not reproduce; the message names trait and family."""


def unsupported_traits(config) -> list[str]:
    """What in this transformers config HAMburger would not reproduce (empty: supported)."""
    family = getattr(config, "model_type", "?")
    traits = []
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", True)  # Qwen2 switches it off by default
    context = getattr(config, "max_position_embeddings", None) or 0
    if window and uses_window and window < context:
        traits.append(
            f"sliding-window attention (window {window} < {context} positions): the packed mask "
            "and the decoders attend to every earlier position"
        )
    if family.startswith("gemma"):
        traits.append(
            "input embeddings scaled by sqrt(hidden_size) inside the base's forward: the micro "
            "decoder and the static decoders feed embeddings to decoder layers unscaled"
        )
    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(config, cap, None):
            traits.append(f"{cap}: the loss, labelling and decoders call the LM head / attention without it")
    if getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None):
        traits.append("mixture-of-experts layers: the router's auxiliary loss is never added")
    return traits


def check_supported(config) -> None:
    traits = unsupported_traits(config)
    if traits:
        family = getattr(config, "model_type", "?")
        raise UnsupportedBase(
            f"base model family {family!r} is not supported: " + "; ".join(traits) + ". Supported without "
            "differences from the base: Llama, Qwen2/2.5, Qwen3, Mistral and Phi-3 without a binding "
            "sliding window."
        )
