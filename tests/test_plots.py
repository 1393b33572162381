from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection, QuadMesh

from aligned_probing.report import plots

SCENARIOS = ["input", "forward", "output", "backward"]


@pytest.fixture
def summary(rng) -> pd.DataFrame:
    """A `probing.summarize`-shaped table for metric pearson (plus two wide extras)."""
    rows = []
    for attribute in ["toxicity", "insult", "threat"]:
        for scenario in SCENARIOS:
            for layer in range(5):
                r = float(rng.uniform(0, 1))
                rows.append(
                    {
                        "model": "m",
                        "attribute": attribute,
                        "scenario": scenario,
                        "layer": layer,
                        "metric": "pearson",
                        "mean": r,
                        "ci_low": r - 0.1,
                        "ci_high": r + 0.05,
                        "selectivity": r / 2,
                        "compression": 1 + r,
                    }
                )
    return pd.DataFrame(rows)


def _line(ax, label):
    return next(line for line in ax.get_lines() if line.get_label() == label)


def test_information_strength_draws_one_line_and_band_per_scenario(summary):
    one = summary[summary["attribute"] == "toxicity"]
    ax = plots.information_strength(one)
    assert [line.get_label() for line in ax.get_lines()] == SCENARIOS  # fixed scenario order
    for scenario in SCENARIOS:
        expected = one[one["scenario"] == scenario].sort_values("layer")
        line = _line(ax, scenario)
        np.testing.assert_array_equal(line.get_xdata(), expected["layer"])
        np.testing.assert_allclose(line.get_ydata(), expected["mean"])
        assert matplotlib.colors.to_hex(line.get_color()) == plots.SCENARIO_COLORS[scenario]
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 4
    # The band of "input" spans exactly [ci_low, ci_high].
    inp = one[one["scenario"] == "input"]
    ys = bands[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(inp["ci_low"].min()) and ys.max() == pytest.approx(inp["ci_high"].max())
    assert ax.get_legend().get_title().get_text() == "scenario"


def test_line_plots_refuse_to_aggregate(summary):
    with pytest.raises(ValueError, match=r"several rows per \('scenario', 'layer'\).*probing.summarize"):
        plots.information_strength(summary)  # three attributes per (scenario, layer)


def test_missing_column_is_named(summary):
    with pytest.raises(ValueError, match=r"no column\(s\) \['pearsn'\]"):
        plots.information_strength(summary, y="pearsn")


def test_given_ax_is_used_and_pyplot_current_figure_untouched(summary):
    fig, ax = plt.subplots()
    other = plt.figure()
    out = plots.selectivity(summary[summary["attribute"] == "insult"], y="selectivity", ax=ax)
    assert out is ax and plt.gcf() is other
    assert len(ax.get_lines()) == 4 + 1  # four scenarios plus the zero line


def test_new_figure_when_ax_is_none(summary):
    before = plt.gcf()
    ax = plots.mdl_compression(
        summary[summary["attribute"] == "threat"], y="compression", ci_low=None, ci_high=None
    )
    assert ax.figure is not before
    np.testing.assert_allclose(
        _line(ax, "output").get_ydata(),
        summary.query("attribute == 'threat' and scenario == 'output'")["compression"],
    )
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]


def test_information_grid_has_one_panel_per_attribute(summary):
    fig = plots.information_grid(summary, col_wrap=2)
    assert [ax.get_title() for ax in fig.axes] == ["toxicity", "insult", "threat"]
    assert fig.axes[0].get_legend() is not None and fig.axes[1].get_legend() is None
    np.testing.assert_allclose(
        _line(fig.axes[2], "backward").get_ydata(),
        summary.query("attribute == 'threat' and scenario == 'backward'")["mean"],
    )


def test_attribute_heatmap_values(summary):
    one = summary[summary["scenario"] == "input"]
    ax = plots.attribute_heatmap(one)
    mesh = next(c for c in ax.collections if isinstance(c, QuadMesh))
    values = np.asarray(mesh.get_array()).reshape(3, 5)
    expected = one.pivot(index="attribute", columns="layer", values="mean").loc[
        ["toxicity", "insult", "threat"]
    ]
    np.testing.assert_allclose(values, expected.to_numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == ["toxicity", "insult", "threat"]


def test_behaviour_bars_heights_and_error_bars():
    data = pd.DataFrame(
        {
            "attribute": ["toxicity", "insult", "toxicity", "insult"],
            "model": ["a", "a", "b", "b"],
            "value": [0.3, 0.2, 0.5, 0.1],
            "ci_low": [0.25, 0.1, 0.4, 0.05],
            "ci_high": [0.35, 0.3, 0.6, 0.2],
        }
    )
    ax = plots.behaviour_bars(data)
    heights = [p.get_height() for p in ax.patches]
    assert heights == pytest.approx([0.3, 0.2, 0.5, 0.1])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["toxicity", "insult"]
    # Error bar segments go from ci_low to ci_high.
    segs = [seg for c in ax.collections for seg in c.get_segments()]
    spans = sorted((round(s[:, 1].min(), 6), round(s[:, 1].max(), 6)) for s in segs)
    assert spans == sorted(zip(data["ci_low"], data["ci_high"], strict=True))


@pytest.mark.parametrize(
    ("func", "x", "y", "hue"),
    [
        (plots.interplay_curve, "layer", "value", "scenario"),
        (plots.layer_skipping_curve, "layer", "delta", None),
        (plots.patching_curve, "layer", "delta", "direction"),
        (plots.steering_curve, "alpha", "delta", "layer"),
    ],
)
def test_curves_draw_their_data(func, x, y, hue, rng):
    levels = (
        ["input", "output"] if hue == "scenario" else (["toxic->clean", "clean->toxic"] if hue else [None])
    )
    if hue == "layer":
        levels = [3, 7]
    rows = [{x: xv, y: float(rng.normal()), **({hue: h} if hue else {})} for h in levels for xv in range(4)]
    data = pd.DataFrame(rows)
    data["ci_low"], data["ci_high"] = data[y] - 0.1, data[y] + 0.1
    ax = func(data, x=x, y=y, hue=hue)
    for h in levels:
        part = data if hue is None else data[data[hue] == h]
        line = ax.get_lines()[levels.index(h)]
        np.testing.assert_allclose(line.get_ydata(), part[y])
        if hue is not None:
            assert line.get_label() == str(h)


def test_save_figure_writes_png_and_svg(tmp_path, summary):
    ax = plots.information_strength(summary[summary["attribute"] == "toxicity"])
    paths = plots.save_figure(ax.figure, tmp_path / "sub" / "info")
    assert [p.name for p in paths] == ["info.png", "info.svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[0].stat().st_size > 5000
    assert "<svg" in paths[1].read_text()[:500]
    with pytest.raises(ValueError, match=r"formats must be among \('png', 'svg', 'pdf'\), got \['jpg'\]"):
        plots.save_figure(ax.figure, tmp_path / "x", formats=["jpg"])


def test_retention_curve_draws_one_line_per_arm_and_chance():
    data = pd.DataFrame(
        {
            "arm": ["a", "a", "a", "b", "b", "b"],
            "step": [0, 4, 8, 0, 4, 8],
            "auroc": [0.9, 0.8, 0.7, 0.9, 0.9, 0.85],
        }
    )
    ax = plots.retention_curve(data)
    lines = ax.get_lines()
    np.testing.assert_allclose(lines[0].get_ydata(), [0.9, 0.8, 0.7])
    np.testing.assert_allclose(lines[1].get_ydata(), [0.9, 0.9, 0.85])
    assert [line.get_label() for line in lines[:2]] == ["a", "b"]
    assert any(np.allclose(line.get_ydata(), 0.5) for line in lines[2:]), "chance level is drawn"


def test_heatmap_grid_has_one_panel_per_scenario_on_one_colour_scale(summary):
    one = summary[summary["model"] == "m"]
    fig = plots.heatmap_grid(one)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == SCENARIOS  # every scenario, fixed order
    lo, hi = one["mean"].min(), one["mean"].max()
    for ax, scenario in zip(panels, SCENARIOS, strict=True):
        mesh = next(c for c in ax.collections if isinstance(c, QuadMesh))
        expected = one[one["scenario"] == scenario].pivot(index="attribute", columns="layer", values="mean")
        expected = expected.reindex(["toxicity", "insult", "threat"])
        np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(expected.shape), expected.to_numpy())
        assert mesh.norm.vmin == pytest.approx(lo) and mesh.norm.vmax == pytest.approx(hi)


def test_effect_with_cost_draws_effect_left_and_cost_on_a_second_axis():
    data = pd.DataFrame(
        {
            "alpha": [-1.0, 0.0, 1.0] * 2,
            "condition": ["probe"] * 3 + ["random"] * 3,
            "delta": [-0.2, 0.0, 0.3, 0.01, 0.0, -0.01],
            "ci_low": [-0.25, -0.01, 0.2, -0.05, -0.01, -0.06],
            "ci_high": [-0.15, 0.01, 0.4, 0.06, 0.01, 0.04],
            "cost": [0.5, 0.0, 0.7, 0.2, 0.0, 0.1],
            "cost_low": [0.4, 0.0, 0.6, 0.1, 0.0, 0.0],
            "cost_high": [0.6, 0.0, 0.8, 0.3, 0.0, 0.2],
        }
    )
    ax = plots.effect_with_cost(data, x="alpha", hue="condition")
    [right] = [a for a in ax.figure.axes if a is not ax]
    assert right.get_ylabel() == "change in log perplexity"
    probe = _line(ax, "probe")
    np.testing.assert_allclose(probe.get_ydata(), [-0.2, 0.0, 0.3])
    cost_lines = [line for line in right.get_lines() if line.get_linestyle() == ":"]
    assert sorted(tuple(np.round(line.get_ydata(), 3)) for line in cost_lines) == [
        (0.2, 0.0, 0.1),
        (0.5, 0.0, 0.7),
    ]
    # The effect axis keeps its CI bands, one per condition.
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 2


def test_trend_curve_draws_points_and_band():
    data = pd.DataFrame(
        {
            "step": [0, 5, 10],
            "value": [0.3, 0.25, 0.2],
            "ci_low": [0.28, 0.2, 0.1],
            "ci_high": [0.32, 0.3, 0.3],
            "arm": "dpo",
        }
    )
    ax = plots.trend_curve(data, hue="arm")
    line = _line(ax, "dpo")
    np.testing.assert_array_equal(line.get_xdata(), [0, 5, 10])
    np.testing.assert_allclose(line.get_ydata(), [0.3, 0.25, 0.2])
    band = next(c for c in ax.collections if isinstance(c, PolyCollection))
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(0.1) and ys.max() == pytest.approx(0.32)
