"""`aligned-probing finetune --progress/--no-progress` (default on, like `run`) and the bars it turns on."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from aligned_probing import cli
from aligned_probing.cli import main
from aligned_probing.training.config import load_finetune_config


@pytest.fixture
def calls(monkeypatch):
    seen: list[dict] = []

    def fake_run_finetune(cfg, *, progress=False):
        seen.append({"cfg": cfg, "progress": progress})
        return pd.DataFrame({"arm": ["probe_dpo"], "value": [0.9]})

    monkeypatch.setattr("aligned_probing.training.run_finetune", fake_run_finetune)
    return seen


@pytest.mark.parametrize(
    ("flags", "expected"), [([], True), (["--progress"], True), (["--no-progress"], False)]
)
def test_progress_flag_reaches_run_finetune(calls, tmp_path, flags, expected):
    config = tmp_path / "ft.toml"
    config.write_text("[probes]\nlayer = 1\n")
    assert main(["finetune", str(config), *flags]) == 0
    assert [c["progress"] for c in calls] == [expected]


def test_help_names_the_progress_flags_and_the_quick_config():
    from typer.testing import CliRunner

    output = " ".join(CliRunner().invoke(cli.app, ["finetune", "--help"]).output.split())
    assert "--progress" in output and "--no-progress" in output
    assert "configs/finetune_quick.toml" in output
    assert (Path(__file__).resolve().parents[1] / "configs" / "finetune_quick.toml").exists()


def test_trainer_bar_only_with_progress(tmp_path):
    """The HF Trainer's own step bar is on exactly when progress is."""
    from aligned_probing.training.run import training_arguments

    cfg = load_finetune_config({"probes": {"layer": 1}})
    assert training_arguments(cfg, tmp_path, 0, progress=True)["disable_tqdm"] is False
    assert training_arguments(cfg, tmp_path, 0, progress=False)["disable_tqdm"] is True
    assert training_arguments(cfg, tmp_path, 0)["disable_tqdm"] is True  # the library default is quiet


def test_activation_and_perplexity_bars_count_batches(tiny_llama_dir, capsys):
    from aligned_probing.training.activations import pooled_response_activations
    from aligned_probing.training.finetuned import load_trainable
    from aligned_probing.training.retention import perplexity

    model, tok = load_trainable(tiny_llama_dir)
    capsys.readouterr()  # building the tiny model shows its own bars
    prompts, responses = [[12, 13]] * 5, [[40, 41]] * 5
    quiet = pooled_response_activations(model, prompts, responses, 1, pad_token_id=0, batch_size=2)
    assert capsys.readouterr().err == ""
    shown = pooled_response_activations(model, prompts, responses, 1, pad_token_id=0, batch_size=2,
                                        progress=True)
    err = capsys.readouterr().err
    assert "activations" in err and "3/3" in err  # 5 sequences in batches of 2
    assert torch.equal(torch.from_numpy(quiet), torch.from_numpy(shown))  # the bar changes nothing
    texts = ["The quick brown fox jumps.", "What a lovely day."] * 3
    shown_ppl = perplexity(model, tok, texts, batch_size=4, progress=True)
    assert shown_ppl == perplexity(model, tok, texts, batch_size=4)
    err = capsys.readouterr().err
    assert "perplexity" in err and "2/2" in err


def test_uncached_hub_name_is_one_actionable_line_and_exit_code_3(tmp_path, monkeypatch, capsys):
    import pandas as pd

    from aligned_probing.training import run as run_module

    class _Scorer:
        def score(self, texts):
            return pd.DataFrame({"toxicity": [0.5] * len(texts)})

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(run_module, "get_training_scorer", lambda scorer: _Scorer())
    config = tmp_path / "ft.toml"
    config.write_text(f'output_dir = "{tmp_path / "out"}"\n[model]\nspec = "some-org/not-cached"\n'
                      "[probes]\nlayer = 1\n")
    assert main(["finetune", str(config), "--no-progress"]) == 3
    err = " ".join(capsys.readouterr().err.split())
    assert "'some-org/not-cached'" in err and "not in the local Hugging Face cache" in err
    assert "hf download some-org/not-cached" in err and "Pass a local path instead" in err
    assert not (tmp_path / "out").exists()
