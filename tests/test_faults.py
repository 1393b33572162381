"""Faults never end in a wrong result with exit code 0: failed stages are never cached, locks never
outlive their process, and a stage's format version is part of its key.

Kill-and-resume of real stages (generation, encoding) to bit-identical tables is tested in
tests/test_pipeline.py (`test_killed_run_resumes_to_identical_tables`); here a real SIGKILL is
used where the operating system's behaviour is what matters (the run lock).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from aligned_probing import pipeline
from aligned_probing.pipeline import runner as _runner
from aligned_probing.pipeline import stages as _stages
from aligned_probing.pipeline.config import RunConfig
from aligned_probing.pipeline.lock import LEASE_FILE, RunLockedError, run_lock
from aligned_probing.pipeline.runner import Stage, execute, read_stage
from aligned_probing.scoring.cache import ScoringFailedError

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    raise AssertionError(f"these stages load no model, asked for {name}")


# ---------------------------------------------------------------------- stage format versions (item 12)
def _chain(calls: list[str]) -> list[Stage]:
    """a -> b -> c and a -> d; each stage records that it ran."""

    def make(key: str, deps: tuple[str, ...]) -> Stage:
        def func(ctx):
            calls.append(key)
            (ctx.out_dir / "out.json").write_text(json.dumps({"key": key}))
            return {}

        return Stage(key, key, {"n": 1}, deps, func)

    return [make("a", ()), make("b", ("a",)), make("c", ("b",)), make("d", ("a",))]


def test_a_stage_version_bump_recomputes_that_stage_and_downstream_only(tmp_path, monkeypatch):
    calls: list[str] = []
    execute(_chain(calls), tmp_path, load_model=_load, progress=False)
    assert calls == ["a", "b", "c", "d"]
    monkeypatch.setitem(_runner.STAGE_VERSIONS, "b", _runner.STAGE_VERSIONS.get("b", 1) + 1)
    calls.clear()
    records = execute(_chain(calls), tmp_path, load_model=_load, progress=False)
    assert calls == ["b", "c"]
    assert {r.key: r.status for r in records} == {"a": "cached", "b": "ran", "c": "ran", "d": "cached"}


# ---------------------------------------------------------------------- scorer outage (item 3)
class _FlakyScorer:
    """A remote-like scorer: texts in `down` fail with the service's error (NaN + attrs['errors'])."""

    id = "flaky-remote/v1"
    attributes = ("toxicity", "insult")

    def __init__(self, down: set[str]):
        self.down = down
        self.seen: list[str] = []

    def score(self, texts):
        self.seen += list(texts)
        rows, errors = [], {}
        for i, text in enumerate(texts):
            if text in self.down:
                rows.append([np.nan, np.nan])
                errors[i] = "HTTP 503 Service Unavailable from commentanalyzer.googleapis.com"
            else:
                value = (len(text) % 10) / 10
                rows.append([value, value / 2])
        frame = pd.DataFrame(rows, columns=list(self.attributes))
        frame.attrs["errors"] = errors
        return frame


def _score_plan(texts: list[str]) -> list[Stage]:
    def fake_generate(ctx):
        out = ctx.out_dir / "continuations"
        out.mkdir(exist_ok=True)
        pd.DataFrame(
            {
                "model": "m",
                "prompt_id": [f"p{i // 2}" for i in range(len(texts))],
                "continuation_idx": [i % 2 for i in range(len(texts))],
                "template": 0,
                "prompt_text": "a prompt",
                "text": texts,
                "token_ids": [[1, 2]] * len(texts),
                "n_tokens": 2,
                "stopped_at_eos": False,
                "seed": 0,
                "token_logprobs": [[-1.0, -1.0]] * len(texts),
            }
        ).to_parquet(out / "part-00000.parquet", index=False)
        return {}

    gen = Stage("generate", "generate/m/t0", {"n": len(texts)}, (), fake_generate)
    from aligned_probing.pipeline.config import ScoringConfig
    from aligned_probing.pipeline.settings import ScoreSettings

    scoring = ScoringConfig.model_construct(scorer="flaky", options={}, batch_size=3)  # no registry check
    score = Stage("score", "score/m/t0", ScoreSettings.model_construct(scoring=scoring), (gen.key,),
                  _stages.score_stage)
    return [gen, score]


def test_a_scorer_outage_fails_the_score_stage_and_the_rerun_scores_only_the_failures(tmp_path, monkeypatch):
    texts = [f"continuation number {i}" for i in range(8)]
    down = {texts[1], texts[6]}
    outage = _FlakyScorer(down)
    monkeypatch.setattr(_stages, "build_scorer", lambda settings: outage)
    with pytest.raises(ScoringFailedError, match="could not score 2 of 8 continuations.*HTTP 503") as info:
        execute(_score_plan(texts), tmp_path, load_model=_load, progress=False)
    assert _runner.failed_stage(info.value) == "score/m/t0"
    score_dir = next((tmp_path / "stages").glob("score--*"))
    assert read_stage(score_dir) is None  # never recorded complete
    assert json.loads((tmp_path / "run.json").read_text())["stages"][1]["status"] == "pending"
    # The service recovers: only the two failed texts are sent again.
    recovered = _FlakyScorer(set())
    monkeypatch.setattr(_stages, "build_scorer", lambda settings: recovered)
    records = execute(_score_plan(texts), tmp_path, load_model=_load, progress=False)
    assert [r.status for r in records] == ["cached", "ran"]
    assert sorted(recovered.seen) == sorted(down)
    scores = pd.read_parquet(records[1].dir / "scores.parquet")
    expected = [(len(t) % 10) / 10 for t in texts]
    np.testing.assert_allclose(scores["toxicity"].to_numpy(), expected)


def _prompts_only_config(tmp_path: Path, *sets: str) -> RunConfig:
    return RunConfig.from_toml(
        ROOT / "tests" / "data" / "tiny.toml",
        overrides=[f'output.run_dir="{tmp_path / "run"}"', 'models=[{spec = "smollm2-135m-instruct"}]',
                   "causal.enabled=false", *sets],
    )


def test_a_scorer_outage_on_prompts_names_the_scorer_error_not_stratification(tmp_path, monkeypatch):
    from aligned_probing.data import embedded_prompts

    down = set(embedded_prompts("rtp-challenging").texts[:5])
    monkeypatch.setattr(_stages, "build_scorer", lambda settings: _FlakyScorer(down))
    cfg = _prompts_only_config(tmp_path)
    with pytest.raises(ScoringFailedError, match="could not score 5 of .* prompts .*HTTP 503") as info:
        pipeline.run(cfg, stages=["prompts"], progress=False)
    assert "stratif" not in str(info.value)
    assert read_stage(next((tmp_path / "run" / "stages").glob("prompts-*"))) is None
    recovered = _FlakyScorer(set())
    monkeypatch.setattr(_stages, "build_scorer", lambda settings: recovered)
    result = pipeline.run(cfg, stages=["prompts"], progress=False)
    assert result.executed == ["prompts"] and sorted(recovered.seen) == sorted(down)


# ---------------------------------------------------------------------- effective config (item 5)
def test_the_run_dir_and_report_show_the_effective_config_with_overrides(tmp_path, monkeypatch):
    from aligned_probing.pipeline.results import load_results

    monkeypatch.setattr(_stages, "build_scorer", lambda settings: _FlakyScorer(set()))
    sets = ["probing.seeds=[1]"]
    cfg = _prompts_only_config(tmp_path, *sets)
    source = (ROOT / "tests" / "data" / "tiny.toml").read_text()
    pipeline.run(cfg, stages=["prompts"], progress=False, config_text=source, overrides=sets)
    text = load_results(tmp_path / "run").config_text
    assert "seeds = [1]" in text and "seeds = [0]" not in text
    assert "probing.seeds=[1]" in text  # the overrides are listed at the top
    assert f'run_dir = "{tmp_path / "run"}"' in text
    assert RunConfig.from_dict(__import__("tomllib").loads(text)) == cfg
    assert (tmp_path / "run" / "config.source.toml").read_text() == source


# ---------------------------------------------------------------------- run lock (item 9)
_HOLDER = """
import sys, time
from pathlib import Path
from aligned_probing.pipeline.lock import run_lock
with run_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_run_is_told_who_holds_the_lock_and_a_sigkilled_holder_never_blocks(tmp_path):
    run_dir = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"in use by pid {child.pid} on host {socket.gethostname()}"):
            with run_lock(run_dir):
                pass
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        with run_lock(run_dir):  # the kernel released the dead run's lock: its resume proceeds
            pass
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_pipeline_run_refuses_a_locked_run_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(_stages, "build_scorer", lambda settings: pytest.fail("a locked run runs nothing"))
    cfg = _prompts_only_config(tmp_path)
    with run_lock(tmp_path / "run"):
        with pytest.raises(RunLockedError, match="in use by pid"):
            pipeline.run(cfg, stages=["prompts"], progress=False)
    assert not (tmp_path / "run" / "stages").exists()


def test_a_lease_on_object_storage_blocks_a_live_holder_and_not_a_dead_one():
    import fsspec

    run_dir = f"memory://lease-test-{os.getpid()}/run"
    location = f"{run_dir}/{LEASE_FILE}"
    fs = fsspec.filesystem("memory")
    live = {"pid": os.getpid(), "host": socket.gethostname(), "started": "t", "expires": time.time() + 60}
    fs.pipe(location.removeprefix("memory://"), json.dumps(live).encode())
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        with run_lock(run_dir):
            pass
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fs.pipe(location.removeprefix("memory://"), json.dumps({**live, "pid": dead.pid}).encode())
    with run_lock(run_dir):  # a killed run on this host: its lease is taken over
        assert json.loads(fs.cat(location.removeprefix("memory://")))["pid"] == os.getpid()
    assert not fs.exists(location.removeprefix("memory://"))  # released on exit
    expired = {**live, "host": "elsewhere", "expires": time.time() - 1}
    fs.pipe(location.removeprefix("memory://"), json.dumps(expired).encode())
    with run_lock(run_dir):
        pass


# ---------------------------------------------------------------------- non-finite logits (item 11)
def test_nan_logits_name_the_model_and_batch():
    from aligned_probing.generation import NonFiniteLogitsError, _PerRowSampler

    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    sampler = _PerRowSampler(gens, 1.0, 0.9, "model 'tiny', generation batch of 2 starting at prompt 'p0'")
    scores = torch.zeros(2, 5)
    scores[1, 3] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match=r"model 'tiny'.*batch row\(s\) \[1\].*models --verify"):
        sampler(torch.zeros(2, 1, dtype=torch.long), scores)
    masked = torch.zeros(2, 5)
    masked[:, 0] = float("-inf")  # a masked token is not an error
    assert sampler(torch.zeros(2, 1, dtype=torch.long), masked).shape == (2, 5)


def test_nan_weights_stop_generation_with_the_model_name(tiny_llama_dir):
    from aligned_probing.data import PromptSet
    from aligned_probing.generation import NonFiniteLogitsError, generate_continuations
    from aligned_probing.models import load_model

    model = load_model(tiny_llama_dir)
    with torch.no_grad():
        next(p for n, p in model.hf_model.named_parameters() if "embed" in n).fill_(float("nan"))
    prompts = PromptSet.from_texts(["hello there", "a second prompt"], source="t")
    with pytest.raises(NonFiniteLogitsError, match=rf"model {model.name!r}, generation batch"):
        generate_continuations(model, prompts, k=1, seed=0, max_new_tokens=3)


# ---------------------------------------------------------------------- a real SIGKILL during generation
_RUNNER = """
import sys
from aligned_probing import pipeline
from aligned_probing.pipeline.config import RunConfig
cfg = RunConfig.from_toml(sys.argv[1])
pipeline.run(cfg, stages=["score"], progress=False)
"""


@pytest.mark.slow
def test_a_run_sigkilled_during_generation_resumes_to_identical_tables(tmp_path):
    from tests._tiny import build_tiny_model

    build_tiny_model(tmp_path / "tiny", seed=0)

    def config(run: str) -> Path:
        path = tmp_path / f"{run}.toml"
        path.write_text(
            '[[models]]\nspec = "./tiny"\n[data]\nn_prompts = 24\n'
            "[generation]\nk = 2\nmax_new_tokens = 24\nbatch_size = 1\n"
            f'[probing]\nn_folds = 2\n[causal]\nenabled = false\n[output]\nrun_dir = "{tmp_path / run}"\n'
            "[runtime]\nthreads = 1\n"
        )
        return path

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _RUNNER, str(config("killed"))], env=env, cwd=ROOT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and child.poll() is None:
            parts = list((tmp_path / "killed" / "stages").glob("generate--*/continuations/part-*.parquet"))
            if parts:
                break
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    gen_dir = next((tmp_path / "killed" / "stages").glob("generate--*"))
    assert not (gen_dir / "stage.json").exists(), "the run finished before it was killed"
    resumed = pipeline.run(RunConfig.from_toml(config("killed")), stages=["score"], progress=False)
    assert [r.status for r in resumed.records] == ["cached", "ran", "ran"]  # the lock did not block it
    reference = pipeline.run(RunConfig.from_toml(config("reference")), stages=["score"], progress=False)
    gen = {r.name: r.dir for r in resumed.records}, {r.name: r.dir for r in reference.records}
    pd.testing.assert_frame_equal(
        _stages.read_continuations(gen[0]["generate"]), _stages.read_continuations(gen[1]["generate"]),
        check_exact=True,
    )
    pd.testing.assert_frame_equal(
        pd.read_parquet(gen[0]["score"] / "scores.parquet"), pd.read_parquet(gen[1]["score"] / "scores.parquet"),
        check_exact=True,
    )


# ---------------------------------------------------------------------- a damaged stage table (item 4)
def test_a_truncated_stage_table_is_a_data_error_naming_the_file(tmp_path):
    from aligned_probing.cli import ExitCode, classify
    from aligned_probing.data import DataError

    calls: list[str] = []
    records = execute(_chain(calls), tmp_path, load_model=_load, progress=False)
    table = records[0].dir / "table.parquet"
    _stages.write_table(pd.DataFrame({"x": np.arange(100.0)}), records[0].dir, "table.parquet")
    table.write_bytes(table.read_bytes()[:-40])
    with pytest.raises(DataError, match=rf"{table} is unreadable .* delete that directory") as info:
        _stages.read_table(records[0].dir, "table.parquet")
    assert classify(info.value)[0] == ExitCode.DATA
