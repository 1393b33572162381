"""Preference pairs (ordering, ties, the classifier baseline), DPO on exactly the generated token ids
with LoRA (EOS only where generation stopped at EOS); save/load via load_model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from trl import DPOConfig

from aligned_probing.models import load_model
from aligned_probing.training.dpo import build_preference_pairs, dpo_trainer, preference_examples, train_dpo
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
        "prompt_token_ids": [[1, 2]] * 3 + [[3]] * 2,
        "token_ids": [[10], [11, 12], [13], [14], [15, 16]],
        "stopped_at_eos": [True, False, False, True, False],
    })


def test_probe_pairs_lowest_chosen_highest_rejected_ties_skipped():
    pairs = build_preference_pairs(_samples(), score="probe_score")
    assert pairs[["prompt_id", "chosen", "rejected"]].values.tolist() == [["a", "a1", "a0"]]
    assert (pairs["chosen_score"] < pairs["rejected_score"]).all()
    # The pair carries the chosen (a1) and rejected (a0) rows' own ids and stop flags.
    row = pairs.iloc[0]
    assert row["prompt_token_ids"] == [1, 2]
    assert (row["chosen_token_ids"], row["rejected_token_ids"]) == ([11, 12], [10])
    assert (row["chosen_stopped_at_eos"], row["rejected_stopped_at_eos"]) == (False, True)


def test_preference_examples_append_eos_only_where_generation_stopped_at_eos():
    pairs = build_preference_pairs(_samples(), score="toxicity")  # a: a2 vs a1, b: b1 vs b0
    assert preference_examples(pairs, eos_token_id=99) == [
        {"prompt_ids": [1, 2], "chosen_ids": [13], "rejected_ids": [11, 12]},  # both cut at max_new_tokens
        {"prompt_ids": [3], "chosen_ids": [15, 16], "rejected_ids": [14, 99]},  # b0 stopped at EOS
    ]
    empty = pairs.assign(chosen_token_ids=[[], [15]], chosen_stopped_at_eos=[True, False])
    assert preference_examples(empty, eos_token_id=99)[0]["chosen_ids"] == [99]  # an immediate stop
    with pytest.raises(ValueError, match=r"row 1's chosen completion is empty"):
        preference_examples(empty.assign(chosen_token_ids=[[], []]), eos_token_id=99)
    with pytest.raises(ValueError, match=r"pairs lacks columns \['chosen_token_ids'"):
        preference_examples(pairs.drop(columns="chosen_token_ids"), eos_token_id=99)


def test_trainer_trains_on_exactly_the_generated_ids(tiny_llama_dir, tmp_path):
    """TRL must neither re-tokenize decoded text nor append EOS to a continuation cut at max_new_tokens."""
    model, tok = load_trainable(tiny_llama_dir)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    # Single-character ids of "hello": decoded and re-tokenized they would merge into fewer tokens.
    hello = tok.convert_tokens_to_ids(list("hello"))
    assert tok(tok.decode(hello))["input_ids"] != hello
    samples = pd.DataFrame({
        "prompt_id": ["a", "a", "b", "b"], "continuation_idx": [0, 1, 0, 1],
        "prompt": ["pa", "pa", "pb", "pb"], "text": [tok.decode(hello), "x", "y", "z"],
        "toxicity": [0.1, 0.9, 0.2, 0.8],
        "prompt_token_ids": [[12, 13, 14]] * 2 + [[15]] * 2,
        "token_ids": [hello, [42, 43], [50], [51, 52]],
        "stopped_at_eos": [False, True, True, False],
    })
    pairs = build_preference_pairs(samples, score="toxicity")
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", save_strategy="no", use_cpu=True, bf16=False,
                     max_length=64, per_device_train_batch_size=2, gradient_checkpointing=False,
                     disable_tqdm=True)
    trainer = dpo_trainer(model, tok, pairs, args, peft_config=lora_config(r=2, alpha=4))
    # a: chosen cut at max_new_tokens (no EOS), rejected stopped at EOS; b: the other way round.
    expected = {
        (12, 13, 14): ([*hello], [42, 43, eos]),
        (15,): ([50, eos], [51, 52]),
    }
    got = {tuple(r["prompt_ids"]): (r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset}
    assert got == expected, f"the trainer's dataset changed the ids: {got}"
    batch = next(iter(trainer.get_train_dataloader()))
    sequences = []
    for ids, mask, attn in zip(batch["input_ids"].tolist(), batch["completion_mask"].tolist(),
                               batch["attention_mask"].tolist(), strict=True):
        n = sum(attn)
        assert all(t == pad for t in ids[n:])
        sequences.append((ids[:n], [i for i, m in zip(ids, mask, strict=True) if m]))
    wanted = [(list(p) + c, c) for p, pair in expected.items() for c in pair]
    assert sorted(sequences) == sorted(wanted), "the collated batch is not prompt ids + generated ids"


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
        "prompt_token_ids": [[1]] * (n_prompts * k), "token_ids": [[i] for i in range(n_prompts * k)],
        "stopped_at_eos": rng.random(n_prompts * k) < 0.5,
    })
    pairs = build_preference_pairs(df, score="probe_score")
    assert (pairs["chosen_score"] < pairs["rejected_score"]).all()
    tied = df.groupby("prompt_id")["probe_score"].agg(lambda s: s.min() == s.max())
    assert set(pairs["prompt_id"]) == set(tied.index[~tied])


def test_missing_column_is_named():
    with pytest.raises(ValueError, match="probe_score"):
        build_preference_pairs(_samples().drop(columns="probe_score"), score="probe_score")


def _sequence_logp(model, p: list[int], completion: list[int]) -> float:
    full = p + completion
    ids = torch.tensor([full])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return float(logp[torch.arange(len(p) - 1, len(full) - 1), ids[0, len(p):]].sum())


def test_dpo_raises_the_margin_and_saves_loadable_models(tiny_llama_dir, tmp_path):
    model, tok = load_trainable(tiny_llama_dir)
    prompts = ["The quick brown fox", "What a lovely day", "This is a test"]
    chosen = [" jumps over the lazy dog.", " for a walk in the park.", " of the tokenizer."]
    rejected = [" stupid idiot.", " I hate you.", " you idiot."]
    pairs = pd.DataFrame({
        "prompt_token_ids": [tok(p)["input_ids"] for p in prompts],
        "chosen_token_ids": [tok(c)["input_ids"] for c in chosen],
        "rejected_token_ids": [tok(r)["input_ids"] for r in rejected],
        "chosen_stopped_at_eos": [True, False, False], "rejected_stopped_at_eos": [False, True, False],
    })
    examples = preference_examples(pairs, eos_token_id=tok.eos_token_id)

    def margin(m):
        return np.mean([_sequence_logp(m, e["prompt_ids"], e["chosen_ids"])
                        - _sequence_logp(m, e["prompt_ids"], e["rejected_ids"]) for e in examples])

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
