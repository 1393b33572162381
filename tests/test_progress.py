"""Progress bars of the long stages (probing, causal) and the CLI around them (issue 19).

One tiny model runs through the causal stage (and everything it needs) once with `progress=False`;
its probe and causal stages are then re-run in a copy with `progress=True`, so both runs compare:
the bars are on stderr with their totals, the tables are identical, and without progress no bar is
shown. The same run directory serves the `report --out` test.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from aligned_probing import cli, pipeline
from aligned_probing.cli import main
from aligned_probing.pipeline.config import RunConfig
from tests._tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
TABLES = {
    "score": ["scores.parquet"],
    "probe": ["probing.parquet"],
    "causal": ["layer_skipping.parquet", "patching.parquet", "steering.parquet"],
}


def _config(root: Path, run_dir: Path) -> RunConfig:
    """tests/data/tiny.toml with one model and the causal stage on (intervention layers 1 and 3)."""
    cfg = RunConfig.from_toml(root / "tiny.toml", overrides=[f'output.run_dir="{run_dir}"'])
    data = cfg.model_dump(mode="json")
    return RunConfig.from_dict(
        {**data, "models": data["models"][:1], "causal": {**data["causal"], "enabled": True}}
    )


def _stage_dir(run_dir: Path, name: str) -> Path:
    [found] = (run_dir / "stages").glob(f"{name}--*")
    return found


def _bar_totals(err: str, desc: str) -> list[int]:
    """The totals of the bars labelled `desc` in captured stderr, one per bar, each checked to end at n/n.

    tqdm draws `desc:   0%|...| 0/n` when a bar starts and `desc: 100%|...| n/n` when it ends (maybe twice).
    """
    label = rf"(?:^|[\r\n]){re.escape(desc)}: +"
    started = [int(n) for n in re.findall(label + r"0%\|[^|]*\| 0/(\d+)", err)]
    ended = {(int(a), int(b)) for a, b in re.findall(label + r"100%\|[^|]*\| (\d+)/(\d+)", err)}
    assert ended == {(n, n) for n in started}, (desc, started, ended)
    return started


def _labels(err: str) -> set[str]:
    """The labels of every tqdm bar drawn in captured stderr (`label: nn%|`)."""
    return set(re.findall(r"(?:^|[\r\n])([^\r\n:|]+?): +\d+%\|", err))


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory):
    """One tiny model through the causal stage with progress off; returns (config dir, run dir, stderr)."""
    root = tmp_path_factory.mktemp("progress_cfg")
    shutil.copy(ROOT / "tests" / "data" / "tiny.toml", root / "tiny.toml")
    build_tiny_model(root / "tiny-a", seed=0)
    run_dir = root / "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        pipeline.run(_config(root, run_dir), stages=["causal"], progress=False)
    return root, run_dir, err.getvalue()


def test_probe_and_causal_stages_show_bars_with_their_totals(quiet_run, tmp_path, capsys):
    from aligned_probing.encoding.store import ActivationStore
    from aligned_probing.probing.scenarios import build_designs, check_targets, infer_attributes

    root, quiet_dir, quiet_err = quiet_run
    ours = ("stages", "generate", "encode tiny-a", "probe", "probe final fits", "causal", "causal skipping")
    ours += ("causal patching", "causal steering", "score continuations")
    assert not _labels(quiet_err) & set(ours), (
        quiet_err
    )  # progress off: none (transformers' loading bar is not ours)
    run_dir = tmp_path / "run"
    shutil.copytree(quiet_dir, run_dir)
    for name in TABLES:  # re-run the score, probe and causal stages, reusing the generations and the store
        shutil.rmtree(_stage_dir(run_dir, name))
    cfg = _config(root, run_dir)
    capsys.readouterr()
    result = pipeline.run(cfg, stages=["causal"], progress=True)
    err = capsys.readouterr().err
    assert set(ours) - {"encode tiny-a"} <= _labels(err)  # encode is cached; the rest are drawn
    assert sorted(result.executed) == ["causal/tiny-a", "probe/tiny-a/t0", "score/tiny-a/t0"]
    n_continuations = len(pd.read_parquet(_stage_dir(run_dir, "score") / "scores.parquet"))
    assert _bar_totals(err, "score continuations") == [n_continuations] and n_continuations == 24 * 2

    # probing: one step per (position design, layer), every layer of the tiny model (3 blocks: 0..3)
    store = ActivationStore.open(_stage_dir(run_dir, "encode") / "store")
    targets = pd.read_parquet(_stage_dir(run_dir, "probe") / "targets.parquet")
    attributes = infer_attributes(targets)
    scenarios = cfg.probing.scenarios
    designs = build_designs(
        store.index, check_targets(targets, scenarios, attributes), scenarios=scenarios, attributes=attributes
    )
    assert store.n_layers == 3 and len(designs) >= 1
    assert _bar_totals(err, "probe") == [len(designs) * 4]
    assert _bar_totals(err, "probe final fits") == [len(designs) * 4]

    # causal: the setup task, one block task (layers 1 and 3), the steering task
    assert _bar_totals(err, "causal") == [3]
    assert _bar_totals(err, "causal skipping") == [2]  # one skipped block per layer >= 1
    assert _bar_totals(err, "causal steering") == [len(cfg.causal.steering_alphas) * 2]  # probe and random
    patching = pd.read_parquet(_stage_dir(run_dir, "causal") / "patching.parquet")
    generated = patching[patching["measure"] != "readout"][["direction", "layer"]].drop_duplicates()
    assert _bar_totals(err, "causal patching") == [len(generated)] and len(generated) >= 2
    assert _bar_totals(err, "generate")  # the shared baseline and the pairs' clean runs, per batch

    # the bars change no number
    for name, files in TABLES.items():
        for file in files:
            pd.testing.assert_frame_equal(
                pd.read_parquet(_stage_dir(run_dir, name) / file),
                pd.read_parquet(_stage_dir(quiet_dir, name) / file),
            )


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")
    }


@pytest.mark.parametrize("out", ["elsewhere/my-report.html", "elsewhere"])
def test_report_out_writes_html_and_figures_there_and_leaves_the_run_alone(quiet_run, tmp_path, capsys, out):
    _, run_dir, _ = quiet_run
    before = _snapshot(run_dir)
    assert main(["report", str(run_dir), "--out", str(tmp_path / out)]) == 0
    html = tmp_path / out if out.endswith(".html") else tmp_path / out / "report.html"
    assert f"report: {html}" in capsys.readouterr().out
    assert 'id="fig-skipping"' in html.read_text()
    assert (html.parent / "figures" / "skipping.svg").is_file()
    assert (html.parent / "figures" / "information.png").is_file()
    assert _snapshot(run_dir) == before  # nothing new, nothing rewritten


@pytest.mark.parametrize("columns", ["40", "60", "80"])
@pytest.mark.parametrize("command", ["run", "probe", "causal"])
def test_the_ray_install_hint_is_intact_at_any_terminal_width(command, columns):
    output = CliRunner().invoke(cli.app, [command, "--help"], env={"COLUMNS": columns}).output
    assert "pip install 'aligned-probing[ray]'" in " ".join(output.split()), output


class _RecordingExecutor:
    """A non-local executor: records every `map` call (a cluster gets all tasks at once)."""

    name = "fake"

    def __init__(self) -> None:
        self.calls: list[tuple[list, object]] = []

    def map(self, fn, tasks, *, resources=None):
        self.calls.append((list(tasks), resources))
        return [fn(t) for t in tasks]


@pytest.mark.parametrize("local", [True, False])
def test_causal_tasks_advance_the_stage_bar_without_changing_dispatch(local, capsys):
    from types import SimpleNamespace

    from aligned_probing.causal.stage import _map_tasks, _task_bar
    from aligned_probing.pipeline.executors import LocalExecutor, Resources

    executor = LocalExecutor() if local else _RecordingExecutor()
    ctx = SimpleNamespace(executor=executor, progress=True)
    needs = [Resources(num_cpus=1), Resources(num_cpus=2), Resources(num_cpus=3)]
    with _task_bar(ctx, 4) as bar:
        assert _map_tasks(ctx, abs, [-1], None, bar) == [1]
        assert _map_tasks(ctx, abs, [-2, 3, -4], needs, bar) == [2, 3, 4]
        assert bar.n == 4
    assert _bar_totals(capsys.readouterr().err, "causal") == [4]
    if not local:  # one map per call, with the per-task resources as given
        assert executor.calls == [([-1], None), ([-2, 3, -4], needs)]


def test_no_progress_also_hides_the_model_loaders_bars(tmp_path, monkeypatch):
    from transformers.utils import logging as hf_logging

    from aligned_probing.pipeline import RunResult

    config = tmp_path / "c.toml"
    config.write_text(
        f'name = "t"\n[[models]]\nspec = "smollm2-135m-instruct"\n[output]\nrun_dir = "{tmp_path}"\n'
    )
    seen = {}

    def fake_run(cfg, *, progress, **kwargs):
        seen.update(progress=progress, transformers_bars=hf_logging.is_progress_bar_enabled())
        return RunResult(tmp_path, [], None)

    monkeypatch.setattr("aligned_probing.pipeline.run", fake_run)
    for flag, expected in (("--no-progress", False), ("--progress", True)):
        assert hf_logging.is_progress_bar_enabled()
        assert main(["generate", str(config), flag]) == 0
        assert seen == {
            "progress": expected,
            "transformers_bars": expected,
        }  # "Loading weights" follows the flag
    assert hf_logging.is_progress_bar_enabled()  # restored for whoever loads a model next in this process
