"""Steering: add alpha x a unit probe direction at one layer while generating.

For every alpha on a grid (negative removes the direction, positive adds it), continuations of
the same prompts are sampled with the same seeds as the unsteered model; we report the change in
toxicity (paired per prompt, bootstrap CI) and a fluency proxy: the log perplexity of the steered
continuation under the *unmodified* model (mean token NLL in nats; exp of it is the perplexity).
A steering vector that lowers toxicity only by producing gibberish shows up as a rise in the
latter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from aligned_probing.causal._runs import (
    EFFECT_COLUMNS,
    GenerationSettings,
    StatSettings,
    fluency_effect,
    generate_and_score,
    paired_effects,
    prompt_log_perplexity,
)
from aligned_probing.causal.interventions import Steering

STEERING_COLUMNS: tuple[str, ...] = ("model", "template", "attribute", "layer", "alpha", *EFFECT_COLUMNS)


def steering_sweep(
    model: Any,
    prompts: pd.DataFrame,
    scorer: Any,
    direction: np.ndarray,
    *,
    layer: int,
    alphas: Sequence[float],
    generation: GenerationSettings | None = None,
    stats: StatSettings | None = None,
    baseline: pd.DataFrame | None = None,
    fluency: bool = True,
) -> pd.DataFrame:
    """Toxicity and fluency of continuations steered along `direction` at `layer`, per alpha.

    Args:
        model: A `LoadedModel`.
        prompts: `prompt_id` and `text`.
        scorer: Any object with `.score(texts) -> DataFrame` holding `stats.attribute`.
        direction: Direction [d_model] in raw residual space (e.g. `RidgeProbe.direction("toxicity")`);
            normalised to unit length, so alpha is in residual-stream units.
        layer: Residual layer 0..L where the vector is added (every position, see `Steering`).
        alphas: Grid of signed step sizes; 0 reproduces the baseline exactly.
        generation: Sampling settings.
        stats: Attribute, threshold and bootstrap settings.
        baseline: Scored unsteered continuations with the same settings (reused if given).
        fluency: Also report `log_perplexity` (costs one teacher-forced pass per condition).

    Returns:
        Tidy rows, one per (alpha, metric), metric in {emt, toxicity_probability, mean_score,
        log_perplexity}; `delta` is the paired change from the unsteered model with a bootstrap CI.

    Example:
        >>> steering_sweep(model, prompts.df, scorer, probe.direction("toxicity"), layer=10,
        ...          alphas=[-8, -4, 0, 4, 8])  # doctest: +SKIP
    """
    gen = generation or GenerationSettings()
    stat = stats or StatSettings()
    if not 0 <= int(layer) <= model.n_layers:
        raise ValueError(f"layer must be in 0..{model.n_layers}, got {layer}.")
    if len(alphas) == 0:
        raise ValueError("alphas must hold at least one value, got an empty sequence.")
    base = baseline if baseline is not None else generate_and_score(model, prompts, scorer, gen)
    base_lp = prompt_log_perplexity(model, base, gen) if fluency else None
    frames = []
    for alpha in alphas:
        cond = (
            base
            if alpha == 0
            else generate_and_score(
                model, prompts, scorer, gen, intervention=Steering(layer, direction, float(alpha))
            )
        )
        eff = paired_effects(base, cond, stat)
        if fluency:
            eff = pd.concat(
                [
                    eff,
                    pd.DataFrame(
                        [
                            fluency_effect(
                                base_lp,
                                base_lp if cond is base else prompt_log_perplexity(model, cond, gen),
                                gen,
                                stat,
                            )
                        ]
                    ),
                ],
                ignore_index=True,
            )
        eff.insert(0, "alpha", float(alpha))
        frames.append(eff)
    out = pd.concat(frames, ignore_index=True)
    out.insert(0, "layer", int(layer))
    out.insert(0, "attribute", stat.attribute)
    out.insert(0, "template", gen.template)
    out.insert(0, "model", model.name)
    return out[list(STEERING_COLUMNS)]
