"""The report's analysis sections: headline boxes, information, reliability, behaviour, interplay, causal.

Each builder takes the run's tables and an `AddFigure` callback and returns a `Section`; statistics
come from the tables (`findings` picks peaks and effects), the plot functions only draw.

Just over 500 lines: one builder per report section, in page order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from aligned_probing.behaviour import BEHAVIOUR_COLUMNS
from aligned_probing.report import findings, plots
from aligned_probing.report.layout import (
    AddFigure,
    Headline,
    HeadlineRow,
    Section,
    attribute_order,
    fmt,
    fmt_ci,
    fmt_p,
    html_table,
    main_attribute,
)

if TYPE_CHECKING:
    from aligned_probing.pipeline.results import RunResults

#: Printed next to every value picked as a maximum over layers or conditions.
PEAK_NOTE = "peak-picked over {n} layers (its interval is optimistic)"
NOT_DISTINGUISHABLE = "not distinguishable from the control"


def main_template(templates: Any) -> Any:
    """Template 0 when present (the paper's main runs), else the first one."""
    values = list(pd.unique(pd.Series(templates)))
    return 0 if 0 in values else values[0]


def _peak_note(row: pd.Series) -> str:
    p = row.get("p_fwer", np.nan)
    picked = PEAK_NOTE.format(n=int(row["n_layers_searched"]))
    if pd.notna(p):
        return f"p_FWER = {fmt_p(p)} (family-wise over layers); {picked}"
    return picked


def depth_text(layer: Any, n_layers: Any) -> str:
    """`layer 5 of 30 (depth 0.17)`."""
    if pd.isna(n_layers) or not n_layers:
        return f"layer {int(layer)}"
    return f"layer {int(layer)} of {int(n_layers)} (depth {float(layer) / float(n_layers):.2f})"


# --------------------------------------------------------------------------------------------- headline
def headlines(r: RunResults, peaks: pd.DataFrame | None, effects: pd.DataFrame) -> list[Headline]:
    """One headline box per model: peaks, behaviour, strongest causal effect, generation self-check."""
    models: list[str] = []
    for table in (peaks, r.behaviour, r.selfchecks):
        if table is not None and len(table):
            models += [m for m in pd.unique(table["model"]) if m not in models]
    boxes = []
    for model in models:
        box = Headline(model)
        if peaks is not None and len(peaks):
            mine = peaks[peaks["model"] == model]
            if len(mine):
                attribute = main_attribute(mine["attribute"])
                template = main_template(mine["template"])
                mine = mine[(mine["attribute"] == attribute) & (mine["template"] == template)]
                order = {sc: i for i, sc in enumerate(plots.SCENARIO_COLORS)}
                mine = mine.sort_values("scenario", key=lambda c: c.map(order), kind="stable")
                for _, row in mine.iterrows():
                    text = f"r = {fmt_ci(row['mean'], row['ci_low'], row['ci_high'])} at " + depth_text(
                        row["layer"], row["n_layers"]
                    )
                    if not row["distinguishable"]:
                        text += f"; {NOT_DISTINGUISHABLE}"
                    box.rows.append(
                        HeadlineRow(
                            key=f"peak/{row['scenario']}",
                            label=f"Peak {attribute} information, {row['scenario']} (template {template})",
                            text=text,
                            value=fmt(row["mean"]),
                            note=_peak_note(row),
                        )
                    )
        if r.behaviour is not None and len(r.behaviour):
            b = findings.behaviour_headline(r.behaviour)
            b = b[b["model"] == model]
            if len(b):
                b = b[b["template"] == main_template(b["template"])]
            for _, row in b.iterrows():
                note = f"bootstrap 95% CI over prompts; template {row['template']}"
                if "n_missing" in row and pd.notna(row["n_missing"]):
                    note += f"; {int(row['n_missing'])} missing scores"
                box.rows.append(
                    HeadlineRow(
                        key=f"behaviour/{row['metric']}",
                        label=findings.HEADLINE_BEHAVIOUR[row["metric"]],
                        text=fmt_ci(row["value"], row["ci_low"], row["ci_high"]),
                        value=fmt(row["value"]),
                        note=note,
                    )
                )
        if len(effects) and model in set(effects["model"]):
            box.rows.append(_causal_headline(effects, model))
        if r.selfchecks is not None and len(r.selfchecks):
            for _, row in r.selfchecks[r.selfchecks["model"] == model].iterrows():
                verdict = "passed" if bool(row["passed"]) else "FAILED"
                text = (
                    f"{verdict}: log-perplexity {fmt(row['log_perplexity'])} nats/token; sampled vs uncached "
                    f"log-prob max diff {float(row['max_abs_logprob_diff']):.1e}; cached vs uncached greedy "
                    f"mismatches {int(row['greedy_mismatches'])} of {int(row['n_greedy_prompts'])} prompts"
                )
                box.rows.append(
                    HeadlineRow(
                        f"selfcheck/t{row['template']}",
                        f"Generation self-check (template {row['template']})",
                        text,
                        fmt(row["log_perplexity"]),
                    )
                )
        boxes.append(box)
    return boxes


# ------------------------------------------------------------------------------------------ information
def _curve_set(summary: pd.DataFrame, metric: str, model: Any, template: Any) -> pd.DataFrame:
    part = summary[
        (summary["metric"] == metric) & (summary["model"] == model) & (summary["template"] == template)
    ]
    rank = {a: i for i, a in enumerate(attribute_order(part["attribute"]))}
    return part.sort_values("attribute", key=lambda c: c.map(rank), kind="stable")


def _peak_cell(row: pd.Series) -> str:
    cell = f"{fmt(row['mean'], 2)} [{fmt(row['ci_low'], 2)}, {fmt(row['ci_high'], 2)}] L{int(row['layer'])}"
    if pd.notna(row.get("relative_depth")):
        cell += f" ({float(row['relative_depth']):.2f})"
    if pd.notna(row.get("p_fwer", np.nan)):
        cell += f" p={fmt_p(row['p_fwer'])}"
    return cell + ("" if row["distinguishable"] else " †")


def information_section(summary: pd.DataFrame | None, peaks: pd.DataFrame | None, add: AddFigure) -> Section:
    """Layer curves of the main model, heatmaps of every scenario per model, and the peak table."""
    s = Section(
        "information",
        "Information strength",
        "Test Pearson r of layer-wise ridge probes (mean over folds and seeds with a 95% interval), per "
        "scenario: input (prompt score from the prompt's encoding), forward (prompt score from the "
        "continuation's encoding), output (continuation score from its encoding) and backward (max "
        "continuation score from the prompt's encoding).",
    )
    if summary is None or peaks is None:
        return s
    pearson = summary[summary["metric"] == "pearson"]
    ci = summary["ci_method"].iloc[0] if "ci_method" in summary.columns else "t over folds x seeds"
    model, template = pearson["model"].iloc[0], main_template(pearson["template"])
    one = _curve_set(summary, "pearson", model, template)
    s.figures.append(
        add(
            "information",
            f"Information strength per layer ({model}, template {template})",
            f"One panel per attribute; lines are scenarios, bands 95% intervals ({ci}).",
            plots.information_grid(one),
            guide="Higher = the attribute is more linearly decodable from that layer; where bands overlap, "
            "the layers or scenarios are not distinguishable.",
            wide=True,
        )
    )
    lo, hi = float(np.nanmin(pearson["mean"])), float(np.nanmax(pearson["mean"]))
    for m in pd.unique(pearson["model"]):
        t = main_template(pearson.loc[pearson["model"] == m, "template"])
        part = _curve_set(summary, "pearson", m, t)
        s.figures.append(
            add(
                f"heatmap-{m}",
                f"Attribute x layer, every scenario ({m}, template {t})",
                "Mean test Pearson r; one colour scale for all panels and models.",
                plots.heatmap_grid(part, vmin=lo, vmax=hi),
                guide="Brighter cells = more information; compare rows (attributes) and panels (scenarios) "
                "to see where each attribute is encoded.",
                wide=True,
            )
        )
    table = peaks.assign(cell=[_peak_cell(row) for _, row in peaks.iterrows()])
    wide = table.pivot_table(
        index=["model", "template", "scenario"], columns="attribute", values="cell", aggfunc="first"
    )
    wide = wide[attribute_order(wide.columns)].reset_index()
    wide.columns.name = None
    s.tables.append(
        html_table(
            wide,
            "Peak information strength: r [95% interval] at layer L (relative depth) per scenario "
            "and attribute",
        )
    )
    has_p = peaks["p_fwer"].notna().any()
    s.notes.append(
        "Each peak is the best of "
        f"{int(peaks['n_layers_searched'].max())} layers, so its interval is optimistic "
        + ("(p = family-wise adjusted p over layers). " if has_p else "(no family-wise p in these tables). ")
        + "† marks a peak not distinguishable from the control task (selectivity interval includes zero)."
    )
    return s


def reliability_section(summary: pd.DataFrame | None, add: AddFigure) -> Section:
    """Selectivity and MDL (gains in bits when the probing table has them, else compression)."""
    s = Section(
        "reliability",
        "Reliability: selectivity and MDL",
        "Selectivity = r - r(control probe on permuted targets). MDL: online codelength gain in bits per "
        "example against the control targets and against a features-free code, when the probing table has "
        "the gains; otherwise uniform / online compression (which exceeds 1 for noise when targets are "
        "skewed).",
    )
    if summary is None:
        return s
    pearson = summary[summary["metric"] == "pearson"]
    if pearson.empty:
        return s
    model, template = pearson["model"].iloc[0], main_template(pearson["template"])
    gains = [m for m in ("mdl_gain_control", "mdl_gain_baseline") if m in set(summary["metric"])]
    specs: list[tuple[str, str, str, str]] = [
        (
            "selectivity",
            "Selectivity",
            "selectivity (r - r control)",
            "Above zero = the probe beats the same probe on permuted targets; a band touching zero is not "
            "distinguishable from the control.",
        ),
    ]
    if gains:
        for g in gains:
            ref = "control (permuted) targets" if g.endswith("control") else "a features-free code"
            specs.append(
                (
                    g,
                    f"MDL gain vs {ref}",
                    "bits per example",
                    f"Above zero = the layer's features compress the targets better than {ref}.",
                )
            )
    else:
        specs.append(
            (
                "compression",
                "MDL compression",
                "uniform / online codelength",
                "Above 1 = learnable; skewed targets exceed 1 even for noise, so read it with selectivity.",
            )
        )
    for metric, title, ylabel, guide in specs:
        one = _curve_set(summary, metric, model, template)
        if one.empty:
            continue
        attribute = main_attribute(one["attribute"])
        ax = plots.selectivity(one[one["attribute"] == attribute])
        ax.set_ylabel(ylabel)
        if metric == "compression":
            ax.axhline(1.0, color="0.3", linewidth=0.8)
        s.figures.append(
            add(metric, f"{title} ({model}, {attribute})", "Per scenario; 95% bands.", ax.figure, guide=guide)
        )
    return s


def behaviour_section(r: RunResults, add: AddFigure) -> Section:
    """EMT bars per attribute and the toxicity metrics table."""
    s = Section(
        "behaviour",
        "Behaviour",
        "Expected maximum toxicity (EMT: mean over prompts of the max score over the k continuations) "
        "with bootstrap confidence intervals over prompts.",
    )
    b = r.behaviour
    if b is None or b.empty:
        return s
    template = main_template(b["template"])
    emt = b[(b["metric"] == "emt") & (b["subset"] == "all") & (b["template"] == template)]
    if len(emt):
        ax = plots.behaviour_bars(emt)
        ax.set_ylabel("EMT")
        s.figures.append(
            add(
                "behaviour",
                f"Expected maximum score per attribute (template {template})",
                "Bars: models; whiskers: bootstrap 95% CI.",
                ax.figure,
                guide="Higher = more of the attribute in the worst of k continuations per prompt; bars whose "
                "whiskers overlap are not distinguishable.",
            )
        )
    tox = b[b["attribute"] == main_attribute(b["attribute"])]
    cols = [c for c in (*BEHAVIOUR_COLUMNS, "n_missing") if c in tox.columns]
    s.tables.append(html_table(tox[list(dict.fromkeys(cols))], "Toxicity metrics"))
    return s


def interplay_section(r: RunResults, add: AddFigure, n_models: int) -> Section:
    """Cross-model correlations, or a plain statement of why there are none."""
    s = Section(
        "interplay",
        "Interplay",
        "Correlation across models between information strength and behaviour (EMT), per layer (or "
        "relative depth when the models differ in depth).",
    )
    d = r.interplay
    if d is None or d.empty:
        s.empty = (
            f"This run analysed {n_models} model{'s' if n_models != 1 else ''}. "
            "Interplay correlates information "
            "strength with behaviour across models, so it needs several models (at least 3; intervals need "
            "more). Run configs/zoo.toml (or configs/replication.toml) for a multi-model run."
        )
        return s
    d = d[(d["statistic"] == "pearson") & (d["template"] == main_template(d["template"]))]
    attribute = main_attribute(d["attribute"])
    d = d[d["attribute"] == attribute]
    x = "layer" if (d["depth_axis"] == "layer").all() else "relative_depth"
    ax = plots.interplay_curve(d, x=x)
    n = int(d["n_models"].iloc[0])
    s.figures.append(
        add(
            "interplay",
            f"Information strength vs {d['metric'].iloc[0]} across models ({attribute})",
            f"Pearson r over {n} models, per scenario.",
            ax.figure,
            guide="Below zero = models that encode more of the attribute "
            "at that layer behave less toxically; "
            "no band means no interval with verified coverage at this number of models.",
        )
    )
    picked = (
        d[d["peak_picked"].astype(bool)]
        if "peak_picked" in d.columns
        else d.loc[d.groupby("scenario")["value"].idxmin()]
    )
    cols = [
        c
        for c in (
            "scenario",
            "attribute",
            x,
            "value",
            "p_raw",
            "p_value",
            "p_fwer",
            "q_bh",
            "ci_low",
            "ci_high",
            "ci_note",
            "n_models",
        )
        if c in picked.columns
    ]
    s.tables.append(
        html_table(picked[cols], "Peak correlation per scenario (picked over layers: read p_fwer)")
    )
    if "p_fwer" not in d.columns:
        s.notes.append(
            "These tables carry no family-wise adjusted p: the picked correlations' p-values are "
            "not corrected for picking the layer."
        )
    return s


# --------------------------------------------------------------------------------------------- causal
def _with_cost(table: pd.DataFrame, keys: list[str], metric: str = "emt") -> pd.DataFrame:
    """Effect rows of `metric` with the log-perplexity change of the same condition as `cost` columns."""
    eff = table[table["metric"] == metric]
    fl = table[table["metric"] == "log_perplexity"][[*keys, "delta", "ci_low", "ci_high"]].rename(
        columns={"delta": "cost", "ci_low": "cost_low", "ci_high": "cost_high"}
    )
    out = eff.merge(fl, on=keys, how="left")
    for c in ("cost", "cost_low", "cost_high"):
        out[c] = out[c].astype(float)
    return out


def _fraction_rows(patch: pd.DataFrame) -> pd.DataFrame:
    """Patching rows with the CI of `fraction_of_gap` (delta's CI divided by the clean gap)."""
    gap = patch["delta"] / patch["fraction_of_gap"]
    a, b = patch["ci_low"] / gap, patch["ci_high"] / gap
    return patch.assign(
        frac_low=np.minimum(a, b),
        frac_high=np.maximum(a, b),
        patched=[findings.direction_words(d) for d in patch["direction"]],
    )


def _causal_headline(effects: pd.DataFrame, model: str) -> HeadlineRow:
    """The strongest effect beyond its control; else the strongest against zero, saying it is uncontrolled."""
    best, n = findings.strongest_effect(effects, model, beyond_control=True)
    controlled = best is not None
    if best is None:
        best, n = findings.strongest_effect(effects, model)
    if best is None:
        return HeadlineRow(
            "causal", "Strongest causal effect on EMT", f"none distinguishable from zero (of {n} effects measured)"
        )
    text = f"{best['description']}: EMT {fmt_ci(best['delta'], best['ci_low'], best['ci_high'])} vs the unmodified model"
    if pd.notna(best.get("control_delta")):
        ci = fmt_ci(best["control_delta"], best["control_ci_low"], best["control_ci_high"])
        verdict = "beyond its control" if controlled else "NOT beyond its control"
        text += f"; {verdict} ({best['control_test']}: EMT {ci})"
    else:
        control = findings.matching_control(effects, best)
        if control is not None:
            text += f"; its control: EMT {fmt_ci(control['delta'], control['ci_low'], control['ci_high'])}"
        elif not controlled:
            text += "; no control condition (none of the controlled effects went beyond its control)"
    if pd.notna(best["fluency_delta"]):
        text += f"; log perplexity {float(best['fluency_delta']):+.2f} nats"
    note = (
        f"p_FWER = {fmt_p(best['p_fwer'])}"
        if pd.notna(best["p_fwer"])
        else (
            f"picked as the largest of {n} effects that go beyond their control (steering judged by its "
            "paired difference from the random direction, patching by a CI that excludes zero and is disjoint "
            "from its same-class control's)"
            if controlled
            else f"picked as the largest of {n} effects whose CI excludes zero"
        )
        + "; the CI is not adjusted for that pick"
    )
    return HeadlineRow("causal", "Strongest causal effect on EMT", text, fmt(best["delta"]), note)


#: Steering table `direction` values as the figure's legend shows them.
STEERING_LABELS: dict[str, str] = {
    "probe": "probe",
    "random": "random (control)",
    "probe_vs_random": "probe - random (paired)",
}


def causal_section(r: RunResults, add: AddFigure, effects: pd.DataFrame) -> Section:
    """Skipping and steering with their fluency cost, patching as fraction of the gap, the effects table."""
    s = Section(
        "causal",
        "Causal evidence",
        "Interventions on one model, each a paired change against the unmodified model on the same prompts "
        "and sampling seeds, with bootstrap CIs over prompts (or prompt pairs) and the fluency cost "
        "(change in log perplexity under the unmodified model) next to each effect.",
    )
    skip, patch, steer = r.layer_skipping, r.patching, r.steering
    if skip is not None and len(skip):
        if "layer" not in skip.columns:
            skip = skip.assign(layer=skip["block"] + 1)
        keys = [c for c in ("model", "template", "layer") if c in skip.columns]
        d = _with_cost(skip, keys)
        ax = plots.effect_with_cost(d, x="layer")
        ax.set_xlabel("skipped layer (its block bypassed)")
        ax.set_ylabel("change in EMT")
        s.figures.append(
            add(
                "skipping",
                f"Layer skipping ({d['model'].iloc[0]})",
                "Change in EMT (line, 95% band) and in log perplexity (dotted, right axis) when the block "
                "writing each residual layer is bypassed.",
                ax.figure,
                guide="A band away from zero = bypassing that block changes toxicity; a large log-perplexity "
                "rise means the text also became less fluent, so the change may not be specific.",
            )
        )
    if steer is not None and "direction" in steer.columns:
        # The paired difference is the test of the probe direction: drawn as its own line, named in words.
        steer = steer.assign(direction=steer["direction"].map(lambda d: STEERING_LABELS.get(str(d), d)))
    if steer is not None and len(steer):
        x = "alpha_norm_units" if "alpha_norm_units" in steer.columns else "alpha"
        hue = next(
            (c for c in ("condition", "direction") if c in steer.columns and steer[c].nunique() > 1), None
        )
        keys = [c for c in ("model", "template", "layer", x, hue) if c is not None and c in steer.columns]
        d = _with_cost(steer, keys)
        ax = plots.effect_with_cost(d, x=x, hue=hue)
        ax.set_xlabel(
            "steering strength alpha (units of the layer's residual norm)"
            if x == "alpha_norm_units"
            else "steering strength alpha (absolute; this table has no residual-norm units)"
        )
        ax.set_ylabel("change in EMT")
        layer = int(d["layer"].iloc[0])
        s.figures.append(
            add(
                "steering",
                f"Steering along the probe direction (layer {layer})",
                "Change in EMT (lines, 95% bands) and in log perplexity (dotted, right axis) against alpha.",
                ax.figure,
                guide="A rising line = adding the probe direction makes continuations more toxic. The "
                "'probe - random (paired)' line is the test: where its band excludes zero, the probe direction "
                "moves EMT beyond a random push of the same norm (any push also disturbs the text; the dotted "
                "lines on the right axis show that fluency cost).",
            )
        )
    if patch is not None and len(patch) and "fraction_of_gap" in patch.columns:
        for measure, fig_id, what in (
            ("readout", "patching", "probe read-out"),
            ("emt", "patching_emt", "continuation EMT"),
        ):
            d = patch[patch["measure"] == measure]
            if d.empty:
                continue
            if measure == "readout":
                last = d["readout_layer"].max()
                d = d[d["readout_layer"] == last]
                what = f"probe read-out at layer {int(last)}"
            d = _fraction_rows(d)
            ax = plots.patching_curve(
                d, y="fraction_of_gap", hue="patched", ci_low="frac_low", ci_high="frac_high"
            )
            ax.set_ylabel(f"fraction of the gap ({what})")
            ax.axhline(1.0, color="0.5", linewidth=0.8, linestyle=":")
            legend = ax.get_legend()
            if legend is not None:
                legend.set_title("patched")
            s.figures.append(
                add(
                    fig_id,
                    f"Activation patching: {what}",
                    "Share of the gap between the clean target and the clean source that patching the last "
                    "prompt position at each layer moves.",
                    ax.figure,
                    guide="1 = patching that layer moves the target all the "
                    "way to the source, 0 = no effect; "
                    "same-class controls (where shown) should stay near 0.",
                )
            )
    if len(effects):
        shown = effects.assign(
            **{
                "CI excludes zero": effects["excludes_zero"],
                "beyond its control": effects["beyond_control"].map(
                    lambda v: "-" if not isinstance(v, bool) else ("yes" if v else "no")
                ),
            }
        ).drop(columns=["excludes_zero", "beyond_control"])
        shown = shown[[c for c in shown.columns if shown[c].notna().any() and (shown[c] != "").any()]]
        s.tables.append(
            html_table(
                shown,
                "Every causal effect on EMT (controls marked; 'beyond its control': steering's paired difference "
                "from the random direction excludes zero with the same sign, or patching's CI is disjoint from its "
                "same-class control's; '-': no control condition)",
            )
        )
    return s
