"""Load a model once, as a TransformerLens 4.x `TransformerBridge` over the Hugging Face model.

Every stage (generation, encoding, causal, training) takes a `LoadedModel`. The bridge gives
TransformerLens hook names on the *unmodified* Hugging Face weights (no LayerNorm folding, no
centring), so activations equal Hugging Face hidden states.

Token bookkeeping traps, in one place:
* The bridge replaces its own tokenizer with a BOS-adding copy. We keep the tokenizer as shipped
  in `LoadedModel.tokenizer` and always pass *token ids* to the model, so nothing is prepended
  behind our back (SmolLM2's tokenizer adds no BOS; a chat template adds its own special tokens).
* Hugging Face's last `hidden_states` entry is *after* the final norm. Our layer `n_layers` is
  the last block's `hook_resid_post`, i.e. *before* the final norm, as in the paper.
* The bridge forces eager attention; compare against Hugging Face with
  `attn_implementation="eager"` (SDPA drifts by ~1e-3 in float32 through kernel reordering).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aligned_probing.models import sources as _sources
from aligned_probing.models.cache import CacheEntry, CorruptCacheWarning, clear_cache, list_cache
from aligned_probing.models.hub import HubUnavailableError
from aligned_probing.models.kv_compat import route_cache_keyword
from aligned_probing.models.quantization import QUANTIZATIONS, check_quantization, quantize_weights
from aligned_probing.models.registry import DEFAULT_MODEL, list_registry, registry_names

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

logger = logging.getLogger(__name__)


def resid_hook_name(layer: int) -> str:
    """TransformerLens hook name of residual layer `layer` (0 = embedding output).

    Layer 0 is `blocks.0.hook_resid_pre` (the embedding output, which for Gemma includes the
    sqrt(d_model) scaling); layer l >= 1 is `blocks.{l-1}.hook_resid_post`.
    """
    if layer < 0:
        raise ValueError(f"layer must be >= 0, got {layer}.")
    return "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"


@dataclass
class LoadedModel:
    """A bridged model plus its tokenizer and the facts every stage needs.

    Attributes:
        name: Display name (registry name, hub name or directory name).
        spec: The spec string the model was loaded from.
        bridge: The TransformerLens `TransformerBridge`; its hooks fire inside `hf_model` too.
        tokenizer: The tokenizer as shipped (not the bridge's BOS-adding copy).
        n_layers: Number of transformer blocks L; residual layers are 0..L.
        d_model: Residual width.
        hook_names: `hook_names[l]` is the hook of residual layer l, length L + 1.
        has_chat_template: Whether the tokenizer carries a chat template.
        revision: Hub revision or a content hash of the local weights.
        dtype: Parameter dtype name.
        device: Torch device string.
        quantization: None, "int8" or "4bit".
        path: Local directory holding the Hugging Face weights, when there is one.
    """

    name: str
    spec: str
    bridge: Any
    tokenizer: Any
    n_layers: int
    d_model: int
    hook_names: list[str]
    has_chat_template: bool
    revision: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    quantization: str | None = None
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def hf_model(self) -> torch.nn.Module:
        """The wrapped Hugging Face model (the bridge's hooks fire in its forward and `generate`)."""
        return self.bridge.original_model

    @property
    def context_length(self) -> int:
        """Maximum number of positions the model accepts."""
        cfg = self.hf_model.config
        for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048

    @property
    def tokenizer_hash(self) -> str:
        """sha256 over the tokenizer's vocabulary, special tokens and chat template."""
        return tokenizer_fingerprint(self.tokenizer)

    @property
    def eos_token_ids(self) -> list[int]:
        """Token ids that end a generation (tokenizer EOS plus the generation config's)."""
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen_eos = getattr(getattr(self.hf_model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif isinstance(gen_eos, list | tuple):
            ids.update(int(i) for i in gen_eos)
        return sorted(ids)

    @property
    def pad_token_id(self) -> int:
        """Padding id: the tokenizer's pad token, else its EOS (masked out everywhere anyway)."""
        if self.tokenizer.pad_token_id is not None:
            return int(self.tokenizer.pad_token_id)
        if self.eos_token_ids:
            return self.eos_token_ids[0]
        return 0

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts for manifests and reports."""
        return {
            "name": self.name,
            "spec": self.spec,
            "revision": self.revision,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "dtype": self.dtype,
            "device": self.device,
            "quantization": self.quantization,
            "tokenizer_hash": self.tokenizer_hash,
            "has_chat_template": self.has_chat_template,
            "hook_names": list(self.hook_names),
        }


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Stable sha256 of a tokenizer's vocabulary, special tokens and chat template."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items()),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _bridge_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer to hand to the bridge, so that ours stays as shipped.

    The bridge normalises the tokenizer it is given in place (padding side, pad/BOS tokens) and,
    unless that tokenizer already adds BOS, reloads it from disk with `add_bos_token=True`. For a
    tokenizer that already prepends BOS (Gemma) we hand over a light copy that shares the
    read-only vocabulary and backend but owns its small mutable state: a reload or deep copy of
    a 262k-token vocabulary costs seconds per load. A tokenizer without a BOS token would be
    mutated in place, so it gets the same light copy.
    """
    bos = tokenizer.bos_token_id
    prepends_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    if bos is not None and not prepends_bos:
        return tokenizer  # the bridge reloads a BOS-adding copy itself and leaves ours alone
    twin = copy.copy(tokenizer)
    for key, value in tokenizer.__dict__.items():
        if isinstance(value, dict | list | set) and len(value) <= 1000:
            twin.__dict__[key] = copy.deepcopy(value)
    if prepends_bos:
        twin.init_kwargs["add_bos_token"] = True  # tells the bridge not to reload it
    return twin


def bridge_model(
    hf_model: torch.nn.Module,
    tokenizer: Any,
    *,
    name: str,
    spec: str | None = None,
    revision: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    quantization: str | None = None,
    path: Path | None = None,
) -> LoadedModel:
    """Wrap an already loaded Hugging Face causal LM in a `TransformerBridge`.

    Args:
        hf_model: A causal LM loaded with `attn_implementation="eager"` (the bridge needs it).
        tokenizer: Its tokenizer; kept as is (see the module docstring on BOS).
        name: Display name.
        spec: The spec string; defaults to `name`.
        revision: Hub revision or content hash.
        dtype: Dtype name recorded in the manifest.
        device: Device string.
        quantization: Quantization recorded in the manifest.
        path: Local directory of the weights; the bridge reads its tokenizer config from there.

    Returns:
        The loaded model.
    """
    from transformer_lens.model_bridge.sources.transformers.source import boot

    hf_model.eval()
    boot_name = str(path) if path is not None else getattr(hf_model.config, "_name_or_path", name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = boot(boot_name, hf_model=hf_model, tokenizer=_bridge_tokenizer(tokenizer), device=device)
    route_cache_keyword(bridge)  # transformers >= 5.24 passes the KV cache as `cache` (see _kv_compat)
    n_layers = int(bridge.cfg.n_layers)
    return LoadedModel(
        name=name,
        spec=spec or name,
        bridge=bridge,
        tokenizer=tokenizer,
        n_layers=n_layers,
        d_model=int(bridge.cfg.d_model),
        hook_names=[resid_hook_name(layer) for layer in range(n_layers + 1)],
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        revision=revision,
        dtype=dtype,
        device=device,
        quantization=quantization,
        path=path,
    )


def load_local_hf(
    path: str | Path,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    name: str | None = None,
    spec: str | None = None,
) -> LoadedModel:
    """Load a local Hugging Face directory (config, weights, tokenizer) into a `LoadedModel`."""
    path = Path(path)
    hf_model, tokenizer, source = _sources.load_local(path, dtype=dtype, device=device)
    return bridge_model(
        hf_model,
        tokenizer,
        name=name or source.name,
        spec=spec or str(path),
        revision=source.revision,
        dtype=dtype,
        device=device,
        path=path,
    )


def load_model(
    spec: str | Path = DEFAULT_MODEL,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    quantization: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Load a model from a registry name, local directory, GGUF file, LoRA adapter or hub name.

    Registry models and GGUF files are dequantised to float32 once and cached as safetensors
    (see `aligned_probing.models.cache`; `$ALIGNED_PROBING_CACHE` moves the cache), so a second
    load takes seconds. A PEFT adapter directory is merged onto its base model, which is itself
    resolved as a spec. A hub name is read from the local Hugging Face cache when it is there;
    otherwise an unreachable hub fails at once instead of retrying.

    Args:
        spec: Registry name (`smollm2-135m-instruct`, `gemma-3-270m`), local Hugging Face
            directory, `.gguf` file, PEFT adapter directory or hub name.
        dtype: "float32", "float16" or "bfloat16" (the parameter and activation dtype).
        device: Torch device string.
        quantization: None, "int8" or "4bit": weight-only quantization of the linear layers with
            optimum-quanto (CPU-capable); activations stay in `dtype`.
        trust_remote_code: Run model code shipped with a hub or local model (off by default:
            it executes arbitrary Python).
        revision: Hub revision (branch, tag or commit) for hub names; ignored otherwise.

    Returns:
        The loaded model, in eval mode.

    Raises:
        ValueError: Unknown spec (the message lists the registry names), bad `dtype` or
            `quantization`, or a corrupt GGUF file.
        FileNotFoundError: A path-like spec does not exist.
        ImportError: An embedded model's wheel is not installed (the message names it).
        HubUnavailableError: A hub name is not cached locally and the hub cannot be reached.

    Example:
        >>> model = load_model("smollm2-135m-instruct")  # doctest: +SKIP
        >>> model.n_layers, model.d_model  # doctest: +SKIP
        (30, 576)
    """
    _sources.check_dtype(dtype)
    check_quantization(quantization)
    hf_model, tokenizer, source = _sources.load_hf(
        spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code, revision=revision
    )
    if quantization is not None:
        quantize_weights(hf_model, quantization)
    loaded = bridge_model(
        hf_model,
        tokenizer,
        name=source.name,
        spec=str(spec),
        revision=source.revision,
        dtype=dtype,
        device=device,
        quantization=quantization,
        path=source.path,
    )
    loaded.extra["source"] = source.kind
    return loaded
