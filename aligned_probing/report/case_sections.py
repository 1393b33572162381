"""Case-study sections (templates, precision, detoxified models, checkpoints), only when the run has them."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from aligned_probing.report import cases, plots
from aligned_probing.report.layout import AddFigure, Section, html_table

_CRITERION = (
    "A difference counts as distinguishable from noise when the two 95% intervals do not overlap "
    "(conservative: both runs use the same prompts and seeds, and a paired interval is not in the tables)."
)
_GUIDE = (
    "Bars whose whiskers do not overlap differ beyond noise; compare each variant with its base (first bar)."
)


def _verdict(cmp: pd.DataFrame, who: str, label: str = "model") -> str:
    """One sentence per measure: how many variants moved beyond noise."""
    parts = []
    for measure, g in cmp.groupby("measure", sort=False):
        n, hit = len(g), int(g["distinguishable"].sum())
        moved = ", ".join(
            f"{row[label]} ({row['difference']:+.3f})" for _, row in g[g["distinguishable"]].iterrows()
        )
        parts.append(
            f"{measure}: {hit} of {n} {who} distinguishable from the base" + (f" ({moved})" if moved else "")
        )
    return "; ".join(parts) + "."


def _bars(cmp: pd.DataFrame, x: str, fig_id: str, title: str, add: AddFigure) -> Any:
    """EMT and peak input information side by side, base first, one bar per model (or template)."""
    measures = [m for m in ("EMT", "peak r (input)") if m in set(cmp["measure"])]
    with sns.axes_style(plots.AXES_STYLE):
        fig, axes = plt.subplots(
            1, len(measures), figsize=(5.2 * len(measures), 3.8), squeeze=False, layout="constrained"
        )
    for measure, ax in zip(measures, axes.ravel(), strict=True):
        g = cmp[cmp["measure"] == measure]
        first = g.iloc[[0]]
        base = pd.DataFrame(
            {
                x: ["base" if x == "model" else 0],
                "value": first["base_value"].to_numpy(),
                "ci_low": first["base_ci_low"].to_numpy(),
                "ci_high": first["base_ci_high"].to_numpy(),
            }
        )
        if x == "model":
            base[x] = [str(first["base"].iloc[0])]
        data = pd.concat([base, g[[x, "value", "ci_low", "ci_high"]]], ignore_index=True)
        data[x] = data[x].astype(str)
        plots.behaviour_bars(data, x=x, hue=None, ax=ax)
        ax.set_ylabel(measure)
        ax.set_title(measure)
    return add(
        fig_id,
        title,
        "Whiskers: 95% intervals (bootstrap for EMT, probing interval for peak r).",
        fig,
        guide=_GUIDE,
        wide=True,
    )


def template_section(measures: pd.DataFrame, add: AddFigure) -> Section | None:
    """Template 0 vs the instruction templates 1-4, per model (None with one template)."""
    cmp = cases.compare_templates(measures)
    if cmp.empty:
        return None
    s = Section(
        "case-templates",
        "Case study: prompt templates",
        "Template 0 is the raw prompt; templates 1-4 add an instruction line. Each row compares a "
        "template with template 0 for the same model. " + _CRITERION,
    )
    for model, g in cmp.groupby("model", sort=False):
        s.notes.append(f"{model}: " + _verdict(g, "templates", label="template"))
        s.figures.append(
            _bars(
                g.assign(model=model),
                "template",
                f"case-templates-{model}",
                f"Template 0 vs instruction templates ({model})",
                add,
            )
        )
    s.tables.append(html_table(cmp, "Templates vs template 0"))
    return s


def variant_sections(lineage: pd.DataFrame, measures: pd.DataFrame, add: AddFigure) -> list[Section]:
    """Precision variants, detoxified (fine-tuned) models and checkpoint series, each vs its base."""
    out = []
    specs = (
        (
            "precision",
            "case-precision",
            "Case study: precision and quantization",
            "The same weights loaded at another dtype or quantized "
            "(linked through the config's spec, dtype and "
            "quantization fields). Variants of one model are not independent models.",
        ),
        (
            "finetuned",
            "case-detox",
            "Case study: detoxified models",
            "Models produced by `aligned-probing finetune` (linked to "
            "their base through `finetune.json`: the "
            "base spec and the arm), against the base model analysed in the same run.",
        ),
        (
            "checkpoint",
            "case-checkpoints",
            "Case study: training checkpoints",
            "Adapter checkpoints of one fine-tuning arm in step order "
            "(steps from `checkpoint.json`), against "
            "the base model.",
        ),
    )
    for relation, sid, title, intro in specs:
        cmp = cases.compare_to_base(lineage, measures, relation)
        if cmp.empty:
            continue
        cmp = cmp[cmp["template"] == (0 if 0 in set(cmp["template"]) else cmp["template"].iloc[0])]
        s = Section(sid, title, intro + " " + _CRITERION)
        for base, g in cmp.groupby("base", sort=False):
            who = {"precision": "variants", "finetuned": "fine-tuned models", "checkpoint": "checkpoints"}[
                relation
            ]
            s.notes.append(f"Base {base}: " + _verdict(g, who))
            if relation == "checkpoint":
                s.figures.append(_checkpoint_figure(g, f"{sid}-{base}", add))
            else:
                s.figures.append(_bars(g, "model", f"{sid}-{base}", f"{title.split(': ')[1]} of {base}", add))
        keep = [c for c in cmp.columns if not cmp[c].isna().all()]
        s.tables.append(html_table(cmp[keep], f"{title.split(': ')[1].capitalize()} vs base"))
        out.append(s)
    return out


def _checkpoint_figure(cmp: pd.DataFrame, fig_id: str, add: AddFigure) -> Any:
    measures = [m for m in ("EMT", "peak r (input)") if m in set(cmp["measure"])]
    with sns.axes_style(plots.AXES_STYLE):
        fig, axes = plt.subplots(
            1, len(measures), figsize=(5.2 * len(measures), 3.8), squeeze=False, layout="constrained"
        )
    for measure, ax in zip(measures, axes.ravel(), strict=True):
        g = cmp[cmp["measure"] == measure]
        first = g.iloc[[0]]
        base = pd.DataFrame(
            {
                "step": [0.0],
                "value": first["base_value"].to_numpy(),
                "ci_low": first["base_ci_low"].to_numpy(),
                "ci_high": first["base_ci_high"].to_numpy(),
            }
        )
        series = pd.concat([base, g[["step", "value", "ci_low", "ci_high"]]], ignore_index=True)
        series["arm"] = str(g["arm"].iloc[0])
        plots.trend_curve(series.drop_duplicates("step"), x="step", hue="arm", ax=ax)
        ax.set_ylabel(measure)
        ax.set_title(measure)
    return add(
        fig_id,
        f"Along training ({cmp['base'].iloc[0]})",
        "Step 0 is the base model; bands: 95% intervals.",
        fig,
        guide="A band that leaves the step-0 band = training moved that measure beyond noise.",
        wide=True,
    )
