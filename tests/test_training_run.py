"""End-to-end `run_finetune` on the tiny model with a fake scorer: every arm trains, saves and is measured."""

from __future__ import annotations

import hashlib

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


@pytest.fixture
def tiny_config(tiny_llama_dir, tmp_path):
    return {
        "output_dir": str(tmp_path / "run"),
        "model": {"spec": str(tiny_llama_dir)},
        "data": {"prompts": "rtp-challenging", "n_train": 12, "n_eval": 8, "seed": 0},
        "generation": {"k": 3, "max_new_tokens": 4, "batch_size": 36},
        "probes": {"layer": 2, "n_ensemble": 2, "n_heldout": 2},
        # probe_dpo_ensemble differs from probe_dpo only in its ranker; three arms keep this short.
        "training": {"arms": ["probe_dpo", "classifier_dpo", "probe_sft"], "max_steps": 1,
                     "per_device_batch_size": 4, "gradient_accumulation_steps": 1,
                     "max_length": 48, "checkpoint_every": 1, "learning_rate": 1e-3},
        "evaluation": {"n_benign": 4, "ppl_max_length": 32, "n_boot": 20},
    }


@pytest.mark.slow  # end to end: four generations, three trainings, ~1-2 min on a free CPU
def test_run_finetune_all_arms(tiny_config, monkeypatch):
    monkeypatch.setattr(run_module, "get_training_scorer", lambda name: _HashScorer())
    results = run_module.run_finetune(tiny_config)
    out = run_module.Path(tiny_config["output_dir"])
    assert set(results["arm"]) == {"base", "probe_dpo", "classifier_dpo", "probe_sft"}
    expected_metrics = {"auroc_frozen", "auroc_ensemble", "auroc_heldout", "auroc_retrained", "emt",
                        "toxic_rate", "mean_toxicity", "perplexity", "n_toxic_test"}
    assert all(set(g["metric"]) == expected_metrics for _, g in results.groupby("arm"))
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
    # Fine-tuned models and intermediate adapters, loadable, never pickled.
    for arm in ("probe_dpo", "probe_sft"):
        assert (out / arm / "checkpoints" / "checkpoint-1" / "adapter_model.safetensors").exists()
        assert load_model(out / arm / "merged").n_layers == 3
    assert not [p for p in out.rglob("*") if p.suffix in {".bin", ".pt", ".pkl"}]
