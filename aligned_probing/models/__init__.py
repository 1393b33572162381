"""Model loading: registry, hub, local directories, GGUF, LoRA, the converted-model cache, quantization.

`load_model(spec)` returns a `LoadedModel` (a TransformerLens 4 `TransformerBridge` over the Hugging
Face model). Modules: `loading` (load_model, LoadedModel), `sources` (where weights come from),
`registry` (embedded models), `gguf` (GGUF conversion), `cache` (converted-model cache), `hub`
(offline-aware hub access), `quantization`, `kv_compat` (KV-cache keyword routing).
"""

from aligned_probing.models.loading import (
    DEFAULT_MODEL,
    QUANTIZATIONS,
    CacheEntry,
    CorruptCacheWarning,
    HubUnavailableError,
    LoadedModel,
    bridge_model,
    clear_cache,
    list_cache,
    list_registry,
    load_local_hf,
    load_model,
    registry_names,
    resid_hook_name,
    tokenizer_fingerprint,
)

__all__ = [
    "DEFAULT_MODEL",
    "QUANTIZATIONS",
    "CacheEntry",
    "CorruptCacheWarning",
    "HubUnavailableError",
    "LoadedModel",
    "bridge_model",
    "clear_cache",
    "list_cache",
    "list_registry",
    "load_local_hf",
    "load_model",
    "registry_names",
    "resid_hook_name",
    "tokenizer_fingerprint",
]
