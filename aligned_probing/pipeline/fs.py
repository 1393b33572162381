"""Locations that are local paths or fsspec URLs (`s3://`, `gs://`, `file://`, `memory://`).

Run directories and activation stores may live on object storage, so that Ray workers on several
machines read and write the same ones. These helpers keep that one concern in one place: callers pass
a location (a `Path`, a plain path string or a URL) plus fsspec `storage_options` (credentials,
`endpoint_url`, ...), and local paths keep working exactly as before (no fsspec in the way).

Atomicity: readers must never see a half-written file. Locally we write a temporary file and
`os.replace` it; on object storage a PUT (single or multipart) is atomic already (an object appears
whole or not at all), so we write the object directly.

Example:
    >>> loc = join("s3://bucket/runs/quick", "stages", "probe")  # doctest: +SKIP
    >>> write_text_atomic(join(loc, "stage.json"), "{}", {"endpoint_url": "http://127.0.0.1:5000"})
"""

from __future__ import annotations

import io
import os
import posixpath
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd

__all__ = [
    "Location",
    "Resolved",
    "StorageOptions",
    "child",
    "exists",
    "filesystem",
    "glob",
    "is_local",
    "join",
    "local_path",
    "makedirs",
    "name",
    "open_file",
    "parent",
    "read_bytes",
    "read_parquet",
    "read_text",
    "resolve",
    "rmtree",
    "upload_tree",
    "write_bytes_atomic",
    "write_parquet_atomic",
    "write_text_atomic",
    "zarr_store",
]

#: A local path or an fsspec URL.
Location = str | os.PathLike[str]
#: A location as the pipeline carries it: a `Path` when local, the URL string otherwise (see `resolve`).
Resolved = Path | str
StorageOptions = Mapping[str, Any] | None

_LOCAL_PROTOCOLS = ("file", "local")


def _protocol(location: Location) -> str | None:
    text = os.fspath(location)
    if "://" not in text:
        return None
    return text.split("://", 1)[0].lower()


def is_local(location: Location) -> bool:
    """Whether `location` is on the local filesystem (a plain path or a `file://` URL)."""
    protocol = _protocol(location)
    return protocol is None or protocol in _LOCAL_PROTOCOLS


def local_path(location: Location) -> Path:
    """The local `Path` of a plain path or `file://` URL.

    Raises:
        ValueError: `location` is a remote URL (e.g. `s3://...`), which has no local path.
    """
    if not is_local(location):
        raise ValueError(f"location must be a local path or file:// URL here, got {os.fspath(location)!r}.")
    text = os.fspath(location)
    return Path(text.split("://", 1)[1]) if "://" in text else Path(text)


def resolve(location: Location) -> Resolved:
    """A local location as a `Path` (`file://` stripped), a remote one as its URL string (no trailing `/`).

    Stage code keeps `Path` arithmetic and types for local runs (what callers and tests see) and
    URL strings only where there is no local path.
    """
    return local_path(location) if is_local(location) else os.fspath(location).rstrip("/")


def child(base: Resolved, *parts: str) -> Resolved:
    """`base / parts`: a `Path` below a `Path`, a URL string below a URL (`resolve` gives `base`)."""
    return base.joinpath(*parts) if isinstance(base, Path) else join(base, *parts)


def name(location: Location) -> str:
    """The last component of a path or URL (`s3://b/runs/x/` -> `x`)."""
    if is_local(location):
        return local_path(location).name
    return posixpath.basename(os.fspath(location).rstrip("/"))


def parent(location: Resolved) -> Resolved:
    """The directory holding `location`: a `Path` for a `Path`, a URL string for a URL."""
    if isinstance(location, Path):
        return location.parent
    return posixpath.dirname(os.fspath(location).rstrip("/"))


def join(base: Location, *parts: str) -> str:
    """`base` joined with `parts` by `/`, keeping the URL's protocol (`s3://b/x` + `y` = `s3://b/x/y`)."""
    if is_local(base) and _protocol(base) is None:
        return os.fspath(Path(base).joinpath(*parts))
    text = os.fspath(base).rstrip("/")
    return posixpath.join(text, *parts) if parts else text


def filesystem(location: Location, storage_options: StorageOptions = None) -> tuple[Any, str]:
    """The fsspec filesystem serving `location` and the path within it (`fsspec.core.url_to_fs`).

    Args:
        location: A path or URL.
        storage_options: fsspec options for that protocol (s3fs: `key`, `secret`, `endpoint_url`,
            `client_kwargs`, ...); ignored for local paths.
    """
    if is_local(location):
        return fsspec.filesystem("file"), os.fspath(local_path(location).absolute())
    return fsspec.core.url_to_fs(os.fspath(location), **dict(storage_options or {}))


def exists(location: Location, storage_options: StorageOptions = None) -> bool:
    """Whether a file or directory (prefix) exists at `location`.

    The listing cache is dropped first: another worker may have written the object since this
    process last listed its directory.
    """
    if is_local(location):
        return local_path(location).exists()
    fs, path = filesystem(location, storage_options)
    fs.invalidate_cache(path)
    return bool(fs.exists(path))


def makedirs(location: Location, storage_options: StorageOptions = None) -> None:
    """Create the directory `location` (a no-op on object storage, where prefixes need no creation)."""
    if is_local(location):
        local_path(location).mkdir(parents=True, exist_ok=True)
        return
    fs, path = filesystem(location, storage_options)
    fs.makedirs(path, exist_ok=True)


def rmtree(location: Location, storage_options: StorageOptions = None) -> None:
    """Delete the directory (or prefix) `location` and everything below it, if it exists."""
    if not exists(location, storage_options):
        return
    fs, path = filesystem(location, storage_options)
    fs.rm(path, recursive=True)


def glob(location: Location, pattern: str, storage_options: StorageOptions = None) -> list[str]:
    """Sorted locations (same protocol as `location`) of the entries of `location` matching `pattern`."""
    if is_local(location):
        return sorted(os.fspath(p) for p in local_path(location).glob(pattern))
    fs, path = filesystem(location, storage_options)
    fs.invalidate_cache(path)
    protocol = _protocol(location)
    return sorted(f"{protocol}://{p}" for p in fs.glob(posixpath.join(path, pattern)))


def open_file(location: Location, mode: str = "rb", storage_options: StorageOptions = None) -> Any:
    """A file object for `location`, streamed from object storage (use it in a `with` block).

    For reading large files piecewise; use `write_bytes_atomic` to write, since a file object being
    written on object storage is not atomic until it is closed and locally not at all.
    """
    if is_local(location):
        return open(local_path(location), mode)  # returned to the caller's `with`
    fs, path = filesystem(location, storage_options)
    return fs.open(path, mode)


def upload_tree(local_dir: Location, location: Location, storage_options: StorageOptions = None) -> list[str]:
    """Copy every file below the local directory `local_dir` to `location` (same relative paths).

    For outputs that must be produced as local files (figures rendered by matplotlib, an HTML
    report, a log file) and published to a run directory that may live on object storage. Each file
    is written atomically (`write_bytes_atomic`).

    Returns:
        The written locations, sorted.
    """
    root = local_path(local_dir)
    written = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        target = join(location, *path.relative_to(root).parts)
        write_bytes_atomic(target, path.read_bytes(), storage_options)
        written.append(target)
    return written


def read_bytes(location: Location, storage_options: StorageOptions = None) -> bytes:
    """The contents of the file at `location`; `FileNotFoundError` when there is none."""
    if is_local(location):
        return local_path(location).read_bytes()
    fs, path = filesystem(location, storage_options)
    fs.invalidate_cache(path)
    return bytes(fs.cat_file(path))


def read_text(location: Location, storage_options: StorageOptions = None) -> str:
    """The UTF-8 text of the file at `location`."""
    return read_bytes(location, storage_options).decode("utf-8")


def write_bytes_atomic(location: Location, data: bytes, storage_options: StorageOptions = None) -> None:
    """Write `data` so that readers see the old file or the new one, never a partial one.

    Locally: a uniquely named temporary file beside the target, then `os.replace` (two processes
    writing the same file cannot clobber each other's temporary). Object storage: one PUT, which
    is atomic by itself.
    """
    if is_local(location):
        target = local_path(location)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return
    fs, path = filesystem(location, storage_options)
    fs.pipe_file(path, data)
    fs.invalidate_cache(path)


def write_text_atomic(location: Location, text: str, storage_options: StorageOptions = None) -> None:
    """Write UTF-8 `text` atomically (see `write_bytes_atomic`)."""
    write_bytes_atomic(location, text.encode("utf-8"), storage_options)


def write_parquet_atomic(
    table: pd.DataFrame, location: Location, storage_options: StorageOptions = None, *, index: bool = False
) -> None:
    """Write `table` as one Parquet file, atomically (serialised in memory, then one write).

    Tables here are small results (probing rows, scores); activations go to the zarr store instead.
    """
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=index)
    write_bytes_atomic(location, buffer.getvalue(), storage_options)


def read_parquet(location: Location, storage_options: StorageOptions = None, **kwargs: Any) -> pd.DataFrame:
    """A Parquet file (or directory of them) as a DataFrame, through pyarrow's fsspec support.

    Raises:
        FileNotFoundError: Nothing at `location`.
        DataError: The file is damaged (truncated, overwritten); the message names it and says to
            delete its stage directory, which the next run recomputes.
    """
    try:
        if is_local(location):
            return pd.read_parquet(local_path(location), **kwargs)
        fs, path = filesystem(location, storage_options)
        fs.invalidate_cache(path)
        return pd.read_parquet(path, filesystem=fs, **kwargs)
    except (FileNotFoundError, TypeError, KeyError):
        raise
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        from aligned_probing.data.schema import DataError

        raise DataError(
            f"{location} is unreadable ({type(err).__name__}: {err}): the file is damaged. If it lies in a "
            "stage directory (RUN_DIR/stages/...), delete that directory; the next run recomputes it."
        ) from None


def zarr_store(location: Location, storage_options: StorageOptions = None, *, read_only: bool = False) -> Any:
    """A zarr 3 store rooted at `location`: `LocalStore` for paths, `FsspecStore` for URLs.

    Args:
        location: Store root, a path or an fsspec URL (`s3://bucket/run/store`).
        storage_options: fsspec options for the URL's protocol.
        read_only: Open the store read-only (what probing workers need).

    Returns:
        A `zarr.abc.store.Store` to pass to `zarr.open_group`.
    """
    import zarr.storage

    if is_local(location):
        path = local_path(location)
        if not read_only:
            path.mkdir(parents=True, exist_ok=True)
        return zarr.storage.LocalStore(path, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(
        os.fspath(location).rstrip("/"), storage_options=dict(storage_options or {}), read_only=read_only
    )


def rm(location: Location, storage_options: StorageOptions = None) -> None:
    """Delete one file (local or on object storage); a missing file is not an error."""
    fs, path = filesystem(location, storage_options)
    if fs.exists(path):
        fs.rm_file(path)
