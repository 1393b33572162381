"""Object storage through fsspec, against a local S3-compatible server (moto) started by the test.

No cloud account: the server listens on 127.0.0.1 with fake credentials set in this test's environment.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aligned_probing.pipeline import fs as _fs


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
    assert _fs.join("file:///data/r", "a") == "file:///data/r/a"
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
    with _fs.open_file(target, "rb", options) as f:
        assert f.read(2) == b'{"' and f.read() == b'hash": "def"}'
    table = pd.DataFrame({"layer": [0, 1, 2], "pearson": [0.1, 0.5, np.nan], "model": ["m"] * 3})
    _fs.write_parquet_atomic(table, _fs.join(run, "stages", "probing.parquet"), options)
    pd.testing.assert_frame_equal(
        _fs.read_parquet(_fs.join(run, "stages", "probing.parquet"), options), table
    )
    found = _fs.glob(_fs.join(run, "stages"), "*.json", options)
    # A file:// location lists as local paths (the protocol adds nothing there).
    expected = str(tmp_path / "run" / "stages" / "stage.json") if kind == "file-url" else target
    assert found == [expected]
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
    with pytest.raises(ValueError, match="read-only"):
        zarr.open_group(_fs.zarr_store(_fs.join(url, "store"), options, read_only=True), mode="r")[
            "input/mean"
        ][0, 0, 0] = 1.0


# ------------------------------------------------------------------------------ the activation store
L, D = 3, 8
KEYS = [("input", "mean"), ("output", "mean")]


def _batch(rng, prompt_ids: list[str]) -> tuple[pd.DataFrame, dict]:
    index = pd.DataFrame({"prompt_id": prompt_ids, "continuation_idx": 0})
    return index, {key: rng.standard_normal((L + 1, len(prompt_ids), D)).astype(np.float32) for key in KEYS}


def _create(location, options=None):
    from aligned_probing.encoding.store import ActivationStore

    return ActivationStore.create(
        location,
        model="tiny",
        template=0,
        n_layers=L,
        d_model=D,
        positions=("input", "output"),
        chunk_rows=4,
        storage_options=options,
    )


def test_activation_store_round_trips_on_s3_like_a_local_one(bucket, tmp_path, rng):
    from aligned_probing.encoding.store import ActivationStore

    url, options = bucket
    location = _fs.join(url, "run", "stages", "encode--tiny--t0", "store")
    batches = [_batch(rng, [f"p{i}" for i in range(j, j + 5)]) for j in (0, 5)]
    for store in (_create(location, options), _create(tmp_path / "store")):
        for index, vectors in batches:
            store.append(index, vectors)
    remote = ActivationStore.open(location, expect={"model": "tiny", "template": 0}, storage_options=options)
    local = ActivationStore.open(tmp_path / "store")
    assert remote.path == location and len(remote) == 10 and remote.committed() == local.committed()
    pd.testing.assert_frame_equal(remote.index, local.index)
    for layer in range(L + 1):
        for key in KEYS:
            expected = np.concatenate([v[key][layer] for _, v in batches])
            np.testing.assert_array_equal(remote.layer(layer, *key), expected)
            np.testing.assert_array_equal(local.layer(layer, *key), expected)
    with pytest.raises(FileExistsError, match="already holds an activation store"):
        _create(location, options)
    with pytest.raises(ValueError, match=r"was written for model='tiny', but model='other' was expected"):
        ActivationStore.open(location, expect={"model": "other"}, storage_options=options)
    with pytest.raises(FileNotFoundError, match="No activation store"):
        ActivationStore.open(_fs.join(url, "nowhere"), storage_options=options)


def test_uncommitted_rows_on_s3_roll_back_and_resume(bucket, rng, monkeypatch):
    from aligned_probing.encoding import store as store_module
    from aligned_probing.encoding.store import ActivationStore

    url, options = bucket
    location = _fs.join(url, "store")
    store = _create(location, options)
    i1, v1 = _batch(rng, ["a", "b", "c"])
    store.append(i1, v1)
    real_commit = store_module._commit

    def die_on_index(location, write, storage_options):
        if str(location).endswith("index.parquet"):
            raise KeyboardInterrupt("worker killed between the vectors and the index")
        real_commit(location, write, storage_options)

    monkeypatch.setattr(store_module, "_commit", die_on_index)
    with pytest.raises(KeyboardInterrupt):
        store.append(*_batch(rng, ["d", "e"]))
    monkeypatch.setattr(store_module, "_commit", real_commit)
    reopened = ActivationStore.open(location, storage_options=options)  # what a retried task does
    assert reopened.committed() == {("a", 0), ("b", 0), ("c", 0)}
    assert all(reopened.array(*key).shape == (L + 1, 3, D) for key in KEYS)
    i3, v3 = _batch(rng, ["d", "e"])
    reopened.append(i3, v3)
    again = ActivationStore.open(location, storage_options=options)
    assert list(again.index["prompt_id"]) == ["a", "b", "c", "d", "e"]
    np.testing.assert_array_equal(again.layer(2, "output")[3:], v3[("output", "mean")][2])
    np.testing.assert_array_equal(again.layer(2, "output")[:3], v1[("output", "mean")][2])


def test_probing_reads_the_s3_store_to_the_same_table(bucket, tmp_path):
    from aligned_probing.probing import run_probing

    url, options = bucket
    rng = np.random.default_rng(1)
    n = 24
    index = pd.DataFrame({"prompt_id": [f"p{i:02d}" for i in range(n)], "continuation_idx": 0})
    latent = rng.standard_normal(n)
    vectors = {
        key: (
            latent[None, :, None] * rng.standard_normal((L + 1, 1, D)) + rng.standard_normal((L + 1, n, D))
        ).astype(np.float32)
        for key in KEYS
    }
    targets = index.assign(prompt_toxicity=1 / (1 + np.exp(-latent)), toxicity=1 / (1 + np.exp(-latent)))
    remote, local = _create(_fs.join(url, "store"), options), _create(tmp_path / "store")
    remote.append(index, vectors)
    local.append(index, vectors)
    settings = {"n_folds": 3, "seeds": (0,), "alphas": (1.0, 10.0)}
    on_s3 = pd.concat(  # two layer blocks, as two probing tasks would read them
        [run_probing(remote, targets, layers=block, **settings) for block in ([0, 1], [2, 3])],
        ignore_index=True,
    )
    pd.testing.assert_frame_equal(on_s3, run_probing(local, targets, **settings), check_exact=True)
    assert on_s3.query("scenario == 'input'")["pearson"].mean() > 0.5  # the planted signal is found


# ------------------------------------------------------------------------------------- encoding
def test_encode_into_an_s3_store_with_a_custom_endpoint_equals_a_local_store(bucket, tiny_model, tmp_path):
    from aligned_probing.encoding import encode
    from aligned_probing.generation import generate_continuations

    url, options = bucket
    prompts = pd.DataFrame(
        {"prompt_id": ["a", "b", "c"], "text": ["The quick brown fox", "You are a stupid idiot", "hello"]}
    )
    conts = generate_continuations(tiny_model, prompts, k=2, seed=0, max_new_tokens=4)
    first = (prompts.iloc[:2], conts[conts["prompt_id"] != "c"])
    stores = {}
    for where, location, so in (
        ("s3", _fs.join(url, "run", "store"), options),
        ("local", tmp_path / "s", None),
    ):
        store = encode(tiny_model, *first, store=location, storage_options=so, chunk_rows=4)
        # Resumed through the store object: it must keep its storage options (the custom endpoint).
        stores[where] = encode(tiny_model, prompts, conts, store=store, chunk_rows=4)
    remote, local = stores["s3"], stores["local"]
    assert remote.path == _fs.join(url, "run", "store") and remote.storage_options == options
    assert len(remote) == 6 and remote.committed() == local.committed()
    pd.testing.assert_frame_equal(remote.index, local.index)
    for layer in range(remote.n_layers + 1):
        for position in ("input", "output"):
            np.testing.assert_array_equal(remote.layer(layer, position), local.layer(layer, position))
    assert _fs.glob(_fs.join(url, "run", "store"), "*.json", options) == [
        _fs.join(url, "run", "store", name) for name in ("checksums.json", "manifest.json", "zarr.json")
    ]


# ------------------------------------------------------------------------------ the pipeline on S3
@pytest.mark.slow
def test_tiny_pipeline_with_its_run_dir_on_s3_gives_the_local_tables_and_reruns_cached(
    s3_server, bucket, tmp_path, monkeypatch
):
    from aligned_probing import pipeline
    from aligned_probing.pipeline.config import RunConfig
    from aligned_probing.pipeline.results import load_results
    from aligned_probing.pipeline.stages import read_continuations
    from tests._tiny import build_tiny_model

    url, _ = bucket
    shutil.copy(Path(__file__).parent / "data" / "tiny.toml", tmp_path / "tiny.toml")
    build_tiny_model(tmp_path / "tiny-a", seed=0)
    endpoint = {"endpoint_url": s3_server}  # the credentials come from the environment, as on a cluster

    def config(run_dir: str, storage_options: dict) -> RunConfig:
        data = RunConfig.from_toml(tmp_path / "tiny.toml").model_dump(mode="json")
        output = {"run_dir": run_dir, "storage_options": storage_options, "figure_formats": ["png"]}
        runtime = {**data["runtime"], "causal_layer_block": 1}  # causal blocks on S3 too
        return RunConfig.from_dict(
            {**data, "models": data["models"][:1], "output": output, "runtime": runtime}
        )

    run_url = _fs.join(url, "runs", "tiny")
    # Locally everything but the report (its figures are checked on S3 below; rendering is the slow part).
    local = pipeline.run(config(str(tmp_path / "local"), {}), stages=["behaviour", "causal"], progress=False)
    remote = pipeline.run(config(run_url, endpoint), progress=False)
    assert {r.status for r in remote.records} == {"ran"} and remote.run_dir == run_url
    # The same layout: stage directories named by the same content hashes, under the URL.
    assert [r.dir for r in remote.records][:-1] == [
        _fs.join(run_url, "stages", r.dir.name) for r in local.records
    ]
    ours, theirs = load_results(run_url, endpoint), load_results(tmp_path / "local")
    for table in ("prompts", "scores", "probing", "behaviour", "layer_skipping", "patching", "steering"):
        pd.testing.assert_frame_equal(
            getattr(ours, table), getattr(theirs, table), check_exact=True, obj=table
        )
    gen = [next(r.dir for r in run.records if r.name == "generate") for run in (remote, local)]
    pd.testing.assert_frame_equal(
        read_continuations(gen[0], endpoint), read_continuations(gen[1]), check_exact=True
    )
    # The report, its figures and the log are published under the URL as well.
    assert remote.report == _fs.join(run_url, "report.html")
    assert 'id="fig-steering"' in _fs.read_text(remote.report, endpoint)
    figures = {_fs.name(f) for f in _fs.glob(_fs.join(run_url, "figures"), "*", endpoint)}
    assert {"information.png", "skipping.png", "patching.png", "steering.png"} <= figures
    saved = json.loads(_fs.read_text(_fs.join(run_url, "config.json"), endpoint))
    assert saved["output"]["storage_options"] == endpoint  # no credentials in the run directory

    def no_model(*args, **kwargs):
        raise AssertionError("a cached run must not load a model")

    monkeypatch.setattr("aligned_probing.models.load_model", no_model)
    again = pipeline.run(config(run_url, endpoint), progress=False)
    assert again.executed == [] and {r.status for r in again.records} == {"cached"}
    log = _fs.read_text(_fs.join(run_url, "logs", "run.log"), endpoint)
    assert "stage causal/tiny-a: cached" in log and "stage causal/tiny-a: running" in log  # appended
