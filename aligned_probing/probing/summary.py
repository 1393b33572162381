"""Probing summaries: mean and 95% CI over folds x seeds per layer, and the peak layer of each curve."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

#: Metrics summarised by default (those present in the frame are used).
SUMMARY_METRICS: tuple[str, ...] = ("pearson", "r2", "rmse", "control_pearson", "selectivity", "compression")
#: Metrics where lower is better (the peak is the minimum).
LOWER_IS_BETTER: frozenset[str] = frozenset({"rmse", "online_codelength"})
_CURVE = ["model", "template", "scenario", "attribute"]


def summarize(
    df: pd.DataFrame, *, metrics: Sequence[str] | None = None, confidence: float = 0.95
) -> pd.DataFrame:
    """Mean and t-based CI over folds x seeds per (model, template, scenario, attribute, layer).

    CI = mean +/- t_{(1 + confidence) / 2, n - 1} * sd / sqrt(n), with sd the sample standard deviation
    (ddof = 1) over the n = folds x seeds values (NaN values are left out). The K-fold x seed replicates
    share training data, so they are not independent and this interval is somewhat too narrow; use it to
    compare layers and scenarios, not as an exact coverage statement.

    Args:
        df: `run_probing` output.
        metrics: Metric columns to summarise (default: those of `SUMMARY_METRICS` in `df`).
        confidence: Coverage of the interval, in (0, 1).

    Returns:
        Long-form rows: model, template, scenario, attribute, layer, n_layers, relative_depth, metric,
        mean, sd, n, ci_low, ci_high, is_peak (True at the curve's best layer for that metric: the
        highest mean, or the lowest for `LOWER_IS_BETTER` metrics).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}.")
    metrics = [m for m in SUMMARY_METRICS if m in df.columns] if metrics is None else list(metrics)
    missing = [c for c in [*_CURVE, "layer", *metrics] if c not in df.columns]
    if missing:
        raise ValueError(f"df is missing columns {missing}; pass run_probing's output.")
    keys = [*_CURVE, "layer"] + [c for c in ("n_layers", "relative_depth") if c in df.columns]
    long = df.melt(id_vars=keys, value_vars=metrics, var_name="metric").dropna(subset=["value"])
    out = (
        long.groupby([*keys, "metric"], sort=True)["value"]
        .agg(mean="mean", sd="std", n="count")
        .reset_index()
    )
    half = stats.t.ppf((1 + confidence) / 2, np.maximum(out["n"] - 1, 1)) * out["sd"] / np.sqrt(out["n"])
    half = half.where(out["n"] > 1)  # one value: no interval
    out["ci_low"], out["ci_high"] = out["mean"] - half, out["mean"] + half
    sign = np.where(out["metric"].isin(LOWER_IS_BETTER), -1.0, 1.0)
    score = pd.Series(sign * out["mean"].to_numpy(), index=out.index)
    best = score.groupby([out[c] for c in [*_CURVE, "metric"]]).idxmax()
    out["is_peak"] = out.index.isin(best.dropna().to_numpy())
    return out


def peak_layers(summary: pd.DataFrame, *, metric: str = "pearson") -> pd.DataFrame:
    """The best layer of each (model, template, scenario, attribute) curve for one metric.

    Args:
        summary: `summarize` output.
        metric: The metric whose peak is wanted.

    Returns:
        One row per curve: model, template, scenario, attribute, layer (the peak), n_layers,
        relative_depth, mean, ci_low, ci_high.
    """
    if metric not in set(summary["metric"]):
        raise ValueError(f"metric must be one of {sorted(set(summary['metric']))}, got {metric!r}.")
    rows = summary[(summary["metric"] == metric) & summary["is_peak"]]
    cols = [*_CURVE, "layer"] + [c for c in ("n_layers", "relative_depth") if c in rows.columns]
    return rows[[*cols, "mean", "ci_low", "ci_high"]].reset_index(drop=True)
