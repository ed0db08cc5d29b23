"""transformers version differences, decided once per class, in one place.

The KV-cache argument of Hugging Face decoders (the causal LM, its inner model and each decoder
layer) is called `cache` from transformers 5.24 and `past_key_values` before. Every forward also
takes **kwargs and swallows unknown names, so passing the wrong one raises nothing: decoding
silently runs without a KV cache. Every place that hands a cache to a Hugging Face module goes
through `cache_kwargs`, which reads the parameter name from the forward's signature.
"""

from __future__ import annotations

import functools
import inspect

from torch import nn

CACHE_PARAM_NAMES = ("cache", "past_key_values", "past_key_value")
"""Names the KV-cache argument has had, newest first."""


@functools.cache
def cache_param_name(module_cls: type) -> str:
    """The KV-cache parameter of `module_cls.forward`; refuses a forward that has none."""
    params = inspect.signature(module_cls.forward).parameters  # follows functools.wraps
    for name in CACHE_PARAM_NAMES:
        if name in params:
            return name
    raise TypeError(
        f"{module_cls.__qualname__}.forward has no KV-cache parameter (looked for {CACHE_PARAM_NAMES}); "
        "this transformers version is not supported"
    )


def cache_kwargs(module: nn.Module, cache) -> dict:
    """{name: cache} for calling `module` with a KV cache under the installed transformers."""
    return {cache_param_name(type(module)): cache}
