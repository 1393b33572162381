"""Object storage through fsspec, against a local S3-compatible server (moto) started by the test.

No cloud account: the server listens on 127.0.0.1 with fake credentials set in this test's environment.
"""

from __future__ import annotations

import logging
import uuid

import numpy as np
import pandas as pd
import pytest

from aligned_probing import _fs


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on 127.0.0.1 (random port) with fake credentials; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    mp = pytest.MonkeyPatch()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        mp.setenv(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    mp.undo()


@pytest.fixture
def bucket(s3_server):
    """A fresh bucket per test; yields (s3://bucket URL, storage_options)."""
    import s3fs

    options = {"endpoint_url": s3_server, "key": "testing", "secret": "testing"}
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**options).mkdir(name)
    return f"s3://{name}", options


# ------------------------------------------------------------------------------------- locations
def test_join_keeps_the_protocol_and_local_paths_stay_paths(tmp_path):
    assert _fs.join("s3://b/runs/", "stages", "x.json") == "s3://b/runs/stages/x.json"
    assert _fs.join("file:///tmp/r", "a") == "file:///tmp/r/a"
    assert _fs.join(tmp_path, "a", "b") == str(tmp_path / "a" / "b")
    assert _fs.is_local(tmp_path) and _fs.is_local(f"file://{tmp_path}") and not _fs.is_local("s3://b/x")
    assert _fs.local_path(f"file://{tmp_path}/x") == tmp_path / "x"
    with pytest.raises(ValueError, match=r"local path or file:// URL here, got 's3://b/x'"):
        _fs.local_path("s3://b/x")


@pytest.mark.parametrize("kind", ["local", "file-url", "s3"])
def test_files_round_trip_atomically_on_every_backend(kind, tmp_path, request):
    if kind == "s3":
        root, options = request.getfixturevalue("bucket")
    else:
        root, options = (str(tmp_path) if kind == "local" else f"file://{tmp_path}"), None
    run = _fs.join(root, "run")
    target = _fs.join(run, "stages", "stage.json")
    assert not _fs.exists(target, options)
    _fs.makedirs(_fs.join(run, "stages"), options)
    _fs.write_text_atomic(target, '{"hash": "abc"}', options)
    _fs.write_text_atomic(target, '{"hash": "def"}', options)  # replaces, never appends
    assert _fs.exists(target, options) and _fs.read_text(target, options) == '{"hash": "def"}'
    table = pd.DataFrame({"layer": [0, 1, 2], "pearson": [0.1, 0.5, np.nan], "model": ["m"] * 3})
    _fs.write_parquet_atomic(table, _fs.join(run, "stages", "probing.parquet"), options)
    pd.testing.assert_frame_equal(_fs.read_parquet(_fs.join(run, "stages", "probing.parquet"), options), table)
    found = _fs.glob(_fs.join(run, "stages"), "*.json", options)
    assert found == [target] if kind != "file-url" else [str(tmp_path / "run" / "stages" / "stage.json")]
    with pytest.raises(FileNotFoundError):
        _fs.read_text(_fs.join(run, "missing.json"), options)
    _fs.rmtree(run, options)
    assert not _fs.exists(target, options)
    if kind != "s3":  # no temporary files left beside the target
        assert not list(tmp_path.rglob("*.tmp"))


def test_zarr_arrays_round_trip_on_s3_and_a_layer_reads_only_its_chunks(bucket):
    import zarr
    from zarr.storage import WrapperStore

    url, options = bucket
    rng = np.random.default_rng(0)
    values = rng.standard_normal((4, 10, 8)).astype(np.float32)  # [layer, sample, d_model]
    group = zarr.open_group(_fs.zarr_store(_fs.join(url, "store"), options), mode="a")
    array = group.create_array(
        "input/mean", shape=(4, 0, 8), chunks=(1, 4, 8), dtype="float32", compressors=None, fill_value=np.nan
    )
    array.resize((4, 10, 8))
    array[:, :10, :] = values

    class RecordingStore(WrapperStore):
        """Records every key read, to check what a worker pulls from object storage."""

        keys: list[str] = []

        async def get(self, key, prototype, byte_range=None):
            RecordingStore.keys.append(key)
            return await self._store.get(key, prototype, byte_range)

    reader = RecordingStore(_fs.zarr_store(_fs.join(url, "store"), options, read_only=True))
    layer2 = zarr.open_group(reader, mode="r")["input/mean"][2]
    np.testing.assert_array_equal(layer2, values[2])
    chunks = [k for k in RecordingStore.keys if "/c/" in k]
    assert chunks and all(k.startswith("input/mean/c/2/") for k in chunks), chunks
    with pytest.raises(Exception):  # noqa: B017 - zarr raises its own read-only error type
        zarr.open_group(_fs.zarr_store(_fs.join(url, "store"), options, read_only=True), mode="r")[
            "input/mean"
        ][0, 0, 0] = 1.0
