"""One generation-settings type with the paper's defaults: pipeline, causal runners and training share it."""

from __future__ import annotations

import pytest

from aligned_probing.causal import GenerationSettings as CausalGenerationSettings
from aligned_probing.generation_settings import GenerationSettings, SamplingSettings
from aligned_probing.pipeline.config import ConfigError, GenerationConfig, RunConfig, config_reference
from aligned_probing.training.config import GenerationSection, load_finetune_config

PAPER = {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 20, "k": 25}


def test_one_type_one_set_of_defaults():
    assert CausalGenerationSettings is GenerationSettings
    assert issubclass(GenerationConfig, SamplingSettings)
    assert issubclass(GenerationSection, GenerationSettings)
    for settings in (GenerationConfig(), GenerationSettings(), GenerationSection()):
        assert {key: getattr(settings, key) for key in PAPER} == PAPER, type(settings).__name__


def test_presets_keep_their_explicit_values():
    cfg = load_finetune_config("configs/finetune_quick.toml")
    assert (cfg.generation.k, cfg.generation.top_p, cfg.generation.max_new_tokens) == (5, 1.0, 16)
    assert RunConfig.from_toml("configs/quickstart.toml").generation.k == 3


def test_settings_are_frozen_and_closed():
    g = GenerationSettings(k=3)
    with pytest.raises(ValueError, match="frozen"):
        g.k = 4  # type: ignore[misc]
    with pytest.raises(ValueError, match="topp"):
        GenerationSettings(topp=0.5)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="generation.k"):
        load_finetune_config({"probes": {"layer": 2}, "generation": {"k": 1}})  # DPO needs two
    with pytest.raises(ConfigError, match="generation.top_p"):
        RunConfig.from_dict({"models": [{"spec": "x"}], "generation": {"top_p": 0.0}})


def test_config_docs_cover_the_finetune_config():
    ref = config_reference()
    for key in ("### finetune [training]", "`probe_lambda`", "`seeds`", "`sft_weight`"):
        assert key in ref
    assert "|  |" not in ref  # every field has a description
