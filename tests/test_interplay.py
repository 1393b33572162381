"""Interplay: planted correlations, exact small-n answers, family-wise error and coverage by simulation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from aligned_probing.interplay import (
    INTERPLAY_COLUMNS,
    correlation_ci,
    information_strength,
    interplay,
    interplay_summary,
    layer_family_tests,
    permutations,
)


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
    table = interplay(_probing(curves, rng, noise=0.0), _behaviour(emt), n_permutations=500)
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


def test_three_monotone_models_get_no_interval(rng):
    # The old bootstrap printed r = -0.996, CI [-1.0, -0.996] with p = 1/3: no interval has valid
    # coverage at n = 3, so the bounds are NaN and ci_note says why.
    curves = {"a": np.array([0.1, 0.2]), "b": np.array([0.2, 0.41]), "c": np.array([0.3, 0.6])}
    table = interplay(_probing(curves, rng, noise=0.0), _behaviour({"a": 0.3, "b": 0.2, "c": 0.1}))
    assert table.ci_low.isna().all() and table.ci_high.isna().all()
    assert table.ci_note.str.contains("n too small").all()
    assert (table.p_method == "exact").all()


def test_exact_p_value_is_the_share_of_all_pairings_at_least_as_extreme(rng):
    import itertools

    x, y = rng.normal(size=5), rng.normal(size=5)
    fam = layer_family_tests(x[:, None], y, permutations(5, 0, 0)[0], "two-sided")
    r = np.corrcoef(x, y)[0, 1]
    perms = [np.corrcoef(x, y[list(p)])[0, 1] for p in itertools.permutations(range(5))]
    assert fam["r"][0] == pytest.approx(r)
    assert fam["p_raw"][0] == pytest.approx(np.mean(np.abs(perms) >= abs(r) - 1e-12))
    less = layer_family_tests(x[:, None], y, permutations(5, 0, 0)[0], "less")
    assert less["p_raw"][0] == pytest.approx(np.mean(np.array(perms) <= r + 1e-12))


def _null_family(rng, n, n_layers=10, rho_layers=0.7):
    """n models x n_layers information values correlated across layers (AR(1)), behaviour independent."""
    X = np.empty((n, n_layers))
    X[:, 0] = rng.normal(size=n)
    for j in range(1, n_layers):
        X[:, j] = rho_layers * X[:, j - 1] + np.sqrt(1 - rho_layers**2) * rng.normal(size=n)
    return X, rng.normal(size=n)


@pytest.mark.parametrize("alternative", ["two-sided", "less"])
def test_peak_fwer_controls_false_positives_under_the_null(rng, alternative):
    sims, hits_fwer, hits_raw = 300, 0, 0
    perms = permutations(5, 0, 0)[0]
    for _ in range(sims):
        X, y = _null_family(rng, 5)
        fam = layer_family_tests(X, y, perms, alternative)
        hits_fwer += fam["p_fwer"][fam["peak"]] < 0.05
        hits_raw += fam["p_raw"][fam["peak"]] < 0.05
    # binomial(300, 0.05): sd 0.013; exact p-values are multiples of 1/120, so the rate is at most 0.05
    assert 0.01 <= hits_fwer / sims <= 0.085
    assert hits_raw / sims > 0.12  # the unadjusted peak p is anti-conservative


def test_power_of_the_adjusted_peak_grows_with_models(rng):
    def power(n, sims=80):
        perms = permutations(n, 499, 1)[0]
        hits = 0
        for _ in range(sims):
            X, y = _null_family(rng, n)
            X[:, 4] = -0.8 * y + 0.6 * rng.normal(size=n)  # planted r ~ -0.8 at layer 4
            fam = layer_family_tests(X, y, perms, "less")
            hits += fam["p_fwer"][4] < 0.05
        return hits / sims

    p5, p12 = power(5), power(12)
    assert p12 > p5 + 0.3 and p12 > 0.7


@pytest.mark.parametrize("n", [5, 20])
@pytest.mark.parametrize("rho", [0.0, 0.6])
def test_fisher_z_interval_coverage(rng, n, rho):
    sims, hits = 2000, 0
    for _ in range(sims):
        x = rng.normal(size=n)
        y = rho * x + np.sqrt(1 - rho**2) * rng.normal(size=n)
        ci = correlation_ci(float(np.corrcoef(x, y)[0, 1]), n, "pearson")
        hits += ci["ci_low"] <= rho <= ci["ci_high"]
    assert 0.93 <= hits / sims <= 0.97  # binomial(2000, 0.95): sd 0.005


def test_spearman_interval_needs_ten_models():
    assert np.isnan(correlation_ci(0.5, 9, "spearman")["ci_low"])
    assert "n too small: 9 models < 10" in correlation_ci(0.5, 9, "spearman")["ci_note"]
    assert np.isfinite(correlation_ci(0.5, 10, "spearman")["ci_low"])


def test_summary_of_pure_noise_carries_the_adjusted_p(rng):
    # 5 models x 31 layers of noise: the best layer's raw p looks significant, its p_fwer does not.
    curves = {f"m{i}": rng.uniform(0.2, 0.8, size=31) for i in range(5)}
    emt = {f"m{i}": e for i, e in enumerate(rng.uniform(0.1, 0.5, size=5))}
    table = interplay(_probing(curves, rng, noise=0.0), _behaviour(emt))
    peak = interplay_summary(table).iloc[0]
    pear = table[table.statistic == "pearson"]
    assert peak["peak_picked"] and abs(peak["value"]) == pytest.approx(pear.value.abs().max())
    assert peak["p_raw"] < 0.1 and peak["p_fwer"] > 0.3
    assert peak["q_bh"] >= peak["p_raw"]
    assert table.groupby("statistic").peak_picked.sum().eq(1).all()
    less = interplay_summary(interplay(_probing(curves, rng, noise=0.0), _behaviour(emt), alternative="less"))
    assert less.iloc[0]["value"] == pytest.approx(pear.value.min())
    with pytest.raises(ValueError, match="by must include"):
        interplay_summary(table, by=("scenario",))


def test_n_bootstrap_is_deprecated(rng):
    curves = {m: np.array([0.1, 0.2 + i / 10]) for i, m in enumerate("abc")}
    with pytest.warns(FutureWarning, match="n_bootstrap"):
        interplay(_probing(curves, rng), _behaviour({"a": 0.1, "b": 0.2, "c": 0.3}), n_bootstrap=100)
