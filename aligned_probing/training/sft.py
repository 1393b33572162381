"""Probe-penalty SFT: TRL's `SFTTrainer` with `loss = LM loss + probe_lambda x frozen-probe P(toxic)`.

The penalty is computed on the trained model's own residual activations at the probe's layer,
pooled over the completion tokens (the positions where `labels != -100`), during the same forward
pass that gives the LM loss, so one backward pass sends both gradients into the LoRA weights.

The trainer receives token ids, not text (`sft_examples`): the prompt ids the continuation was
generated from and exactly the generated ids. From text, TRL would re-tokenize the decoded
continuation (which need not give the generated ids back) and append an EOS token that the probe
never saw during fitting, so the penalty would pool different tokens than the probe was fitted on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from trl import SFTConfig, SFTTrainer

from aligned_probing.training.activations import capture_residual
from aligned_probing.training.penalty import ProbePenalty


@dataclass
class ProbeSFTConfig(SFTConfig):
    """`SFTConfig` plus the probe penalty's weight.

    Args:
        probe_lambda: Weight of the frozen probe's mean P(toxic) in the loss (the paper: 1.0).
    """

    probe_lambda: float = field(default=1.0, metadata={"help": "Weight of the frozen-probe penalty."})

    def __post_init__(self) -> None:
        if self.probe_lambda < 0:
            raise ValueError(f"probe_lambda must be >= 0, got {self.probe_lambda}.")
        super().__post_init__()


class ProbePenaltySFTTrainer(SFTTrainer):
    """`SFTTrainer` whose loss adds the frozen-probe penalty (only `compute_loss` is overridden).

    Args:
        *args: Passed to `SFTTrainer`.
        penalty: The frozen probe penalty (its `layer` picks the residual layer to read).
        **kwargs: Passed to `SFTTrainer`; `args` must be a `ProbeSFTConfig`.
    """

    def __init__(self, *args: Any, penalty: ProbePenalty, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.penalty = penalty

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        # Completion positions: the collator sets labels to -100 on prompt and padding tokens.
        mask = (inputs["labels"] != -100).long()
        with capture_residual(model, self.penalty.layer) as captured:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        loss, outputs = result if return_outputs else (result, None)
        # captured[0] is the loss forward (graph kept); with return_outputs=True, TRL 1.16 runs a
        # second, no-grad forward for the logits, which would carry no gradient.
        acts = captured[0]
        probe_p = self.penalty(acts, mask.to(acts.device))
        mode = "train" if model.training else "eval"
        self._metrics[mode]["probe_penalty"].append(float(probe_p.detach()))
        term = self.args.probe_lambda * probe_p
        if model.training and self._loss_scaled_for_ga(num_items_in_batch):
            # The LM loss is already divided by the tokens of the whole accumulated batch, so the
            # Trainer will not divide by the accumulation steps; our per-micro-batch mean must be.
            term = term / getattr(self, "current_gradient_accumulation_steps", 1)
        loss = loss + term
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Mirror of `Trainer.training_step`'s test for whether it will skip the accumulation division."""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
            or self.compute_loss_func is not None
        )


def sft_examples(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> list[dict]:
    """Pre-tokenized SFT examples: `input_ids` = prompt + response ids, `labels` -100 on the prompt.

    TRL uses an `input_ids` column as is (no EOS appended, no re-tokenization) and a `labels`
    column as the loss mask, so LM loss and probe penalty cover exactly the response ids.

    Args:
        prompt_ids: Rendered prompt ids per sample.
        response_ids: Generated ids per sample (non-empty).

    Returns:
        One dict per sample with `input_ids` and `labels` (lists of int).
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(
            f"prompt_ids and response_ids must have the same length, got {len(prompt_ids)} and "
            f"{len(response_ids)}."
        )
    examples = []
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        p, r = [int(t) for t in p], [int(t) for t in r]
        if not r:
            raise ValueError(f"response_ids[{i}] is empty; drop empty continuations first.")
        examples.append({"input_ids": p + r, "labels": [-100] * len(p) + r})
    return examples


def train_probe_sft(
    model: Any,
    tokenizer: Any,
    texts: Any,
    args: ProbeSFTConfig,
    *,
    penalty: ProbePenalty,
    peft_config: Any,
    callbacks: list[Any] | None = None,
) -> Any:
    """Fine-tune with LoRA on prompt/completion texts under the frozen-probe penalty.

    Args:
        model: A plain Hugging Face causal LM (see `finetuned.load_trainable`).
        tokenizer: Its tokenizer (with a pad token).
        texts: A DataFrame with `prompt_token_ids` and `token_ids` (generated ids) per sample; the
            LM loss and the penalty both cover exactly the generated tokens.
        args: The `ProbeSFTConfig`.
        penalty: The frozen probe penalty.
        peft_config: A `peft.LoraConfig`.
        callbacks: Extra Trainer callbacks.

    Returns:
        The trained `PeftModel`.
    """
    from datasets import Dataset

    missing = sorted({"prompt_token_ids", "token_ids"} - set(texts.columns))
    if missing:
        raise ValueError(f"texts lacks columns {missing}; it has {sorted(texts.columns)}.")
    dataset = Dataset.from_list(sft_examples(list(texts["prompt_token_ids"]), list(texts["token_ids"])))
    trainer = ProbePenaltySFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
        penalty=penalty,
    )
    trainer.train()
    return trainer.model
