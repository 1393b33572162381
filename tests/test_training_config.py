"""Finetune configs: presets load, unknown keys list the valid ones, bad values name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from aligned_probing.training.config import ARMS, FinetuneConfig, load_finetune_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["finetune_quick.toml", "finetune_gpu.toml"])
def test_presets_load(name):
    cfg = load_finetune_config(CONFIGS / name)
    assert isinstance(cfg, FinetuneConfig) and set(cfg.training.arms) == set(ARMS)
    assert cfg.training.beta == 0.1


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError, match=r"unknown key 'training.learning_rat'.*'learning_rate'"):
        load_finetune_config({"probes": {"layer": 2}, "training": {"learning_rat": 1e-4}})


def test_bad_value_names_field():
    with pytest.raises(ValueError, match=r"generation.k"):
        load_finetune_config({"probes": {"layer": 2}, "generation": {"k": 1}})
    with pytest.raises(ValueError, match=r"training.arms.0"):
        load_finetune_config({"probes": {"layer": 2}, "training": {"arms": ["rlhf"]}})


@pytest.mark.parametrize(("layer", "kind"), [(9, int), (0.5, float), (0, int), (1.0, float)])
def test_layer_accepts_index_or_relative_depth(layer, kind):
    cfg = load_finetune_config({"probes": {"layer": layer}})
    assert isinstance(cfg.probes.layer, kind) and cfg.probes.layer == layer


@pytest.mark.parametrize(("layer", "message"), [
    (1.5, r"relative depth in \[0, 1\]"), (-1, r"int >= 0"),
    ("best", r"needs probes.probing_run"), ("middle", r"probes.layer"),
])
def test_bad_layers_are_rejected(layer, message):
    with pytest.raises(ValueError, match=message):
        load_finetune_config({"probes": {"layer": layer}})


def test_scorer_shorthand_and_options():
    assert load_finetune_config({"probes": {"layer": 2}, "scorer": "tox-block"}).scorer.name == "tox-block"
    cfg = load_finetune_config({"probes": {"layer": 2},
                                "scorer": {"name": "detoxify", "options": {"checkpoint": "/x.ckpt",
                                                                          "device": "cuda"}}})
    assert cfg.scorer.options == {"checkpoint": "/x.ckpt", "device": "cuda"}
    with pytest.raises(ValueError, match=r"scorer.name must be one of"):
        load_finetune_config({"probes": {"layer": 2}, "scorer": "perspectiv"})


def test_secret_scorer_options_are_refused_without_echoing_them():
    with pytest.raises(ValueError, match=r"must not hold credentials.*\['api_key'\]") as err:
        load_finetune_config({"probes": {"layer": 2},
                              "scorer": {"name": "perspective", "options": {"api_key": "sk-SECRET123"}}})
    assert "SECRET123" not in str(err.value)


def test_duplicate_seeds_rejected():
    with pytest.raises(ValueError, match=r"training.seeds has duplicates"):
        load_finetune_config({"probes": {"layer": 2}, "training": {"seeds": [0, 0]}})
