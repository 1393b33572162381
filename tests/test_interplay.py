"""Interplay: planted correlations across models, exact small-n answers, depth handling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from aligned_probing.interplay import INTERPLAY_COLUMNS, information_strength, interplay


def _probing(
    curves: dict[str, np.ndarray], rng, *, noise: float = 0.01, scenario: str = "input"
) -> pd.DataFrame:
    """Probing rows: per model a curve over layers 0..L, 2 folds x 2 seeds jittered around it."""
    rows = []
    for model, curve in curves.items():
        n_layers = len(curve) - 1
        for layer, mean in enumerate(curve):
            jitter = rng.normal(scale=noise, size=4)
            jitter -= jitter.mean()  # the fold x seed mean is exactly the curve
            for i, (fold, seed) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
                rows.append(
                    {
                        "model": model,
                        "template": 0,
                        "scenario": scenario,
                        "attribute": "toxicity",
                        "layer": layer,
                        "n_layers": n_layers,
                        "fold": fold,
                        "seed": seed,
                        "pearson": mean + jitter[i],
                    }
                )
    return pd.DataFrame(rows)


def _behaviour(emt: dict[str, float]) -> pd.DataFrame:
    rows = []
    for model, value in emt.items():
        for metric in ("emt", "toxicity_probability"):
            rows.append(
                {
                    "model": model,
                    "template": 0,
                    "attribute": "toxicity",
                    "metric": metric,
                    "subset": "all",
                    "value": value if metric == "emt" else 0.5,
                    "ci_low": np.nan,
                    "ci_high": np.nan,
                    "n_prompts": 100,
                    "k": 25,
                }
            )
    return pd.DataFrame(rows)


def test_information_strength_is_mean_over_folds_and_seeds(rng):
    curves = {"a": np.array([0.1, 0.5, 0.3]), "b": np.array([0.2, 0.4, 0.6])}
    info = information_strength(_probing(curves, rng))
    assert info.set_index(["model", "layer"])["information"].to_dict() == pytest.approx(
        {("a", 0): 0.1, ("a", 1): 0.5, ("a", 2): 0.3, ("b", 0): 0.2, ("b", 1): 0.4, ("b", 2): 0.6}
    )
    assert set(info.n_runs) == {4}
    assert info.set_index(["model", "layer"]).loc[("a", 1), "relative_depth"] == 0.5


def test_recovers_planted_negative_correlation(rng):
    n_models, n_layers = 8, 4
    strength = rng.uniform(0.3, 0.9, size=n_models)  # information at layer 2 drives behaviour
    emt = 0.8 - 0.6 * strength + rng.normal(scale=0.01, size=n_models)
    curves = {}
    for i in range(n_models):
        curve = rng.uniform(0.2, 0.8, size=n_layers + 1)  # unrelated elsewhere
        curve[2] = strength[i]
        curves[f"m{i}"] = curve
    table = interplay(
        _probing(curves, rng),
        _behaviour({f"m{i}": e for i, e in enumerate(emt)}),
        n_permutations=2000,
        n_bootstrap=500,
    )
    assert list(table.columns) == list(INTERPLAY_COLUMNS)
    assert set(table.depth_axis) == {"layer"}
    assert len(table) == (n_layers + 1) * 2
    planted = table[(table.layer == 2)].set_index("statistic")
    assert planted.loc["pearson", "value"] == pytest.approx(
        stats.pearsonr(strength, emt).statistic, abs=1e-12
    )
    assert planted.loc["pearson", "value"] < -0.99
    assert planted.loc["spearman", "value"] == pytest.approx(
        stats.spearmanr(strength, emt).statistic, abs=1e-12
    )
    assert planted.loc["pearson", "p_value"] < 0.002
    assert planted.loc["pearson", "ci_high"] < -0.95
    assert (planted.n_models == n_models).all()
    # the other layers' p-values are not all tiny
    others = table[(table.layer != 2) & (table.statistic == "pearson")]
    assert (others.p_value > 0.01).any()


def test_three_models_exact_permutation_p_value(rng):
    # n = 3: the 3! = 6 pairings are enumerated; a perfect correlation is matched only by itself
    # and its reverse (|r| = 1), so the exact two-sided p-value is 2/6.
    curves = {"a": np.array([0.1, 0.2]), "b": np.array([0.2, 0.4]), "c": np.array([0.3, 0.9])}
    table = interplay(_probing(curves, rng, noise=0.0), _behaviour({"a": 0.3, "b": 0.2, "c": 0.1}))
    layer1 = table[(table.layer == 1) & (table.statistic == "spearman")].iloc[0]
    assert layer1.value == pytest.approx(-1.0)
    assert layer1.p_value == pytest.approx(1 / 3)


def test_relative_depth_interpolation_for_models_of_different_depth(rng):
    # information = 0.2 + 0.6 * relative depth in every model (a linear curve interpolates exactly);
    # behaviour depends on the model's slope scale, planted through a per-model factor.
    scale = {"s4": 1.0, "s8": 0.5, "s6": 0.8, "s12": 0.3}
    depths = {"s4": 4, "s8": 8, "s6": 6, "s12": 12}
    curves = {m: scale[m] * (0.2 + 0.6 * np.arange(L + 1) / L) for m, L in depths.items()}
    emt = {m: 1.0 - scale[m] for m in scale}
    table = interplay(_probing(curves, rng, noise=0.0), _behaviour(emt), n_permutations=500, n_bootstrap=200)
    assert set(table.depth_axis) == {"relative"}
    assert table.layer.isna().all()
    assert sorted(table.relative_depth.unique()) == pytest.approx(np.linspace(0, 1, 5))  # shallowest: 4 + 1
    info = information_strength(_probing(curves, rng, noise=0.0))
    assert np.interp(
        0.25, *info[info.model == "s8"][["relative_depth", "information"]].to_numpy().T
    ) == pytest.approx(0.5 * (0.2 + 0.6 * 0.25))
    pear = table[table.statistic == "pearson"]
    assert np.allclose(pear.value, -1.0)
    with pytest.raises(ValueError, match="depth_axis='layer' needs models of equal depth"):
        interplay(_probing(curves, rng), _behaviour(emt), depth_axis="layer")


def test_refuses_two_models(rng):
    curves = {"a": np.array([0.1, 0.2]), "b": np.array([0.2, 0.4])}
    with pytest.raises(ValueError, match=r"at least 3 models .* got 2"):
        interplay(_probing(curves, rng), _behaviour({"a": 0.1, "b": 0.2}))


def test_missing_behaviour_for_a_model_is_an_error(rng):
    curves = {m: np.array([0.1, 0.2 + i / 10]) for i, m in enumerate("abc")}
    with pytest.raises(ValueError, match=r"only 2 model\(s\)"):
        interplay(_probing(curves, rng), _behaviour({"a": 0.1, "b": 0.2}))
    with pytest.raises(ValueError, match="metric='emt' and subset='toxic_prompts'"):
        interplay(_probing(curves, rng), _behaviour({"a": 0.1, "b": 0.2, "c": 0.3}), subset="toxic_prompts")
