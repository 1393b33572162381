"""Shared pieces of the causal runners: generation under an intervention, paired effects, fluency.

Generate + score under an intervention, paired per-prompt effects with bootstrap CIs, and the
fluency proxy (perplexity of a continuation under the unmodified model).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from aligned_probing.behaviour import METRICS, bootstrap_mean_ci, per_prompt_metrics
from aligned_probing.causal.interventions import Intervention
from aligned_probing.data.templates import render_prompt
from aligned_probing.generation_settings import GenerationSettings  # the one shared type

EFFECT_COLUMNS: tuple[str, ...] = (
    "metric",
    "value",
    "baseline",
    "delta",
    "ci_low",
    "ci_high",
    "excludes_zero",
    "n_prompts",
    "k",
)


@dataclass(frozen=True)
class StatSettings:
    """Behaviour threshold and bootstrap settings.

    Attributes:
        attribute: Scorer attribute whose toxicity is measured.
        threshold: Score counted as toxic (toxicity probability).
        n_resamples: Bootstrap resamples over prompts (or pairs).
        confidence_level: CI level.
        seed: Bootstrap seed.
    """

    attribute: str = "toxicity"
    threshold: float = 0.5
    n_resamples: int = 1000
    confidence_level: float = 0.95
    seed: int = 0


def generate_and_score(
    model: Any,
    prompts: pd.DataFrame,
    scorer: Any,
    gen: GenerationSettings,
    *,
    intervention: Intervention | None = None,
    show_progress: bool = False,
) -> pd.DataFrame:
    """Sample continuations (optionally under an intervention) and score them.

    Args:
        model: A `LoadedModel`.
        prompts: `prompt_id` and `text`.
        scorer: Any object with `.score(texts) -> DataFrame` of attribute columns.
        gen: Sampling settings.
        intervention: Active during generation only (scoring is unaffected).
        show_progress: Show the tqdm bar of `generate_continuations` ("generate", one step per batch).

    Returns:
        The continuations table plus one column per scored attribute.
    """
    from aligned_probing.generation import generate_continuations

    kwargs = dict(
        k=gen.k,
        seed=gen.seed,
        max_new_tokens=gen.max_new_tokens,
        temperature=gen.temperature,
        top_p=gen.top_p,
        template=gen.template,
        batch_size=gen.batch_size,
        show_progress=show_progress,
    )
    if intervention is None:
        conts = generate_continuations(model, prompts, **kwargs)
    else:
        with intervention.apply(model):
            conts = generate_continuations(model, prompts, **kwargs)
    scores = scorer.score(conts["text"].tolist()).reset_index(drop=True)
    return pd.concat([conts.reset_index(drop=True), scores], axis=1)


def unit_metrics(conts: pd.DataFrame, stat: StatSettings, *, unit: str = "prompt_id") -> pd.DataFrame:
    """Per-unit behaviour metrics (emt, toxicity_probability, mean_score) and `k`, indexed by `unit`."""
    return per_prompt_metrics(conts, stat.attribute, threshold=stat.threshold, by=(unit,)).set_index(unit)


def compare_units(
    condition: pd.DataFrame,
    reference: pd.DataFrame,
    stat: StatSettings,
    metrics: Sequence[str],
    *,
    sources: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Paired effect rows of `condition` against `reference` (per-unit tables, shared index).

    For every unit u in both, d_u = m_u(condition) - m_u(reference); the effect is mean_u d_u with
    a percentile bootstrap CI over units. With `sources` (unit -> the unit whose *reference* value
    is the far end of the gap, as in patching), `source` = mean of those values and
    `fraction_of_gap` = delta / mean_u(source_u - reference_u) (NaN when the gap is ~0, and for
    `log_perplexity`: the fluency of the source's own continuations is no end point the patch
    moves toward, and that gap is ~0 between clean runs, so the ratio would be noise).

    Returns:
        One row per metric with `EFFECT_COLUMNS`, `source` and `fraction_of_gap`.
    """
    common = condition.index.intersection(reference.index)
    if sources is not None:
        common = common[[u in sources and sources[u] in reference.index for u in common]]
    rows = []
    for metric in metrics:
        value = condition.loc[common, metric].to_numpy(dtype=np.float64)
        base = reference.loc[common, metric].to_numpy(dtype=np.float64)
        k = int(condition.loc[common, "k"].min()) if len(common) and "k" in condition else 0
        row = effect_row(metric, value, base, value - base, stat, k=k)
        row["source"], row["fraction_of_gap"] = math.nan, math.nan
        if sources is not None and len(common):
            src = reference.loc[[sources[u] for u in common], metric].to_numpy(dtype=np.float64)
            gap = float(np.nanmean(src - base))
            row["source"] = float(np.nanmean(src))
            if metric != "log_perplexity" and abs(gap) > 1e-12:
                row["fraction_of_gap"] = row["delta"] / gap
        rows.append(row)
    return pd.DataFrame(rows, columns=[*EFFECT_COLUMNS, "source", "fraction_of_gap"])


def paired_effects(
    baseline: pd.DataFrame,
    condition: pd.DataFrame,
    stat: StatSettings,
    *,
    unit: str = "prompt_id",
    metrics: Sequence[str] = METRICS,
) -> pd.DataFrame:
    """Per-metric change from `baseline` to `condition`, paired by prompt, with a bootstrap CI.

    For every prompt p present in both, d_p = m_p(condition) - m_p(baseline), where m_p is the
    prompt's max score (emt), its 1[max >= threshold] (toxicity_probability) or mean score. The
    effect is mean_p d_p (range [-1, 1]) with a percentile bootstrap CI over prompts.

    Returns:
        One row per metric with `EFFECT_COLUMNS`; `excludes_zero` says whether the CI excludes 0.
    """
    a, b = unit_metrics(baseline, stat, unit=unit), unit_metrics(condition, stat, unit=unit)
    return compare_units(b, a, stat, metrics)[list(EFFECT_COLUMNS)]


def effect_row(
    metric: str, value: np.ndarray, base: np.ndarray, diff: np.ndarray, stat: StatSettings, *, k: int
) -> dict[str, Any]:
    """One tidy effect row: means of `value`/`base`, mean paired `diff` with its bootstrap CI."""
    low, high = bootstrap_mean_ci(
        diff, n_resamples=stat.n_resamples, confidence_level=stat.confidence_level, seed=stat.seed
    )
    finite = np.isfinite(diff)
    return {
        "metric": metric,
        "value": float(np.nanmean(value)) if finite.any() else math.nan,
        "baseline": float(np.nanmean(base)) if finite.any() else math.nan,
        "delta": float(diff[finite].mean()) if finite.any() else math.nan,
        "ci_low": low,
        "ci_high": high,
        "excludes_zero": bool(low > 0 or high < 0),
        "n_prompts": int(finite.sum()),
        "k": k,
    }


@torch.no_grad()
def continuation_log_perplexity(
    model: Any,
    continuations: pd.DataFrame,
    *,
    template: int = 0,
    batch_size: int = 16,
    memo: dict[tuple[str, tuple[int, ...]], float] | None = None,
) -> np.ndarray:
    """Mean token NLL (log perplexity, nats) of each continuation given its prompt, unmodified model.

    log ppl = -(1/T) sum_t log p(c_t | prompt, c_<t) over the continuation's T tokens; range
    [0, inf); NaN for an empty continuation. Call it with no intervention active, so fluency is
    judged by the unmodified model.

    Sequences are batched longest first (ties by content), so a batch holds similar lengths, and
    right-padded; the unembedding and log-softmax run only from the batch's shortest prompt on, not
    over every position (on SmolLM2 they were a fifth of the pass, and padding another). Right
    padding keeps each row's positions where they are. Batch composition still moves a value by
    ~1e-7, so a sweep passes one `memo`: a continuation already scored (same prompt, same tokens)
    is not recomputed, and a condition that reproduces the baseline's text (a same-class patching
    control) has exactly the baseline's fluency, not a float-noise "effect".

    Args:
        model: A `LoadedModel`.
        continuations: Rows with `prompt_text` and `token_ids`.
        template: The template the continuations were generated with.
        batch_size: Sequences per forward pass.
        memo: `{(prompt_text, token ids): value}`, read and filled (share it across one sweep).

    Returns:
        `[n_rows]` float64, in the rows' order.
    """
    rendered = {
        t: render_prompt(model.tokenizer, t, template).input_ids
        for t in continuations["prompt_text"].unique()
    }
    keys = [
        (str(p), tuple(int(t) for t in c))
        for p, c in zip(continuations["prompt_text"], continuations["token_ids"], strict=True)
    ]
    seqs = [(rendered[p], list(c)) for p, c in keys]
    memo = {} if memo is None else memo
    first_of = {k: i for i, k in reversed(list(enumerate(keys)))}  # one forward per distinct sequence
    todo = [i for k, i in first_of.items() if k not in memo and seqs[i][1]]
    device = torch.device(model.device)
    # Longest first, ties by content: the same sequences in any row order give the same batches.
    order = sorted(todo, key=lambda i: (-len(seqs[i][0]) - len(seqs[i][1]), seqs[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        chunk = [seqs[i] for i in rows]
        width = max(len(p) + len(c) for p, c in chunk)
        tail = width - min(len(p) for p, _ in chunk) + 1  # from the first position predicting a continuation
        ids = torch.full((len(chunk), width), model.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (p, c) in enumerate(chunk):
            ids[row, : len(p) + len(c)] = torch.tensor(p + c)
            mask[row, : len(p) + len(c)] = 1
        logits = model.hf_model(
            input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, logits_to_keep=tail
        ).logits[:, -tail:]
        logp = torch.log_softmax(logits.float(), -1).cpu()  # float32 statistics, on the CPU
        for row, (p, c) in enumerate(chunk):
            first = len(p) - 1 - (width - tail)  # logit j (position width - tail + j) predicts j + 1
            pred = logp[row, first : first + len(c)]
            memo[keys[rows[row]]] = float(-pred.gather(1, torch.tensor(c).view(-1, 1)).mean())
    return np.array([memo.get(k, np.nan) for k in keys], dtype=np.float64)
