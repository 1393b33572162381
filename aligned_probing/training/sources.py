"""Where a fine-tuning run's inputs come from: prompts, the probe layer, the scorer.

Each is resolved before anything is written to `output_dir`, so a bad prompt path, a layer the model
does not have or an unknown scorer option stops the run with nothing saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aligned_probing.training.config import FinetuneConfig


def load_finetune_prompts(spec: str, *, text_column: str | None = None) -> Any:
    """The prompt set named by `data.prompts`, from the same sources as the run config.

    One function so the shared prompt-source loader can replace `load_prompts` here alone.

    Args:
        spec: Embedded set name, RTP .jsonl, .csv/.tsv, text file, .parquet prompt table or hub dataset.
        text_column: Text column of a CSV or hub dataset.

    Returns:
        A `PromptSet` (its `df` has `prompt_id`, `text`, `source`, `prompt_*` scores).
    """
    from aligned_probing.data import load_prompts

    return load_prompts(spec, text_column=text_column)


def split_prompts(cfg: FinetuneConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`n_train` training and `n_eval` disjoint evaluation prompts, drawn with `data.seed`.

    Raises:
        ValueError: When the source has fewer than `n_train + n_eval` prompts.
    """
    d = cfg.data
    prompt_set = load_finetune_prompts(d.prompts, text_column=d.text_column)
    n_needed = d.n_train + d.n_eval
    if len(prompt_set.df) < n_needed:
        raise ValueError(
            f"data.prompts {d.prompts!r} has {len(prompt_set.df)} prompts, fewer than "
            f"data.n_train + data.n_eval = {n_needed}; lower them or use a larger source."
        )
    prompts = prompt_set.sample(n_needed, stratify_by=None, seed=d.seed).df
    rng = np.random.default_rng(d.seed)
    is_eval = np.zeros(len(prompts), dtype=bool)
    is_eval[rng.choice(len(prompts), size=d.n_eval, replace=False)] = True
    return prompts[~is_eval], prompts[is_eval]


def best_probe_layer(
    probing: pd.DataFrame, *, attribute: str, scenario: str, model: str | None, n_layers: int
) -> int:
    """The layer with the highest mean test Pearson r in an aligned-probing table.

    Args:
        probing: Probing rows (`model`, `scenario`, `attribute`, `layer`, `n_layers`, `pearson`).
        attribute: Attribute to read (e.g. `toxicity`).
        scenario: Scenario (`output` reads response tokens, like the fine-tuning probes).
        model: The run's model name; None takes the table's only model.
        n_layers: The fine-tuned model's layer count, which the run's must equal.

    Returns:
        A residual layer index in [0, n_layers].
    """
    models = sorted(probing["model"].unique())
    if model is None:
        if len(models) != 1:
            raise ValueError(f"The probing run has models {models}; set probes.probing_model to one of them.")
        model = models[0]
    rows = probing[
        (probing["model"] == model) & (probing["attribute"] == attribute) & (probing["scenario"] == scenario)
    ]
    if rows.empty:
        raise ValueError(
            f"No probing rows for model={model!r}, attribute={attribute!r}, scenario={scenario!r}; "
            f"the run has models {models}, attributes {sorted(probing['attribute'].unique())}, scenarios "
            f"{sorted(probing['scenario'].unique())}."
        )
    run_layers = int(rows["n_layers"].iloc[0])
    if run_layers != n_layers:
        raise ValueError(
            f"The probing run's model {model!r} has {run_layers} layers but the model to fine-tune has "
            f"{n_layers}; probe the same model, or give probes.layer as an int or a relative depth."
        )
    means = rows.groupby("layer")["pearson"].mean()
    return int(means.idxmax())


def resolve_probe_layer(cfg: FinetuneConfig, n_layers: int, model_name: str) -> int:
    """`probes.layer` as a residual layer index of a model with `n_layers` blocks.

    Raises:
        ValueError: An int layer beyond `n_layers`, or a `"best"` run that does not fit this model.
    """
    p = cfg.probes
    if p.layer == "best":
        from aligned_probing.pipeline.results import load_results

        results = load_results(Path(str(p.probing_run)))
        if results.probing is None or results.probing.empty:
            raise ValueError(f"probes.probing_run {p.probing_run!r} has no completed probing table.")
        model = p.probing_model
        if model is None and model_name in set(results.probing["model"]):
            model = model_name
        return best_probe_layer(
            results.probing,
            attribute=p.best_attribute,
            scenario=p.best_scenario,
            model=model,
            n_layers=n_layers,
        )
    if isinstance(p.layer, float):
        return int(round(p.layer * n_layers))
    if p.layer > n_layers:
        raise ValueError(f"probes.layer must be in [0, {n_layers}] for {model_name}, got {p.layer}.")
    return int(p.layer)
