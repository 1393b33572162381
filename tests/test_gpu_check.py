"""scripts/gpu_check.py end to end on CPU (`--device cpu --small`): every stage, every arm, both dtypes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_versions_name_every_package_and_models_have_the_stated_shape(tmp_path):
    gpu_check = _load()
    found = gpu_check.versions()
    assert set(gpu_check.VERSIONED) | {"python", "cuda", "gpu"} <= set(found)
    from transformers import AutoConfig

    path = gpu_check.build_model(tmp_path / "g", gpu_check.SMALL["gemma3-1b"], "cpu")
    config = AutoConfig.from_pretrained(path)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("gemma3_text", 6, 64)
    # The 1B shapes are what the summary says (Llama-3.2-1B and Gemma-3-1B block shapes).
    assert gpu_check.SHAPES["llama-1b"]["num_hidden_layers"] == 16
    assert gpu_check.SHAPES["gemma3-1b"]["head_dim"] == 256


def test_hash_scorer_is_deterministic_and_reports_every_attribute():
    gpu_check = _load()
    from aligned_probing.scoring import ATTRIBUTES

    scorer = gpu_check.HashScorer()
    a, b = scorer.score(["x", "y"]), scorer.score(["x", "y"])
    assert list(a.columns) == list(ATTRIBUTES) and a.equals(b)
    assert ((a >= 0) & (a <= 1)).all().all()


@pytest.mark.slow  # every stage on three tiny models in two dtypes plus four arms: ~1-2 min on a free CPU
def test_gpu_check_runs_end_to_end_on_cpu(tmp_path, capsys):
    import aligned_probing.scoring as scoring

    gpu_check = _load()
    real_get_scorer = scoring.get_scorer
    code = gpu_check.main(["--device", "cpu", "--small", "--out", str(tmp_path)])
    assert scoring.get_scorer is real_get_scorer, "main must restore the real scorers"
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert code == 0, summary["problems"]
    assert "ALL CHECKS PASSED" in printed and "versions: python=" in printed
    for dtype in ("float32", "bfloat16"):
        row = summary["dtypes"][dtype]
        assert row["gen_new_tokens_per_s"] > 0 and row["encode_tokens_per_s"] > 0 and row["finetune_s"] > 0
    assert all(0 <= e <= 0.05 for e in summary["bf16_rel_error"].values())


def test_a_failing_step_is_reported_and_the_check_goes_on(tmp_path, capsys, monkeypatch):
    """One GPU run must show every failure: a crashing step becomes a problem, the rest still runs."""
    gpu_check = _load()

    def broken_pipeline(config):
        raise RuntimeError("Expected all tensors to be on the same device, but found cuda:0 and cpu")

    rates = {"gen_new_tokens_per_s": 1.0, "encode_tokens_per_s": 2.0, "hf_hidden_states_tokens_per_s": 4.0}
    monkeypatch.setattr(gpu_check, "run_pipeline", broken_pipeline)
    monkeypatch.setattr(gpu_check, "throughput", lambda *a: rates)
    monkeypatch.setattr(gpu_check, "finetune", lambda *a: (3.0, []))
    monkeypatch.setattr(gpu_check, "bf16_agreement", lambda *a: 0.2)
    code = gpu_check.main(["--device", "cpu", "--small", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 1
    assert "[float32] pipeline raised RuntimeError: Expected all tensors" in printed
    assert "[bfloat16] pipeline raised RuntimeError" in printed
    assert "relative error 0.2000 > tol 0.05" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dtypes"]["float32"]["finetune_s"] == 3.0  # later steps still ran
    assert "Traceback" in (tmp_path / "steps.log").read_text()
