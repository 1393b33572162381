from __future__ import annotations

from pathlib import Path

import pytest

from aligned_probing import cli
from aligned_probing.cli import main

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [
    "run",
    "generate",
    "score",
    "encode",
    "probe",
    "behaviour",
    "interplay",
    "causal",
    "report",
    "models",
    "doctor",
    "finetune",
    "config-docs",
]


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(
        f'name = "t"\n[[models]]\nspec = "smollm2-135m-instruct"\nname = "m"\n'
        f'[output]\nrun_dir = "{tmp_path / "run"}"\n'
    )
    return path


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_everywhere(command, capsys):
    assert main(([command] if command else []) + ["--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage" in out
    if command is None:
        for name in COMMANDS:
            assert name in out


def test_dry_run_lists_stages_and_runs_nothing(config, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        "aligned_probing.models.load_model", lambda *a, **k: pytest.fail("dry run loads no model")
    )
    assert main(["run", str(config), "--dry-run", "--set", "causal.enabled=false"]) == 0
    out = capsys.readouterr().out
    keys = [line.split()[0] for line in out.splitlines()[:-1]]
    assert keys == [
        "prompts",
        "generate/m/t0",
        "score/m/t0",
        "encode/m/t0",
        "probe/m/t0",
        "behaviour/m/t0",
        "report",
    ]
    assert "dry run: 7 of 7 stages would run" in out
    assert not (tmp_path / "run").exists()


def test_stage_command_selects_the_stage_and_its_inputs(config, capsys):
    assert main(["behaviour", str(config), "--dry-run"]) == 0
    keys = [line.split()[0] for line in capsys.readouterr().out.splitlines()[:-1]]
    assert keys == ["prompts", "generate/m/t0", "score/m/t0", "behaviour/m/t0"]


def test_config_errors_exit_2_with_the_key(config, capsys):
    assert main(["run", str(config), "--set", "generation.kk=2", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "Unknown key 'generation.kk'; valid keys in [generation]" in err


def test_missing_config_file_is_a_usage_error(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_run_dispatches_to_the_pipeline(config, monkeypatch, capsys, tmp_path):
    seen = {}

    def fake_run(cfg, *, stages, dry_run, progress, config_text, overrides):
        from aligned_probing.pipeline import RunResult

        seen.update(k=cfg.generation.k, stages=stages, progress=progress, text=config_text, sets=overrides)
        return RunResult(tmp_path, [], tmp_path / "report.html")

    monkeypatch.setattr("aligned_probing.pipeline.run", fake_run)
    assert main(["probe", str(config), "--set", "generation.k=3", "--no-progress"]) == 0
    assert seen == {
        "k": 3, "stages": ["probe"], "progress": False, "text": config.read_text(), "sets": ["generation.k=3"]
    }
    assert f"report: {tmp_path / 'report.html'}" in capsys.readouterr().out


def test_report_command_on_a_non_run_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "config.json does not exist: is" in capsys.readouterr().err


def test_models_lists_registry_and_cache(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNED_PROBING_CACHE", str(tmp_path))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "gemma-3-270m" in out and "30 layers" in out
    assert "cache: 0 entries" in out


def test_doctor_reports_every_check(monkeypatch, capsys):
    class Fake:
        n_layers, d_model = 3, 32

    monkeypatch.setattr("aligned_probing.models.load_model", lambda name: Fake())
    monkeypatch.setattr("aligned_probing.cli._generation_check", lambda name: (lambda: "fake model, not checked"))
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for module in cli.EMBEDDED_PACKAGES:
        assert f"[ ok ] wheel {module}" in out
    assert "[ ok ] model smollm2-135m-instruct: 3 layers" in out
    assert "[ ok ] embedded scorer reproduces its Keras fixture" in out
    assert "[ ok ] generation self-check (smollm2-135m-instruct)" in out
    assert f"{len(cli.EMBEDDED_PACKAGES) + 4} of {len(cli.EMBEDDED_PACKAGES) + 4} checks passed" in out


def test_doctor_fails_with_the_reason(monkeypatch, capsys):
    monkeypatch.setitem(cli.EMBEDDED_PACKAGES, "not_a_real_module_xyz", "xyz==1")
    monkeypatch.setattr("aligned_probing.scoring.verify_embedded_scorer", lambda: 0.5)
    assert main(["doctor", "--no-models"]) == 1
    out = capsys.readouterr().out
    assert (
        "[FAIL] wheel not_a_real_module_xyz: ModuleNotFoundError: not installed; "
        "run `pip install --no-deps xyz==1`"
        in out
    )
    assert (
        "[FAIL] embedded scorer reproduces its Keras fixture: ValueError: max |torch - keras| = 5.00e-01"
        in out
    )


def test_finetune_dispatches(monkeypatch, capsys, config):
    import pandas as pd

    calls = []
    monkeypatch.setattr(
        "aligned_probing.training.run_finetune",
        lambda path: calls.append(path) or pd.DataFrame({"arm": ["probe_dpo"], "value": [0.9]}),
    )
    assert main(["finetune", str(config)]) == 0
    assert calls == [config] and "probe_dpo" in capsys.readouterr().out


def test_config_docs_writes_the_reference(tmp_path):
    from aligned_probing.pipeline.config import config_reference

    assert main(["config-docs", "--out", str(tmp_path / "ref.md")]) == 0
    assert (tmp_path / "ref.md").read_text() == config_reference()


def test_console_script_is_declared():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"aligned-probing": "aligned_probing.cli:app"}
