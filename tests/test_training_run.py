"""End-to-end `run_finetune` on the tiny model with a fake scorer: every arm trains, saves and is measured."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest

from aligned_probing.models import load_model
from aligned_probing.training import run as run_module
from aligned_probing.training.probes import ProbeSet


class _HashScorer:
    """Deterministic fake scorer: toxicity from a hash of the text (both classes appear)."""

    def score(self, texts):
        values = [hashlib.sha256(t.encode()).digest()[0] / 255 for t in texts]
        return pd.DataFrame({"toxicity": values})


def _rtp_jsonl(path, n=40):
    from aligned_probing.data import embedded_prompts

    texts = embedded_prompts("rtp-challenging").df["text"].head(n)
    path.write_text("".join(json.dumps({"challenging": True, "prompt": {"text": t, "toxicity": None}}) + "\n"
                            for t in texts))
    return path


@pytest.fixture
def tiny_config(tiny_llama_dir, tmp_path):
    # A local Hugging Face directory (the tiny random model) and an RTP jsonl file as the prompts.
    return {
        "output_dir": str(tmp_path / "run"),
        "model": {"spec": str(tiny_llama_dir)},
        "data": {"prompts": str(_rtp_jsonl(tmp_path / "prompts.jsonl")), "n_train": 12, "n_eval": 8,
                 "seed": 0},
        "generation": {"k": 3, "max_new_tokens": 4, "batch_size": 36},
        "probes": {"layer": 2, "n_ensemble": 2, "n_heldout": 2},
        # probe_dpo_ensemble differs from probe_dpo only in its ranker; three arms keep this short.
        "training": {"arms": ["probe_dpo", "classifier_dpo", "probe_sft"], "max_steps": 1,
                     "per_device_batch_size": 4, "gradient_accumulation_steps": 1,
                     "max_length": 48, "checkpoint_every": 1, "learning_rate": 1e-3, "seeds": [0, 1]},
        "evaluation": {"n_benign": 4, "ppl_max_length": 32, "n_boot": 20},
    }


@pytest.mark.slow  # end to end: four generations, three trainings, ~1-2 min on a free CPU
def test_run_finetune_all_arms(tiny_config, monkeypatch, capsys):
    monkeypatch.setattr(run_module, "get_training_scorer", lambda scorer: _HashScorer())
    capsys.readouterr()
    results = run_module.run_finetune(tiny_config, progress=True)
    # Bars with totals: the base model and 3 arms x 2 seeds; generation; each arm's optimizer step.
    err = capsys.readouterr().err
    assert "finetune" in err and "7/7" in err and "generate" in err and "perplexity" in err
    assert "1/1" in err  # a Trainer's bar over max_steps = 1
    out = run_module.Path(tiny_config["output_dir"])
    assert set(results["arm"]) == {"base", "probe_dpo", "classifier_dpo", "probe_sft"}
    assert set(results.loc[results["arm"] != "base", "seed"]) == {0, 1}
    expected_metrics = {"auroc_frozen", "auroc_ensemble", "auroc_heldout", "auroc_retrained", "emt",
                        "toxic_rate", "mean_toxicity", "perplexity", "n_toxic_test"}
    assert all(set(g["metric"]) == expected_metrics for _, g in results.groupby(["arm", "seed"]))
    # Every AUROC has a prompt-bootstrap CI around it.
    aurocs = results[results["metric"].str.startswith("auroc_")].dropna(subset=["value"])
    inside = (aurocs["ci_low"] <= aurocs["value"]) & (aurocs["value"] <= aurocs["ci_high"])
    assert len(aurocs) and inside.all()
    # On the base model the retrained probe is fitted on the frozen probe's own rows: same scores.
    base = results[results["arm"] == "base"].set_index("metric")["value"]
    assert base["auroc_retrained"] == pytest.approx(base["auroc_frozen"], abs=1e-6)
    # Paired comparisons: every two arms and each arm vs base, per probe kind.
    comparisons = pd.read_parquet(out / "comparisons.parquet")
    compared = set(zip(comparisons["arm_a"], comparisons["arm_b"], strict=True))
    assert {("probe_dpo", "classifier_dpo"), ("probe_dpo", "base")} <= compared
    assert set(comparisons["n_seeds"]) == {2}
    assert {"emt", "auroc_frozen", "auroc_retrained"} <= set(comparisons["metric"])
    # The paired EMT difference equals the difference of the mean-over-seeds EMTs in the results.
    emt = results[results["metric"] == "emt"].groupby("arm")["value"].mean()
    row = comparisons[(comparisons["arm_a"] == "probe_dpo") & (comparisons["arm_b"] == "base")
                      & (comparisons["metric"] == "emt")].iloc[0]
    assert row["difference"] == pytest.approx(emt["probe_dpo"] - emt["base"], abs=1e-9)
    # The prompts came from the jsonl file.
    records = pd.read_json(tiny_config["data"]["prompts"], lines=True)["prompt"]
    file_texts = set(records.map(lambda p: p["text"]))
    assert set(pd.read_parquet(out / "base" / "eval_samples.parquet")["prompt_text"]) <= file_texts
    ppl = results[results["metric"] == "perplexity"]["value"]
    assert (ppl > 1).all() and np.isfinite(ppl).all()
    wide = pd.read_csv(out / "results_wide.csv")
    assert list(wide["arm"]) == ["probe_dpo", "classifier_dpo", "probe_sft"]

    # Held-out probes were fitted on other prompts than the training probe, with other seeds.
    train = ProbeSet.load(out / "base" / "probes" / "train",
                          expect={"layer": 2, "hook_name": "blocks.1.hook_resid_post"})
    heldout = ProbeSet.load(out / "base" / "probes" / "heldout")
    assert train.meta["fingerprint"] != heldout.meta["fingerprint"]
    assert not set(train.meta["seeds"]) & set(heldout.meta["seeds"])

    # The classifier baseline ranked by the scorer; probe-DPO by the probe.
    assert (pd.read_parquet(out / "classifier_dpo" / "pairs.parquet")["ranking"] == "toxicity").all()
    assert (pd.read_parquet(out / "probe_dpo" / "pairs.parquet")["ranking"] == "probe_score").all()
    # DPO pairs carry exactly the generated ids (and prompt ids) of the chosen and rejected rows.
    samples = pd.read_parquet(out / "base" / "train_samples.parquet")
    samples = samples.set_index(["prompt_id", "continuation_idx"])
    for pair in pd.read_parquet(out / "classifier_dpo" / "pairs.parquet").itertuples():
        for side in ("chosen", "rejected"):
            row = samples.loc[(pair.prompt_id, getattr(pair, f"{side}_idx"))]
            assert list(getattr(pair, f"{side}_token_ids")) == list(row["token_ids"])
            assert getattr(pair, f"{side}_stopped_at_eos") == row["stopped_at_eos"]
        assert list(pair.prompt_token_ids) == list(row["prompt_token_ids"])
    # Fine-tuned models and intermediate adapters, loadable, never pickled.
    for arm in ("probe_dpo", "probe_sft"):
        for seed in (0, 1):
            checkpoint = out / arm / f"seed{seed}" / "checkpoints" / "checkpoint-1"
            assert (checkpoint / "adapter_model.safetensors").exists()
        assert load_model(out / arm / "seed1" / "merged").n_layers == 3
    assert not [p for p in out.rglob("*") if p.suffix in {".bin", ".pt", ".pkl"}]
    # A notebook reloads this finished run instead of re-training.
    reloaded = run_module.completed_results(tiny_config)
    assert reloaded is not None and len(reloaded) == len(results)


def test_rejected_configs_write_nothing(tiny_config, tmp_path, monkeypatch):
    """Every check runs before `output_dir` is created: a refused secret is never saved."""
    out = run_module.Path(tiny_config["output_dir"])
    bad_option = {**tiny_config, "scorer": {"name": "tox-block", "options": {"not_an_option": 1}}}
    with pytest.raises(ValueError, match=r"takes the options .* got unknown \['not_an_option'\]"):
        run_module.run_finetune(bad_option)
    secret = {**tiny_config, "scorer": {"name": "perspective", "options": {"api_key": "sk-123"}}}
    with pytest.raises(ValueError, match="must not hold credentials"):
        run_module.run_finetune(secret)
    monkeypatch.setattr(run_module, "get_training_scorer", lambda scorer: _HashScorer())
    too_deep = {**tiny_config, "probes": {"layer": 7}}
    with pytest.raises(ValueError, match=r"probes.layer must be in \[0, 3\]"):
        run_module.run_finetune(too_deep)
    missing = {**tiny_config, "data": {**tiny_config["data"], "prompts": str(tmp_path / "nope.jsonl")}}
    with pytest.raises(FileNotFoundError):
        run_module.run_finetune(missing)
    assert not out.exists()


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline", "unreachable"])
def test_uncached_hub_name_fails_at_once_and_writes_nothing(tiny_config, monkeypatch, tmp_path, env):
    """A hub name absent from the cache, with no hub: one actionable error before anything is written."""
    import time

    from aligned_probing.models.hub import HubUnavailableError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(run_module, "get_training_scorer", lambda scorer: _HashScorer())
    cfg = {**tiny_config, "model": {"spec": "some-org/not-cached-model"}}
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError) as info:
        run_module.run_finetune(cfg)
    assert time.perf_counter() - start < 20, "it must not retry the hub for minutes"
    message = " ".join(str(info.value).split())
    assert "'some-org/not-cached-model'" in message  # names the model
    assert "not in the local Hugging Face cache" in message  # says why
    assert "hf download some-org/not-cached-model" in message  # and both fixes
    assert "Pass a local path instead (a Hugging Face directory with config.json" in message
    assert ("HF_HUB_OFFLINE is set" if "HF_HUB_OFFLINE" in env else "unreachable") in message
    out = run_module.Path(tiny_config["output_dir"])
    assert not out.exists() and not (out / "config.json").exists()


def test_cached_hub_name_is_trained_from_the_cache_offline(tiny_llama_dir, tmp_path, monkeypatch):
    """A hub name in the local cache: load_model and the trainer both read it there, with the hub off."""
    import shutil
    import time

    from aligned_probing.training.finetuned import load_trainable

    hub = tmp_path / "hub"
    repo = hub / "models--someorg--tiny-llama"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    # An unreachable hub: any request (e.g. for a PEFT adapter_config.json) would retry for ~23 s.
    monkeypatch.setattr("huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE",
                        "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    cfg = run_module.load_finetune_config({"model": {"spec": "someorg/tiny-llama"}, "probes": {"layer": 1}})
    start = time.perf_counter()
    base = load_model(cfg.model.spec)
    source = run_module._trainable_source(base, cfg, tmp_path / "run")
    assert str(source) == "someorg/tiny-llama" and run_module._hub_offline()
    model, _ = load_trainable(source, local_files_only=True)
    assert model.config.num_hidden_layers == 3
    assert time.perf_counter() - start < 15, "a cached model must load without asking the hub"
    assert not (tmp_path / "run").exists()


def test_load_trainable_reads_hub_names_from_the_cache_only_when_asked():
    """Offline, a hub name is read from the local cache without any request (fails at once if absent)."""
    import time

    from aligned_probing.training.finetuned import load_trainable

    start = time.perf_counter()
    with pytest.raises(OSError, match="cached files"):
        load_trainable("some-org/not-cached-model", local_files_only=True)
    assert time.perf_counter() - start < 10


def test_completed_results_reuses_only_runs_of_this_config_and_code_version(tmp_path):
    """A finished run is reused only for the same config and FINETUNE_VERSION (older DPO runs recompute)."""
    cfg = run_module.load_finetune_config({"output_dir": str(tmp_path / "run"), "probes": {"layer": 1}})
    out = tmp_path / "run"
    out.mkdir()
    results = pd.DataFrame({"arm": ["base"], "seed": [-1], "metric": ["emt"], "value": [0.5]})
    results.to_parquet(out / "results.parquet", index=False)
    (out / "results_wide.csv").write_text("arm\n")
    (out / "config.json").write_text(json.dumps(cfg.model_dump()))
    assert run_module.completed_results(cfg) is None  # no resolved.json: a run from before versions
    (out / "resolved.json").write_text(json.dumps({"layer": 1, "finetune_version": 1}))
    assert run_module.completed_results(cfg) is None  # text-based DPO pairs
    version = run_module.FINETUNE_VERSION
    (out / "resolved.json").write_text(json.dumps({"layer": 1, "finetune_version": version}))
    pd.testing.assert_frame_equal(run_module.completed_results(cfg), results)
    other = run_module.load_finetune_config({"output_dir": str(out), "probes": {"layer": 2}})
    assert run_module.completed_results(other) is None
