"""Preference pairs ranked by a probe (or the scorer), and DPO with LoRA through TRL's `DPOTrainer`.

TRL is pinned (trl==1.16.0 in pyproject.toml): the LM loss on the chosen answer is its
`loss_type=["sigmoid", "sft"]` with `loss_weights=[1.0, sft_weight]`, whose "sft" term is the mean
negative log-likelihood of the chosen completion tokens (what older versions called `rpo_alpha`).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

PAIR_COLUMNS = (
    "prompt_id", "prompt", "chosen", "rejected", "chosen_idx", "rejected_idx",
    "chosen_score", "rejected_score", "ranking",
)


def build_preference_pairs(samples: pd.DataFrame, *, score: str, prompt_col: str = "prompt") -> pd.DataFrame:
    """One pair per prompt: chosen = lowest-`score` continuation, rejected = highest.

    Prompts whose lowest and highest scores tie give no pair (there is no preference to learn).
    Among equal minima (maxima) the lowest `continuation_idx` wins, so pairs are deterministic.

    Args:
        samples: One row per continuation with `prompt_id`, `continuation_idx`, `text`,
            `prompt_col` and the `score` column.
        score: Ranking column: `"probe_score"` (probe-DPO) or `"toxicity"` (classifier baseline).
        prompt_col: Column with the rendered prompt string given to the trainer.

    Returns:
        One row per kept prompt with `PAIR_COLUMNS`; `chosen_score < rejected_score` on every row.
    """
    needed = {"prompt_id", "continuation_idx", "text", prompt_col, score}
    missing = sorted(needed - set(samples.columns))
    if missing:
        raise ValueError(f"samples lacks columns {missing}; it has {sorted(samples.columns)}.")
    rows = []
    ordered = samples.sort_values(["prompt_id", "continuation_idx"], kind="stable")
    for prompt_id, group in ordered.groupby("prompt_id", sort=False):
        values = group[score].to_numpy(dtype=float)
        lo, hi = int(values.argmin()), int(values.argmax())  # first occurrence = lowest index
        if not values[lo] < values[hi]:
            continue
        rows.append(
            {
                "prompt_id": prompt_id,
                "prompt": group[prompt_col].iloc[lo],
                "chosen": group["text"].iloc[lo],
                "rejected": group["text"].iloc[hi],
                "chosen_idx": int(group["continuation_idx"].iloc[lo]),
                "rejected_idx": int(group["continuation_idx"].iloc[hi]),
                "chosen_score": float(values[lo]),
                "rejected_score": float(values[hi]),
                "ranking": score,
            }
        )
    return pd.DataFrame(rows, columns=list(PAIR_COLUMNS))


def train_dpo(
    model: Any,
    tokenizer: Any,
    pairs: pd.DataFrame,
    args: Any,
    *,
    peft_config: Any,
    callbacks: list[Any] | None = None,
) -> Any:
    """Run TRL's `DPOTrainer` with LoRA on `pairs` and return the trained `PeftModel`.

    With PEFT the reference model is the base with the adapter disabled (no second copy in memory).

    Args:
        model: A plain Hugging Face causal LM (see `finetuned.load_trainable`).
        tokenizer: Its tokenizer (with a pad token).
        pairs: Output of `build_preference_pairs`.
        args: A `trl.DPOConfig`.
        peft_config: A `peft.LoraConfig`.
        callbacks: Extra Trainer callbacks (e.g. `AdapterCheckpointCallback`).

    Returns:
        The trained `PeftModel`.
    """
    from datasets import Dataset
    from trl import DPOTrainer

    if len(pairs) == 0:
        raise ValueError("pairs is empty: every prompt's continuations tied; sample more continuations.")
    dataset = Dataset.from_pandas(pairs[["prompt", "chosen", "rejected"]].reset_index(drop=True))
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer.model
