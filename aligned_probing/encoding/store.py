"""The activation store: pooled residual vectors on disk, one zarr array per (position, pooling).

One store directory holds the encodings of one (model, template):

    store/
      manifest.json      what was encoded: model, revision, tokenizer hash, template, dtype, ...
      index.parquet      row i = sample i of every array: prompt_id, continuation_idx (-1 = input only)
      checksums.json     CRC32 of every (array, layer) slice each append wrote, verified on read
      zarr.json          the zarr group; arrays `input/mean`, `output/mean`, `input/last`, ...
      input/mean/...     float32 (or float16) [n_layers + 1, n_samples, d_model]

Arrays are chunked `(1, chunk_rows, d_model)`, so `store.layer(l)` reads only layer l's chunks.

Location: a local directory (the default) or an fsspec URL (`s3://bucket/run/store`, `gs://...`,
`file://...`) with `storage_options` (credentials, `endpoint_url`), so that workers on several machines
share one store. Each worker reads one layer's chunks at a time; no whole array travels anywhere.

Integrity: every `append` records the CRC32 of each (array, layer) slice it wrote in
`checksums.json` (written before the index commit; entries beyond the committed index are
ignored), and `layer()` checks the slices it reads against them, which costs one CRC pass over
bytes already in memory. A chunk overwritten on disk, a truncated chunk, manifest or index raise
`StoreCorruptError`, which names the file and says to delete the stage directory so that the
next run recomputes it.

Crash safety: `append` writes the vectors first and the index last, by an atomic rename. The
index is the commit record: on open, arrays longer than the index (a kill between the two
writes) are truncated back to it, so rows and vectors always stay aligned and a resumed run
simply skips the (prompt_id, continuation_idx) pairs already in the index. Locally a file lock
serialises writers; on object storage there is no lock, so a store has one writer at a time (the
pipeline runs one encoding task per store), while any number of readers may open it.

Over 500 lines on purpose: the store's on-disk contract (manifest, index, chunked arrays, per-flush
checksums, crash-safe commit) is one concept whose parts must change together.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import zlib
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from filelock import FileLock

from aligned_probing.data.schema import DataError
from aligned_probing.pipeline import fs as _fs

FORMAT_VERSION = 1
POSITIONS: tuple[str, ...] = ("input", "output")
DTYPES: tuple[str, ...] = ("float32", "float16")
INDEX_COLUMNS: tuple[str, ...] = ("prompt_id", "continuation_idx")
_MANIFEST = "manifest.json"
_INDEX = "index.parquet"
_CHECKSUMS = "checksums.json"
_LOCK = ".lock"
_VERSIONED_LIBS = ("aligned-probing", "torch", "transformers", "transformer-lens", "zarr", "numpy")


class StoreCorruptError(DataError):
    """An activation store's files do not match what was written (the message names the file)."""


def _recovery(path: Path | str) -> str:
    """How to recover from a corrupt store: delete it (in a pipeline run, its stage directory)."""
    parent = _fs.parent(path) if isinstance(path, str) else path.parent
    return (
        f"Delete the stage directory {parent} (or the store {path} itself when you made it by hand); "
        "the next run encodes it again."
    )


def _crc_layers(values: np.ndarray) -> list[int]:
    """CRC32 of each layer's bytes of a `[layers, rows, d_model]` block, as stored on disk."""
    return [zlib.crc32(np.ascontiguousarray(values[i]).tobytes()) for i in range(values.shape[0])]


def _library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for lib in _VERSIONED_LIBS:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    return versions


def _atomic_write(path: Path, write: Any) -> None:
    """Write via a temporary file and `os.replace`, so readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _commit(location: Path | str, write: Any, storage_options: Mapping[str, Any] | None) -> None:
    """`write(tmp_path)` and publish the file atomically: renamed locally, one PUT on object storage."""
    if isinstance(location, Path):
        _atomic_write(location, write)
        return
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch) / "upload"
        write(tmp)
        _fs.write_bytes_atomic(location, tmp.read_bytes(), storage_options)


def _location(path: str | os.PathLike[str]) -> Path | str:
    """A local store's `Path`, or a URL string for object storage."""
    return _fs.local_path(path) if _fs.is_local(path) else os.fspath(path).rstrip("/")


def _child(location: Path | str, name: str) -> Path | str:
    """`location/name`, a `Path` for a local store (what tests and callers see) or a URL string."""
    return location / name if isinstance(location, Path) else _fs.join(location, name)


def _lock(location: Path | str) -> contextlib.AbstractContextManager[Any]:
    """The writers' lock: a file lock locally, none on object storage (one writer per store there)."""
    if isinstance(location, Path):
        return FileLock(location / _LOCK)
    return contextlib.nullcontext()


def _empty_index() -> pd.DataFrame:
    return pd.DataFrame(
        {"prompt_id": pd.Series([], dtype=str), "continuation_idx": pd.Series([], dtype="int64")}
    )


def _check_choice(name: str, values: Iterable[str], allowed: Iterable[str]) -> tuple[str, ...]:
    values = tuple(values)
    allowed = tuple(allowed)
    if not values:
        raise ValueError(f"{name} must name at least one of {allowed}, got an empty sequence.")
    for value in values:
        if value not in allowed:
            raise ValueError(f"{name} must be drawn from {allowed}, got {value!r}.")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must not repeat entries, got {values}.")
    return values


class ActivationStore:
    """Pooled activations of one (model, template), appendable and resumable.

    Open an existing store with `ActivationStore.open`, make a new one with
    `ActivationStore.create`, or use `ActivationStore.open_or_create` (what the encoder does).

    Example:
        >>> store = ActivationStore.open("runs/smollm2/t0", expect={"template": 0})  # doctest: +SKIP
        >>> X = store.layer(5, position="input", pooling="mean")  # [n_samples, d_model] float32
        >>> store.index.head()  # prompt_id, continuation_idx of each row of X
    """

    def __init__(
        self,
        path: Path | str,
        manifest: dict[str, Any],
        group: zarr.Group,
        index: pd.DataFrame,
        storage_options: Mapping[str, Any] | None = None,
    ):
        # Private: use open / create / open_or_create.
        self.path = path
        self.storage_options = dict(storage_options or {})
        self._manifest = manifest
        self._group = group
        self._index = index
        self._flushes: list[dict[str, Any]] | None = None  # recorded checksums; None: store predates them

    def _read_index(self) -> pd.DataFrame:
        where = _child(self.path, _INDEX)
        try:
            return _fs.read_parquet(where, self.storage_options)
        except FileNotFoundError:
            raise StoreCorruptError(f"Store index {where} is missing. {_recovery(self.path)}") from None
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise StoreCorruptError(
                f"Store index {where} is unreadable ({type(err).__name__}: {err}). {_recovery(self.path)}"
            ) from None

    def _read_checksums(self) -> list[dict[str, Any]] | None:
        """The recorded flushes (None for a store written before checksums existed)."""
        where = _child(self.path, _CHECKSUMS)
        if not _fs.exists(where, self.storage_options):
            return None
        try:
            flushes = json.loads(_fs.read_text(where, self.storage_options))["flushes"]
        except (ValueError, KeyError, TypeError, UnicodeError) as err:
            raise StoreCorruptError(f"Store checksums {where} are unreadable ({err}). {_recovery(self.path)}") from None
        return list(flushes)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        model: str,
        template: int,
        n_layers: int,
        d_model: int,
        positions: Iterable[str] = ("input",),
        poolings: Iterable[str] = ("mean",),
        dtype: str = "float32",
        layer_names: list[str] | None = None,
        chunk_rows: int = 256,
        extra: Mapping[str, Any] | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> ActivationStore:
        """Create an empty store at `path` (which must not hold a store yet).

        Args:
            path: Store directory, or an fsspec URL (`s3://bucket/run/store`).
            model: Model name recorded in the manifest and checked on open.
            template: Prompt template 0-4.
            n_layers: Number of blocks L; arrays hold residual layers 0..L.
            d_model: Residual width.
            positions: Subset of ("input", "output").
            poolings: Pooling names, e.g. ("mean",) or ("mean", "last").
            dtype: On-disk dtype, "float32" (default) or "float16" (half the disk; `layer`
                still returns float32).
            layer_names: Hook name of each residual layer (length n_layers + 1).
            chunk_rows: Rows per chunk; a chunk is `(1, chunk_rows, d_model)`.
            extra: More JSON-ready manifest fields (spec, revision, tokenizer_hash, ...).
            storage_options: fsspec options for a URL `path` (`key`, `secret`, `endpoint_url`, ...).

        Returns:
            The empty store.
        """
        path = _location(path)
        if _fs.exists(_fs.join(path, _MANIFEST), storage_options):
            raise FileExistsError(
                f"{path} already holds an activation store; use ActivationStore.open or open_or_create."
            )
        positions = _check_choice("positions", positions, POSITIONS)
        poolings = tuple(poolings)
        if not poolings or len(set(poolings)) != len(poolings):
            raise ValueError(f"poolings must be non-empty with unique names, got {poolings}.")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}.")
        for name, value in (("n_layers", n_layers), ("d_model", d_model), ("chunk_rows", chunk_rows)):
            if not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if layer_names is not None and len(layer_names) != n_layers + 1:
            raise ValueError(
                f"layer_names must have n_layers + 1 = {n_layers + 1} entries, got {len(layer_names)}."
            )
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "model": model,
            "template": int(template),
            "n_layers": int(n_layers),
            "d_model": int(d_model),
            "positions": list(positions),
            "poolings": list(poolings),
            "dtype": dtype,
            "layer_names": list(layer_names) if layer_names is not None else None,
            "chunk_rows": int(chunk_rows),
            **dict(extra or {}),
            "library_versions": _library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _fs.makedirs(path, storage_options)
        with _lock(path):
            group = zarr.open_group(_fs.zarr_store(path, storage_options), mode="a")
            for position in positions:
                for pooling in poolings:
                    group.create_array(
                        f"{position}/{pooling}",
                        shape=(n_layers + 1, 0, d_model),
                        chunks=(1, chunk_rows, d_model),
                        dtype=dtype,
                        # Residual activations are near-incompressible floats: skipping the codec
                        # saves CPU on every append and read for a few percent of disk.
                        compressors=None,
                        fill_value=np.nan,
                        dimension_names=("layer", "sample", "d_model"),
                        overwrite=True,  # leftovers of a create that died before its manifest
                    )
            _commit(
                _child(path, _CHECKSUMS),
                lambda p: p.write_text(json.dumps({"flushes": []})),
                storage_options,
            )
            _commit(
                _child(path, _INDEX),
                lambda p: _empty_index().to_parquet(p, index=False),
                storage_options,
            )
            # The manifest goes last: its presence marks a complete, openable store.
            _commit(
                _child(path, _MANIFEST),
                lambda p: p.write_text(json.dumps(manifest, indent=2)),
                storage_options,
            )
        store = cls(path, manifest, group, _empty_index(), storage_options)
        store._flushes = []
        return store

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        expect: Mapping[str, Any] | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> ActivationStore:
        """Open an existing store, check it against `expect`, and roll back uncommitted rows.

        Args:
            path: Store directory, or an fsspec URL (`s3://bucket/run/store`).
            expect: Manifest fields that must match, e.g. {"model": ..., "revision": ...,
                "tokenizer_hash": ..., "template": 0}. A store written for another model or
                template is an error, not a silent mix.
            storage_options: fsspec options for a URL `path`.

        Returns:
            The store, with every array exactly as long as the committed index.

        Raises:
            FileNotFoundError: No store at `path`.
            ValueError: A field of `expect` differs from the manifest.
        """
        path = _location(path)
        if not _fs.exists(_fs.join(path, _MANIFEST), storage_options):
            raise FileNotFoundError(
                f"No activation store at {path} (no {_MANIFEST}); create one with "
                "ActivationStore.create or encode(..., store=path)."
            )
        manifest_file = _fs.join(path, _MANIFEST)
        try:
            manifest = json.loads(_fs.read_text(manifest_file, storage_options))
        except (ValueError, UnicodeError) as err:
            raise StoreCorruptError(f"Store manifest {manifest_file} is unreadable ({err}). {_recovery(path)}") from None
        _check_expected(manifest, expect or {}, path)
        with _lock(path):
            try:
                group = zarr.open_group(_fs.zarr_store(path, storage_options), mode="r+")
            except Exception as err:  # noqa: BLE001 - any zarr metadata failure means a damaged store
                raise StoreCorruptError(
                    f"Store {path}: its zarr metadata is unreadable ({type(err).__name__}: {err}). {_recovery(path)}"
                ) from None
            store = cls(path, manifest, group, _empty_index(), storage_options)
            store._index = store._read_index()
            store._flushes = store._read_checksums()
            store._rollback_uncommitted()
        return store

    @classmethod
    def open_or_create(
        cls,
        path: str | Path,
        *,
        expect: Mapping[str, Any] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        **create_kwargs: Any,
    ) -> ActivationStore:
        """Open the store at `path` if there is one (checking `expect`), else create it.

        Args:
            path: Store directory or fsspec URL.
            expect: Manifest fields an existing store must match.
            storage_options: fsspec options for a URL `path`.
            **create_kwargs: Arguments of `create`, used when there is no store yet.
        """
        if _fs.exists(_fs.join(_location(path), _MANIFEST), storage_options):
            return cls.open(path, expect=expect, storage_options=storage_options)
        return cls.create(path, storage_options=storage_options, **create_kwargs)

    def _rollback_uncommitted(self) -> None:
        n = len(self._index)
        if self._flushes is not None:
            # Checksums written for rows whose index commit never happened describe nothing.
            self._flushes = [f for f in self._flushes if f["stop"] <= n]
        for key, array in self._arrays():
            length = array.shape[1]
            if length > n:
                # A kill between the vector write and the index commit: drop the orphan rows.
                array.resize((array.shape[0], n, array.shape[2]))
            elif length < n:
                raise StoreCorruptError(
                    f"Store {self.path} is corrupt: array {key} has {length} rows but the index "
                    f"commits {n}. {_recovery(self.path)}"
                )

    # ---- reading ------------------------------------------------------------------------------

    def _arrays(self) -> list[tuple[str, zarr.Array]]:
        return [(f"{p}/{q}", self._group[f"{p}/{q}"]) for p in self.positions for q in self.poolings]

    def array(self, position: str = "input", pooling: str = "mean") -> zarr.Array:
        """The zarr array `[n_layers + 1, n_samples, d_model]` of (position, pooling), lazily read."""
        if position not in self.positions:
            raise ValueError(f"position must be one of {self.positions} in this store, got {position!r}.")
        if pooling not in self.poolings:
            raise ValueError(f"pooling must be one of {self.poolings} in this store, got {pooling!r}.")
        return self._group[f"{position}/{pooling}"]

    def layer(self, layer: int, position: str = "input", pooling: str = "mean") -> np.ndarray:
        """Vectors of residual layer `layer` for every sample: float32 `[n_samples, d_model]`.

        Only that layer's chunks are read from disk. Row i belongs to `store.index.iloc[i]`.
        """
        if not isinstance(layer, int | np.integer) or not 0 <= layer <= self.n_layers:
            raise ValueError(f"layer must be an int in [0, {self.n_layers}], got {layer!r}.")
        array = self.array(position, pooling)
        key = f"{position}/{pooling}"
        try:
            raw = np.asarray(array[int(layer), : len(self)])
        except Exception as err:  # noqa: BLE001 - a truncated chunk fails inside zarr's codecs
            raise StoreCorruptError(
                f"Store {self.path}: array {key} layer {layer} cannot be read ({type(err).__name__}: {err}); a "
                f"chunk file under {_child(self.path, key)} is damaged. {_recovery(self.path)}"
            ) from None
        self._verify(raw, key, int(layer))
        return raw.astype(np.float32, copy=False)

    def _verify(self, raw: np.ndarray, key: str, layer: int) -> None:
        """Compare the CRC32 of every recorded flush's slice of `raw` with the one written."""
        for flush in self._flushes or []:
            expected = flush["crc"].get(key)
            if expected is None:
                continue
            got = zlib.crc32(np.ascontiguousarray(raw[flush["start"] : flush["stop"]]).tobytes())
            if got != expected[layer]:
                chunk_rows = int(self._manifest["chunk_rows"])
                first, last = flush["start"] // chunk_rows, (flush["stop"] - 1) // chunk_rows
                raise StoreCorruptError(
                    f"Store {self.path}: array {key} layer {layer} rows {flush['start']}-{flush['stop'] - 1} "
                    f"do not match the checksum recorded when they were written (chunk file(s) "
                    f"{_child(self.path, key)}/c/{layer}/{first}..{last}/0 changed on disk). {_recovery(self.path)}"
                )

    @property
    def index(self) -> pd.DataFrame:
        """A copy of the committed index: `prompt_id`, `continuation_idx`, one row per sample."""
        return self._index.copy()

    def committed(self) -> set[tuple[str, int]]:
        """The (prompt_id, continuation_idx) pairs already stored (what a resumed run skips)."""
        return set(zip(self._index["prompt_id"], self._index["continuation_idx"].astype(int), strict=True))

    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest."""
        return json.loads(json.dumps(self._manifest))

    @property
    def n_layers(self) -> int:
        """Number of blocks L; layers 0..L are stored."""
        return int(self._manifest["n_layers"])

    @property
    def d_model(self) -> int:
        """Residual width."""
        return int(self._manifest["d_model"])

    @property
    def model_name(self) -> str:
        """Name of the model that was encoded."""
        return str(self._manifest["model"])

    @property
    def template(self) -> int:
        """Prompt template 0-4."""
        return int(self._manifest["template"])

    @property
    def positions(self) -> tuple[str, ...]:
        """Stored positions, a subset of ("input", "output")."""
        return tuple(self._manifest["positions"])

    @property
    def poolings(self) -> tuple[str, ...]:
        """Stored poolings, e.g. ("mean",)."""
        return tuple(self._manifest["poolings"])

    @property
    def dtype(self) -> str:
        """On-disk dtype."""
        return str(self._manifest["dtype"])

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.path)!r}, model={self.model_name!r}, template={self.template}, "
            f"n_samples={len(self)}, n_layers={self.n_layers}, d_model={self.d_model}, "
            f"positions={self.positions}, poolings={self.poolings})"
        )

    # ---- writing ------------------------------------------------------------------------------

    def append(self, index: pd.DataFrame, vectors: Mapping[tuple[str, str], np.ndarray]) -> None:
        """Append rows: write every array's vectors, then commit the index.

        Args:
            index: `prompt_id`, `continuation_idx` of the m new rows; pairs must be new.
            vectors: For every stored (position, pooling), an array `[n_layers + 1, m, d_model]`.

        Raises:
            ValueError: Missing columns or arrays, wrong shapes, or rows already stored.
        """
        new = _normalise_index(index)
        m = len(new)
        expected = {(p, q) for p in self.positions for q in self.poolings}
        if set(vectors) != expected:
            raise ValueError(f"vectors must have exactly the keys {sorted(expected)}, got {sorted(vectors)}.")
        shape = (self.n_layers + 1, m, self.d_model)
        for key, values in vectors.items():
            if tuple(np.shape(values)) != shape:
                raise ValueError(f"vectors[{key}] must have shape {shape}, got {tuple(np.shape(values))}.")
        if m == 0:
            return
        with _lock(self.path):
            # Another writer may have committed since we opened: start from the index on disk.
            self._index = self._read_index()
            self._flushes = self._read_checksums()
            self._rollback_uncommitted()
            already = self.committed().intersection(
                zip(new["prompt_id"], new["continuation_idx"], strict=True)
            )
            if already:
                raise ValueError(
                    f"{len(already)} rows are already stored, e.g. {sorted(already)[:3]}; "
                    "skip store.committed() pairs when resuming."
                )
            n = len(self._index)
            crc: dict[str, list[int]] = {}
            for (position, pooling), values in vectors.items():
                array = self._group[f"{position}/{pooling}"]
                array.resize((shape[0], n + m, shape[2]))
                stored = np.asarray(values, dtype=self.dtype)
                array[:, n : n + m, :] = stored
                crc[f"{position}/{pooling}"] = _crc_layers(stored)
            if self._flushes is not None:  # a store from before checksums stays unchecked
                flushes = [*self._flushes, {"start": n, "stop": n + m, "crc": crc}]
                _commit(
                    _child(self.path, _CHECKSUMS),
                    lambda p: p.write_text(json.dumps({"flushes": flushes})),
                    self.storage_options,
                )
                self._flushes = flushes
            committed = pd.concat([self._index, new], ignore_index=True)
            # The index is the commit record: written last, atomically.
            _commit(
                _child(self.path, _INDEX),
                lambda p: committed.to_parquet(p, index=False),
                self.storage_options,
            )
            self._index = committed


def _normalise_index(index: pd.DataFrame) -> pd.DataFrame:
    """The two index columns with canonical dtypes; rejects missing columns and repeated pairs."""
    if not isinstance(index, pd.DataFrame):
        raise TypeError(f"index must be a pandas DataFrame, got {type(index).__name__}.")
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise ValueError(f"index is missing columns {missing}; it needs {list(INDEX_COLUMNS)}.")
    new = pd.DataFrame(
        {
            "prompt_id": index["prompt_id"].astype(str).to_numpy(),
            "continuation_idx": index["continuation_idx"].astype("int64").to_numpy(),
        }
    )
    keys = list(zip(new["prompt_id"], new["continuation_idx"], strict=True))
    if len(set(keys)) != len(keys):
        raise ValueError("index repeats (prompt_id, continuation_idx) pairs; each row must be unique.")
    return new


def _check_expected(manifest: Mapping[str, Any], expect: Mapping[str, Any], path: Path | str) -> None:
    for field, expected in expect.items():
        if field not in manifest:
            raise ValueError(
                f"Store {path} has no manifest field {field!r} to check (expected {expected!r}); "
                f"its fields are {sorted(manifest)}."
            )
        stored = manifest[field]
        # JSON turns tuples into lists; compare like with like.
        if isinstance(expected, tuple):
            expected = list(expected)
        if stored != expected:
            raise ValueError(
                f"Store {path} was written for {field}={stored!r}, but {field}={expected!r} was expected. "
                "Use another store directory for this model/template, or delete the old store."
            )
