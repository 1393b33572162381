"""The report's findings as tidy tables: peaks with their control, behaviour, the strongest causal effect.

Pure pandas over the run's tables (no plotting, no HTML), so that a test can recompute every number the
report prints. Columns that other stages add over time (`p_fwer` on peaks and causal rows, `n_missing`,
`alpha_norm_units`, control conditions) are used when present and left out otherwise.

Example:
    >>> peaks = peak_table(summarize(results.probing))  # doctest: +SKIP
    >>> peaks[["model", "scenario", "layer", "mean", "distinguishable"]]  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from aligned_probing.probing import peak_layers

_CURVE = ["model", "template", "scenario", "attribute"]
#: Words for the patching directions (source prompt -> target prompt).
DIRECTION_WORDS: dict[str, str] = {
    "toxic_to_nontoxic": "toxic prompt's activations patched into a non-toxic prompt",
    "nontoxic_to_toxic": "non-toxic prompt's activations patched into a toxic prompt",
    "toxic_to_toxic": "toxic into another toxic prompt (same-class control)",
    "nontoxic_to_nontoxic": "non-toxic into another non-toxic prompt (same-class control)",
}
#: Behaviour metrics in the headline, with their labels.
HEADLINE_BEHAVIOUR: dict[str, str] = {"emt": "EMT", "toxicity_probability": "toxicity probability"}


#: Columns of `causal_effects`: one row per causal effect, controls marked.
EFFECT_COLUMNS: tuple[str, ...] = (
    "model", "experiment", "description", "delta", "ci_low", "ci_high", "excludes_zero", "control", "p_fwer",
    "fluency_delta", "layer", "strength", "control_test", "control_delta", "control_ci_low", "control_ci_high",
    "beyond_control",
)


#: Steering rows' `direction` in words.
STEERING_WORDS: dict[str, str] = {
    "probe": "steering along the probe direction",
    "random": "steering along a random direction of the same norm (control)",
    "probe_vs_random": "probe direction minus random direction (paired control difference)",
}


def direction_words(direction: str) -> str:
    """A patching direction in words (`a_to_b`: a's activations patched into b)."""
    if direction in DIRECTION_WORDS:
        return DIRECTION_WORDS[direction]
    source, sep, target = str(direction).partition("_to_")
    if not sep:
        return str(direction)
    control = " (same-class control)" if source == target else ""
    return f"{source} prompt's activations patched into a {target} prompt{control}"


def is_control(table: pd.DataFrame) -> pd.Series:
    """Rows of a causal table that are control conditions (random direction, same-class patching).

    Read from the table's own fields: a boolean `control` column; a `condition`/`direction` value naming
    a random direction; a patching `direction` whose source and target class are equal.
    """
    out = pd.Series(False, index=table.index)
    if "control" in table.columns:
        out |= table["control"].fillna(False).astype(bool)
    for col in ("condition", "vector", "direction_kind"):
        if col in table.columns:
            out |= pd.Series(
                ["random" in str(v).lower() or "control" in str(v).lower() for v in table[col]],
                index=table.index,
                dtype=bool,
            )
    if "direction" in table.columns:
        words = [str(x) if pd.notna(x) else "" for x in table["direction"]]
        flags = [
            "random" in w.lower() or (sep != "" and a == b)
            for w, (a, sep, b) in zip(words, (w.partition("_to_") for w in words), strict=True)
        ]
        out |= pd.Series(flags, index=table.index, dtype=bool)
    return out


def excludes_zero(table: pd.DataFrame) -> pd.Series:
    """Whether each row's CI excludes zero (from `ci_low`/`ci_high`; NaN bounds: False)."""
    return (table["ci_low"] > 0) | (table["ci_high"] < 0)


def peak_table(summary: pd.DataFrame, *, metric: str = "pearson") -> pd.DataFrame:
    """Each curve's peak layer with its CI, its depth, its control and whether it beats the control.

    The peak is picked over the curve's layers, so its CI is optimistic (`peak_picked`); a family-wise
    adjusted `p_fwer` is carried when the summary provides one. `distinguishable` is True when the
    selectivity (r - control r) at the peak layer has a CI above zero, or, without selectivity rows,
    when the peak's CI lies above the control's.

    Args:
        summary: `aligned_probing.probing.summarize` output.
        metric: The information metric.

    Returns:
        One row per (model, template, scenario, attribute): layer, n_layers, relative_depth, mean,
        ci_low, ci_high, n_layers_searched, control, control_high, selectivity_low, distinguishable,
        p_fwer (NaN when not provided), peak_picked.
    """
    peaks = peak_layers(summary, metric=metric)
    key = [*_CURVE, "layer"]
    at = summary[summary["metric"] == metric]
    searched = at.groupby(_CURVE)["layer"].nunique().rename("n_layers_searched").reset_index()
    peaks = peaks.merge(searched, on=_CURVE, how="left")
    if "n_layers" not in peaks.columns:
        peaks["n_layers"] = peaks["n_layers_searched"] - 1
    peaks["relative_depth"] = peaks["layer"] / peaks["n_layers"].replace(0, np.nan)
    if "p_fwer" in at.columns:
        peaks = peaks.merge(at[[*key, "p_fwer"]], on=key, how="left")
    else:
        peaks["p_fwer"] = np.nan
    ctrl = summary[summary["metric"] == f"control_{metric}"][[*key, "mean", "ci_high"]]
    peaks = peaks.merge(
        ctrl.rename(columns={"mean": "control", "ci_high": "control_high"}), on=key, how="left"
    )
    sel = summary[summary["metric"] == "selectivity"][[*key, "ci_low"]]
    peaks = peaks.merge(sel.rename(columns={"ci_low": "selectivity_low"}), on=key, how="left")
    by_selectivity = peaks["selectivity_low"] > 0
    by_control = peaks["ci_low"] > peaks["control_high"]
    peaks["distinguishable"] = by_selectivity.where(peaks["selectivity_low"].notna(), by_control)
    peaks["distinguishable"] = (
        peaks["distinguishable"]
        .where(peaks["selectivity_low"].notna() | peaks["control_high"].notna(), peaks["ci_low"] > 0)
        .astype(bool)
    )
    peaks["peak_picked"] = True
    return peaks


def behaviour_headline(behaviour: pd.DataFrame, *, attribute: str = "toxicity") -> pd.DataFrame:
    """EMT and toxicity probability (subset `all`) with CIs per model and template for `attribute`."""
    b = behaviour[
        (behaviour["attribute"] == attribute)
        & (behaviour["subset"] == "all")
        & behaviour["metric"].isin(list(HEADLINE_BEHAVIOUR))
    ]
    cols = ["model", "template", "metric", "value", "ci_low", "ci_high"] + [
        c for c in ("n_prompts", "k", "n_missing") if c in b.columns
    ]
    return b[cols].reset_index(drop=True)


def causal_effects(
    layer_skipping: pd.DataFrame | None,
    steering: pd.DataFrame | None,
    patching: pd.DataFrame | None,
    *,
    metric: str = "emt",
) -> pd.DataFrame:
    """Every causal effect on one behaviour metric, described in words, with its fluency cost.

    Args:
        layer_skipping: Layer-skipping table (or None).
        steering: Steering table (or None).
        patching: Patching table (or None).
        metric: Behaviour metric of the effect.

    Returns:
        Rows: model, experiment, description (words), delta, ci_low, ci_high, excludes_zero, control,
        p_fwer (NaN when absent), fluency_delta (log-perplexity change when the table has it), layer,
        strength (steering alpha, in residual norms when the table has them).
    """
    rows: list[pd.DataFrame] = []
    if layer_skipping is not None and len(layer_skipping):
        t = layer_skipping
        eff = t[t["metric"] == metric].copy()
        keys = [c for c in ("model", "template", "block") if c in t.columns]
        if "layer" not in eff.columns:
            eff["layer"] = eff["block"] + 1
        eff["description"] = [f"skipping the block that writes layer {int(x)}" for x in eff["layer"]]
        rows.append(_with_fluency(eff, t, keys, "layer skipping"))
    if steering is not None and len(steering):
        t = steering
        eff = t[(t["metric"] == metric)].copy()
        strength = "alpha_norm_units" if "alpha_norm_units" in t.columns else "alpha"
        unit = " residual norms" if strength == "alpha_norm_units" else " (absolute)"
        eff = eff[eff[strength] != 0]
        eff["strength"] = eff[strength]
        kind_col = next((c for c in ("direction", "condition") if c in eff.columns), None)
        kinds = eff[kind_col] if kind_col else pd.Series("probe", index=eff.index)
        eff["description"] = [
            f"{STEERING_WORDS.get(str(kind), f'steering along {kind}')} at layer {int(layer)} with alpha {a:+.2g}{unit}"
            for kind, layer, a in zip(kinds, eff["layer"], eff[strength], strict=True)
        ]
        keys = [
            c for c in ("model", "template", "layer", "alpha", "condition", "direction", "control") if c in t
        ]
        rows.append(_with_fluency(eff, t, keys, "steering"))
    if patching is not None and len(patching) and "measure" in patching.columns:
        eff = patching[patching["measure"] == metric].copy()
        eff["description"] = [
            f"patching layer {int(layer)}: {direction_words(d)}"
            for layer, d in zip(eff["layer"], eff["direction"], strict=True)
        ]
        eff["fluency_delta"] = np.nan
        rows.append(eff.assign(experiment="patching"))
    if not rows:
        return pd.DataFrame(columns=list(EFFECT_COLUMNS))
    out = pd.concat(rows, ignore_index=True)
    out["excludes_zero"] = excludes_zero(out)
    out["control"] = is_control(out)
    if "p_fwer" not in out.columns:
        out["p_fwer"] = np.nan
    for col in ("layer", "strength", "direction"):
        if col not in out.columns:
            out[col] = np.nan
    return _against_controls(out)[list(EFFECT_COLUMNS)]


def _against_controls(out: pd.DataFrame) -> pd.DataFrame:
    """Each effect next to its control and whether it goes beyond it (`beyond_control`; NaN: no control).

    Steering: the paired per-prompt difference probe direction - random direction at the same layer and
    strength (`probe_vs_random` rows) must exclude zero with the effect's sign. Patching: the effect's CI
    must not overlap its same-class control's (patching another prompt of the target's class), a
    conservative check, since the two are not paired. Layer skipping has no control condition.
    """
    out = out.assign(
        control_test="", control_delta=np.nan, control_ci_low=np.nan, control_ci_high=np.nan, beyond_control=np.nan
    )
    out["beyond_control"] = out["beyond_control"].astype(object)
    for i, row in out[~out["control"]].iterrows():
        if row["experiment"] == "steering":
            paired = out[
                (out["experiment"] == "steering")
                & (out["direction"] == "probe_vs_random")
                & (out["model"] == row["model"])
                & (out["layer"] == row["layer"])
                & (out["strength"] == row["strength"])
            ]
            if paired.empty:
                continue
            ctrl = paired.iloc[0]
            test = "paired difference from a random direction of the same norm"
            beyond = bool(ctrl["excludes_zero"]) and bool(np.sign(ctrl["delta"]) == np.sign(row["delta"]))
        elif row["experiment"] == "patching":
            found = matching_control(out, row)
            if found is None:
                continue
            ctrl = found
            test = "same-class control (CIs must not overlap)"
            beyond = bool(row["ci_low"] > ctrl["ci_high"] or row["ci_high"] < ctrl["ci_low"])
        else:
            continue
        out.loc[i, ["control_test", "control_delta", "control_ci_low", "control_ci_high"]] = [
            test, ctrl["delta"], ctrl["ci_low"], ctrl["ci_high"]
        ]
        out.at[i, "beyond_control"] = beyond
    return out


def _with_fluency(
    effects: pd.DataFrame, table: pd.DataFrame, keys: list[str], experiment: str
) -> pd.DataFrame:
    fl = table[table["metric"] == "log_perplexity"]
    if len(fl) and keys:
        effects = effects.merge(
            fl[[*keys, "delta"]].rename(columns={"delta": "fluency_delta"}), on=keys, how="left"
        )
    else:
        effects["fluency_delta"] = np.nan
    return effects.assign(experiment=experiment)


def matching_control(effects: pd.DataFrame, effect: pd.Series) -> pd.Series | None:
    """The control condition measured with `effect` (same model, experiment, layer and strength), if any."""
    same = effects[
        effects["control"]
        & (effects["model"] == effect["model"])
        & (effects["experiment"] == effect["experiment"])
        & (effects["layer"] == effect["layer"])
        & (
            (effects["strength"] == effect["strength"])
            | (effects["strength"].isna() & pd.isna(effect["strength"]))
        )
    ]
    if same.empty:
        return None
    # Patching into a prompt of class b is controlled by patching another b prompt into it (b_to_b):
    # same target, same-class source, so what remains is the effect of patching itself.
    direction = str(effect.get("direction", ""))
    if "direction" in same.columns and "_to_" in direction:
        target = direction.partition("_to_")[2]
        matched = same[same["direction"] == f"{target}_to_{target}"]
        if len(matched):
            return matched.iloc[0]
    return same.iloc[0]


def strongest_effect(
    effects: pd.DataFrame, model: str, *, beyond_control: bool = False
) -> tuple[pd.Series | None, int]:
    """The largest of `model`'s non-control effects whose CI excludes zero, and the number searched.

    With `beyond_control`, only effects that go beyond their control count, and steering is judged by
    its paired contrast with the random direction (the proper test of "the probe direction is used":
    any push of that norm also moves the text, so the probe-vs-unmodified change mixes the two); its
    size is that contrast's. Patching must also exclude zero on its own.

    Args:
        effects: `causal_effects` output.
        model: The model.
        beyond_control: Only effects that also go beyond their control (`beyond_control` True).

    Returns:
        (the row, or None when none qualifies; the number of non-control effects it was picked from).
    """
    mine = effects[(effects["model"] == model) & ~effects["control"]]
    size = mine["delta"].abs()
    if beyond_control and "beyond_control" in mine.columns:
        credited = mine["beyond_control"].map(lambda v: v is True)
        paired = mine["experiment"] == "steering"
        hits = mine[credited & (paired | mine["excludes_zero"])]
        size = size.where(~paired, mine["control_delta"].abs())
    else:
        hits = mine[mine["excludes_zero"]]
    if hits.empty:
        return None, len(mine)
    return hits.loc[size.loc[hits.index].idxmax()], len(mine)
