"""Probing summaries: mean and a corrected 95% CI over folds x seeds per layer, and each curve's peak layer.

The J = folds x seeds values of a metric are not independent (the folds of one seed share training
rows, and the seeds re-split the same data), so the plain t interval `sd / sqrt(J)` is too narrow.
`summarize` uses the corrected resampled t interval of Nadeau & Bengio (2003):

    mean +/- t_{(1 + confidence) / 2, J - 1} * sqrt((1 / J + n_test / n_train) * sd^2)

with sd the sample standard deviation over the J values and n_test / n_train the mean test-to-train
ratio of the replicates (1/3 for 4-fold CV). `benchmarks/stats_coverage.py` measures its coverage of the
population test r (the expected test Pearson r of a probe trained on n_train rows); see docs/probing.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

#: Metrics summarised by default (those present in the frame are used). MDL enters as its gains in
#: bits per sample; `compression` (uniform / online) is not summarised by default: it is > 1 for pure
#: noise whenever the targets are skewed.
SUMMARY_METRICS: tuple[str, ...] = (
    "pearson",
    "r2",
    "rmse",
    "control_pearson",
    "selectivity",
    "mdl_gain_control",
    "mdl_gain_baseline",
    "mdl_compression_baseline",
)
#: Metrics where lower is better (the peak is the minimum).
LOWER_IS_BETTER: frozenset[str] = frozenset({"rmse", "online_codelength"})
#: Interval methods: "nadeau_bengio" (corrected resampled t, default) or "t" (plain, too narrow for CV).
CI_METHODS: tuple[str, ...] = ("nadeau_bengio", "t")
_CURVE = ["model", "template", "scenario", "attribute"]


def corrected_t_halfwidth(
    sd: np.ndarray, n: np.ndarray, test_train_ratio: np.ndarray, confidence: float = 0.95
) -> np.ndarray:
    """Half-width `t_{q, J-1} sqrt((1/J + n_test/n_train) sd^2)` of the Nadeau-Bengio interval.

    Args:
        sd: Sample standard deviation (ddof 1) of the J replicate values.
        n: J, the number of replicates (>= 2; NaN otherwise).
        test_train_ratio: Mean n_test / n_train of the replicates (0 gives the plain t interval).
        confidence: Coverage in (0, 1).
    """
    n = np.asarray(n, dtype=np.float64)
    q = stats.t.ppf((1 + confidence) / 2, np.maximum(n - 1, 1))
    half = q * np.sqrt((1.0 / n + np.asarray(test_train_ratio, dtype=np.float64)) * np.asarray(sd) ** 2)
    return np.where(n > 1, half, np.nan)


def summarize(
    df: pd.DataFrame,
    *,
    metrics: Sequence[str] | None = None,
    confidence: float = 0.95,
    ci_method: str = "nadeau_bengio",
) -> pd.DataFrame:
    """Mean and CI over folds x seeds per (model, template, scenario, attribute, layer).

    The CI is the corrected resampled t interval (module docstring); NaN values are left out. With
    `ci_method="t"`, or when `df` lacks `n_train`/`n_test`, it is the plain t interval
    `mean +/- t sd / sqrt(J)` (too narrow for CV replicates; `ci_method` says which one a row has).

    Args:
        df: `run_probing` output.
        metrics: Metric columns to summarise (default: those of `SUMMARY_METRICS` in `df`).
        confidence: Coverage of the interval, in (0, 1).
        ci_method: "nadeau_bengio" (default) or "t".

    Returns:
        Long-form rows: model, template, scenario, attribute, layer, n_layers, relative_depth (and
        `n_rows_lost` when `df` has it), metric, mean, sd, n, ci_low, ci_high, ci_method, is_peak (True at
        the curve's best layer for that metric: the highest mean, or the lowest for `LOWER_IS_BETTER`).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}.")
    if ci_method not in CI_METHODS:
        raise ValueError(f"ci_method must be one of {CI_METHODS}, got {ci_method!r}.")
    metrics = [m for m in SUMMARY_METRICS if m in df.columns] if metrics is None else list(metrics)
    missing = [c for c in [*_CURVE, "layer", *metrics] if c not in df.columns]
    if missing:
        raise ValueError(f"df is missing columns {missing}; pass run_probing's output.")
    keys = [*_CURVE, "layer"] + [c for c in ("n_layers", "relative_depth", "n_rows_lost") if c in df.columns]
    corrected = ci_method == "nadeau_bengio" and {"n_train", "n_test"} <= set(df.columns)
    frame = df.assign(_ratio=df["n_test"] / df["n_train"]) if corrected else df.assign(_ratio=0.0)
    long = frame.melt(id_vars=[*keys, "_ratio"], value_vars=metrics, var_name="metric").dropna(
        subset=["value"]
    )
    out = (
        long.groupby([*keys, "metric"], sort=True)
        .agg(mean=("value", "mean"), sd=("value", "std"), n=("value", "count"), _ratio=("_ratio", "mean"))
        .reset_index()
    )
    half = corrected_t_halfwidth(
        out["sd"].to_numpy(), out["n"].to_numpy(), out["_ratio"].to_numpy(), confidence
    )
    out["ci_low"], out["ci_high"] = out["mean"] - half, out["mean"] + half
    out["ci_method"] = "nadeau_bengio" if corrected else "t"
    out = out.drop(columns="_ratio")
    sign = np.where(out["metric"].isin(LOWER_IS_BETTER), -1.0, 1.0)
    score = pd.Series(sign * out["mean"].to_numpy(), index=out.index)
    best = score.groupby([out[c] for c in [*_CURVE, "metric"]]).idxmax()
    out["is_peak"] = out.index.isin(best.dropna().to_numpy())
    return out


def rows_lost(df: pd.DataFrame) -> pd.DataFrame:
    """Rows each scenario lost per model (non-finite activations, i.e. empty continuations).

    Args:
        df: `run_probing` output (with `n_rows_lost`).

    Returns:
        One row per (model, template, scenario): `n_rows_lost` (the largest over layers) and `n_rows`
        (rows used, n_train + n_test, of the first fold and seed).
    """
    if "n_rows_lost" not in df.columns:
        raise ValueError("df has no n_rows_lost column; pass run_probing's output.")
    keys = ["model", "template", "scenario"]
    return (
        df.assign(n_rows=df["n_train"] + df["n_test"])
        .groupby(keys, sort=True)
        .agg(n_rows_lost=("n_rows_lost", "max"), n_rows=("n_rows", "max"))
        .reset_index()
    )


def peak_layers(summary: pd.DataFrame, *, metric: str = "pearson") -> pd.DataFrame:
    """The best layer of each (model, template, scenario, attribute) curve for one metric.

    The peak is picked after looking at every layer, so its interval is optimistic for the peak value
    (selection); it is labelled `peak_picked = True`.

    Args:
        summary: `summarize` output.
        metric: The metric whose peak is wanted.

    Returns:
        One row per curve: model, template, scenario, attribute, layer (the peak), n_layers,
        relative_depth, mean, ci_low, ci_high, ci_method, peak_picked.
    """
    if metric not in set(summary["metric"]):
        raise ValueError(f"metric must be one of {sorted(set(summary['metric']))}, got {metric!r}.")
    rows = summary[(summary["metric"] == metric) & summary["is_peak"]]
    cols = [*_CURVE, "layer"] + [c for c in ("n_layers", "relative_depth") if c in rows.columns]
    extra = [c for c in ("ci_method",) if c in rows.columns]
    return rows[[*cols, "mean", "ci_low", "ci_high", *extra]].assign(peak_picked=True).reset_index(drop=True)
