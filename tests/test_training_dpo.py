"""Preference pairs (ordering, ties, the classifier baseline) and DPO with LoRA; save/load via load_model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from trl import DPOConfig

from aligned_probing.models import load_model
from aligned_probing.training.dpo import build_preference_pairs, train_dpo
from aligned_probing.training.finetuned import load_trainable, lora_config, save_finetuned


def _samples() -> pd.DataFrame:
    # prompt a: probe and scorer disagree; prompt b: the probe ties (no pair), the scorer does not.
    return pd.DataFrame({
        "prompt_id": ["a", "a", "a", "b", "b"],
        "continuation_idx": [0, 1, 2, 0, 1],
        "prompt": ["P a"] * 3 + ["P b"] * 2,
        "text": ["a0", "a1", "a2", "b0", "b1"],
        "probe_score": [0.9, 0.1, 0.5, 0.3, 0.3],
        "toxicity": [0.2, 0.8, 0.05, 0.7, 0.1],
    })


def test_probe_pairs_lowest_chosen_highest_rejected_ties_skipped():
    pairs = build_preference_pairs(_samples(), score="probe_score")
    assert pairs[["prompt_id", "chosen", "rejected"]].values.tolist() == [["a", "a1", "a0"]]
    assert (pairs["chosen_score"] < pairs["rejected_score"]).all()


def test_classifier_baseline_ranks_by_scorer_scores():
    pairs = build_preference_pairs(_samples(), score="toxicity")
    expected = [["a", "a2", "a1"], ["b", "b1", "b0"]]
    assert pairs[["prompt_id", "chosen", "rejected"]].values.tolist() == expected
    assert pairs["chosen_score"].tolist() == [0.05, 0.1] and (pairs["ranking"] == "toxicity").all()


def test_chosen_below_rejected_on_random_tables(rng):
    n_prompts, k = 50, 5
    df = pd.DataFrame({
        "prompt_id": np.repeat([f"p{i}" for i in range(n_prompts)], k),
        "continuation_idx": np.tile(np.arange(k), n_prompts),
        "prompt": "x", "text": [f"t{i}" for i in range(n_prompts * k)],
        "probe_score": rng.integers(0, 3, size=n_prompts * k) / 2,  # coarse scores: many ties
    })
    pairs = build_preference_pairs(df, score="probe_score")
    assert (pairs["chosen_score"] < pairs["rejected_score"]).all()
    tied = df.groupby("prompt_id")["probe_score"].agg(lambda s: s.min() == s.max())
    assert set(pairs["prompt_id"]) == set(tied.index[~tied])


def test_missing_column_is_named():
    with pytest.raises(ValueError, match="probe_score"):
        build_preference_pairs(_samples().drop(columns="probe_score"), score="probe_score")


def _sequence_logp(model, tok, prompt: str, completion: str) -> float:
    p, full = tok(prompt)["input_ids"], tok(prompt + completion)["input_ids"]
    ids = torch.tensor([full])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return float(logp[torch.arange(len(p) - 1, len(full) - 1), ids[0, len(p):]].sum())


def test_dpo_raises_the_margin_and_saves_loadable_models(tiny_llama_dir, tmp_path):
    model, tok = load_trainable(tiny_llama_dir)
    pairs = pd.DataFrame({
        "prompt": ["The quick brown fox", "What a lovely day", "This is a test"],
        "chosen": [" jumps over the lazy dog.", " for a walk in the park.", " of the tokenizer."],
        "rejected": [" stupid idiot.", " I hate you.", " you idiot."],
    })
    def margin(m):
        return np.mean([_sequence_logp(m, tok, r.prompt, r.chosen)
                        - _sequence_logp(m, tok, r.prompt, r.rejected) for r in pairs.itertuples()])

    before = margin(model)
    args = DPOConfig(output_dir=str(tmp_path / "trainer"), max_steps=6, per_device_train_batch_size=3,
                     learning_rate=5e-3, beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0],
                     report_to="none", save_strategy="no", use_cpu=True, bf16=False, max_length=64,
                     gradient_checkpointing=False, disable_tqdm=True, seed=0)
    trained = train_dpo(model, tok, pairs, args, peft_config=lora_config(r=4, alpha=8))
    after = margin(trained)
    assert after > before + 0.5, f"chosen-rejected log-prob margin {before:.2f} -> {after:.2f}"

    ids = torch.tensor([tok("The quick brown fox jumps")["input_ids"]])
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
    dirs = save_finetuned(trained, tok, tmp_path / "arm", info={"arm": "test"})
    assert (dirs["adapter"] / "adapter_model.safetensors").exists()
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt")), "nothing may be pickled"
    reloaded = load_model(dirs["merged"])
    with torch.no_grad():
        got = reloaded.hf_model(input_ids=ids).logits
    drift = (got - expected).abs().max().item()
    assert drift < 1e-4, f"merged model reloaded through load_model drifts {drift:.2e} from the trained one"
