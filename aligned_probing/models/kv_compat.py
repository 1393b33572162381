"""Route the KV cache to TransformerLens's attention bridge under both keyword names.

Root cause of the transformers 5.24 "token salad": 5.24 renamed the cache keyword of the attention,
decoder-layer and model `forward`s from `past_key_values` to `cache` (with a deprecation shim until
5.40), so a decoder layer now calls `self_attn(..., cache=cache)`. TransformerLens 4.3's
`AttentionBridge._update_kv_cache` still reads only `kwargs["past_key_values"]` (or `layer_past`);
finding neither, it neither stores nor reads the cache, so in KV-cached generation every decoding
step attends only to itself and the prompt is ignored. Uncached forwards are unaffected, which is
why parity tests against Hugging Face still passed.

The fix is ours, not a patched TransformerLens: a forward pre-hook on every attention bridge copies
`cache` into `past_key_values` when only the new name is given. On transformers < 5.24 the hook
finds `past_key_values` already set and does nothing.
"""

from __future__ import annotations

from typing import Any

import torch

#: Keyword names under which transformers passes the KV cache to attention, newest first.
CACHE_KEYWORDS: tuple[str, ...] = ("cache", "past_key_values")


def call_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache object a `forward` call received, under either keyword name (None without one)."""
    for name in CACHE_KEYWORDS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def _alias_cache(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
    """Pre-hook: give the attention bridge `past_key_values` when transformers passed `cache`."""
    if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
        return args, {**kwargs, "past_key_values": kwargs["cache"]}
    return None


def route_cache_keyword(bridge: torch.nn.Module) -> int:
    """Register `_alias_cache` on every TransformerLens attention bridge of `bridge`; return how many.

    Registered once at load time (hooks live as long as the model). Idempotent per module.
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    n = 0
    for module in bridge.modules():
        if isinstance(module, AttentionBridge) and not getattr(module, "_ap_cache_routed", False):
            module.register_forward_pre_hook(_alias_cache, with_kwargs=True)
            module._ap_cache_routed = True
            n += 1
    return n
