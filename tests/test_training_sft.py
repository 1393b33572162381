"""Probe-penalty SFT: the penalty's gradient reaches LoRA weights; training lowers the probe's score."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from peft import get_peft_model

from aligned_probing.training.activations import capture_residual, pooled_response_activations
from aligned_probing.training.finetuned import load_trainable, lora_config
from aligned_probing.training.penalty import ProbePenalty
from aligned_probing.training.probes import fit_probe_set
from aligned_probing.training.sft import ProbeSFTConfig, sft_examples, train_probe_sft

PROMPTS = ["The quick brown fox", "You are a", "What a lovely day", "This is a test", "hello world"] * 2
COMPLETIONS = [" jumps over the lazy dog.", " stupid idiot and I hate you.", " for a walk in the park.",
               " of the tokenizer, with commas.", " and numbers 123.", " over the dog.", " idiot.",
               " with friends.", " newlines and numbers.", " Continuation: hello"]
LAYER = 2


def _probe_scores(model, tok, probes):
    p_ids = [tok(p)["input_ids"] for p in PROMPTS]
    r_ids = [tok(c)["input_ids"] for c in COMPLETIONS]
    acts = pooled_response_activations(model, p_ids, r_ids, LAYER, pad_token_id=tok.pad_token_id)
    return acts, probes.predict_proba(acts)


def _fit(model, tok):
    p_ids = [tok(p)["input_ids"] for p in PROMPTS]
    r_ids = [tok(c)["input_ids"] for c in COMPLETIONS]
    acts = pooled_response_activations(model, p_ids, r_ids, LAYER, pad_token_id=tok.pad_token_id)
    return fit_probe_set(acts, np.array([0, 1] * 5), meta={"layer": LAYER})


def _id_texts(tok):
    return pd.DataFrame({"prompt_token_ids": [tok(p)["input_ids"] for p in PROMPTS],
                         "token_ids": [tok(c)["input_ids"] for c in COMPLETIONS]})


def test_sft_examples_mask_exactly_the_generated_ids():
    examples = sft_examples([[5, 6, 7], [5]], [[8, 9], [10, 11, 12]])
    assert examples == [
        # prompt 5 6 7 | generated 8 9
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, -100, 8, 9]},
        # prompt 5 | generated 10 11 12
        {"input_ids": [5, 10, 11, 12], "labels": [-100, 10, 11, 12]},
    ]
    with pytest.raises(ValueError, match=r"response_ids\[0\] is empty"):
        sft_examples([[1]], [[]])


def test_trainer_batch_pools_generated_ids_without_eos(tiny_llama_dir, tmp_path):
    """TRL must neither append EOS nor re-tokenize: the penalty mask is the generated ids' positions."""
    from datasets import Dataset

    from aligned_probing.training.sft import ProbePenaltySFTTrainer

    model, tok = load_trainable(tiny_llama_dir)
    eos = tok.eos_token_id
    # Arbitrary generated ids, no EOS at the end: they must reach the model unchanged.
    prompt = [[12, 13, 14], [15]]
    gen = [[40, 41], [42, 43, 44]]
    ds = Dataset.from_list(sft_examples(prompt, gen))
    args = ProbeSFTConfig(output_dir=str(tmp_path), report_to="none", save_strategy="no", use_cpu=True,
                          bf16=False, max_length=64, per_device_train_batch_size=2)
    trainer = ProbePenaltySFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                                     peft_config=lora_config(r=2, alpha=4),
                                     penalty=ProbePenalty(_fit(model, tok)))
    batch = next(iter(trainer.get_train_dataloader()))
    pad = tok.pad_token_id
    assert sorted(batch["input_ids"].tolist()) == sorted([[12, 13, 14, 40, 41], [15, 42, 43, 44, pad]]), (
        f"the trainer changed the ids (EOS appended or re-tokenized): {batch['input_ids'].tolist()}"
    )
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        mask = [int(v != -100) for v in labels]
        if ids[0] == 12:  # prompt 12 13 14 | generated 40 41
            assert mask == [0, 0, 0, 1, 1]
        else:  # prompt 15 | generated 42 43 44 | padding
            assert mask == [0, 1, 1, 1, 0]
        assert eos not in [i for i, m in zip(ids, mask, strict=True) if m]


@pytest.fixture
def fitted(tiny_llama_dir):
    model, tok = load_trainable(tiny_llama_dir)
    return model, tok, _fit(model, tok)


def test_penalty_gradient_reaches_lora_weights_below_the_probe_layer(fitted):
    model, tok, probes = fitted
    peft_model = get_peft_model(model, lora_config(r=2, alpha=4))
    penalty = ProbePenalty(probes)
    ids = torch.tensor([tok("You are a stupid idiot")["input_ids"]])
    mask = torch.zeros_like(ids)
    mask[:, 3:] = 1
    with capture_residual(peft_model, LAYER) as captured:
        peft_model(input_ids=ids)
    penalty(captured[-1], mask).backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if "lora_B" in n}
    below = [g for n, g in grads.items() if ".layers.0." in n or ".layers.1." in n]
    above = [g for n, g in grads.items() if ".layers.2." in n]
    assert below and all(g is not None and g.abs().sum() > 0 for g in below), "no gradient into LoRA B"
    # Residual layer 2 is the output of block 1: block 2's adapters cannot affect it.
    assert above and all(g is None or g.abs().sum() == 0 for g in above)
    assert all(not b.requires_grad for b in penalty.buffers()), "the probe must stay frozen"


def test_trainer_loss_adds_lambda_times_penalty_with_gradient(fitted, tmp_path):
    model, tok, probes = fitted
    from datasets import Dataset

    from aligned_probing.training.sft import ProbePenaltySFTTrainer

    ds = Dataset.from_list(sft_examples([tok(p)["input_ids"] for p in PROMPTS[:2]],
                                        [tok(c)["input_ids"] for c in COMPLETIONS[:2]]))
    args = ProbeSFTConfig(output_dir=str(tmp_path), probe_lambda=3.0, report_to="none", save_strategy="no",
                          use_cpu=True, bf16=False, max_length=64, gradient_checkpointing=False,
                          per_device_train_batch_size=2)
    trainer = ProbePenaltySFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                                     peft_config=lora_config(r=2, alpha=4), penalty=ProbePenalty(probes))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n and ".layers.0." in n]

    def loss_and_grads(lam):
        trainer.args.probe_lambda = lam
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        return float(loss), [p.grad.clone() for p in lora_b]

    total, g_total = loss_and_grads(3.0)
    penalty_value = trainer._metrics["train"]["probe_penalty"][-1]
    lm_only, g_lm = loss_and_grads(0.0)
    assert 0 < penalty_value < 1
    assert total - lm_only == pytest.approx(3.0 * penalty_value, rel=1e-4)
    # The penalty term must carry gradient into the adapters (not only add a constant).
    assert max(float((a - b).abs().max()) for a, b in zip(g_total, g_lm, strict=True)) > 1e-6


def test_a_few_steps_lower_the_frozen_probe_score(tiny_llama_dir, tmp_path):
    """Against a lambda = 0 control with the same seed, data and steps: the penalty does the work."""
    after = {}
    for lam in (0.0, 20.0):
        model, tok = load_trainable(tiny_llama_dir)
        if lam == 0.0:
            _, before = _probe_scores(model, tok, _fit(model, tok))
        probes = _fit(model, tok)
        args = ProbeSFTConfig(output_dir=str(tmp_path / str(lam)), probe_lambda=lam, learning_rate=5e-3,
                              max_steps=8, per_device_train_batch_size=10, report_to="none",
                              save_strategy="no",
                              use_cpu=True, bf16=False, max_length=64, gradient_checkpointing=False,
                              logging_steps=1, disable_tqdm=True, seed=0)
        texts = _id_texts(tok)
        trained = train_probe_sft(model, tok, texts, args, penalty=ProbePenalty(probes),
                                  peft_config=lora_config(r=4, alpha=8))
        after[lam] = _probe_scores(trained, tok, probes)[1].mean()
    assert after[20.0] < before.mean() - 0.1, f"mean P(toxic) {before.mean():.3f} -> {after[20.0]:.3f}"
    assert after[20.0] < after[0.0] - 0.1, f"penalised {after[20.0]:.3f} vs control {after[0.0]:.3f}"


def test_negative_lambda_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="probe_lambda must be >= 0"):
        ProbeSFTConfig(output_dir=str(tmp_path), probe_lambda=-1.0, report_to="none")
