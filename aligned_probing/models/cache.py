"""A content-checked, process-safe cache of converted model directories (safetensors + JSON).

Converting a GGUF file to Hugging Face weights takes tens of seconds; loading the saved
safetensors takes a few. Each entry is a directory `{root}/models/{key}` with a
`cache_manifest.json` that records every file's size, modification time and sha256. On load a
file whose size differs is truncated; a file whose mtime changed since the entry was written is
re-hashed (so a rewrite with the same size is caught too); either failure rebuilds the entry
with a `CorruptCacheWarning`. Hashing unchanged files on every load would cost about a second per
GB, a large share of a warm load, for no information that the mtime does not already give;
`verify_entry(path, full=True)` hashes everything (bit rot on disk).

Two processes that load at once must neither both convert nor see a half-written entry: a
`filelock` serialises builders of one key, an entry is built in a temporary sibling directory and
published with one atomic `os.replace`, and readers only trust directories whose manifest checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "ALIGNED_PROBING_CACHE"
MANIFEST = "cache_manifest.json"
# Bump when the layout of an entry changes: old entries are then simply not found.
FORMAT_VERSION = 1


class CorruptCacheWarning(UserWarning):
    """A cache entry failed its integrity check and is being rebuilt."""


@dataclass(frozen=True)
class CacheEntry:
    """One converted model in the cache.

    Attributes:
        key: Directory name of the entry.
        path: Its directory.
        size_bytes: Total size of its files.
        source: What it was converted from (from the manifest; "" when unreadable).
        valid: Whether `verify_entry` finds the entry intact (size and, for files rewritten
            since, sha256).
    """

    key: str
    path: Path
    size_bytes: int
    source: str
    valid: bool


def cache_root() -> Path:
    """The cache directory: `$ALIGNED_PROBING_CACHE` if set, else the platform user cache dir."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("aligned-probing"))


def models_dir() -> Path:
    """Where converted model entries live (`{cache_root}/models`)."""
    return cache_root() / "models"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(directory: Path, source: str) -> None:
    files = {
        f.name: {"size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns, "sha256": sha256_file(f)}
        for f in sorted(directory.iterdir())
        if f.is_file() and f.name != MANIFEST
    }
    manifest = {"format": FORMAT_VERSION, "source": source, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _read_manifest(directory: Path) -> dict | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        return None
    if not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        return None
    return manifest


def verify_entry(directory: Path, *, full: bool = False) -> str | None:
    """Check a cache entry; return None when it is intact, else the reason it is not.

    Args:
        directory: The entry's directory.
        full: Compare every file's sha256, not only those whose mtime changed since the entry
            was written (catches bit rot on disk as well as rewrites).
    """
    if not directory.is_dir():
        return "missing"
    manifest = _read_manifest(directory)
    if manifest is None:
        return f"unreadable or missing {MANIFEST}"
    for name, facts in manifest["files"].items():
        f = directory / name
        if not f.is_file():
            return f"file {name} is missing"
        size = f.stat().st_size
        if size != facts["size"]:
            return f"file {name} has {size} bytes, expected {facts['size']} (truncated?)"
        changed = f.stat().st_mtime_ns != facts.get("mtime_ns")
        if (full or changed) and sha256_file(f) != facts["sha256"]:
            return f"file {name} does not match its recorded sha256 (corrupted)"
    return None


def _check_key(key: str) -> None:
    if not key or "/" in key or "\\" in key or key.startswith("."):
        raise ValueError(f"cache key must be a plain directory name, got {key!r}.")


def get_or_build(key: str, build: Callable[[Path], None], *, source: str = "") -> Path:
    """Return the directory of cache entry `key`, building it with `build(tmp_dir)` if needed.

    A missing entry is built; a corrupt one is rebuilt with a `CorruptCacheWarning`. `build`
    writes into an empty temporary directory `{models_dir}/.tmp-{key}-*` that is published
    atomically when it returns; if it raises, nothing is published and the error propagates.
    Scratch space that `build` needs may be created as a sibling named `{tmp_dir.name}-*`, so a
    crashed build's leftovers are removed by the next build of the same key.

    Args:
        key: Entry name (a plain directory name).
        build: Writes the entry's files into the directory it is given.
        source: A description of what the entry was converted from, recorded in the manifest.

    Returns:
        The entry's directory.
    """
    from filelock import FileLock

    _check_key(key)
    root = models_dir()
    final = root / key
    if verify_entry(final) is None:
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{key}.lock")):
        # Another process may have built it while we waited for the lock.
        problem = verify_entry(final)
        if problem is None:
            return final
        if final.exists():
            warnings.warn(
                f"Model cache entry {final} is invalid ({problem}); rebuilding it.",
                CorruptCacheWarning,
                stacklevel=3,
            )
            shutil.rmtree(final)
        # We hold the key's lock, so any temporary directory of this key is a crashed build's.
        for stale in root.glob(f".tmp-{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            build(tmp)
            _write_manifest(tmp, source)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def list_cache(*, verify: bool = False) -> list[CacheEntry]:
    """All entries in the model cache, with their size and validity.

    Args:
        verify: Re-hash every file (`verify_entry(full=True)`): catches a rewrite that kept the
            file's size and modification time, which the default (size, and sha256 of files whose
            mtime changed) cannot see.
    """
    root = models_dir()
    if not root.is_dir():
        return []
    entries = []
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        manifest = _read_manifest(d) or {}
        entries.append(
            CacheEntry(
                key=d.name,
                path=d,
                size_bytes=sum(f.stat().st_size for f in d.iterdir() if f.is_file()),
                source=str(manifest.get("source", "")),
                valid=verify_entry(d, full=verify) is None,
            )
        )
    return entries


def clear_cache(key: str | None = None) -> list[str]:
    """Delete one cache entry (or all when `key` is None); return the keys removed."""
    if key is not None:
        _check_key(key)
    removed = []
    for entry in list_cache():
        if key is None or entry.key == key:
            shutil.rmtree(entry.path)
            removed.append(entry.key)
    return removed


# ----------------------------------------------------------------------------- content hashes of user files
HASH_INDEX = "file_hashes.json"


def _hash_index_path() -> Path:
    return cache_root() / HASH_INDEX


def _read_hash_index() -> dict[str, dict]:
    try:
        index = json.loads(_hash_index_path().read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def _write_hash_index(index: dict[str, dict]) -> None:
    path = _hash_index_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(index, sort_keys=True))
    os.replace(tmp, path)  # concurrent writers lose entries at worst, never corrupt the index


def content_hashes(files: list[Path], *, verify: bool = False) -> dict[Path, str]:
    """Hex sha256 of each file's bytes, remembered by (resolved path, size, mtime).

    Hashing multi-GB weights on every run would cost seconds per GB, so a file whose path, size
    and modification time are unchanged since it was last hashed keeps its recorded hash (kept in
    `{cache_root}/file_hashes.json`). A rewrite that keeps size and mtime (a copy with `cp -p`,
    some sync tools) is only caught with `verify=True`, which hashes every file again.

    Args:
        files: Regular files to hash.
        verify: Ignore the remembered hashes and read every byte.

    Returns:
        The hash of every file, by the path given.
    """
    index = _read_hash_index()
    out: dict[Path, str] = {}
    changed = False
    for f in files:
        stat = f.stat()
        key = str(f.resolve())
        known = index.get(key)
        if (
            not verify
            and isinstance(known, dict)
            and known.get("size") == stat.st_size
            and known.get("mtime_ns") == stat.st_mtime_ns
        ):
            out[f] = str(known["sha256"])
            continue
        digest = sha256_file(f)
        out[f] = digest
        if known is None or known.get("sha256") != digest or known.get("mtime_ns") != stat.st_mtime_ns:
            index[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
            changed = True
    if changed:
        try:
            _write_hash_index(index)
        except OSError:  # a read-only cache only costs re-hashing next time
            pass
    return out
