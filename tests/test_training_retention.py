"""Retention metrics: planted directions, hand-computed toxicity summaries, perplexity against HF's loss."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from aligned_probing.training.finetuned import load_trainable
from aligned_probing.training.probes import fit_probe_set
from aligned_probing.training.retention import perplexity, probe_aurocs, retrained_auroc, toxicity_summary


def _unit(rng, d):
    v = rng.normal(size=d)
    return v / np.linalg.norm(v)


def test_frozen_probe_blind_after_removal_retrained_probe_finds_replanted_direction(rng):
    n, d = 1200, 24
    u = _unit(rng, d)
    y = rng.integers(0, 2, size=n)
    sign = 2.0 * y - 1.0
    before = rng.normal(size=(n, d)) + 3.0 * np.outer(sign, u)
    frozen = fit_probe_set(before, y, meta={"layer": 1})
    u = frozen.weight[0] / np.linalg.norm(frozen.weight[0])  # what the frozen probe actually reads
    v = _unit(rng, d)
    v = v - (v @ u) * u
    v /= np.linalg.norm(v)  # orthogonal to the frozen probe's direction
    # "Fine-tuning": project the frozen probe's direction out, re-plant the label along v.
    after = rng.normal(size=(n, d))
    after -= np.outer(after @ u, u)
    # Label-free variation along u: without it every frozen score is the same constant up to 1e-16
    # rounding that happens to correlate with the label, and the AUROC of exact ties is arbitrary.
    after += np.outer(rng.normal(size=n), u)
    after += 3.0 * np.outer(sign, v)
    half = n // 2
    table = probe_aurocs({"frozen": frozen}, after[half:], y[half:])
    assert table.loc[0, "auroc"] == pytest.approx(0.5, abs=0.08), "frozen probe should be at chance"
    assert probe_aurocs({"frozen": frozen}, before, y).loc[0, "auroc"] > 0.99
    retrained = retrained_auroc(after[:half], y[:half], after[half:], y[half:])
    assert retrained > 0.99, "the information moved; a retrained probe must still find it"


def test_toxicity_summary_by_hand():
    table = pd.DataFrame({"prompt_id": ["a", "a", "b", "b"], "toxicity": [0.9, 0.1, 0.2, 0.4]})
    out = toxicity_summary(table, n_boot=200, seed=0).set_index("metric")
    assert out.loc["emt", "value"] == pytest.approx((0.9 + 0.4) / 2)  # mean over prompts of the max
    assert out.loc["toxic_rate", "value"] == pytest.approx(1 / 4)
    assert out.loc["mean_toxicity", "value"] == pytest.approx(0.4)
    assert (out["ci_low"] <= out["value"]).all() and (out["value"] <= out["ci_high"]).all()


def test_perplexity_matches_hf_loss(tiny_llama_dir):
    model, tok = load_trainable(tiny_llama_dir)
    texts = ["What a lovely day for a walk.", "The quick brown fox jumps over the lazy dog and more."]
    ids = [torch.tensor([tok(t)["input_ids"]]) for t in texts]
    with torch.no_grad():
        nll = sum(float(model(input_ids=i, labels=i).loss) * (i.shape[1] - 1) for i in ids)
    expected = np.exp(nll / sum(i.shape[1] - 1 for i in ids))
    assert perplexity(model, tok, texts, batch_size=2) == pytest.approx(expected, rel=1e-4)
