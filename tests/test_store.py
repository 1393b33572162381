"""ActivationStore: layout, round trips, per-layer reads, crash rollback and manifest checks."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import aligned_probing.encoding.store as store_module
from aligned_probing.encoding.store import ActivationStore

L, D = 3, 8  # n_layers, d_model
KEYS = [("input", "mean"), ("output", "mean"), ("input", "last"), ("output", "last")]


def _create(path, **kwargs) -> ActivationStore:
    args = dict(
        model="tiny",
        template=0,
        n_layers=L,
        d_model=D,
        positions=("input", "output"),
        poolings=("mean", "last"),
        chunk_rows=4,
        layer_names=[f"h{i}" for i in range(L + 1)],
        extra={"revision": "r1", "tokenizer_hash": "abc"},
    )
    args.update(kwargs)
    return ActivationStore.create(path, **args)


def _batch(rng, ids: list[str], cont: int = 0) -> tuple[pd.DataFrame, dict]:
    index = pd.DataFrame({"prompt_id": ids, "continuation_idx": [cont] * len(ids)})
    return index, {key: rng.standard_normal((L + 1, len(ids), D)).astype(np.float32) for key in KEYS}


def test_round_trip_and_layout(tmp_path, rng):
    store = _create(tmp_path / "s")
    i1, v1 = _batch(rng, ["a", "b", "c"])
    i2, v2 = _batch(rng, ["d", "e", "f", "g", "h", "i"])
    store.append(i1, v1)
    store.append(i2, v2)
    reopened = ActivationStore.open(tmp_path / "s")
    assert len(reopened) == 9
    pd.testing.assert_frame_equal(
        reopened.index,
        pd.concat([i1, i2], ignore_index=True).astype({"prompt_id": object, "continuation_idx": "int64"}),
        check_dtype=False,
    )
    for pos, pooling in KEYS:
        for layer in range(L + 1):
            expected = np.concatenate([v1[(pos, pooling)][layer], v2[(pos, pooling)][layer]])
            got = reopened.layer(layer, pos, pooling)
            assert got.dtype == np.float32 and got.shape == (9, D)
            np.testing.assert_array_equal(got, expected)
    array = reopened.array("output", "last")
    assert array.shape == (L + 1, 9, D)
    assert array.chunks == (1, 4, D)
    assert (reopened.n_layers, reopened.d_model, reopened.model_name, reopened.template) == (L, D, "tiny", 0)
    assert reopened.positions == ("input", "output") and reopened.poolings == ("mean", "last")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["layer_names"] == ["h0", "h1", "h2", "h3"]
    assert manifest["dtype"] == "float32" and manifest["revision"] == "r1"
    assert manifest["library_versions"]["zarr"].startswith("3.")
    assert set(pd.read_parquet(tmp_path / "s" / "index.parquet").columns) == {"prompt_id", "continuation_idx"}


def test_layer_reads_only_its_own_chunks(tmp_path, rng):
    store = _create(tmp_path / "s")
    index, vectors = _batch(rng, [f"p{i}" for i in range(10)])
    store.append(index, vectors)
    # Corrupt every chunk of layer 1 (zarr v3 chunk keys are c/<layer>/<row block>/<col block>).
    chunk_files = sorted((tmp_path / "s" / "input" / "mean" / "c" / "1").rglob("*"))
    chunk_files = [f for f in chunk_files if f.is_file()]
    assert len(chunk_files) == 3  # ceil(10 / 4) row blocks
    for f in chunk_files:
        f.write_bytes(b"garbage")
    reopened = ActivationStore.open(tmp_path / "s")
    for layer in (0, 2, 3):
        np.testing.assert_array_equal(reopened.layer(layer), vectors[("input", "mean")][layer])
    with pytest.raises(Exception):  # noqa: B017 - the codec's own error; only that it fails matters
        reopened.layer(1)


def test_float16_storage_returns_float32(tmp_path, rng):
    store = _create(tmp_path / "s", dtype="float16")
    index, vectors = _batch(rng, ["a", "b"])
    store.append(index, vectors)
    got = ActivationStore.open(tmp_path / "s").layer(2, "output", "mean")
    assert got.dtype == np.float32
    assert store.array("output", "mean").dtype == np.float16
    np.testing.assert_allclose(got, vectors[("output", "mean")][2], rtol=1e-3, atol=1e-3)


def test_crash_between_vectors_and_index_rolls_back(tmp_path, rng, monkeypatch):
    store = _create(tmp_path / "s")
    i1, v1 = _batch(rng, ["a", "b", "c"])
    store.append(i1, v1)
    real_write = store_module._atomic_write

    def die_on_index(path, write):
        if path.name == "index.parquet":
            raise KeyboardInterrupt("killed")
        real_write(path, write)

    monkeypatch.setattr(store_module, "_atomic_write", die_on_index)
    i2, v2 = _batch(rng, ["d", "e"])
    with pytest.raises(KeyboardInterrupt):
        store.append(i2, v2)
    monkeypatch.setattr(store_module, "_atomic_write", real_write)
    # The vectors of d, e reached disk but were never committed.
    reopened = ActivationStore.open(tmp_path / "s")
    assert len(reopened) == 3
    assert reopened.committed() == {("a", 0), ("b", 0), ("c", 0)}
    for key in KEYS:
        assert reopened.array(*key).shape == (L + 1, 3, D)
    # Resume: append the lost rows again; rows and vectors stay aligned.
    i3, v3 = _batch(rng, ["d", "e"])
    reopened.append(i3, v3)
    again = ActivationStore.open(tmp_path / "s")
    assert list(again.index["prompt_id"]) == ["a", "b", "c", "d", "e"]
    np.testing.assert_array_equal(again.layer(1, "output", "last")[3:], v3[("output", "last")][1])
    np.testing.assert_array_equal(again.layer(1, "output", "last")[:3], v1[("output", "last")][1])


def test_two_writers_on_one_store_stay_aligned(tmp_path, rng):
    first = _create(tmp_path / "s")
    second = ActivationStore.open(tmp_path / "s")
    i1, v1 = _batch(rng, ["a", "b"])
    i2, v2 = _batch(rng, ["c"])
    first.append(i1, v1)
    second.append(i2, v2)  # its in-memory index is stale: append must start from the committed one
    with pytest.raises(ValueError, match="already stored"):
        second.append(i1, v1)
    merged = ActivationStore.open(tmp_path / "s")
    assert list(merged.index["prompt_id"]) == ["a", "b", "c"]
    expected = np.concatenate([v1[("input", "mean")][2], v2[("input", "mean")][2]])
    np.testing.assert_array_equal(merged.layer(2), expected)


def test_index_longer_than_arrays_is_corruption(tmp_path, rng):
    store = _create(tmp_path / "s")
    store.append(*_batch(rng, ["a", "b"]))
    pd.DataFrame({"prompt_id": ["a", "b", "c"], "continuation_idx": [0, 0, 0]}).to_parquet(
        tmp_path / "s" / "index.parquet", index=False
    )
    with pytest.raises(ValueError, match=r"corrupt: array input/mean has 2 rows but the index commits 3"):
        ActivationStore.open(tmp_path / "s")


@pytest.mark.parametrize(
    ("field", "value", "stored"),
    [
        ("model", "other-model", "'tiny'"),
        ("template", 2, "0"),
        ("revision", "r2", "'r1'"),
        ("tokenizer_hash", "zzz", "'abc'"),
        ("poolings", ("mean",), r"\['mean', 'last'\]"),
    ],
)
def test_open_with_mismatched_expectation_names_the_field(tmp_path, field, value, stored):
    _create(tmp_path / "s")
    with pytest.raises(ValueError, match=rf"written for {field}={stored}, but {field}=.* was expected"):
        ActivationStore.open(tmp_path / "s", expect={field: value})
    assert (
        len(ActivationStore.open(tmp_path / "s", expect={"model": "tiny", "poolings": ("mean", "last")})) == 0
    )


def test_open_or_create(tmp_path, rng):
    created = ActivationStore.open_or_create(
        tmp_path / "s", expect={"model": "tiny"}, model="tiny", template=0, n_layers=L, d_model=D
    )
    created.append(
        pd.DataFrame({"prompt_id": ["a"], "continuation_idx": [-1]}),
        {("input", "mean"): np.ones((L + 1, 1, D))},
    )
    opened = ActivationStore.open_or_create(
        tmp_path / "s", expect={"model": "tiny"}, model="tiny", template=0, n_layers=L, d_model=D
    )
    assert len(opened) == 1 and opened.index["continuation_idx"].tolist() == [-1]
    with pytest.raises(ValueError, match="model='tiny', but model='x' was expected"):
        ActivationStore.open_or_create(
            tmp_path / "s", expect={"model": "x"}, model="x", template=0, n_layers=L, d_model=D
        )


def test_append_errors(tmp_path, rng):
    store = _create(tmp_path / "s")
    index, vectors = _batch(rng, ["a", "b"])
    store.append(index, vectors)
    with pytest.raises(ValueError, match=r"2 rows are already stored.*store.committed\(\)"):
        store.append(index, vectors)
    with pytest.raises(ValueError, match="repeats"):
        store.append(*_batch(rng, ["x", "x"]))
    i, v = _batch(rng, ["y"])
    with pytest.raises(ValueError, match=r"must have shape \(4, 1, 8\), got \(4, 1, 7\)"):
        store.append(i, {**v, ("input", "mean"): np.zeros((L + 1, 1, D - 1))})
    with pytest.raises(ValueError, match="vectors must have exactly the keys"):
        store.append(i, {("input", "mean"): v[("input", "mean")]})
    with pytest.raises(ValueError, match=r"missing columns \['continuation_idx'\]"):
        store.append(pd.DataFrame({"prompt_id": ["y"]}), v)
    with pytest.raises(TypeError, match="index must be a pandas DataFrame"):
        store.append([("y", 0)], v)
    assert len(ActivationStore.open(tmp_path / "s")) == 2  # nothing half-appended


def test_read_and_create_errors(tmp_path, rng):
    with pytest.raises(FileNotFoundError, match="No activation store"):
        ActivationStore.open(tmp_path / "nothing")
    store = _create(tmp_path / "s")
    with pytest.raises(FileExistsError, match="already holds an activation store"):
        _create(tmp_path / "s")
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 3\], got 4"):
        store.layer(4)
    with pytest.raises(ValueError, match="position must be one of"):
        store.layer(0, position="middle")
    with pytest.raises(ValueError, match="pooling must be one of"):
        store.layer(0, pooling="max")
    with pytest.raises(ValueError, match="dtype must be one of"):
        _create(tmp_path / "t", dtype="int8")
    with pytest.raises(ValueError, match="positions must be drawn from"):
        _create(tmp_path / "u", positions=("prompt",))
    with pytest.raises(ValueError, match="layer_names must have n_layers \\+ 1 = 4 entries, got 2"):
        _create(tmp_path / "v", layer_names=["a", "b"])


# ---------------------------------------------------------------------- corruption is detected, never served
def _chunk_files(root):
    return sorted(p for p in (root / "input" / "mean" / "c").rglob("*") if p.is_file())


def test_a_chunk_overwritten_with_same_size_random_bytes_is_detected(tmp_path, rng):
    from aligned_probing.encoding.store import StoreCorruptError

    store = _create(tmp_path / "stage" / "store")
    store.append(*_batch(rng, ["a", "b", "c", "d"]))
    store.append(*_batch(rng, ["e", "f"]))
    chunk = tmp_path / "stage" / "store" / "input" / "mean" / "c" / "2" / "0" / "0"
    assert chunk in _chunk_files(tmp_path / "stage" / "store")
    chunk.write_bytes(np.random.default_rng(1).bytes(chunk.stat().st_size))
    reopened = ActivationStore.open(tmp_path / "stage" / "store")
    reopened.layer(1, "input", "mean")  # other layers are intact and still read
    with pytest.raises(StoreCorruptError, match=r"input/mean layer 2 rows 0-3 do not match the checksum") as info:
        reopened.layer(2, "input", "mean")
    assert f"Delete the stage directory {tmp_path / 'stage'}" in str(info.value)


def test_a_truncated_chunk_or_manifest_or_index_names_the_file(tmp_path, rng):
    from aligned_probing.encoding.store import StoreCorruptError

    root = tmp_path / "stage" / "store"
    store = _create(root)
    store.append(*_batch(rng, ["a", "b", "c", "d"]))
    chunk = root / "output" / "last" / "c" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(StoreCorruptError, match=r"output/last layer 0 cannot be read.*Delete the stage directory"):
        ActivationStore.open(root).layer(0, "output", "last")
    index = root / "index.parquet"
    index.write_bytes(index.read_bytes()[:20])
    with pytest.raises(StoreCorruptError, match=rf"Store index {index} is unreadable"):
        ActivationStore.open(root)
    manifest = root / "manifest.json"
    manifest.write_text(manifest.read_text()[:15])
    with pytest.raises(StoreCorruptError, match=rf"Store manifest {manifest} is unreadable"):
        ActivationStore.open(root)


def test_checksums_of_an_uncommitted_append_are_dropped_on_open(tmp_path, rng, monkeypatch):
    store = _create(tmp_path / "s")
    store.append(*_batch(rng, ["a", "b"]))
    real = store_module._commit

    def die_at_index(location, write, options):
        if str(location).endswith("index.parquet"):
            raise KeyboardInterrupt("killed before the index commit")
        real(location, write, options)

    monkeypatch.setattr(store_module, "_commit", die_at_index)
    with pytest.raises(KeyboardInterrupt):
        store.append(*_batch(rng, ["c", "d", "e"]))
    monkeypatch.setattr(store_module, "_commit", real)
    reopened = ActivationStore.open(tmp_path / "s")
    assert len(reopened) == 2
    batch = _batch(rng, ["c", "d"])
    reopened.append(*batch)  # the resumed append records its own checksums over the stale ones
    again = ActivationStore.open(tmp_path / "s")
    for layer in range(L + 1):
        np.testing.assert_array_equal(again.layer(layer)[2:], batch[1][("input", "mean")][layer])
