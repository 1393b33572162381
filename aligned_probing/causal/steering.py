"""Steering: move the residual stream along a unit probe direction at one layer while generating.

Strengths are in units of the layer's median residual norm (`units="norm"`, the default): residual
norms grow with depth, so an absolute step that is large at one layer is negligible at another
(SmolLM2-135M: +-8 is 7 % of the median norm at layer 8, 1 % at layer 30, 3x at layer 0). The
median is taken over every prompt-span position of the sweep's prompts at that layer.

Every strength is run twice: along the probe direction and along a seeded random unit direction
(orthogonal to the probe's) with the same operator, strength and layer. The `probe_vs_random`
rows are the paired per-prompt difference between the two, so an effect is credited to the probe
direction only when that CI excludes zero. Every condition also reports `log_perplexity`: the mean
token NLL (nats) of its continuations under the *unmodified* model (exp of it is the perplexity),
so "less toxic" that is only gibberish shows up as a rise there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from aligned_probing.causal._activations import median_residual_norm
from aligned_probing.causal._runs import EFFECT_COLUMNS, GenerationSettings, StatSettings
from aligned_probing.causal.interventions import OPERATORS, Steering
from aligned_probing.causal.sweep import Condition, Contrast, paired_sweep
from aligned_probing.data.templates import render_prompt

UNITS: tuple[str, ...] = ("norm", "absolute")
STEERING_COLUMNS: tuple[str, ...] = (
    "model",
    "template",
    "attribute",
    "layer",
    "operator",
    "direction",
    "alpha",
    "units",
    "alpha_norm_units",
    "residual_norm",
    *EFFECT_COLUMNS,
)


def random_direction(d_model: int, *, seed: int, orthogonal_to: np.ndarray | None = None) -> np.ndarray:
    """A seeded random unit vector [d_model] (Gaussian, then normalised), optionally orthogonal to one.

    The control direction of a steering sweep: steering along it at the same strength shows what
    any push of that size does, so the probe direction must beat it.
    """
    vec = np.random.default_rng(seed).standard_normal(d_model)
    if orthogonal_to is not None:
        u = np.asarray(orthogonal_to, dtype=np.float64).ravel()
        u = u / np.linalg.norm(u)
        vec = vec - (vec @ u) * u
    return vec / np.linalg.norm(vec)


def steering_sweep(
    model: Any,
    prompts: pd.DataFrame,
    scorer: Any,
    direction: np.ndarray,
    *,
    layer: int,
    alphas: Sequence[float],
    units: str = "norm",
    operator: str = "add",
    random_control: bool = True,
    control_seed: int = 0,
    generation: GenerationSettings | None = None,
    stats: StatSettings | None = None,
    baseline: pd.DataFrame | None = None,
    fluency: bool = True,
    show_progress: bool = False,
) -> pd.DataFrame:
    """Toxicity and fluency of continuations steered along `direction` at `layer`, per alpha.

    Args:
        model: A `LoadedModel`.
        prompts: `prompt_id` and `text`.
        scorer: Any object with `.score(texts) -> DataFrame` holding `stats.attribute`.
        direction: Direction [d_model] in raw residual space (e.g. `RidgeProbe.direction("toxicity")`);
            normalised to unit length.
        layer: Residual layer 0..L where the operator acts (every position, see `Steering`).
        alphas: Grid of signed strengths; with "add", 0 reproduces the baseline exactly. With
            "ablate" alpha has no effect (pass one value).
        units: "norm" (alpha x the layer's median residual norm on `prompts`) or "absolute"
            (residual-stream units).
        operator: "add", "ablate" or "ablate_then_add" (see `aligned_probing.causal.OPERATORS`).
        random_control: Also steer along a seeded random direction (same strength, layer and
            operator) and add `probe_vs_random` rows.
        control_seed: Seed of the random direction.
        generation: Sampling settings.
        stats: Attribute, threshold and bootstrap settings.
        baseline: Scored unsteered continuations with the same settings (reused if given).
        fluency: Also report `log_perplexity` (one teacher-forced pass per condition).
        show_progress: Show a tqdm bar ("causal steering") with one step per (direction, alpha).

    Returns:
        Tidy rows with `STEERING_COLUMNS`, one per (direction, alpha, metric): `direction` is
        "probe", "random" (both against the unsteered baseline) or "probe_vs_random" (`value` =
        probe, `baseline` = random, `delta` = mean per-prompt difference, CI over prompts);
        `alpha` is as given in `units`, `alpha_norm_units` = alpha / `residual_norm` for absolute
        units; metric in {emt, toxicity_probability, mean_score, log_perplexity}.

    Example:
        >>> steering_sweep(model, prompts.df, scorer, probe.direction("toxicity"), layer=5,
        ...                alphas=[-0.25, 0.0, 0.25])  # doctest: +SKIP
    """
    gen = generation or GenerationSettings()
    stat = stats or StatSettings()
    if not 0 <= int(layer) <= model.n_layers:
        raise ValueError(f"layer must be in 0..{model.n_layers}, got {layer}.")
    if len(alphas) == 0:
        raise ValueError("alphas must hold at least one value, got an empty sequence.")
    if units not in UNITS:
        raise ValueError(f"units must be one of {UNITS}, got {units!r}.")
    if operator not in OPERATORS:
        raise ValueError(f"operator must be one of {sorted(OPERATORS)}, got {operator!r}.")
    rendered = [render_prompt(model.tokenizer, t, gen.template) for t in prompts["text"]]
    norm = median_residual_norm(model, rendered, int(layer), batch_size=gen.batch_size)
    scale = norm if units == "norm" else 1.0
    kinds = {"probe": np.asarray(direction, dtype=np.float64)}
    if random_control:
        kinds["random"] = random_direction(model.d_model, seed=control_seed, orthogonal_to=direction)
    conditions: list[Condition] = []
    contrasts: list[Contrast] = []
    for alpha in alphas:
        index = {}
        for kind, vec in kinds.items():
            identity = operator == "add" and alpha == 0
            steer = None if identity else Steering(int(layer), vec, float(alpha) * scale, operator)
            index[kind] = len(conditions)
            conditions.append(Condition({"direction": kind, "alpha": float(alpha)}, steer))
        if random_control:
            labels = {"direction": "probe_vs_random", "alpha": float(alpha)}
            contrasts.append(Contrast(labels, index["probe"], index["random"]))
    out = paired_sweep(
        model,
        prompts,
        scorer,
        conditions,
        generation=gen,
        stats=stat,
        baseline=baseline,
        fluency=fluency,
        contrasts=contrasts,
        show_progress=show_progress,
        progress_desc="causal steering",
    )
    out["alpha_norm_units"] = out["alpha"] if units == "norm" else out["alpha"] / norm
    out = out.assign(
        model=model.name,
        template=gen.template,
        attribute=stat.attribute,
        layer=int(layer),
        operator=operator,
        units=units,
        residual_norm=norm,
    )
    return out[list(STEERING_COLUMNS)]
