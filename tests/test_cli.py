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


def test_doctor_exits_with_the_self_check_code_when_generation_fails(monkeypatch, capsys):
    from aligned_probing.generation_checks import GenerationCheckError

    class Fake:
        n_layers, d_model = 3, 32

    def salad():
        raise GenerationCheckError("cached and uncached log-probabilities differ by 7.1 nats")

    monkeypatch.setattr("aligned_probing.models.load_model", lambda name: Fake())
    monkeypatch.setattr("aligned_probing.cli._generation_check", lambda name: salad)
    assert main(["doctor"]) == cli.ExitCode.SELF_CHECK
    assert "[FAIL] generation self-check (smollm2-135m-instruct): GenerationCheckError" in capsys.readouterr().out


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


def test_finetune_dispatches(monkeypatch, capsys, tmp_path):
    import pandas as pd

    config = tmp_path / "ft.toml"
    config.write_text("[probes]\nlayer = 1\n")
    calls = []
    monkeypatch.setattr(
        "aligned_probing.training.run_finetune",
        lambda cfg, progress=True: calls.append(cfg) or pd.DataFrame({"arm": ["probe_dpo"], "value": [0.9]}),
    )
    assert main(["finetune", str(config), "--set", "training.seeds=[3]"]) == 0
    assert calls[0].probes.layer == 1 and calls[0].training.seeds == [3]  # the validated, overridden config
    assert "probe_dpo" in capsys.readouterr().out


def test_config_docs_writes_the_reference(tmp_path):
    from aligned_probing.pipeline.config import config_reference

    assert main(["config-docs", "--out", str(tmp_path / "ref.md")]) == 0
    assert (tmp_path / "ref.md").read_text() == config_reference()


def test_console_script_is_declared():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"aligned-probing": "aligned_probing.cli:app"}


# ---------------------------------------------------------------------- issue 17: validation, exit codes, messages
def test_a_rejected_secret_is_never_written(config, tmp_path, capsys):
    code = main(["run", str(config), "--set", 'scoring.options={api_key="s3cr3t-key"}'])
    captured = capsys.readouterr()
    assert code == 2 and "scoring.options must not hold credentials" in captured.err
    assert not (tmp_path / "run").exists()
    assert "s3cr3t-key" not in captured.err + captured.out


@pytest.mark.parametrize(
    ("sets", "code", "match"),
    [
        (['probing.attributes=["toxicityy"]'], 2, "probing.attributes must name attributes of scorer 'embedded'"),
        (['behaviour.attributes=["threat", "obscene"]'], 2, "got unknown ['obscene']"),
        (['models=[{spec = "smollm2-135m-instruct", name = "m", device = "cuda:97"}]'], 2, "device = 'cuda:97'"),
        (['data.prompt_set="./nope.jsonl"'], 3, "no such prompt file"),
        (['data.stratify_by="prompt_nonsense"'], 2, "data.stratify_by must be a prompt-score column"),
        (['scoring.options={batch_sise=3}'], 2, "got unknown ['batch_sise']"),
    ],
)
def test_dry_run_validates_before_the_first_stage(config, tmp_path, capsys, sets, code, match):
    args = ["run", str(config), "--dry-run"] + [x for s in sets for x in ("--set", s)]
    assert main(args) == code
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_dry_run_with_a_hub_model_offline_is_a_data_error(config, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    assert main(["run", str(config), "--dry-run", "--set", 'models=[{spec = "some-org/some-model"}]']) == 3
    err = capsys.readouterr().err
    assert "Cannot load model spec 'some-org/some-model'" in err and "HF_HUB_OFFLINE is set" in err


def test_max_new_tokens_beyond_the_context_is_caught_before_any_stage(tiny_llama_dir, tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text(
        f'[[models]]\nspec = "{tiny_llama_dir}"\nname = "tiny"\n[generation]\nmax_new_tokens = 256\n'
        f'[causal]\nenabled = false\n[output]\nrun_dir = "{tmp_path / "run"}"\n'
    )
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "generation.max_new_tokens (256) must be smaller than the context of model 'tiny' (256 tokens" in err


def test_every_error_kind_has_its_exit_code():
    from aligned_probing.generation_checks import GenerationCheckError
    from aligned_probing.models.hub import HubUnavailableError
    from aligned_probing.pipeline.lock import RunLockedError
    from aligned_probing.scoring.cache import ScoringFailedError

    def in_stage(err):
        err.stage_key = "score/m/t0"
        return err

    cases = [
        (FileNotFoundError("No such prompt file: x.jsonl"), cli.ExitCode.DATA),
        (HubUnavailableError("hub down"), cli.ExitCode.DATA),
        (in_stage(OSError(28, "No space left on device")), cli.ExitCode.STAGE),
        (in_stage(ScoringFailedError("scorer down")), cli.ExitCode.STAGE),
        (in_stage(GenerationCheckError("token salad")), cli.ExitCode.SELF_CHECK),
        (RunLockedError("in use by pid 1"), cli.ExitCode.LOCKED),
        (IndexError("list index out of range"), cli.ExitCode.INTERNAL),
        (OSError(28, "No space left on device"), cli.ExitCode.STAGE),
    ]
    for err, expected in cases:
        code, message = cli.classify(err)
        assert code == expected, (err, code)
        assert "\n" not in message
    assert len({int(c) for c in cli.ExitCode}) == len(cli.ExitCode) == 7
    assert "free disk space" in cli.classify(cases[2][0])[1] and "stage score/m/t0 failed" in cli.classify(cases[2][0])[1]
    docs = (ROOT / "docs" / "cli.md").read_text()
    for c in cli.ExitCode:
        assert f"| {int(c)} |" in docs


@pytest.mark.parametrize("verbose", [False, True])
def test_a_failed_stage_prints_one_line_and_the_traceback_only_when_verbose(config, capsys, monkeypatch, verbose):
    from aligned_probing.pipeline import stages

    def broken(settings):
        raise IndexError("list index out of range")

    monkeypatch.setattr(stages, "build_scorer", broken)
    args = ["generate", str(config), "--no-progress"] + (["--verbose"] if verbose else [])
    assert main(args) == cli.ExitCode.STAGE
    err = capsys.readouterr().err
    assert "error: stage prompts failed: IndexError: list index out of range" in err
    assert ("Traceback" in err) == verbose
    log = (Path(str(config).replace("c.toml", "run")) / "logs" / "run.log").read_text()
    assert "Traceback" in log  # the run log always has it


def test_models_verify_rehashes_the_cache(capsys, monkeypatch, tmp_path):
    import os

    from aligned_probing.models import cache as _model_cache

    monkeypatch.setenv("ALIGNED_PROBING_CACHE", str(tmp_path))
    path = _model_cache.get_or_build("entry", lambda out: (out / "w.safetensors").write_bytes(bytes(2 << 20)))
    weights = path / "w.safetensors"
    stat = weights.stat()
    with weights.open("r+b") as fh:
        fh.write(os.urandom(1 << 20))  # 1 MiB overwritten in place
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the mtime kept
    assert main(["models"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if str(path) in x)
    assert " ok " in line  # size and mtime unchanged: the quick check cannot see it
    assert main(["models", "--verify"]) == cli.ExitCode.DATA
    captured = capsys.readouterr()
    assert "INVALID" in captured.out and "corrupt" in captured.err


def test_ctrl_c_exits_130_and_says_how_to_resume(config, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("aligned_probing.pipeline.run", interrupted)
    assert main(["run", str(config)]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err


def test_finetune_takes_overrides_and_a_dry_run(capsys, tmp_path):
    config = Path(__file__).resolve().parents[1] / "configs" / "finetune_quick.toml"
    code = main(["finetune", str(config), "--set", "training.seeds=[0,1]", "--set", f'output_dir="{tmp_path}/o"',
                 "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and "with seeds [0, 1]" in out and "trainings, plus the base model" in out
    assert not (tmp_path / "o").exists()  # a dry run writes nothing
    assert main(["finetune", str(config), "--set", "training.nope=1", "--dry-run"]) == 2
    assert "unknown key 'training.nope'" in capsys.readouterr().err


def test_help_texts_keep_bracketed_extras_and_name_the_right_config():
    from typer.testing import CliRunner

    runner = CliRunner()
    assert "aligned-probing[ray]" in " ".join(runner.invoke(cli.app, ["run", "--help"]).output.split())
    assert "finetune_quick.toml" in runner.invoke(cli.app, ["finetune", "--help"]).output
