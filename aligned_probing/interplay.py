"""Interplay: across models, correlate information strength per layer with behaviour.

For a set of models, per (template, scenario, attribute, layer), the x values are each model's
information strength (the probe's test Pearson r averaged over folds x seeds) and the y values
the models' behaviour metric (EMT by default). We report Pearson r and Spearman rho, each with

* a two-sided permutation p-value (`scipy.stats.permutation_test`, pairings shuffled; exact when
  the number of models is small enough to enumerate all n! pairings), and
* a percentile bootstrap CI over models (models resampled with replacement).

Depth: when all models have the same number of layers L, layers are compared as they are
(`depth_axis = "layer"`). Otherwise each model's curve is placed on relative depth l / L and
linearly interpolated (`numpy.interp`) onto a common grid of `n_grid` evenly spaced points in
[0, 1] (default: the shallowest model's L + 1 points, so no model is read at a finer resolution
than the coarsest one has), and `depth_axis = "relative"`.

The paper's headline is a correlation of about -0.75 between input/forward information and EMT.
With few models the uncertainty is large: three models give at best p = 1/3 (two-sided, exact).
"""

from __future__ import annotations

from collections.abc import Sequence

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
    "ci_low",
    "ci_high",
    "n_models",
)
_PROBE_KEYS = ("model", "template", "scenario", "attribute", "layer", "n_layers")
MIN_MODELS = 3


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


def _pearson(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Vectorised Pearson r along `axis` (NaN where x or y is constant); range [-1, 1].

    r = sum((x - mean x)(y - mean y)) / sqrt(sum (x - mean x)^2 * sum (y - mean y)^2).
    Hand-written because `scipy.stats.pearsonr` evaluates one resample per call, and the
    permutation and bootstrap loops need thousands per layer.
    """
    xc = x - x.mean(axis=axis, keepdims=True)
    yc = y - y.mean(axis=axis, keepdims=True)
    den = np.sqrt((xc**2).sum(axis=axis) * (yc**2).sum(axis=axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc).sum(axis=axis) / den
    return np.where(den > 1e-15, np.clip(r, -1.0, 1.0), np.nan)


def _spearman(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman rho: Pearson r of average ranks (equals `scipy.stats.spearmanr`, ties included)."""
    return _pearson(stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis), axis=axis)


_STATISTICS = {"pearson": _pearson, "spearman": _spearman}


def _correlation_row(
    x: np.ndarray,
    y: np.ndarray,
    name: str,
    *,
    n_permutations: int,
    n_bootstrap: int,
    confidence_level: float,
    seed: int,
) -> dict[str, float]:
    fn = _STATISTICS[name]
    value = float(fn(x, y))
    if not np.isfinite(value):
        return {"value": value, "p_value": np.nan, "ci_low": np.nan, "ci_high": np.nan}
    perm = stats.permutation_test(
        (x, y),
        fn,
        permutation_type="pairings",
        vectorized=True,
        n_resamples=n_permutations,
        alternative="two-sided",
        rng=np.random.default_rng(seed),
    )
    # Bootstrap over models, hand-written: resamples that repeat one model so often that x or y is
    # constant have no correlation (NaN) and are dropped, which scipy.stats.bootstrap cannot do.
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_bootstrap, len(x)))
    boot = fn(x[idx], y[idx], axis=-1)
    boot = boot[np.isfinite(boot)]
    tail = (1.0 - confidence_level) / 2.0 * 100.0
    low, high = np.percentile(boot, [tail, 100.0 - tail]) if len(boot) else (np.nan, np.nan)
    return {"value": value, "p_value": float(perm.pvalue), "ci_low": float(low), "ci_high": float(high)}


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
    n_bootstrap: int = 2000,
    confidence_level: float = 0.95,
    seed: int = 0,
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
        n_permutations: Permutations for the p-value (exact test when n! is smaller).
        n_bootstrap: Bootstrap resamples over models.
        confidence_level: CI level.
        seed: Seed of permutations and bootstrap.

    Returns:
        Tidy rows with `INTERPLAY_COLUMNS`: one per (template, scenario, attribute, layer or grid
        point, statistic in {pearson, spearman}). `layer` is the layer on the layer axis and <NA> on
        the relative axis; `relative_depth` is always filled.

    Raises:
        ValueError: fewer than three models with both probing and behaviour for a group.

    Example:
        >>> interplay(probing_rows, behaviour_rows).query("scenario == 'input'")  # doctest: +SKIP
    """
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
        y = target[models].to_numpy(dtype=np.float64)
        for j, col in enumerate(curves.columns):
            x = curves.loc[models, col].to_numpy(dtype=np.float64)
            for stat in ("pearson", "spearman"):
                res = _correlation_row(
                    x,
                    y,
                    stat,
                    n_permutations=n_permutations,
                    n_bootstrap=n_bootstrap,
                    confidence_level=confidence_level,
                    seed=seed,
                )
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
                        **res,
                        "n_models": len(models),
                    }
                )
    out = pd.DataFrame(rows, columns=list(INTERPLAY_COLUMNS))
    return out.astype({"layer": "Int64"})


def interplay_summary(
    table: pd.DataFrame, *, statistic: str = "pearson", by: Sequence[str] = ("scenario",)
) -> pd.DataFrame:
    """The layer (or depth) of the strongest |correlation| per group, for a one-line report."""
    part = table[table["statistic"] == statistic].dropna(subset=["value"])
    best = part.loc[part.groupby(list(by))["value"].apply(lambda s: s.abs().idxmax())]
    return best.reset_index(drop=True)
