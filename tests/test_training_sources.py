"""Fine-tuning inputs: prompts from the run config's sources, the probe layer (index, depth, best)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from aligned_probing.training.config import load_finetune_config
from aligned_probing.training.sources import best_probe_layer, resolve_probe_layer, split_prompts


def _rtp_jsonl(path, n):
    lines = [
        json.dumps(
            {
                "filename": f"f{i}",
                "begin": 0,
                "end": 10,
                "challenging": bool(i % 2),
                "prompt": {"text": f"Prompt number {i} says", "toxicity": (i % 10) / 10},
                "continuation": {"text": " something", "toxicity": 0.1},
            }
        )
        for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prompts_come_from_an_rtp_jsonl_file(tmp_path):
    path = _rtp_jsonl(tmp_path / "prompts.jsonl", 30)
    cfg = load_finetune_config(
        {"probes": {"layer": 1}, "data": {"prompts": str(path), "n_train": 12, "n_eval": 8}}
    )
    train, evaluation = split_prompts(cfg)
    assert len(train) == 12 and len(evaluation) == 8
    assert not set(train["prompt_id"]) & set(evaluation["prompt_id"])
    file_texts = {f"Prompt number {i} says" for i in range(30)}
    assert set(train["text"]) | set(evaluation["text"]) <= file_texts
    # Same seed, same split: the arms and a rerun see the same prompts.
    again, _ = split_prompts(cfg)
    assert list(again["prompt_id"]) == list(train["prompt_id"])


def test_too_few_prompts_names_the_counts(tmp_path):
    path = _rtp_jsonl(tmp_path / "prompts.jsonl", 10)
    cfg = load_finetune_config(
        {"probes": {"layer": 1}, "data": {"prompts": str(path), "n_train": 8, "n_eval": 4}}
    )
    with pytest.raises(ValueError, match=r"has 10 prompts, fewer than .* = 12"):
        split_prompts(cfg)


def _probing_table(peak: int, n_layers: int = 6, model: str = "m") -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for attribute, scenario, top in (
        ("toxicity", "output", peak),
        ("toxicity", "input", 1),
        ("insult", "output", 5),
    ):
        for layer in range(n_layers + 1):
            for fold in range(3):
                r = 0.8 - 0.1 * abs(layer - top) + rng.normal(0, 0.01)
                rows.append(
                    {
                        "model": model,
                        "attribute": attribute,
                        "scenario": scenario,
                        "layer": layer,
                        "n_layers": n_layers,
                        "fold": fold,
                        "pearson": r,
                    }
                )
    return pd.DataFrame(rows)


def test_best_layer_is_the_planted_peak_of_the_chosen_attribute_and_scenario():
    table = _probing_table(peak=3)
    assert best_probe_layer(table, attribute="toxicity", scenario="output", model=None, n_layers=6) == 3
    assert best_probe_layer(table, attribute="insult", scenario="output", model="m", n_layers=6) == 5
    with pytest.raises(ValueError, match=r"has 6 layers but the model to fine-tune has 18"):
        best_probe_layer(table, attribute="toxicity", scenario="output", model=None, n_layers=18)
    two = pd.concat([table, _probing_table(peak=2, model="other")])
    with pytest.raises(ValueError, match=r"set probes.probing_model"):
        best_probe_layer(two, attribute="toxicity", scenario="output", model=None, n_layers=6)
    with pytest.raises(ValueError, match=r"No probing rows.*attributes \['insult', 'toxicity'\]"):
        best_probe_layer(table, attribute="threat", scenario="output", model=None, n_layers=6)


def test_resolve_layer_index_depth_and_best(monkeypatch, tmp_path):
    def cfg(**probes):
        return load_finetune_config({"probes": probes})

    assert resolve_probe_layer(cfg(layer=9), 18, "m") == 9
    assert resolve_probe_layer(cfg(layer=0.5), 18, "m") == 9
    assert resolve_probe_layer(cfg(layer=0.5), 26, "m") == 13
    assert resolve_probe_layer(cfg(layer=1.0), 30, "m") == 30
    with pytest.raises(ValueError, match=r"probes.layer must be in \[0, 18\]"):
        resolve_probe_layer(cfg(layer=19), 18, "m")
    # "best" reads the run's probing table through load_results (a two-model run: picks model.spec's name).
    import aligned_probing.pipeline.results as results_module

    seen = {}

    def fake_load_results(run_dir):
        seen["run_dir"] = run_dir
        return SimpleNamespace(
            probing=pd.concat([_probing_table(peak=4, model="mine"), _probing_table(peak=2, model="other")])
        )

    monkeypatch.setattr(results_module, "load_results", fake_load_results)
    assert resolve_probe_layer(cfg(layer="best", probing_run=str(tmp_path)), 6, "mine") == 4
    assert str(seen["run_dir"]) == str(tmp_path)
    assert (
        resolve_probe_layer(cfg(layer="best", probing_run=str(tmp_path), probing_model="other"), 6, "x") == 2
    )
