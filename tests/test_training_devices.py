"""Every model input of the fine-tuning code paths is put on the model's device (CPU-checked).

`tests/_device_guard.DeviceGuard` tags tensors the code moved to (or created on) the model's
device and fails a forward whose inputs were built on the host and passed on as is, the bug that
only a GPU run shows. Generation and encoding, which fine-tuning calls, are checked too.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
import torch

from aligned_probing.data import embedded_prompts
from aligned_probing.training.activations import pooled_response_activations
from aligned_probing.training.data import label_continuations
from aligned_probing.training.finetuned import load_trainable, lora_config
from aligned_probing.training.penalty import ProbePenalty
from aligned_probing.training.probes import fit_probe_set
from aligned_probing.training.retention import perplexity
from tests._device_guard import DeviceGuard


class _HashScorer:
    def score(self, texts):
        return pd.DataFrame({"toxicity": [hashlib.sha256(t.encode()).digest()[0] / 255 for t in texts]})


def test_guard_catches_a_host_tensor_and_accepts_a_moved_one(tiny_llama_dir):
    """The negative control: without `.to(device)` the guard must fail, with it it must pass."""
    model, _ = load_trainable(tiny_llama_dir)
    device = next(model.parameters()).device
    with DeviceGuard(model) as guard:
        model(input_ids=torch.tensor([[5, 6, 7]]).to(device))
        with pytest.raises(AssertionError, match=r"\['input_ids'\] were created on the host"):
            model(input_ids=torch.tensor([[5, 6, 7]]))
        with pytest.raises(AssertionError, match=r"attention_mask"):
            ids = torch.tensor([[5, 6, 7]]).to(device)
            model(input_ids=ids, attention_mask=torch.ones(1, 3, dtype=torch.long))
    assert guard.n_checked == 3


@pytest.fixture(scope="module")
def sampled(tiny_model):
    from aligned_probing.generation import generate_continuations

    prompts = embedded_prompts("rtp-challenging").df.head(6)
    with DeviceGuard(tiny_model.hf_model) as guard:
        conts = generate_continuations(tiny_model, prompts, k=2, seed=0, max_new_tokens=4, batch_size=6)
        samples = label_continuations(tiny_model, conts, scorer=_HashScorer(), layer=2, max_new_tokens=4)
    assert guard.n_checked > 4  # generation steps and the teacher-forced pooling pass
    return samples


def test_generation_labelling_pooling_and_perplexity_move_inputs(tiny_model, sampled):
    with DeviceGuard(tiny_model.hf_model) as guard:
        acts = pooled_response_activations(
            tiny_model.hf_model,
            sampled.prompt_ids,
            list(sampled.table["token_ids"]),
            2,
            pad_token_id=tiny_model.pad_token_id,
        )
        ppl = perplexity(tiny_model.hf_model, tiny_model.tokenizer, ["Hello world, a test.", "Another text."])
    assert guard.n_checked >= 2 and acts.shape == sampled.activations.shape and ppl > 1


def test_encoding_moves_inputs(tiny_model, sampled, tmp_path):
    from aligned_probing.encoding import encode

    prompts = embedded_prompts("rtp-challenging").df.head(6)
    conts = sampled.table.drop(columns=["prompt", "toxicity", "label"])
    with DeviceGuard(tiny_model.hf_model) as guard:
        encode(tiny_model, prompts, conts, store=tmp_path / "store", batch_size=4)
    assert guard.n_checked >= 1


@pytest.mark.parametrize("arm", ["probe_sft", "dpo"])
def test_one_training_step_of_each_trainer_moves_inputs(arm, tiny_llama_dir, sampled, tmp_path):
    from trl import DPOConfig

    from aligned_probing.training.dpo import build_preference_pairs, train_dpo
    from aligned_probing.training.run import sft_texts
    from aligned_probing.training.sft import ProbeSFTConfig, train_probe_sft

    model, tok = load_trainable(tiny_llama_dir)
    labels = np.arange(len(sampled.table)) % 2
    probes = fit_probe_set(sampled.activations, labels, meta={"layer": 2})
    common = dict(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        max_length=48,
        disable_tqdm=True,
    )
    with DeviceGuard(model) as guard:
        if arm == "probe_sft":
            train_probe_sft(
                model,
                tok,
                sft_texts(sampled, 1),
                ProbeSFTConfig(**common),
                penalty=ProbePenalty(probes),
                peft_config=lora_config(r=2, alpha=4),
            )
        else:
            scores = probes.predict_proba(sampled.activations)
            scored = sampled.table_with_prompt_ids().assign(probe_score=scores)
            pairs = build_preference_pairs(scored, score="probe_score")
            train_dpo(model, tok, pairs, DPOConfig(beta=0.1, **common), peft_config=lora_config(r=2, alpha=4))
    assert guard.n_checked >= 1
