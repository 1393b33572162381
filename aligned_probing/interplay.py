"""Interplay: across models, correlate information strength per layer with behaviour.

For a set of models, per (template, scenario, attribute, layer), the x values are each model's
information strength (the probe's test Pearson r averaged over folds x seeds) and the y values
the models' behaviour metric (EMT by default). We report Pearson r and Spearman rho, each with

* a permutation p-value `p_raw` (pairings shuffled): exact, over all n! pairings, for n <= 8 models;
  otherwise (1 + #{T* >= T}) / (1 + B) over B seeded random permutations;
* a family-wise adjusted `p_fwer` over the layers of each (template, scenario, attribute, statistic)
  curve: the max-statistic permutation test (Westfall & Young). One permutation of the models is applied
  to every layer at once, the largest statistic over layers is recorded, and
  `p_fwer_l = P(max_l' T*_l' >= T_l)`. The statistic has the sidedness of the selection (`alternative`):
  |r| for "two-sided", -r for "less" (the most negative layer), r for "greater";
* `q_bh`, Benjamini-Hochberg q-values of `p_raw` over the same layers;
* `peak_picked`: True at the layer that a "best layer" summary would select (largest |r|, most negative
  or largest r, by `alternative`). Report a picked peak with `p_fwer`, never with `p_raw`;
* a confidence interval whose coverage was checked by simulation (benchmarks/stats_coverage.py):
  Pearson: Fisher z, `tanh(atanh(r) -/+ z_q / sqrt(n - 3))`, for n >= 4 models (coverage 0.95-0.97 at
  n = 4-20 for bivariate normal data); Spearman: Fisher z with the Bonett-Wright variance
  `(1 + rho^2 / 2) / (n - 3)`, for n >= 10 (below that its coverage drops to 0.6-0.9 for strong
  correlations). Where no interval has verified coverage, the bounds are NaN and `ci_note` says why.
  (The percentile bootstrap over models used before had 33% false exclusions of 0 at n = 3.)

Depth: when all models have the same number of layers L, layers are compared as they are
(`depth_axis = "layer"`). Otherwise each model's curve is placed on relative depth l / L and
linearly interpolated (`numpy.interp`) onto a common grid of `n_grid` evenly spaced points in
[0, 1] (default: the shallowest model's L + 1 points, so no model is read at a finer resolution
than the coarsest one has), and `depth_axis = "relative"`.

The paper's headline is a correlation of about -0.75 between input/forward information and EMT.
With few models the uncertainty is large: three models give at best p = 1/3 (two-sided, exact).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

INTERPLAY_COLUMNS: tuple[str, ...] = (
    "template",
    "scenario",
    "attribute",
    "behaviour_attribute",
    "metric",
    "subset",
    "depth_axis",
    "layer",
    "relative_depth",
    "statistic",
    "value",
    "p_value",
    "p_raw",
    "p_fwer",
    "q_bh",
    "peak_picked",
    "alternative",
    "p_method",
    "ci_low",
    "ci_high",
    "ci_method",
    "ci_note",
    "n_models",
)
_PROBE_KEYS = ("model", "template", "scenario", "attribute", "layer", "n_layers")
MIN_MODELS = 3
#: Enumerate all n! pairings (exact permutation p-values) up to this many models.
EXACT_MAX_N = 8
#: Fewest models for each interval (below: NaN bounds and a `ci_note`), chosen by simulation.
MIN_CI_MODELS: dict[str, int] = {"pearson": 4, "spearman": 10}
ALTERNATIVES: tuple[str, ...] = ("two-sided", "less", "greater")
_TIE = 1e-12  # statistics equal up to rounding count as ties (>=)


def information_strength(probing: pd.DataFrame, *, value: str = "pearson") -> pd.DataFrame:
    """Mean of a probing score over folds x seeds, per (model, template, scenario, attribute, layer).

    Args:
        probing: Probing rows (docs/architecture.md): `model`, `template`, `scenario`, `attribute`,
            `layer`, `n_layers`, `fold`, `seed` and the `value` column.
        value: Score to average: "pearson" (information strength) or e.g. "selectivity".

    Returns:
        The keys plus `relative_depth` (= layer / n_layers, in [0, 1]), `information` and `n_runs`.
    """
    missing = [c for c in (*_PROBE_KEYS, value) if c not in probing.columns]
    if missing:
        raise ValueError(f"probing lacks column(s) {missing}; it has {list(probing.columns)}.")
    out = (
        probing.groupby(list(_PROBE_KEYS), sort=True)[value]
        .agg(information="mean", n_runs="size")
        .reset_index()
    )
    out.insert(out.columns.get_loc("n_layers") + 1, "relative_depth", out["layer"] / out["n_layers"])
    return out


def permutations(n: int, n_permutations: int, seed: int) -> tuple[np.ndarray, bool]:
    """Pairings to evaluate: all n! when n <= `EXACT_MAX_N` (exact), else seeded random ones.

    Returns:
        `(perms [B, n], exact)`; random sets start with the identity, so p = (1 + #) / (1 + B).
    """
    if n <= EXACT_MAX_N:
        return np.array(list(itertools.permutations(range(n))), dtype=np.int64), True
    rng = np.random.default_rng(seed)
    perms = np.stack([np.arange(n)] + [rng.permutation(n) for _ in range(n_permutations)])
    return perms, False


def _standardised(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Columns centred and scaled to unit norm (NaN columns where constant), and the validity mask."""
    c = a - a.mean(axis=0, keepdims=True)
    norm = np.sqrt((c**2).sum(axis=0))
    ok = norm > 1e-15
    return c / np.where(ok, norm, 1.0), ok


def _selection_stat(r: np.ndarray, alternative: str) -> np.ndarray:
    return {"two-sided": np.abs(r), "less": -r, "greater": r}[alternative]


def layer_family_tests(
    X: np.ndarray, y: np.ndarray, perms: np.ndarray, alternative: str
) -> dict[str, Any]:
    """Per-layer correlation, raw and max-statistic (family-wise) permutation p-values, BH q-values.

    Args:
        X: Information `[n, L]` (models x layers) for one curve family.
        y: Behaviour `[n]`.
        perms: Pairings `[B, n]` (the identity included), applied to every layer at once.
        alternative: "two-sided", "less" or "greater": the sidedness of p and of the selection.

    Returns:
        {"r", "p_raw", "p_fwer", "q_bh"} each `[L]` (NaN for constant layers), and "peak" (the
        selected layer's index, or -1).
    """
    xs, ok = _standardised(X)
    ys, y_ok = _standardised(y[:, None])
    L = X.shape[1]
    nan = np.full(L, np.nan)
    if not y_ok[0] or not ok.any():
        return {"r": nan, "p_raw": nan.copy(), "p_fwer": nan.copy(), "q_bh": nan.copy(), "peak": -1}
    r_perm = ys[perms, 0] @ xs  # (B, L): r of every pairing at every layer
    r_perm = np.clip(r_perm, -1.0, 1.0)
    r_perm[:, ~ok] = np.nan
    r = np.clip(ys[:, 0] @ xs, -1.0, 1.0)
    r[~ok] = np.nan
    t_obs = _selection_stat(r, alternative)
    t_perm = _selection_stat(r_perm, alternative)
    p_raw = np.mean(t_perm >= t_obs - _TIE, axis=0)  # the identity is one of the pairings
    t_max = np.nanmax(t_perm, axis=1)  # (B,): the family's largest statistic per pairing
    p_fwer = np.mean(t_max[:, None] >= t_obs[None, :] - _TIE, axis=0)
    p_raw[~ok], p_fwer[~ok] = np.nan, np.nan
    q = np.full(L, np.nan)
    q[ok] = stats.false_discovery_control(p_raw[ok], method="bh")
    peak = int(np.nanargmax(t_obs))
    return {"r": r, "p_raw": p_raw, "p_fwer": p_fwer, "q_bh": q, "peak": peak}


def correlation_ci(r: float, n: int, statistic: str, confidence_level: float = 0.95) -> dict[str, object]:
    """Fisher-z interval for Pearson r (n >= 4) or Spearman rho (Bonett-Wright variance, n >= 10).

    `tanh(atanh(r) -/+ z_{(1 + confidence) / 2} * se)` with `se = 1 / sqrt(n - 3)` (Pearson) or
    `sqrt((1 + rho^2 / 2) / (n - 3))` (Spearman). Below `MIN_CI_MODELS` the bounds are NaN and
    `ci_note` says why: simulation (benchmarks/stats_coverage.py) found no interval of these forms
    with valid coverage there.

    Returns:
        {"ci_low", "ci_high", "ci_method", "ci_note"}.
    """
    need = MIN_CI_MODELS[statistic]
    method = "fisher_z" if statistic == "pearson" else "fisher_z_bonett_wright"
    if n < need:
        note = f"n too small: {n} models < {need}, no {statistic} interval with verified coverage"
        return {"ci_low": np.nan, "ci_high": np.nan, "ci_method": "none", "ci_note": note}
    if not np.isfinite(r):
        return {"ci_low": np.nan, "ci_high": np.nan, "ci_method": method, "ci_note": "r undefined"}
    se = 1.0 / math.sqrt(n - 3) if statistic == "pearson" else math.sqrt((1 + r**2 / 2) / (n - 3))
    z = math.atanh(min(max(r, -1 + 1e-15), 1 - 1e-15))
    q = stats.norm.ppf((1 + confidence_level) / 2)
    return {
        "ci_low": math.tanh(z - q * se),
        "ci_high": math.tanh(z + q * se),
        "ci_method": method,
        "ci_note": "",
    }


def _resolve_axis(depths: pd.Series, depth_axis: str) -> str:
    if depth_axis not in ("auto", "layer", "relative"):
        raise ValueError(f"depth_axis must be 'auto', 'layer' or 'relative', got {depth_axis!r}.")
    same = depths.nunique() == 1
    if depth_axis == "auto":
        return "layer" if same else "relative"
    if depth_axis == "layer" and not same:
        raise ValueError(
            f"depth_axis='layer' needs models of equal depth, got n_layers {sorted(depths.unique())}; "
            "use depth_axis='relative' (or 'auto')."
        )
    return depth_axis


def _curves(info: pd.DataFrame, axis: str, n_grid: int | None) -> tuple[pd.DataFrame, np.ndarray]:
    """Per model, information on the common axis: [n_models, n_points] table and the axis points."""
    if axis == "layer":
        wide = info.pivot(index="model", columns="layer", values="information")
        return wide, wide.columns.to_numpy(dtype=np.float64) / float(info["n_layers"].iloc[0])
    n = n_grid if n_grid is not None else int(info["n_layers"].min()) + 1
    if n < 2:
        raise ValueError(f"n_grid must be >= 2, got {n}.")
    grid = np.linspace(0.0, 1.0, n)
    rows = {
        model: np.interp(grid, g["relative_depth"].to_numpy(), g["information"].to_numpy())
        for model, g in info.sort_values("relative_depth").groupby("model", sort=True)
    }
    return pd.DataFrame.from_dict(rows, orient="index", columns=range(n)), grid


def interplay(
    probing: pd.DataFrame,
    behaviour: pd.DataFrame,
    *,
    metric: str = "emt",
    subset: str = "all",
    behaviour_attribute: str | None = None,
    information: str = "pearson",
    depth_axis: str = "auto",
    n_grid: int | None = None,
    n_permutations: int = 9999,
    n_bootstrap: int | None = None,
    confidence_level: float = 0.95,
    seed: int = 0,
    alternative: Literal["two-sided", "less", "greater"] = "two-sided",
) -> pd.DataFrame:
    """Correlation across models between per-layer information strength and a behaviour metric.

    Args:
        probing: Probing rows (see `information_strength`) for at least three models.
        behaviour: Behaviour rows (`aligned_probing.behaviour.behaviour_metrics`).
        metric: Behaviour metric: "emt", "toxicity_probability" or "mean_score".
        subset: Behaviour subset: "all", "toxic_prompts" or "nontoxic_prompts".
        behaviour_attribute: Attribute of the behaviour metric; None pairs each probed attribute
            with the same attribute's behaviour.
        information: Probing column averaged into information strength ("pearson", "selectivity").
        depth_axis: "auto" (relative when depths differ), "layer" or "relative".
        n_grid: Points of the relative-depth grid (default: shallowest model's L + 1).
        n_permutations: Random pairings for p-values when there are more than `EXACT_MAX_N` models
            (with fewer, all n! pairings are enumerated: exact).
        n_bootstrap: Deprecated and ignored (the bootstrap interval was replaced by Fisher z, whose
            coverage was verified); passing it warns. Removal in 0.3.
        confidence_level: CI level.
        seed: Seed of the random permutations.
        alternative: Sidedness of `p_raw`, `p_fwer`, `q_bh` and of the peak selection: "two-sided"
            (largest |r|), "less" (most negative r, e.g. the paper's negative input-EMT correlation)
            or "greater".

    Returns:
        Tidy rows with `INTERPLAY_COLUMNS`: one per (template, scenario, attribute, layer or grid
        point, statistic in {pearson, spearman}). `layer` is the layer on the layer axis and <NA> on
        the relative axis; `relative_depth` is always filled. `p_value` equals `p_raw` (kept for
        compatibility); `p_method` is "exact" or "permutation"; `peak_picked` marks the layer a
        best-layer summary selects (`interplay_summary`).

    Raises:
        ValueError: fewer than three models with both probing and behaviour for a group.

    Example:
        >>> table = interplay(probing_rows, behaviour_rows, alternative="less")  # doctest: +SKIP
        >>> interplay_summary(table)[["scenario", "layer", "value", "p_raw", "p_fwer"]]  # doctest: +SKIP
    """
    if n_bootstrap is not None:
        warnings.warn(
            "interplay(n_bootstrap=...) is deprecated and ignored: intervals are Fisher z (coverage "
            "verified by simulation); remove the argument (it goes in 0.3).",
            FutureWarning,
            stacklevel=2,
        )
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}.")
    if not 0.0 < confidence_level < 1.0:
        raise ValueError(f"confidence_level must be in (0, 1), got {confidence_level!r}.")
    info = information_strength(probing, value=information)
    n_models = info["model"].nunique()
    if n_models < MIN_MODELS:
        raise ValueError(
            f"interplay needs at least {MIN_MODELS} models (a correlation across models), got {n_models}: "
            f"{sorted(info['model'].unique())}. Probe more models."
        )
    beh = behaviour[(behaviour["metric"] == metric) & (behaviour["subset"] == subset)]
    if beh.empty:
        raise ValueError(f"behaviour has no rows with metric={metric!r} and subset={subset!r}.")
    axis = _resolve_axis(info.groupby("model")["n_layers"].first(), depth_axis)
    rows: list[dict] = []
    for (template, scenario, attribute), group in info.groupby(
        ["template", "scenario", "attribute"], sort=True
    ):
        b_attr = behaviour_attribute or attribute
        target = beh[(beh["template"] == template) & (beh["attribute"] == b_attr)].set_index("model")["value"]
        if target.index.duplicated().any():
            raise ValueError(
                f"behaviour has several rows per model for template {template}, attribute {b_attr}."
            )
        curves, depth = _curves(group, axis, n_grid)
        models = [m for m in curves.index if m in target.index and np.isfinite(target[m])]
        if len(models) < MIN_MODELS:
            raise ValueError(
                f"template {template}, scenario {scenario!r}, attribute {attribute!r}: only {len(models)} "
                f"model(s) have both probing and {metric}/{subset} behaviour ({models}); need {MIN_MODELS}."
            )
        n = len(models)
        y = target[models].to_numpy(dtype=np.float64)
        X = curves.loc[models].to_numpy(dtype=np.float64)  # (n, L)
        perms, exact = permutations(n, n_permutations, seed)
        for stat in ("pearson", "spearman"):
            Xs, ys = (X, y) if stat == "pearson" else (stats.rankdata(X, axis=0), stats.rankdata(y))
            fam = layer_family_tests(Xs, ys, perms, alternative)
            for j, col in enumerate(curves.columns):
                rows.append(
                    {
                        "template": template,
                        "scenario": scenario,
                        "attribute": attribute,
                        "behaviour_attribute": b_attr,
                        "metric": metric,
                        "subset": subset,
                        "depth_axis": axis,
                        "layer": int(col) if axis == "layer" else pd.NA,
                        "relative_depth": float(depth[j]),
                        "statistic": stat,
                        "value": fam["r"][j],
                        "p_value": fam["p_raw"][j],
                        "p_raw": fam["p_raw"][j],
                        "p_fwer": fam["p_fwer"][j],
                        "q_bh": fam["q_bh"][j],
                        "peak_picked": j == fam["peak"],
                        "alternative": alternative,
                        "p_method": "exact" if exact else "permutation",
                        **correlation_ci(fam["r"][j], n, stat, confidence_level),
                        "n_models": n,
                    }
                )
    out = pd.DataFrame(rows, columns=list(INTERPLAY_COLUMNS))
    return out.astype({"layer": "Int64"})


#: The layer family of one family-wise test: peaks must be picked within it.
FAMILY: tuple[str, ...] = ("template", "scenario", "attribute", "statistic")


def interplay_summary(
    table: pd.DataFrame,
    *,
    statistic: str = "pearson",
    by: Sequence[str] = ("template", "scenario", "attribute"),
) -> pd.DataFrame:
    """The peak-picked layer (or depth) of each curve, with its family-wise adjusted p-value.

    The peak is the layer with the largest |r|, the most negative r or the largest r, following the
    table's `alternative` (set when calling `interplay`); `p_fwer` is adjusted for exactly that selection
    over the layers of the curve, so report it (and `q_bh`) next to `p_raw`. The interval of a picked
    peak is not adjusted for the selection.

    Args:
        table: `interplay` output.
        statistic: "pearson" or "spearman".
        by: Grouping; must contain template, scenario and attribute (the family of the adjustment):
            picking across attributes or templates would be a larger selection than `p_fwer` covers.

    Returns:
        One row per group with the table's columns (`peak_picked` True).
    """
    missing = [c for c in ("template", "scenario", "attribute") if c not in by]
    if missing:
        raise ValueError(
            f"by must include {list(FAMILY[:3])} (p_fwer is adjusted over the layers of one curve); "
            f"got by={list(by)}, missing {missing}. Group by them and filter the rows you want."
        )
    part = table[(table["statistic"] == statistic) & table["peak_picked"]]
    if part.groupby(list(by)).size().gt(1).any():
        raise ValueError(f"by={list(by)} splits no curve; several peaks per group. Pass coarser keys.")
    return part.reset_index(drop=True)
