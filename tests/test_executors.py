from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from aligned_probing.pipeline.config import RunConfig
from aligned_probing.pipeline.executors import (
    EXECUTORS,
    Executor,
    LocalExecutor,
    RayExecutor,
    Resources,
    get_executor,
)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------- task functions (module level: picklable)
def _square(x: int) -> int:
    return x * x


def _die_once(task: tuple[str, int]) -> int:
    """Kill the worker process on the first attempt (a marker file remembers it), succeed on the retry."""
    marker, value = Path(task[0]), task[1]
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os._exit(1)  # a hard kill: no exception, no cleanup, the worker process is gone
    return value * 10


def _raise_once(task: tuple[str, int]) -> int:
    marker, value = Path(task[0]), task[1]
    if not marker.exists():
        marker.write_text("raised")
        raise RuntimeError("transient failure")
    return value + 1


def _always_raise(_: int) -> int:
    raise ValueError("bad task 7")


def _rendezvous(task: tuple[str, int]) -> int:
    """Wait until every task of the map has started: only returns if the tasks run at the same time."""
    directory, i = Path(task[0]), task[1]
    (directory / f"started-{i}").write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while len(list(directory.glob("started-*"))) < 2:
        if time.monotonic() > deadline:
            raise TimeoutError("the other task never started: tasks did not run concurrently")
        time.sleep(0.05)
    return os.getpid()


# ------------------------------------------------------------------------------------------ local
def test_local_executor_maps_in_order_in_this_process():
    ex = get_executor("local")
    assert isinstance(ex, LocalExecutor) and isinstance(ex, Executor) and ex.name == "local"
    assert ex.map(_square, [3, 1, 2], resources=Resources(num_gpus=1)) == [9, 1, 4]
    assert ex.map(_square, []) == []


def test_local_executor_stops_at_the_failing_task():
    seen: list[int] = []

    def task(x: int) -> int:
        seen.append(x)
        if x == 2:
            raise ValueError("task 2 failed")
        return x

    with pytest.raises(ValueError, match="task 2 failed"):
        LocalExecutor().map(task, [1, 2, 3])
    assert seen == [1, 2]


def test_get_executor_errors_name_the_parameter_and_the_choices():
    assert EXECUTORS == ("local", "ray")
    with pytest.raises(ValueError, match=r"executor must be one of \('local', 'ray'\), got 'dask'"):
        get_executor("dask")
    with pytest.raises(ValueError, match=r"only used with executor='ray', got address='auto'"):
        get_executor("local", address="auto")
    with pytest.raises(ValueError, match=r"max_retries must be an int >= 0, got -1"):
        RayExecutor(max_retries=-1)


def test_resources_are_validated_and_become_ray_options():
    assert Resources(num_cpus=0.5, num_gpus=1).ray_options() == {"num_cpus": 0.5, "num_gpus": 1}
    assert Resources(memory=2**30).ray_options()["memory"] == 2**30
    with pytest.raises(ValueError, match=r"Resources.num_gpus must be a number >= 0, got -1"):
        Resources(num_gpus=-1)
    with pytest.raises(ValueError, match=r"Resources.memory must be a positive int"):
        Resources(memory=0)
    with pytest.raises(ValueError, match=r"one per task \(2\), got a sequence of 1"):
        LocalExecutor().map(_square, [1, 2], resources=[Resources()])


def test_ray_without_ray_installed_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'aligned-probing\[ray\]'"):
        get_executor("ray")
    # Building the executor object itself never imports Ray; the first dispatch does.
    lazy = RayExecutor()
    with pytest.raises(ImportError, match=r"pip install 'aligned-probing\[ray\]'"):
        lazy.map(_square, [1])


# -------------------------------------------------------------------------------------------- ray
@pytest.fixture(scope="module")
def ray_cluster():
    """A local two-CPU Ray cluster for this module's tests (shut down afterwards)."""
    import cloudpickle
    import ray

    # The task functions live in this test module, which Ray workers cannot import by name.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
def test_ray_gives_the_local_results_in_task_order(ray_cluster):
    tasks = list(range(7))
    ex = get_executor("ray")
    assert isinstance(ex, RayExecutor) and isinstance(ex, Executor)
    assert ex.map(_square, tasks) == LocalExecutor().map(_square, tasks)
    assert ex.map(_square, []) == []
    # Any callable, not only plain functions: builtins and partials are wrapped for Ray.
    assert ex.map(abs, [-2, 3]) == [2, 3]
    assert ex.map(functools.partial(pow, 2), [3, 4]) == [8, 16]


@pytest.mark.slow
def test_ray_runs_tasks_concurrently(ray_cluster, tmp_path):
    tasks = [(str(tmp_path), 0), (str(tmp_path), 1)]
    pids = RayExecutor().map(_rendezvous, tasks, resources=[Resources(1), Resources(0.5)])
    assert len(set(pids)) == 2 and os.getpid() not in pids


@pytest.mark.slow
def test_ray_retries_a_killed_task_and_completes(ray_cluster, tmp_path):
    tasks = [(str(tmp_path / f"attempt-{i}"), i) for i in range(2)]
    assert RayExecutor(max_retries=2).map(_die_once, tasks) == [0, 10]
    assert all(Path(m).exists() for m, _ in tasks)  # every task really died once


@pytest.mark.slow
def test_ray_without_retries_reports_the_killed_task(ray_cluster, tmp_path):
    from ray.exceptions import WorkerCrashedError

    with pytest.raises(WorkerCrashedError):
        RayExecutor(max_retries=0).map(_die_once, [(str(tmp_path / "attempt"), 1)])


@pytest.mark.slow
def test_ray_retries_exceptions_only_when_asked(ray_cluster, tmp_path):
    assert RayExecutor(max_retries=1).map(_raise_once, [(str(tmp_path / "a"), 1)]) == [2]
    with pytest.raises(RuntimeError, match="transient failure"):
        RayExecutor(max_retries=1, retry_exceptions=False).map(_raise_once, [(str(tmp_path / "b"), 1)])
    # A task that fails on every attempt surfaces as its own exception type.
    with pytest.raises(ValueError, match="bad task 7"):
        RayExecutor(max_retries=1).map(_always_raise, [7])


# ------------------------------------------------------------------------------- the pipeline on Ray
def _stub_plan(marker_dir: Path):
    """a -> b -> c and a -> d; b is resumable and its worker is killed once after its first part file."""
    import json

    from aligned_probing.pipeline.runner import Stage

    def make(key: str, deps: tuple[str, ...], resumable: bool = False):
        def func(ctx):
            total = sum(json.loads((ctx.inputs[d] / "out.json").read_text())["value"] for d in deps)
            parts = ctx.out_dir / "parts"
            parts.mkdir(exist_ok=True)
            for i in range(3):
                part = parts / f"{i}.json"
                if resumable and part.exists():
                    continue  # resume: keep what the killed attempt committed
                if key == "b" and i == 1 and not (marker_dir / "killed").exists():
                    (marker_dir / "killed").write_text(str(os.getpid()))
                    os._exit(1)
                part.write_text(json.dumps({"i": i, "pid": os.getpid()}))
            value = total + 3 * len(key)
            (ctx.out_dir / "out.json").write_text(json.dumps({"value": value}))
            return {"value": value}

        return Stage(key, key, {"n": 3}, deps, func, resumable=resumable)

    return [make("a", ()), make("b", ("a",), resumable=True), make("c", ("b",)), make("d", ("a",))]


def _no_model(name: str):
    raise AssertionError(f"stub stages load no model, asked for {name}")


@pytest.mark.slow
def test_runner_on_ray_resumes_a_killed_stage_to_the_local_outputs(ray_cluster, tmp_path):
    from ray.exceptions import WorkerCrashedError

    from aligned_probing.pipeline.runner import _waves, execute, read_stage

    plan = _stub_plan(tmp_path)
    assert [[s.key for s in w] for w in _waves(plan)] == [["a"], ["b", "d"], ["c"]]
    (tmp_path / "killed").write_text("the local run is not killed")
    local = execute(plan, tmp_path / "local", load_model=_no_model, progress=False)
    (tmp_path / "killed").unlink()
    # Without retries the killed worker fails the run, after its sibling d has finished.
    with pytest.raises(WorkerCrashedError):
        execute(
            plan, tmp_path / "ray", load_model=_no_model, progress=False, executor=RayExecutor(max_retries=0)
        )
    b_dir = next((tmp_path / "ray" / "stages").glob("b-*"))
    assert read_stage(b_dir) is None and (b_dir / "parts" / "0.json").exists()
    assert read_stage(next((tmp_path / "ray" / "stages").glob("d-*"))) is not None
    # A re-run resumes: b picks up its part file, c runs, a and d are cached.
    records = execute(
        plan, tmp_path / "ray", load_model=_no_model, progress=False, executor=RayExecutor(max_retries=2)
    )
    assert [r.status for r in records] == ["cached", "ran", "ran", "cached"]
    assert {r.key: r.status for r in local} == {k: "ran" for k in "abcd"}
    assert [r.summary for r in records] == [r.summary for r in local]
    killed_pid = (tmp_path / "killed").read_text()
    assert (b_dir / "parts" / "0.json").read_text().endswith(f"{killed_pid}}}")  # kept, not redone
    for key in "abcd":
        ours = next((tmp_path / "ray" / "stages").glob(f"{key}-*"))
        theirs = next((tmp_path / "local" / "stages").glob(f"{key}-*"))
        assert ours.name == theirs.name  # same layout: same content hashes
        assert (ours / "out.json").read_text() == (theirs / "out.json").read_text()
    # With retries, the killed task is retried within the run, which completes in one go.
    (tmp_path / "killed").unlink()
    again = execute(
        plan, tmp_path / "retried", load_model=_no_model, progress=False, executor=RayExecutor(max_retries=2)
    )
    assert (tmp_path / "killed").exists()  # b's worker really died once
    assert [r.status for r in again] == ["ran"] * 4
    assert [r.summary for r in again] == [r.summary for r in local]


@pytest.fixture(scope="module")
def tiny_run_config(tmp_path_factory):
    """tests/data/tiny.toml with one tiny random Llama, causal stage off."""
    import shutil

    from aligned_probing.pipeline.config import RunConfig
    from tests._tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny_ray")
    shutil.copy(ROOT / "tests" / "data" / "tiny.toml", root / "tiny.toml")
    build_tiny_model(root / "tiny-a", seed=0)
    cfg = RunConfig.from_toml(root / "tiny.toml", overrides=["causal.enabled=false"])
    data = cfg.model_dump(mode="json")
    return root, {**data, "models": data["models"][:1]}


def _executor_config(root: Path, data: dict, executor: str, **runtime: Any) -> RunConfig:
    """The tiny config `data` run by `executor` in `root / executor`, with extra runtime settings."""
    output = {**data["output"], "run_dir": str(root / executor)}
    return RunConfig.from_dict(
        {**data, "output": output, "runtime": {**data["runtime"], "executor": executor, **runtime}}
    )


@pytest.mark.slow
def test_tiny_pipeline_through_ray_gives_the_local_tables(ray_cluster, tiny_run_config):
    from aligned_probing import pipeline
    from aligned_probing.pipeline.results import load_results
    from aligned_probing.pipeline.stages import read_continuations

    root, data = tiny_run_config

    def config(executor: str) -> RunConfig:
        return _executor_config(root, data, executor, probe_layer_block=2)

    runs = {}
    for executor in ("local", "ray"):
        result = pipeline.run(config(executor), stages=["probe", "behaviour"], progress=False)
        assert {r.status for r in result.records} == {"ran"}
        runs[executor] = result
    local, ray_run = (load_results(root / name) for name in ("local", "ray"))
    for table in ("prompts", "scores", "probing", "behaviour"):
        pd.testing.assert_frame_equal(
            getattr(ray_run, table), getattr(local, table), check_exact=True, obj=table
        )
    conts = [read_continuations(next((root / n / "stages").glob("generate--*"))) for n in ("local", "ray")]
    pd.testing.assert_frame_equal(conts[1], conts[0], check_exact=True)
    # Same run directory layout; probing ran as one task per block of two layers (4 residual layers).
    assert sorted(p.name for p in (root / "ray" / "stages").iterdir()) == sorted(
        p.name for p in (root / "local" / "stages").iterdir()
    )
    probe_dir = next(r.dir for r in runs["ray"].records if r.name == "probe")
    assert sorted(p.name for p in (probe_dir / "blocks").iterdir()) == [
        "layers-000-001.parquet",
        "layers-002-003.parquet",
    ]
    # A re-run through Ray is fully cached.
    assert pipeline.run(config("ray"), stages=["probe", "behaviour"], progress=False).executed == []


@pytest.mark.slow
def test_causal_blocks_through_ray_give_the_local_tables(ray_cluster, tiny_run_config):
    from aligned_probing import pipeline

    root, data = tiny_run_config

    def config(executor: str) -> RunConfig:
        # The run directories of the test above: the stages upstream of causal are cached there.
        causal = {**data, "causal": {**data["causal"], "enabled": True}}
        return _executor_config(root, causal, executor, causal_layer_block=1)

    outs = {}
    for executor in ("local", "ray"):
        result = pipeline.run(config(executor), stages=["causal"], progress=False)
        outs[executor] = next(r.dir for r in result.records if r.name == "causal")
    assert outs["ray"].name == outs["local"].name
    # Ray ran one task per intervention layer (1 and 3) plus steering; the tables are the local ones.
    assert sorted(p.name for p in (outs["ray"] / "blocks").iterdir()) == [
        "patching-layers-001-001.parquet",
        "patching-layers-003-003.parquet",
        "skipping-layers-001-001.parquet",
        "skipping-layers-003-003.parquet",
        "steering.parquet",
    ]
    for name in ("layer_skipping", "patching", "steering"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(outs["ray"] / f"{name}.parquet"),
            pd.read_parquet(outs["local"] / f"{name}.parquet"),
            check_exact=True,
            obj=name,
        )


# -------------------------------------------------------------------------------------- the CLI
@pytest.fixture
def cli_config(tmp_path) -> Path:
    path = tmp_path / "c.toml"
    # A registry model: the run checks its models before the executor (a bare unknown name fails there).
    path.write_text(
        f'name = "t"\n[[models]]\nspec = "smollm2-135m-instruct"\nname = "m"\n[output]\nrun_dir = "{tmp_path / "run"}"\n'
    )
    return path


def test_cli_executor_options_reach_the_config(cli_config, monkeypatch):
    from aligned_probing import pipeline
    from aligned_probing.cli import main

    seen = {}

    def fake_run(cfg, **kwargs):
        seen["runtime"] = cfg.runtime
        raise ValueError("stop after parsing")

    monkeypatch.setattr(pipeline, "run", fake_run)
    assert main(["probe", str(cli_config), "--executor", "ray", "--ray-address", "ray://head:10001"]) == 2
    assert seen["runtime"].executor == "ray" and seen["runtime"].ray_address == "ray://head:10001"
    assert main(["run", str(cli_config)]) == 2
    assert seen["runtime"].executor == "local" and seen["runtime"].ray_address is None


def test_cli_executor_errors(cli_config, tmp_path, monkeypatch, capsys):
    from aligned_probing.cli import main

    assert main(["run", str(cli_config), "--executor", "dask"]) == 2
    assert "runtime.executor: Input should be 'local' or 'ray'; got 'dask'" in capsys.readouterr().err
    assert main(["run", str(cli_config), "--ray-address", "auto"]) == 2
    assert 'runtime.ray_address is only used with runtime.executor = "ray"' in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    assert main(["run", str(cli_config), "--executor", "ray"]) == 2
    assert "pip install 'aligned-probing[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # failed before touching the run directory
