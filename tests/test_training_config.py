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
