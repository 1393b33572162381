from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from aligned_probing.pipeline.config import ConfigError, RunConfig, config_reference

ROOT = Path(__file__).resolve().parents[1]
BASE = {"models": [{"spec": "smollm2-135m-instruct"}]}


@pytest.mark.parametrize("name", ["quickstart.toml", "zoo.toml"])
def test_shipped_presets_validate(name):
    cfg = RunConfig.from_toml(ROOT / "configs" / name)
    assert cfg.model_variants()[0].spec == "smollm2-135m-instruct"


def test_zoo_has_enough_models_for_interplay():
    cfg = RunConfig.from_toml(ROOT / "configs" / "zoo.toml")
    names = [v.name for v in cfg.model_variants()]
    assert len(names) == 8 and cfg.interplay_active()
    assert "gemma-3-270m@4bit" in names and "smollm2-135m@float16" in names


def test_quickstart_is_a_single_model_without_interplay():
    cfg = RunConfig.from_toml(ROOT / "configs" / "quickstart.toml")
    assert [v.name for v in cfg.model_variants()] == ["smollm2-135m"]
    assert not cfg.interplay_active()


def test_tiny_config_resolves_relative_model_paths():
    cfg = RunConfig.from_toml(ROOT / "tests" / "data" / "tiny.toml")
    specs = [v.spec for v in cfg.model_variants()]
    assert specs == [str((ROOT / "tests" / "data" / f"tiny-{x}").resolve()) for x in "abc"]
    assert [v.name for v in cfg.model_variants()] == ["tiny-a", "tiny-b", "tiny-c"]


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(
        ConfigError,
        match=r"Unknown key 'generation\.topp'; valid keys in \[generation\]: "
        r"k, max_new_tokens, temperature, top_p, batch_size, seed, templates",
    ):
        RunConfig.from_dict({**BASE, "generation": {"topp": 0.9}})


def test_unknown_top_level_and_nested_list_keys():
    with pytest.raises(
        ConfigError, match=r"Unknown key 'models\[0\]\.variants\[0\]\.dtyp'.*dtype, quantization"
    ):
        RunConfig.from_dict({"models": [{"spec": "x", "variants": [{"dtyp": "float16"}]}]})
    with pytest.raises(ConfigError, match=r"Unknown key 'probes'; valid keys in \[top level\]:.*probing"):
        RunConfig.from_dict({**BASE, "probes": {}})


def test_bad_value_names_key_allowed_values_and_received_value():
    with pytest.raises(
        ConfigError, match=r"encoding\.poolings\[0\]: Input should be 'mean' or 'last'; got 'avg'"
    ):
        RunConfig.from_dict({**BASE, "encoding": {"poolings": ["avg"]}})
    with pytest.raises(ConfigError, match=r"generation\.k: Input should be greater than 0; got 0"):
        RunConfig.from_dict({**BASE, "generation": {"k": 0}})


def test_missing_models_is_named():
    with pytest.raises(ConfigError, match="Missing required key 'models'"):
        RunConfig.from_dict({})


@pytest.mark.parametrize(
    ("update", "pattern"),
    [
        ({"interplay": {"enabled": True}}, r"interplay\.enabled = true needs at least 3 models, got 1"),
        (
            {"data": {"n_prompts": 3}, "probing": {"n_folds": 4}},
            r"probing\.n_folds \(4\) must be <= data\.n_prompts \(3\)",
        ),
        (
            {"data": {"n_prompts": 10}, "causal": {"n_prompts": 16}},
            r"causal\.n_prompts \(16\) must be <= data\.n_prompts \(10\)",
        ),
        (
            {"causal": {"model": "nope"}},
            r"causal\.model must be one of \['smollm2-135m-instruct'\], got 'nope'",
        ),
    ],
)
def test_cross_field_checks_quote_both_values(update, pattern):
    with pytest.raises(ConfigError, match=pattern):
        RunConfig.from_dict({**BASE, **update})


def test_duplicate_model_names_are_rejected():
    with pytest.raises(ConfigError, match=r"display names must be unique, got duplicates \['m'\]"):
        RunConfig.from_dict({"models": [{"spec": "a", "name": "m"}, {"spec": "b", "name": "m"}]})


def test_variants_expand_with_suffixed_names():
    cfg = RunConfig.from_dict(
        {
            "models": [
                {
                    "spec": "gemma-3-270m",
                    "variants": [
                        {"dtype": "float16"},
                        {"quantization": "4bit"},
                        {"quantization": "int8", "name": "g8"},
                    ],
                }
            ]
        }
    )
    got = [(v.name, v.dtype, v.quantization) for v in cfg.model_variants()]
    assert got == [
        ("gemma-3-270m", "float32", None),
        ("gemma-3-270m@float16", "float16", None),
        ("gemma-3-270m@4bit", "float32", "4bit"),
        ("g8", "float32", "int8"),
    ]
    assert cfg.interplay_active()  # auto with 4 models


def test_config_is_frozen():
    cfg = RunConfig.from_dict(BASE)
    with pytest.raises(ValidationError):
        cfg.generation.k = 3  # type: ignore[misc]


def test_overrides_are_parsed_as_toml_and_validated(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[[models]]\nspec = "x"\n[generation]\nk = 5\n')
    cfg = RunConfig.from_toml(
        path, overrides=["generation.k=2", "output.run_dir=runs/o", "probing.seeds=[3, 4]"]
    )
    assert (cfg.generation.k, cfg.output.run_dir, cfg.probing.seeds) == (2, "runs/o", [3, 4])
    with pytest.raises(ConfigError, match=r"Unknown key 'generation\.kk'"):
        RunConfig.from_toml(path, overrides=["generation.kk=2"])
    with pytest.raises(ConfigError, match="must look like `section.key=value`, got 'generation.k'"):
        RunConfig.from_toml(path, overrides=["generation.k"])


def test_invalid_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[generation\nk = 1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        RunConfig.from_toml(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RunConfig.from_toml(tmp_path / "nope.toml")


def test_docs_config_reference_matches_the_field_descriptions():
    docs = (ROOT / "docs" / "config.md").read_text()
    assert config_reference() in docs, (
        "docs/config.md is stale: regenerate it with `aligned-probing config-docs`"
    )


def test_reference_lists_every_field_of_every_section():
    ref = config_reference()
    for key in ("`n_prompts`", "`steering_alphas`", "`figure_formats`", "`variants`", "`mdl`", "`metric`"):
        assert key in ref


def test_run_dir_url_takes_storage_options_but_never_credentials():
    ok = RunConfig.from_dict(
        {**BASE, "output": {"run_dir": "s3://b/runs/x", "storage_options": {"endpoint_url": "http://h:9000"}}}
    )
    assert ok.output.storage_options == {"endpoint_url": "http://h:9000"}
    secrets = {"endpoint_url": "http://h", "secret": "hunter2", "client_kwargs": {"aws_access_key_id": "AK7"}}
    with pytest.raises(
        ConfigError,
        match=r"must not hold credentials, got the key\(s\) \['secret', 'client_kwargs.aws_access_key_id'\]; "
        r"set them in the environment",
    ) as err:
        RunConfig.from_dict({**BASE, "output": {"run_dir": "s3://b/x", "storage_options": secrets}})
    # The message names the keys only: it may end up in a log.
    assert "hunter2" not in str(err.value) and "AK7" not in str(err.value)


def test_causal_layer_block_is_a_positive_int_or_none():
    assert RunConfig.from_dict(BASE).runtime.causal_layer_block is None
    assert RunConfig.from_dict({**BASE, "runtime": {"causal_layer_block": 2}}).runtime.causal_layer_block == 2
    with pytest.raises(ConfigError, match=r"runtime.causal_layer_block: Input should be greater than 0"):
        RunConfig.from_dict({**BASE, "runtime": {"causal_layer_block": 0}})


# ---------------------------------------------------------------------- issue 17
@pytest.mark.parametrize("off", ["false", '"none"', '"None"'])
def test_stratification_can_be_turned_off_from_toml(tmp_path, off):
    path = tmp_path / "c.toml"
    path.write_text(f'[[models]]\nspec = "m"\n[data]\nstratify_by = {off}\n')
    assert RunConfig.from_toml(path).data.stratify_by is None
    assert RunConfig.from_toml(path, overrides=['data.stratify_by="prompt_insult"']).data.stratify_by == (
        "prompt_insult"
    )


def test_relative_prompt_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "p.txt").write_text("a\nb\n")
    path = tmp_path / "cfg" / "c.toml"
    path.write_text('[[models]]\nspec = "m"\n[data]\nprompt_set = "p.txt"\n')
    monkeypatch.chdir(tmp_path)
    assert RunConfig.from_toml(path).data.prompt_set == str(tmp_path / "cfg" / "p.txt")
    path.write_text('[[models]]\nspec = "m"\n[data]\nprompt_set = "./missing.jsonl"\n')
    assert RunConfig.from_toml(path).data.prompt_set == str(tmp_path / "cfg" / "missing.jsonl")
    for kept in ("rtp-challenging", "allenai/real-toxicity-prompts"):  # names, not paths
        path.write_text(f'[[models]]\nspec = "m"\n[data]\nprompt_set = "{kept}"\n')
        assert RunConfig.from_toml(path).data.prompt_set == kept


@pytest.mark.parametrize("option", ["api_key", "token", "client_secret"])
def test_credentials_in_scoring_options_are_refused_without_echoing_them(option):
    data = {"models": [{"spec": "m"}], "scoring": {"scorer": "perspective", "options": {option: "s3cr3t-value"}}}
    with pytest.raises(ConfigError, match=rf"scoring.options must not hold credentials.*'{option}'") as info:
        RunConfig.from_dict(data)
    assert "s3cr3t-value" not in str(info.value)


def test_the_effective_config_round_trips_through_toml(tmp_path):
    import tomllib

    from aligned_probing.pipeline.config import config_to_toml

    cfg = RunConfig.from_toml(
        ROOT / "tests" / "data" / "tiny.toml",
        overrides=["probing.seeds=[1]", "data.stratify_by=false", "runtime.resources.generate={num_gpus=1}",
                   'description="quote \\" and \\\\ backslash"', 'models=[{spec="m", variants=[{dtype="float16"}]}]'],
    )
    text = config_to_toml(cfg, comment="line one\nline two")
    assert text.startswith("# line one\n# line two\n")
    assert RunConfig.from_dict(tomllib.loads(text)) == cfg
def test_threads_default_to_every_available_core_and_can_be_pinned(monkeypatch):
    import torch

    from aligned_probing.pipeline import plan

    before = torch.get_num_threads()
    monkeypatch.setattr(plan.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    try:
        assert RunConfig.from_dict(BASE).runtime.threads is None
        assert plan._set_threads(None) == before and torch.get_num_threads() == 3  # default: all cores
        assert plan._set_threads(1) == 3 and torch.get_num_threads() == 1  # pinned
    finally:
        torch.set_num_threads(before)
