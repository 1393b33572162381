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


def _auc(score, label):
    from aligned_probing.training.retention import weighted_auroc

    return weighted_auroc(score, label, np.ones((1, len(score))))[0]


def _clustered(rng, n_prompts, per_prompt, d, prompt_sd=1.0, u=None):
    """Scores with a shared prompt effect u (so rows of a prompt are dependent) plus d x label."""
    u = rng.normal(0, prompt_sd, n_prompts) if u is None else u
    pid = np.repeat(np.arange(n_prompts), per_prompt)
    # Labels too depend on the prompt (toxic prompts give toxic continuations).
    p_toxic = 1 / (1 + np.exp(-(u[pid] - 1.0)))
    label = (rng.random(len(pid)) < p_toxic).astype(int)
    score = u[pid] + d * label + rng.normal(0, 1, len(pid))
    return pid, score, label


def test_auroc_ci_matches_roc_auc_and_covers_by_simulation():
    from sklearn.metrics import roc_auc_score

    from aligned_probing.training.retention import auroc_with_ci

    rng = np.random.default_rng(1)
    pid, score, label = _clustered(rng, 40, 4, d=1.0)
    value, low, high = auroc_with_ci(pid, np.round(score, 1), label, n_boot=50)  # ties: average ranks
    assert value == pytest.approx(roc_auc_score(label, np.round(score, 1)), abs=1e-12)
    assert low < value < high
    # Truth: the expected AUROC at this design, by Monte Carlo.
    truth = np.mean([_auc(s, y) for _, s, y in (_clustered(rng, 50, 4, d=1.0) for _ in range(1500))])
    hits = 0
    reps = 200
    for _ in range(reps):
        pid, score, label = _clustered(rng, 50, 4, d=1.0)
        _, low, high = auroc_with_ci(pid, score, label, n_boot=200, seed=int(rng.integers(1 << 30)))
        hits += low <= truth <= high
    assert 0.88 <= hits / reps <= 0.99, f"coverage {hits / reps:.3f} of the nominal 0.95 interval"


def test_paired_auroc_difference_covers_and_is_antisymmetric():
    from aligned_probing.training.retention import paired_auroc_difference

    rng = np.random.default_rng(2)
    n_prompts, per_prompt, seeds = 50, 4, (0, 1)

    def arms():
        u = rng.normal(0, 1.0, n_prompts)  # the same eval prompts for both arms (pairing)
        frames = {}
        for name, d in (("a", 1.2), ("b", 0.7)):
            parts = []
            for s in seeds:
                pid, score, label = _clustered(rng, n_prompts, per_prompt, d, u=u)
                parts.append(pd.DataFrame({"seed": s, "prompt_id": pid, "score": score, "label": label}))
            frames[name] = pd.concat(parts, ignore_index=True)
        return frames

    def point(f):
        return np.mean([_auc(f["score"].to_numpy()[f["seed"] == s], f["label"].to_numpy()[f["seed"] == s])
                        for s in seeds])

    truth = np.mean([point(f["a"]) - point(f["b"]) for f in (arms() for _ in range(300))])
    assert truth > 0.05
    f = arms()
    ab = paired_auroc_difference(f["a"], f["b"], n_boot=50, seed=0)
    ba = paired_auroc_difference(f["b"], f["a"], n_boot=50, seed=0)
    assert ab[0] == pytest.approx(point(f["a"]) - point(f["b"]))
    assert ab[0] == pytest.approx(-ba[0]) and ab[1] == pytest.approx(-ba[2])
    hits, reps = 0, 100
    for _ in range(reps):
        f = arms()
        _, low, high = paired_auroc_difference(f["a"], f["b"], n_boot=150, seed=int(rng.integers(1 << 30)))
        hits += low <= truth <= high
    assert 0.87 <= hits / reps <= 0.995, f"coverage {hits / reps:.3f} of the nominal 0.95 interval"
    with pytest.raises(ValueError, match="must share their seeds"):
        paired_auroc_difference(f["a"], f["b"][f["b"]["seed"] == 0], n_boot=10)


def test_single_class_gives_nan_not_an_error():
    from aligned_probing.training.retention import auroc_with_ci, paired_auroc_difference

    pid = np.repeat(np.arange(5), 2)
    assert all(np.isnan(auroc_with_ci(pid, np.arange(10.0), np.zeros(10), n_boot=20)))
    one = pd.DataFrame({"seed": 0, "prompt_id": pid, "score": np.arange(10.0), "label": 0})
    assert all(np.isnan(paired_auroc_difference(one, one, n_boot=20)))


def test_paired_emt_difference_is_exact_and_covers():
    from aligned_probing.training.retention import paired_mean_difference

    rng = np.random.default_rng(3)
    n, seeds, shift = 40, (0, 1), 0.05

    def arms():
        difficulty = rng.beta(2, 3, n)  # per-prompt max toxicity shared by both arms (pairing)
        # No clipping to [0, 1], so the expected difference is exactly `shift`.
        make = [pd.DataFrame({"seed": s, "prompt_id": np.arange(n),
                              "value": difficulty - d + rng.normal(0, 0.05, n)})
                for d in (0.0, shift) for s in seeds]
        return pd.concat(make[:2]), pd.concat(make[2:])

    a, b = arms()
    diff, _, _ = paired_mean_difference(a, b, n_boot=20)
    assert diff == pytest.approx(a["value"].mean() - b["value"].mean())
    truth = shift
    hits, reps = 0, 200
    for _ in range(reps):
        a, b = arms()
        _, low, high = paired_mean_difference(a, b, n_boot=200, seed=int(rng.integers(1 << 30)))
        hits += low <= truth <= high
    assert 0.88 <= hits / reps <= 0.99, f"coverage {hits / reps:.3f} of the nominal 0.95 interval"
