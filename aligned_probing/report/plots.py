"""Figures of the method, drawn from the tidy result tables in one consistent style.

Every function takes `data` (a long-form DataFrame) first, column names as keyword-only
arguments and `ax=None`, and returns the Axes (or the Figure, for the faceted main figure). They
compute no statistics: a table with several rows per point (folds, seeds) is an error, so
aggregate first (`aligned_probing.probing.summarize`, the behaviour and interplay tables already
carry `ci_low`/`ci_high`). They never show or save; `save_figure` writes PNG and SVG.

Example:
    >>> summary = probing.summarize(results).query("metric == 'pearson'")  # doctest: +SKIP
    >>> fig = information_grid(summary[summary.model == "smollm2"])  # doctest: +SKIP
    >>> save_figure(fig, "figures/information")  # doctest: +SKIP

Over 500 lines on purpose: one small drawing function per figure (about 30 lines each, data first,
`ax=None`) sharing the band, legend and colour helpers; splitting by figure would scatter those.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# One style everywhere: seaborn's whitegrid, a fixed colour per scenario, colourblind palette otherwise.
AXES_STYLE = "whitegrid"
SCENARIO_COLORS: dict[str, str] = {
    "input": "#0173b2",
    "forward": "#de8f05",
    "output": "#029e73",
    "backward": "#d55e00",
}
_FIGSIZE = (6.4, 4.0)


def _new_axes(ax: Axes | None, figsize: tuple[float, float] = _FIGSIZE) -> Axes:
    """`ax`, or the Axes of a new figure in our style (never pyplot's current figure)."""
    if ax is not None:
        return ax
    with sns.axes_style(AXES_STYLE):
        fig, new = plt.subplots(figsize=figsize, layout="constrained")
    return new


def _check_columns(data: pd.DataFrame, columns: Sequence[str | None]) -> None:
    if not isinstance(data, pd.DataFrame):
        raise TypeError(f"data must be a pandas DataFrame, got {type(data).__name__}.")
    missing = [c for c in columns if c is not None and c not in data.columns]
    if missing:
        raise ValueError(f"data has no column(s) {missing}; its columns are {list(data.columns)}.")


def _check_unique(data: pd.DataFrame, keys: Sequence[str | None]) -> None:
    keys = [k for k in keys if k is not None]
    if data.duplicated(subset=keys).any():
        raise ValueError(
            f"data has several rows per {tuple(keys)}: plots draw one value per point and compute no "
            "statistics. Filter the table or aggregate it first (e.g. probing.summarize)."
        )


def palette_for(levels: Sequence[object]) -> dict[object, object]:
    """Colours for hue levels: the fixed scenario colours when the levels are scenarios."""
    if levels and all(level in SCENARIO_COLORS for level in levels):
        return {level: SCENARIO_COLORS[str(level)] for level in levels}
    colors = sns.color_palette("colorblind", max(len(levels), 1))
    return dict(zip(levels, colors, strict=False))


def _levels(data: pd.DataFrame, hue: str | None) -> list[object]:
    if hue is None:
        return [None]
    values = list(pd.unique(data[hue]))
    order = [s for s in SCENARIO_COLORS if s in values]
    return order if len(order) == len(values) else values


def _line_band(
    data: pd.DataFrame,
    *,
    x: str,
    y: str,
    hue: str | None,
    ci_low: str | None,
    ci_high: str | None,
    ax: Axes | None,
    marker: str | None = None,
) -> Axes:
    """Lines of `y` over `x`, one per `hue` level, with a shaded [ci_low, ci_high] band."""
    _check_columns(data, [x, y, hue, ci_low, ci_high])
    _check_unique(data, [hue, x])
    ax = _new_axes(ax)
    levels = _levels(data, hue)
    colors = palette_for(levels) if hue is not None else {None: sns.color_palette("colorblind")[0]}
    for level in levels:
        part = data if hue is None else data[data[hue] == level]
        part = part.sort_values(x)
        label = None if hue is None else str(level)
        ax.plot(part[x].to_numpy(), part[y].to_numpy(), color=colors[level], label=label, marker=marker)
        if ci_low is not None and ci_high is not None:
            ax.fill_between(
                part[x].to_numpy(),
                part[ci_low].to_numpy(dtype=float),
                part[ci_high].to_numpy(dtype=float),
                color=colors[level],
                alpha=0.2,
                linewidth=0,
            )
    if pd.api.types.is_integer_dtype(data[x]):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if hue is not None:
        ax.legend(title=hue, frameon=False)
    return ax


def information_strength(
    data: pd.DataFrame,
    *,
    x: str = "layer",
    y: str = "mean",
    hue: str | None = "scenario",
    ci_low: str | None = "ci_low",
    ci_high: str | None = "ci_high",
    ax: Axes | None = None,
) -> Axes:
    """Information strength (test Pearson r) per layer, one line per scenario, with CI bands.

    Args:
        data: One row per (hue, x), e.g. `probing.summarize(df).query("metric == 'pearson'")` filtered
            to one model, template and attribute.
        x: Layer column.
        y: Information strength column.
        hue: Line grouping (scenario).
        ci_low: Lower CI column (None: no band).
        ci_high: Upper CI column.
        ax: Axes to draw on; None makes a new figure.

    Returns:
        The Axes.
    """
    ax = _line_band(data, x=x, y=y, hue=hue, ci_low=ci_low, ci_high=ci_high, ax=ax)
    ax.set_ylabel("information strength (Pearson r)" if y in {"mean", "pearson"} else y)
    return ax


def information_grid(
    data: pd.DataFrame,
    *,
    col: str = "attribute",
    x: str = "layer",
    y: str = "mean",
    hue: str | None = "scenario",
    ci_low: str | None = "ci_low",
    ci_high: str | None = "ci_high",
    col_wrap: int = 3,
) -> Figure:
    """The paper's main figure: one `information_strength` panel per attribute, shared axes.

    Args:
        data: One row per (col, hue, x) for one model.
        col: Facet column (attribute).
        x: Layer column.
        y: Information strength column.
        hue: Line grouping (scenario).
        ci_low: Lower CI column.
        ci_high: Upper CI column.
        col_wrap: Panels per row.

    Returns:
        The Figure (its Axes in `fig.axes`, titled by facet value).
    """
    _check_columns(data, [col, x, y, hue, ci_low, ci_high])
    panels = list(pd.unique(data[col]))
    ncols = max(1, min(col_wrap, len(panels)))
    nrows = int(np.ceil(len(panels) / ncols)) or 1
    with sns.axes_style(AXES_STYLE):
        fig, axes = plt.subplots(
            nrows,
            ncols,
            figsize=(4.2 * ncols, 3.2 * nrows),
            sharex=True,
            sharey=True,
            squeeze=False,
            layout="constrained",
        )
    flat = axes.ravel()
    for panel, ax in zip(panels, flat, strict=False):
        information_strength(
            data[data[col] == panel], x=x, y=y, hue=hue, ci_low=ci_low, ci_high=ci_high, ax=ax
        )
        ax.set_title(str(panel))
        if ax is not flat[0] and ax.get_legend() is not None:
            ax.get_legend().remove()
    for ax in flat[len(panels) :]:
        fig.delaxes(ax)
    return fig


def attribute_heatmap(
    data: pd.DataFrame,
    *,
    x: str = "layer",
    y: str = "attribute",
    value: str = "mean",
    ax: Axes | None = None,
    cmap: str = "viridis",
) -> Axes:
    """Attribute x layer heatmap of one value (information strength by default).

    Args:
        data: One row per (y, x), e.g. one model and scenario of `probing.summarize`.
        x: Column across (layer).
        y: Column down (attribute).
        value: Colour value.
        ax: Axes to draw on; None makes a new figure.
        cmap: Matplotlib colormap.

    Returns:
        The Axes (the heatmap is its first `QuadMesh` collection).
    """
    _check_columns(data, [x, y, value])
    _check_unique(data, [y, x])
    grid = data.pivot(index=y, columns=x, values=value).sort_index(axis=1)
    grid = grid.reindex(list(pd.unique(data[y])))
    ax = _new_axes(ax, figsize=(max(6.4, 0.25 * grid.shape[1] + 2), 0.45 * grid.shape[0] + 1.5))
    sns.heatmap(grid, ax=ax, cmap=cmap, cbar_kws={"label": value})
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    return ax


def selectivity(
    data: pd.DataFrame,
    *,
    x: str = "layer",
    y: str = "mean",
    hue: str | None = "scenario",
    ci_low: str | None = "ci_low",
    ci_high: str | None = "ci_high",
    ax: Axes | None = None,
) -> Axes:
    """Selectivity (r - r_control) per layer: how much the probe beats the permuted-target control.

    Args:
        data: One row per (hue, x).
        x: Layer column.
        y: Selectivity column.
        hue: Line grouping.
        ci_low: Lower CI column (None: no band).
        ci_high: Upper CI column.
        ax: Axes to draw on; None makes a new figure.

    Returns:
        The Axes.
    """
    ax = _line_band(data, x=x, y=y, hue=hue, ci_low=ci_low, ci_high=ci_high, ax=ax)
    ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle="--")
    ax.set_ylabel("selectivity (r - r control)" if y in {"mean", "selectivity"} else y)
    return ax


def mdl_compression(
    data: pd.DataFrame,
    *,
    x: str = "layer",
    y: str = "mean",
    hue: str | None = "scenario",
    ci_low: str | None = "ci_low",
    ci_high: str | None = "ci_high",
    ax: Axes | None = None,
) -> Axes:
    """MDL compression (uniform / online codelength, >= 1 means the labels are learnable) per layer.

    Args:
        data: One row per (hue, x).
        x: Layer column.
        y: Compression column.
        hue: Line grouping.
        ci_low: Lower CI column (None: no band).
        ci_high: Upper CI column.
        ax: Axes to draw on; None makes a new figure.

    Returns:
        The Axes.
    """
    ax = _line_band(data, x=x, y=y, hue=hue, ci_low=ci_low, ci_high=ci_high, ax=ax)
    ax.axhline(1.0, color="0.5", linewidth=0.8, linestyle="--")
    ax.set_ylabel("MDL compression" if y in {"mean", "compression"} else y)
    return ax


def behaviour_bars(
    data: pd.DataFrame,
    *,
    x: str = "attribute",
    y: str = "value",
    hue: str | None = "model",
    ci_low: str | None = "ci_low",
    ci_high: str | None = "ci_high",
    ax: Axes | None = None,
) -> Axes:
    """Grouped bars of a behaviour metric (e.g. EMT) with CI error bars.

    Args:
        data: One row per (x, hue), e.g. the behaviour table filtered to one metric and subset.
        x: Bar groups.
        y: Bar height.
        hue: Bars within a group.
        ci_low: Lower CI column (None: no error bars).
        ci_high: Upper CI column.
        ax: Axes to draw on; None makes a new figure.

    Returns:
        The Axes; bars are its `patches` (hue level by hue level, x in order of appearance).
    """
    _check_columns(data, [x, y, hue, ci_low, ci_high])
    _check_unique(data, [x, hue])
    ax = _new_axes(ax)
    groups = list(pd.unique(data[x]))
    levels = _levels(data, hue)
    colors = palette_for(levels) if hue is not None else {None: sns.color_palette("colorblind")[0]}
    width = 0.8 / len(levels)
    for i, level in enumerate(levels):
        part = data if hue is None else data[data[hue] == level]
        part = part.set_index(x).reindex(groups).dropna(subset=[y])
        pos = np.array([groups.index(g) for g in part.index]) - 0.4 + width * (i + 0.5)
        heights = part[y].to_numpy(dtype=float)
        ax.bar(
            pos, heights, width=width * 0.95, color=colors[level], label=None if hue is None else str(level)
        )
        if ci_low is not None and ci_high is not None:
            err = np.vstack(
                [heights - part[ci_low].to_numpy(dtype=float), part[ci_high].to_numpy(dtype=float) - heights]
            )
            ax.errorbar(
                pos, heights, yerr=np.clip(err, 0, None), fmt="none", ecolor="0.2", capsize=3, linewidth=1
            )
    ax.set_xticks(range(len(groups)), [str(g) for g in groups], rotation=30 if len(groups) > 4 else 0)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if hue is not None:
        ax.legend(title=hue, frameon=False)
    return ax


def interplay_curve(
    data: pd.DataFrame,
    *,
    x: str = "layer",
    y: str = "value",
    hue: str | None = "scenario",
    ci_low: str | None = "ci_low",
    ci_high: str | None = "ci_high",
    ax: Axes | None = None,
) -> Axes:
    """Correlation across models between information strength and behaviour, per layer.

    Args:
        data: One row per (hue, x), e.g. the interplay table for one attribute and statistic.
        x: Layer column (relative depth works too).
        y: Correlation column.
        hue: Line grouping (scenario).
        ci_low: Lower CI column (None: no band).
        ci_high: Upper CI column.
        ax: Axes to draw on; None makes a new figure.

    Returns:
        The Axes.
    """
    ax = _line_band(data, x=x, y=y, hue=hue, ci_low=ci_low, ci_high=ci_high, ax=ax)
    ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle="--")
    ax.set_ylabel("correlation with behaviour" if y in {"value", "pearson", "spearman"} else y)
    return ax


def layer_skipping_curve(
    data: pd.DataFrame,
    *,
    x: str = "layer",
    y: str = "delta",
    hue: str | None = None,
    ci_low: str | None = "ci_low",
    ci_high: str | None = "ci_high",
    ax: Axes | None = None,
) -> Axes:
    """Change in behaviour (EMT) when one block at a time is bypassed.

    Args:
        data: One row per (hue, x).
        x: Skipped layer.
        y: Change in the metric relative to no skipping.
        hue: Optional line grouping (attribute or model).
        ci_low: Lower CI column (None: no band).
        ci_high: Upper CI column.
        ax: Axes to draw on; None makes a new figure.

    Returns:
        The Axes.
    """
    ax = _line_band(data, x=x, y=y, hue=hue, ci_low=ci_low, ci_high=ci_high, ax=ax, marker="o")
    ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle="--")
    ax.set_xlabel("skipped layer")
    return ax


def patching_curve(
    data: pd.DataFrame,
    *,
    x: str = "layer",
    y: str = "delta",
    hue: str | None = "direction",
    ci_low: str | None = "ci_low",
    ci_high: str | None = "ci_high",
    ax: Axes | None = None,
) -> Axes:
    """Effect of activation patching at each layer (e.g. toxic -> non-toxic and the reverse).

    Args:
        data: One row per (hue, x).
        x: Patched layer.
        y: Effect (change in the probe read-out or in continuation toxicity).
        hue: Line grouping (patching direction).
        ci_low: Lower CI column (None: no band).
        ci_high: Upper CI column.
        ax: Axes to draw on; None makes a new figure.

    Returns:
        The Axes.
    """
    ax = _line_band(data, x=x, y=y, hue=hue, ci_low=ci_low, ci_high=ci_high, ax=ax, marker="o")
    ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle="--")
    ax.set_xlabel("patched layer")
    return ax


def steering_curve(
    data: pd.DataFrame,
    *,
    x: str = "alpha",
    y: str = "delta",
    hue: str | None = "layer",
    ci_low: str | None = "ci_low",
    ci_high: str | None = "ci_high",
    ax: Axes | None = None,
) -> Axes:
    """Behaviour under steering along the probe direction, per steering strength alpha.

    Args:
        data: One row per (hue, x).
        x: Steering strength.
        y: Metric under steering.
        hue: Line grouping (steered layer).
        ci_low: Lower CI column (None: no band).
        ci_high: Upper CI column.
        ax: Axes to draw on; None makes a new figure.

    Returns:
        The Axes.
    """
    ax = _line_band(data, x=x, y=y, hue=hue, ci_low=ci_low, ci_high=ci_high, ax=ax, marker="o")
    ax.set_xlabel("steering strength alpha")
    return ax


def heatmap_grid(
    data: pd.DataFrame,
    *,
    col: str = "scenario",
    x: str = "layer",
    y: str = "attribute",
    value: str = "mean",
    col_wrap: int = 2,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
) -> Figure:
    """One `attribute_heatmap` panel per `col` level (every scenario), sharing one colour scale.

    Args:
        data: One row per (col, y, x), e.g. one model and template of `probing.summarize` for pearson.
        col: Facet column (scenario).
        x: Column across (layer).
        y: Column down (attribute).
        value: Colour value.
        col_wrap: Panels per row.
        cmap: Matplotlib colormap.
        vmin: Lower end of the colour scale (None: the data's minimum).
        vmax: Upper end of the colour scale (None: the data's maximum).

    Returns:
        The Figure; each panel's heatmap is the first `QuadMesh` of its Axes, titled by facet value.
    """
    _check_columns(data, [col, x, y, value])
    _check_unique(data, [col, y, x])
    levels = _levels(data, col)
    ncols = max(1, min(col_wrap, len(levels)))
    nrows = int(np.ceil(len(levels) / ncols)) or 1
    n_x, n_y = data[x].nunique(), data[y].nunique()
    lo = float(np.nanmin(data[value])) if vmin is None else vmin
    hi = float(np.nanmax(data[value])) if vmax is None else vmax
    with sns.axes_style(AXES_STYLE):
        fig, axes = plt.subplots(
            nrows,
            ncols,
            figsize=(max(5.0, 0.2 * n_x + 2.5) * ncols, (0.4 * n_y + 1.4) * nrows),
            squeeze=False,
            layout="constrained",
        )
    flat = axes.ravel()
    for level, ax in zip(levels, flat, strict=False):
        grid = data[data[col] == level].pivot(index=y, columns=x, values=value).sort_index(axis=1)
        grid = grid.reindex([v for v in pd.unique(data[y]) if v in grid.index])
        sns.heatmap(grid, ax=ax, cmap=cmap, vmin=lo, vmax=hi, cbar_kws={"label": value})
        ax.set_title(str(level))
        ax.set_xlabel(x)
        ax.set_ylabel(y)
    for ax in flat[len(levels) :]:
        fig.delaxes(ax)
    return fig


def effect_with_cost(
    data: pd.DataFrame,
    *,
    x: str,
    y: str = "delta",
    cost: str = "cost",
    hue: str | None = None,
    ci_low: str | None = "ci_low",
    ci_high: str | None = "ci_high",
    cost_low: str | None = "cost_low",
    cost_high: str | None = "cost_high",
    cost_label: str = "change in log perplexity",
    ax: Axes | None = None,
) -> Axes:
    """An effect (lines, CI bands) per `x` with its cost (e.g. fluency) on a second y axis.

    The effect is drawn as in `steering_curve` on `ax`; the cost as dotted grey-edged lines with
    error bars on `ax.twinx()`, the same colour per hue level.

    Args:
        data: One row per (hue, x) with both the effect and the cost columns.
        x: Intervention strength or layer.
        y: Effect column (left axis).
        cost: Cost column (right axis).
        hue: Line grouping (e.g. probe vs random direction).
        ci_low: Lower CI of the effect (None: no band).
        ci_high: Upper CI of the effect.
        cost_low: Lower CI of the cost (None: no error bars).
        cost_high: Upper CI of the cost.
        cost_label: Right axis label.
        ax: Axes to draw on; None makes a new figure.

    Returns:
        The left Axes; the cost's Axes is its twin (`[a for a in ax.figure.axes if a is not ax]`).
    """
    _check_columns(data, [x, y, cost, hue, ci_low, ci_high, cost_low, cost_high])
    ax = _line_band(data, x=x, y=y, hue=hue, ci_low=ci_low, ci_high=ci_high, ax=ax, marker="o")
    ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle="--")
    right = ax.twinx()
    right.grid(False)
    levels = _levels(data, hue)
    colors = palette_for(levels) if hue is not None else {None: sns.color_palette("colorblind")[0]}
    for level in levels:
        part = (data if hue is None else data[data[hue] == level]).sort_values(x)
        xs, ys = part[x].to_numpy(dtype=float), part[cost].to_numpy(dtype=float)
        label = f"{cost_label}" if hue is None else f"{level}: {cost_label}"
        if cost_low is not None and cost_high is not None:
            low, high = part[cost_low].to_numpy(dtype=float), part[cost_high].to_numpy(dtype=float)
            err = np.clip(np.vstack([ys - low, high - ys]), 0, None)
            right.errorbar(
                xs,
                ys,
                yerr=err,
                color=colors[level],
                linestyle=":",
                marker="s",
                markersize=4,
                capsize=2,
                linewidth=1,
                label=label,
            )
        else:
            right.plot(xs, ys, color=colors[level], linestyle=":", marker="s", markersize=4, label=label)
    right.set_ylabel(cost_label)
    ax.set_xlabel(x)
    return ax


def trend_curve(
    data: pd.DataFrame,
    *,
    x: str = "step",
    y: str = "value",
    hue: str | None = None,
    ci_low: str | None = "ci_low",
    ci_high: str | None = "ci_high",
    ax: Axes | None = None,
) -> Axes:
    """A measure with its CI band along an ordered axis (training step, checkpoint), markers at the points.

    Args:
        data: One row per (hue, x).
        x: Ordered axis (step).
        y: Measure column.
        hue: Line grouping (e.g. fine-tuning arm).
        ci_low: Lower CI column (None: no band).
        ci_high: Upper CI column.
        ax: Axes to draw on; None makes a new figure.

    Returns:
        The Axes.
    """
    ax = _line_band(data, x=x, y=y, hue=hue, ci_low=ci_low, ci_high=ci_high, ax=ax, marker="o")
    return ax


def retention_curve(
    data: pd.DataFrame,
    *,
    x: str = "step",
    y: str = "auroc",
    hue: str | None = "arm",
    ax: Axes | None = None,
) -> Axes:
    """Frozen-probe AUROC over fine-tuning steps, one line per arm (`training.checkpoint_aurocs`).

    Args:
        data: One row per (hue, x), e.g. the checkpoint table filtered to one probe.
        x: Optimizer step (0 = the base model).
        y: AUROC.
        hue: Line grouping (arm).
        ax: Axes to draw on; None makes a new figure.

    Returns:
        The Axes, with chance level (0.5) dashed.
    """
    ax = _line_band(data, x=x, y=y, hue=hue, ci_low=None, ci_high=None, ax=ax, marker="o")
    ax.axhline(0.5, color="0.5", linewidth=0.8, linestyle="--")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("frozen-probe AUROC" if y == "auroc" else y)
    return ax


def save_figure(
    fig: Figure,
    path_stem: str | Path,
    *,
    formats: Sequence[str] = ("png", "svg"),
    dpi: int = 150,
) -> list[Path]:
    """Write `fig` as `{path_stem}.png` and `{path_stem}.svg` (creating the directory).

    Args:
        fig: The figure (`ax.figure` for an Axes).
        path_stem: Output path without suffix.
        formats: Any of "png", "svg", "pdf".
        dpi: Resolution of raster formats.

    Returns:
        The written paths, in `formats` order.
    """
    allowed = ("png", "svg", "pdf")
    bad = [f for f in formats if f not in allowed]
    if bad:
        raise ValueError(f"formats must be among {allowed}, got {list(formats)}.")
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        fig.savefig(
            path, format=fmt, dpi=dpi, bbox_inches="tight", metadata={"Date": None} if fmt == "svg" else None
        )
        paths.append(path)
    return paths
