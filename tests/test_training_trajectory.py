"""Retention along checkpoints: base rows equal a direct computation; an untouched adapter changes nothing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from aligned_probing.training.activations import pooled_response_activations
from aligned_probing.training.finetuned import load_trainable, lora_config
from aligned_probing.training.probes import fit_probe_set
from aligned_probing.training.retention import probe_aurocs
from aligned_probing.training.trajectory import auroc_change, checkpoint_aurocs, list_checkpoints

LAYER = 2


@pytest.fixture(scope="module")
def samples(tiny_llama_dir):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        rows.append({
            "prompt_id": f"p{i // 2}",
            "prompt_token_ids": rng.integers(5, 300, size=int(rng.integers(3, 8))).tolist(),
            "token_ids": rng.integers(5, 300, size=int(rng.integers(1, 6))).tolist(),
            "label": i % 2,
        })
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def probes(tiny_llama_dir, samples):
    model, tok = load_trainable(tiny_llama_dir)
    X = pooled_response_activations(model, list(samples.prompt_token_ids), list(samples.token_ids), LAYER,
                                    pad_token_id=tok.pad_token_id)
    return X, {"frozen": fit_probe_set(X, samples.label.to_numpy(), meta={"layer": LAYER})}


@pytest.fixture(scope="module")
def arm_dir(tiny_llama_dir, tmp_path_factory):
    """An arm whose checkpoint is a fresh LoRA (B = 0: the identity) and whose final model is the base."""
    from peft import get_peft_model

    arm = tmp_path_factory.mktemp("run") / "probe_dpo"
    model, tok = load_trainable(tiny_llama_dir)
    peft_model = get_peft_model(model, lora_config(r=4, alpha=8))
    peft_model.save_pretrained(arm / "checkpoints" / "checkpoint-2", safe_serialization=True)
    (arm / "checkpoints" / "checkpoint-junk").mkdir()  # ignored: not a step, no adapter
    shutil.copytree(tiny_llama_dir, arm / "merged")
    (arm / "merged" / "finetune.json").write_text(json.dumps({"global_step": 3}))
    return arm


def test_list_checkpoints_in_step_order_with_final(arm_dir):
    found = [(name, step) for name, step, _ in list_checkpoints(arm_dir)]
    assert found == [("checkpoint-2", 2), ("final", 3)]


def test_base_rows_equal_direct_auroc_and_identity_adapter_changes_nothing(tiny_llama_dir, arm_dir, samples,
                                                                           probes):
    X, probe_sets = probes
    table = checkpoint_aurocs(tiny_llama_dir, [arm_dir], samples, probe_sets, layer=LAYER)
    direct = probe_aurocs(probe_sets, X, samples.label.to_numpy()).loc[0, "auroc"]
    assert list(table.checkpoint) == ["base", "checkpoint-2", "final"]
    assert list(table.step) == [0, 2, 3]
    assert (table.arm == "probe_dpo").all() and (table.n_test == len(samples)).all()
    assert table.auroc.iloc[0] == pytest.approx(direct, abs=1e-12)
    # A zero-initialised LoRA and a copy of the base read the same activations: retention is unchanged.
    np.testing.assert_allclose(table.auroc, direct, atol=1e-9)
    change = auroc_change(table)
    assert change.loc[0, "change"] == pytest.approx(0.0, abs=1e-9)


def test_checks_its_inputs(tiny_llama_dir, arm_dir, samples, probes):
    _, probe_sets = probes
    with pytest.raises(ValueError, match=r"samples lacks \['prompt_token_ids'\]"):
        checkpoint_aurocs(tiny_llama_dir, [arm_dir], samples.drop(columns="prompt_token_ids"), probe_sets,
                          layer=LAYER)
    with pytest.raises(ValueError, match="reads layer 2, not layer 1"):
        checkpoint_aurocs(tiny_llama_dir, [arm_dir], samples, probe_sets, layer=1)
