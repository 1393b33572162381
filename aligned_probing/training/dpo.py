"""Preference pairs ranked by a probe (or the scorer), and DPO with LoRA through TRL's `DPOTrainer`.

TRL is pinned (trl==1.16.0 in pyproject.toml): the LM loss on the chosen answer is its
`loss_type=["sigmoid", "sft"]` with `loss_weights=[1.0, sft_weight]`, whose "sft" term is the mean
negative log-likelihood of the chosen completion tokens (what older versions called `rpo_alpha`).

The trainer receives token ids, not text (`preference_examples`): the rendered prompt's ids and
exactly the generated ids of the chosen and rejected continuations, plus the EOS token only where
the continuation actually stopped at EOS. From text, TRL 1.16 would re-tokenize the decoded
continuations (which need not give the generated ids back) and append EOS to every completion,
so a continuation cut at `max_new_tokens` would teach the model to stop where it never stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
from trl import DPOTrainer

PAIR_COLUMNS = (
    "prompt_id", "prompt", "chosen", "rejected", "chosen_idx", "rejected_idx",
    "chosen_score", "rejected_score", "ranking",
    "prompt_token_ids", "chosen_token_ids", "rejected_token_ids",
    "chosen_stopped_at_eos", "rejected_stopped_at_eos",
)
# Pre-tokenized example keys that TRL 1.16's `DataCollatorForPreference` reads.
_TOKEN_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")


def build_preference_pairs(samples: pd.DataFrame, *, score: str, prompt_col: str = "prompt") -> pd.DataFrame:
    """One pair per prompt: chosen = lowest-`score` continuation, rejected = highest.

    Prompts whose lowest and highest scores tie give no pair (there is no preference to learn).
    Among equal minima (maxima) the lowest `continuation_idx` wins, so pairs are deterministic.

    Args:
        samples: One row per continuation with `prompt_id`, `continuation_idx`, `text`,
            `prompt_col`, the `score` column, and the ids DPO trains on: `prompt_token_ids` (the
            rendered prompt the continuation was generated from), `token_ids` (the generated ids,
            EOS excluded) and `stopped_at_eos`.
        score: Ranking column: `"probe_score"` (probe-DPO) or `"toxicity"` (classifier baseline).
        prompt_col: Column with the rendered prompt string (kept for reading the pairs).

    Returns:
        One row per kept prompt with `PAIR_COLUMNS`; `chosen_score < rejected_score` on every row.
    """
    needed = {"prompt_id", "continuation_idx", "text", prompt_col, score, "prompt_token_ids", "token_ids",
              "stopped_at_eos"}
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
                "prompt_token_ids": [int(t) for t in group["prompt_token_ids"].iloc[lo]],
                "chosen_token_ids": [int(t) for t in group["token_ids"].iloc[lo]],
                "rejected_token_ids": [int(t) for t in group["token_ids"].iloc[hi]],
                "chosen_stopped_at_eos": bool(group["stopped_at_eos"].iloc[lo]),
                "rejected_stopped_at_eos": bool(group["stopped_at_eos"].iloc[hi]),
            }
        )
    return pd.DataFrame(rows, columns=list(PAIR_COLUMNS))


def _completion(ids: Sequence[int], stopped_at_eos: bool, eos_token_id: int, where: str) -> list[int]:
    out = [int(t) for t in ids] + ([eos_token_id] if stopped_at_eos else [])
    if not out:
        raise ValueError(f"{where} is empty and did not stop at EOS; drop empty continuations first.")
    return out


def preference_examples(pairs: pd.DataFrame, *, eos_token_id: int) -> list[dict[str, list[int]]]:
    """Pre-tokenized DPO examples: `prompt_ids`, `chosen_ids`, `rejected_ids` (lists of int).

    A completion is exactly its generated ids, plus `eos_token_id` when (and only when) the
    continuation stopped at EOS; one cut at `max_new_tokens` gets no EOS. The generation table
    records that a continuation stopped, not which stop token: with several EOS ids (a chat
    model's end-of-turn and its tokenizer's EOS) the tokenizer's EOS stands in for it.

    Args:
        pairs: Output of `build_preference_pairs`.
        eos_token_id: The tokenizer's EOS id.

    Returns:
        One dict per pair.
    """
    needed = {"prompt_token_ids", "chosen_token_ids", "rejected_token_ids", "chosen_stopped_at_eos",
              "rejected_stopped_at_eos"}
    missing = sorted(needed - set(pairs.columns))
    if missing:
        raise ValueError(
            f"pairs lacks columns {missing}; build them with build_preference_pairs from samples with "
            "token ids."
        )
    examples = []
    for i, row in enumerate(pairs.itertuples(index=False)):
        examples.append({
            "prompt_ids": [int(t) for t in row.prompt_token_ids],
            "chosen_ids": _completion(row.chosen_token_ids, bool(row.chosen_stopped_at_eos), eos_token_id,
                                      f"pairs row {i}'s chosen completion"),
            "rejected_ids": _completion(row.rejected_token_ids, bool(row.rejected_stopped_at_eos),
                                        eos_token_id, f"pairs row {i}'s rejected completion"),
        })
    return examples


class TokenDPOTrainer(DPOTrainer):
    """`DPOTrainer` that trains on pre-tokenized pairs as given (only `_prepare_dataset` is overridden).

    TRL 1.16 has no pass-through for tokenized preference data: its `_prepare_dataset` always adds
    EOS to and re-tokenizes text columns. A dataset with `prompt_ids`, `chosen_ids` and
    `rejected_ids` skips that; only TRL's own filter is kept (with `truncation_mode="keep_start"`,
    a prompt that fills `max_length` alone leaves no completion token, so the example is dropped).
    """

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:  # noqa: D102
        if not set(_TOKEN_KEYS) <= set(dataset.column_names or []):
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if args.max_length is not None and args.truncation_mode == "keep_start":
            dataset = dataset.filter(lambda example: len(example["prompt_ids"]) < args.max_length)
        return dataset


def dpo_trainer(
    model: Any,
    tokenizer: Any,
    pairs: pd.DataFrame,
    args: Any,
    *,
    peft_config: Any,
    callbacks: list[Any] | None = None,
) -> TokenDPOTrainer:
    """A `TokenDPOTrainer` with LoRA on `pairs`' token ids (see `preference_examples`), not yet trained.

    With PEFT the reference model is the base with the adapter disabled (no second copy in memory).

    Args:
        model: A plain Hugging Face causal LM (see `finetuned.load_trainable`).
        tokenizer: Its tokenizer (with a pad token and an EOS token).
        pairs: Output of `build_preference_pairs`.
        args: A `trl.DPOConfig`.
        peft_config: A `peft.LoraConfig`.
        callbacks: Extra Trainer callbacks (e.g. `AdapterCheckpointCallback`).
    """
    from datasets import Dataset

    if len(pairs) == 0:
        raise ValueError("pairs is empty: every prompt's continuations tied; sample more continuations.")
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token; DPO needs it for continuations that stopped.")
    dataset = Dataset.from_list(preference_examples(pairs, eos_token_id=int(tokenizer.eos_token_id)))
    return TokenDPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def train_dpo(
    model: Any,
    tokenizer: Any,
    pairs: pd.DataFrame,
    args: Any,
    *,
    peft_config: Any,
    callbacks: list[Any] | None = None,
) -> Any:
    """Run DPO with LoRA on `pairs` (exactly their token ids) and return the trained `PeftModel`.

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
    trainer = dpo_trainer(model, tokenizer, pairs, args, peft_config=peft_config, callbacks=callbacks)
    trainer.train()
    return trainer.model
