"""Layer skipping: how continuation toxicity changes when one block is bypassed during generation.

For each block b, the continuations of the same prompts are sampled with the same per-row seeds
with and without `LayerSkip(b)`, so the change in EMT, toxicity probability and mean score is a
paired per-prompt difference with a bootstrap CI over prompts (the paper: skipping layer 7 of a
32-layer model raised EMT by 11 points).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from aligned_probing.causal._runs import EFFECT_COLUMNS, GenerationSettings, StatSettings
from aligned_probing.causal.interventions import LayerSkip
from aligned_probing.causal.sweep import Condition, paired_sweep

SKIPPING_COLUMNS: tuple[str, ...] = (
    "model",
    "template",
    "attribute",
    "block",
    "relative_depth",
    *EFFECT_COLUMNS,
)


def layer_skipping(
    model: Any,
    prompts: pd.DataFrame,
    scorer: Any,
    *,
    blocks: Sequence[int] | None = None,
    generation: GenerationSettings | None = None,
    stats: StatSettings | None = None,
    baseline: pd.DataFrame | None = None,
    fluency: bool = True,
    show_progress: bool = False,
) -> pd.DataFrame:
    """Change in behaviour per skipped block, against the unmodified model on the same prompts and seeds.

    Args:
        model: A `LoadedModel`.
        prompts: `prompt_id` and `text` (e.g. `PromptSet.df`).
        scorer: Any object with `.score(texts) -> DataFrame` holding `stats.attribute`.
        blocks: Blocks b in 0..L-1 to skip one at a time; None means all.
        generation: Sampling settings (defaults: k=3, 20 new tokens, T=1, top-p 0.9, template 0).
        stats: Attribute, threshold and bootstrap settings.
        baseline: Scored continuations of the unmodified model with the same settings (from
            `generate_and_score`), to reuse across experiments; generated when None.
        fluency: Also report `log_perplexity`, the mean token NLL of the skipped model's
            continuations under the unmodified model (one teacher-forced pass per block): a drop in
            toxicity that comes with much less likely text is breakage, not detoxification.
        show_progress: Show a tqdm bar ("causal skipping") with one step per skipped block.

    Returns:
        Tidy rows, one per (block, metric), metric in {emt, toxicity_probability, mean_score,
        log_perplexity (if `fluency`)}: `value` with the block skipped, `baseline` without,
        `delta` = mean per-prompt difference with `ci_low`/`ci_high` (bootstrap over prompts) and
        `excludes_zero`. `relative_depth` = (b + 1) / L, the depth of the block's output.

    Example:
        >>> layer_skipping(model, prompts.df, get_scorer("embedded"), blocks=[0, 7, 15])  # doctest: +SKIP
    """
    gen = generation or GenerationSettings()
    stat = stats or StatSettings()
    blocks = list(range(model.n_layers)) if blocks is None else [int(b) for b in blocks]
    bad = [b for b in blocks if not 0 <= b < model.n_layers]
    if bad:
        raise ValueError(f"blocks must be in 0..{model.n_layers - 1}, got {bad}.")
    conditions = [
        Condition({"block": b, "relative_depth": (b + 1) / model.n_layers}, LayerSkip(b)) for b in blocks
    ]
    out = paired_sweep(
        model,
        prompts,
        scorer,
        conditions,
        generation=gen,
        stats=stat,
        baseline=baseline,
        fluency=fluency,
        show_progress=show_progress,
        progress_desc="causal skipping",
    )
    out.insert(0, "attribute", stat.attribute)
    out.insert(0, "template", gen.template)
    out.insert(0, "model", model.name)
    return out[list(SKIPPING_COLUMNS)]
