"""One generic paired sweep: conditions -> paired effects (tidy), shared by every causal runner.

A condition is a set of labels plus an intervention (and, optionally, its own prompts and the
"source" prompt of each unit, for patching). Every condition is generated with the same per-row
seeds as the baseline, so each effect is a paired per-prompt difference with a bootstrap CI over
prompts, and the fluency cost (`log_perplexity` under the unmodified model) sits beside it.
`Contrast`s compare two conditions directly (steering: probe direction vs a random direction),
paired on the same prompts. Layer skipping, steering and patching are thin wrappers that build
their conditions, the way TransformerLens' `generic_activation_patch` takes small setters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from aligned_probing.behaviour import METRICS
from aligned_probing.causal._runs import (
    EFFECT_COLUMNS,
    GenerationSettings,
    StatSettings,
    compare_units,
    continuation_log_perplexity,
    generate_and_score,
    unit_metrics,
)
from aligned_probing.causal.interventions import Intervention

#: Columns of `paired_sweep` after the condition labels.
SWEEP_COLUMNS: tuple[str, ...] = (*EFFECT_COLUMNS, "source", "fraction_of_gap")


@dataclass(frozen=True)
class Condition:
    """One condition of a paired sweep.

    Attributes:
        labels: Column values that identify the condition (e.g. `{"block": 3}`); every condition
            of a sweep has the same label keys.
        intervention: Active while generating; None reuses the baseline continuations (the
            identity condition, e.g. steering with alpha = 0).
        prompts: The prompts generated under this condition (`prompt_id`, `text`); None: the
            sweep's prompts. Units are prompt ids, so they must be in the baseline.
        sources: Optional `{prompt_id: source prompt_id}`: the clean run of the source is the far
            end of the gap (`source`, `fraction_of_gap`); patching sets it.
    """

    labels: Mapping[str, Any]
    intervention: Intervention | None
    prompts: pd.DataFrame | None = None
    sources: Mapping[str, str] | None = field(default=None)


@dataclass(frozen=True)
class Contrast:
    """A paired comparison of two conditions of the same sweep (indices into `conditions`).

    Its rows have `value` = condition `a`, `baseline` = condition `b`, `delta` = mean_p (a_p - b_p).
    """

    labels: Mapping[str, Any]
    a: int
    b: int


def _units(
    model: Any,
    conts: pd.DataFrame,
    gen: GenerationSettings,
    stat: StatSettings,
    fluency: bool,
    memo: dict[tuple[str, tuple[int, ...]], float],
) -> pd.DataFrame:
    """Per-prompt metrics (+ mean `log_perplexity` of its continuations under the unmodified model).

    `memo` is shared by the sweep: a continuation the baseline already has is not re-scored.
    """
    table = unit_metrics(conts, stat)
    if fluency:
        lp = continuation_log_perplexity(
            model, conts, template=gen.template, batch_size=gen.batch_size, memo=memo
        )
        table["log_perplexity"] = conts.assign(lp=lp).groupby("prompt_id")["lp"].mean()
    return table


def paired_sweep(
    model: Any,
    prompts: pd.DataFrame,
    scorer: Any,
    conditions: Sequence[Condition],
    *,
    generation: GenerationSettings | None = None,
    stats: StatSettings | None = None,
    baseline: pd.DataFrame | None = None,
    fluency: bool = True,
    contrasts: Sequence[Contrast] = (),
    show_progress: bool = False,
    progress_desc: str = "causal",
) -> pd.DataFrame:
    """Generate under every condition and return its paired effects against the baseline.

    Args:
        model: A `LoadedModel`.
        prompts: `prompt_id` and `text`: the baseline's prompts and the default condition prompts.
        scorer: Any object with `.score(texts) -> DataFrame` holding `stats.attribute`.
        conditions: The conditions (see `Condition`).
        generation: Sampling settings shared by the baseline and every condition (paired seeds).
        stats: Attribute, threshold and bootstrap settings.
        baseline: Scored continuations of the unmodified model with the same settings
            (`generate_and_score`); generated from `prompts` when None.
        fluency: Add a `log_perplexity` row per condition (mean token NLL, nats, of the
            condition's continuations under the unmodified model, per prompt).
        contrasts: Paired condition-vs-condition comparisons appended after the conditions.
        show_progress: Show a tqdm bar over the sweep's generations: one step per condition (an
            identity condition steps at once), plus one for the baseline when it is generated here.
        progress_desc: The bar's label (the runners name themselves, e.g. "causal skipping").

    Returns:
        One row per (condition or contrast, metric): the label columns, then `SWEEP_COLUMNS`
        (`source`/`fraction_of_gap` are NaN unless the condition has `sources`).

    Example:
        >>> conds = [Condition({"block": b}, LayerSkip(b)) for b in (0, 3)]  # doctest: +SKIP
        >>> paired_sweep(model, prompts, scorer, conds, generation=gen)  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    gen = generation or GenerationSettings()
    stat = stats or StatSettings()
    keys = [tuple(c.labels) for c in conditions] + [tuple(c.labels) for c in contrasts]
    if len(set(keys)) > 1:
        raise ValueError(f"every condition and contrast needs the same label keys, got {sorted(set(keys))}.")
    metrics = [*METRICS, "log_perplexity"] if fluency else list(METRICS)
    total = len(conditions) + (baseline is None)
    with tqdm(total=total, desc=progress_desc, unit="condition", disable=not show_progress) as bar:
        base = baseline if baseline is not None else generate_and_score(model, prompts, scorer, gen)
        bar.update(int(baseline is None))
        memo: dict[tuple[str, tuple[int, ...]], float] = {}
        base_units = _units(model, base, gen, stat, fluency, memo)
        frames, units = [], []
        for cond in conditions:
            wanted = (prompts if cond.prompts is None else cond.prompts)["prompt_id"].astype(str)
            if cond.intervention is None:
                table = base_units.loc[base_units.index.intersection(wanted)]
            else:
                conts = generate_and_score(
                    model,
                    prompts if cond.prompts is None else cond.prompts,
                    scorer,
                    gen,
                    intervention=cond.intervention,
                )
                table = _units(model, conts, gen, stat, fluency, memo)
            units.append(table)
            frames.append(
                _labelled(compare_units(table, base_units, stat, metrics, sources=cond.sources), cond.labels)
            )
            bar.update()
    for con in contrasts:
        frames.append(_labelled(compare_units(units[con.a], units[con.b], stat, metrics), con.labels))
    return pd.concat(frames, ignore_index=True)


def _labelled(rows: pd.DataFrame, labels: Mapping[str, Any]) -> pd.DataFrame:
    for i, (key, value) in enumerate(labels.items()):
        rows.insert(i, key, [value] * len(rows))
    return rows
