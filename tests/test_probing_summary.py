"""summarize / peak_layers: t intervals against scipy, peaks, tidy shape."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from aligned_probing.probing import peak_layers, summarize


@pytest.fixture
def results(rng):
    rows = []
    for scenario in ("input", "output"):
        for layer in range(5):
            true = 0.8 - 0.1 * abs(layer - (1 if scenario == "input" else 3))  # peaks at 1 and 3
            for fold in range(4):
                for seed in range(5):
                    r = true + 0.02 * rng.normal()
                    rows.append(
                        {
                            "model": "m",
                            "template": 0,
                            "scenario": scenario,
                            "attribute": "toxicity",
                            "layer": layer,
                            "n_layers": 4,
                            "relative_depth": layer / 4,
                            "fold": fold,
                            "seed": seed,
                            "pearson": r,
                            "r2": r**2,
                            "rmse": 1 - r,
                            "control_pearson": 0.0,
                            "selectivity": r,
                        }
                    )
    return pd.DataFrame(rows)


def test_interval_matches_scipy_t_interval(results):
    summary = summarize(results)
    row = summary.query("scenario == 'input' and layer == 2 and metric == 'pearson'").iloc[0]
    values = results.query("scenario == 'input' and layer == 2").pearson
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert row["n"] == 20
    assert row["mean"] == pytest.approx(values.mean())
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high))


def test_peaks(results):
    summary = summarize(results)
    peaks = peak_layers(summary).set_index("scenario")
    assert peaks.loc["input", "layer"] == 1 and peaks.loc["output", "layer"] == 3
    assert peaks.loc["output", "relative_depth"] == 0.75
    rmse_peaks = peak_layers(summary, metric="rmse").set_index("scenario")  # lower is better
    assert rmse_peaks.loc["input", "layer"] == 1
    # exactly one peak per (curve, metric)
    assert summary.groupby(["scenario", "metric"]).is_peak.sum().eq(1).all()


def test_nan_values_are_left_out(results):
    results.loc[results.index[:3], "pearson"] = np.nan
    summary = summarize(results, metrics=["pearson"])
    first = summary.query("scenario == 'input' and layer == 0").iloc[0]
    assert first["n"] == 17


def test_errors(results):
    with pytest.raises(ValueError, match=r"missing columns \['compression'\]"):
        summarize(results, metrics=["compression"])
    with pytest.raises(ValueError, match="metric must be one of"):
        peak_layers(summarize(results), metric="auroc")
