"""Seeded, batched, resumable generation on tiny random models (and SmolLM2, slow).

Several tests pin the next-token distribution with a TransformerLens hook on `unembed.hook_out`
(logits replaced by a constant vector): that gives closed-form expectations for top-p, EOS
stopping and sampling frequencies, and checks that bridge hooks fire inside generation.
"""

from __future__ import annotations

import math
import warnings

import pandas as pd
import pytest
import torch
from scipy import stats

import aligned_probing.generation as gen
from aligned_probing.data import PromptDataWarning, PromptSet
from aligned_probing.data.templates import TemplateTruncationWarning, render_prompt
from aligned_probing.generation import (
    CONTINUATION_COLUMNS,
    generate_continuations,
    read_continuations,
    row_seed,
)

TEXTS = ["The quick brown fox", "You are a stupid idiot and I hate you.", "hello", "What a lovely day"]


@pytest.fixture(scope="module")
def prompts() -> PromptSet:
    return PromptSet.from_texts(TEXTS, source="test")


def _constant_logits(vocab: int, probs: dict[int, float]):
    """A hook that replaces the model's logits by log(probs) (tokens not listed get -inf)."""
    logits = torch.full((vocab,), float("-inf"))
    for token, p in probs.items():
        logits[token] = math.log(p)

    def hook(tensor, hook):  # (batch, pos, vocab)
        return torch.zeros_like(tensor) + logits

    return hook


def _ids(df: pd.DataFrame) -> list[tuple[int, ...]]:
    return [tuple(ids) for ids in df["token_ids"]]


def test_k_rows_per_prompt_with_exact_columns(tiny_model, prompts):
    df = generate_continuations(tiny_model, prompts, k=3, seed=0, max_new_tokens=6, batch_size=5)
    assert list(df.columns) == list(CONTINUATION_COLUMNS)
    assert len(df) == len(TEXTS) * 3
    assert df.groupby("prompt_id")["continuation_idx"].apply(list).tolist() == [[0, 1, 2]] * len(TEXTS)
    assert df["prompt_id"].drop_duplicates().tolist() == prompts.df["prompt_id"].tolist()  # prompt order
    assert df["prompt_text"].drop_duplicates().tolist() == TEXTS
    assert (df["n_tokens"] <= 6).all()
    assert (df["n_tokens"] == df["token_ids"].map(len)).all()
    for ids, text in zip(df["token_ids"], df["text"], strict=True):
        assert all(isinstance(i, int) for i in ids)
        assert text == tiny_model.tokenizer.decode(ids, skip_special_tokens=True)
    assert set(df["model"]) == {tiny_model.name} and set(df["seed"]) == {0} and set(df["template"]) == {0}
    # Different continuation indices are different draws.
    assert len(set(_ids(df))) > len(TEXTS)


def test_top_p_keeps_the_nucleus_and_matches_its_frequencies(tiny_model, prompts):
    # p = 0.5, 0.3, 0.15 for tokens 10-12 and 0.05 spread over 20 others: the 0.9 nucleus is {10, 11, 12}
    # (cumulative 0.5, 0.8, 0.95), renormalised to 0.5/0.95, 0.3/0.95, 0.15/0.95.
    probs = {10: 0.5, 11: 0.3, 12: 0.15, **{t: 0.05 / 20 for t in range(20, 40)}}
    hook = _constant_logits(len(tiny_model.tokenizer), probs)
    with tiny_model.bridge.hooks(fwd_hooks=[("unembed.hook_out", hook)]):
        df = generate_continuations(
            tiny_model, prompts, k=10, seed=1, max_new_tokens=10, top_p=0.9, batch_size=20
        )
    drawn = pd.Series([t for ids in df["token_ids"] for t in ids])
    assert set(drawn) <= {10, 11, 12}
    assert len(drawn) == len(TEXTS) * 10 * 10  # no EOS in the nucleus: every row runs to max_new_tokens
    observed = drawn.value_counts().reindex([10, 11, 12], fill_value=0).to_numpy()
    expected = [len(drawn) * p / 0.95 for p in (0.5, 0.3, 0.15)]
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_stops_at_eos_and_excludes_it(tiny_model, prompts):
    eos = tiny_model.eos_token_ids[0]
    hook = _constant_logits(len(tiny_model.tokenizer), {eos: 0.3, 10: 0.7})
    with tiny_model.bridge.hooks(fwd_hooks=[("unembed.hook_out", hook)]):
        df = generate_continuations(
            tiny_model, prompts, k=8, seed=2, max_new_tokens=5, top_p=1.0, batch_size=32
        )
    assert all(set(ids) <= {10} for ids in df["token_ids"])  # EOS and padding excluded
    stopped = df["stopped_at_eos"]
    assert (df.loc[stopped, "n_tokens"] < 5).all()
    assert (df.loc[~stopped, "n_tokens"] == 5).all()
    # n_tokens is geometric: P(n = j) = 0.7^j 0.3 for j < 5, P(n = 5) = 0.7^5; 32 rows.
    assert 0 < stopped.sum() < len(df)
    assert (df["n_tokens"] == 0).sum() > 0  # EOS as the very first token gives an empty continuation


def test_greedy_tokens_are_the_teacher_forced_argmax(tiny_model, prompts):
    # The encoder feeds render_prompt(...).input_ids + token_ids: they must be what the model generated.
    df = generate_continuations(
        tiny_model, prompts, k=1, seed=0, max_new_tokens=6, temperature=0, batch_size=4
    )
    for text, ids in zip(df["prompt_text"], df["token_ids"], strict=True):
        prompt_ids = render_prompt(tiny_model.tokenizer, text, 0).input_ids
        with torch.no_grad():
            logits = tiny_model.hf_model(torch.tensor([prompt_ids + ids])).logits[0]  # (pos, vocab)
        expected = logits[len(prompt_ids) - 1 : -1].argmax(-1).tolist()
        assert ids == expected[: len(ids)]


def test_same_seed_same_output_and_batch_size_invariance(tiny_model, prompts):
    a = generate_continuations(tiny_model, prompts, k=2, seed=7, max_new_tokens=6, batch_size=8)
    b = generate_continuations(tiny_model, prompts, k=2, seed=7, max_new_tokens=6, batch_size=8)
    pd.testing.assert_frame_equal(a, b)
    # One sequence per call: no padding at all, other rows absent; the per-row generators give the same draws.
    c = generate_continuations(tiny_model, prompts, k=2, seed=7, max_new_tokens=6, batch_size=1)
    assert _ids(c) == _ids(a)
    d = generate_continuations(tiny_model, prompts, k=2, seed=8, max_new_tokens=6, batch_size=8)
    assert _ids(d) != _ids(a)


def test_row_seed_is_stable_and_distinct():
    assert row_seed(0, "abc", 0) == row_seed(0, "abc", 0)
    assert len({row_seed(s, p, c) for s in (0, 1) for p in ("a", "b") for c in (0, 1)}) == 8
    assert 0 <= row_seed(123, "x", 5) < 2**63


def test_resume_after_interruption_gives_the_uninterrupted_rows(tiny_model, prompts, tmp_path, monkeypatch):
    settings = dict(k=3, seed=4, max_new_tokens=5, batch_size=5)
    full = generate_continuations(tiny_model, prompts, output_dir=tmp_path / "full", **settings)

    real_write = gen._write_part
    calls = {"n": 0}

    def dying_write(output_dir, batch_no, rows, storage_options):
        if calls["n"] == 1:  # the second batch: die as if killed while writing it
            (output_dir / f".part-{batch_no:06d}-dead.parquet.tmp").write_bytes(b"half a file")
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_write(output_dir, batch_no, rows, storage_options)

    monkeypatch.setattr(gen, "_write_part", dying_write)
    with pytest.raises(KeyboardInterrupt):
        generate_continuations(tiny_model, prompts, output_dir=tmp_path / "resumed", **settings)
    assert len(read_continuations(tmp_path / "resumed")) == 5  # exactly one batch survived
    monkeypatch.setattr(gen, "_write_part", real_write)

    generated = []
    real_batch = gen._generate_batch
    monkeypatch.setattr(
        gen,
        "_generate_batch",
        lambda m, items, *a, **kw: generated.extend(items) or real_batch(m, items, *a, **kw),
    )
    resumed = generate_continuations(tiny_model, prompts, output_dir=tmp_path / "resumed", **settings)
    assert len(generated) == len(TEXTS) * 3 - 5  # only the missing rows were generated
    pd.testing.assert_frame_equal(resumed, full)
    on_disk = read_continuations(tmp_path / "resumed")
    assert len(on_disk) == len(TEXTS) * 3
    assert not on_disk.duplicated(["prompt_id", "continuation_idx"]).any()
    assert not list((tmp_path / "resumed").glob(".*.tmp"))  # the half-written file was cleaned up

    # A finished run is a no-op and returns the same table.
    generated.clear()
    again = generate_continuations(tiny_model, prompts, output_dir=tmp_path / "resumed", **settings)
    assert generated == []
    pd.testing.assert_frame_equal(again, full)


def test_raising_k_only_adds_rows(tiny_model, prompts, tmp_path, monkeypatch):
    small = generate_continuations(tiny_model, prompts, k=2, seed=5, max_new_tokens=4, output_dir=tmp_path)
    generated = []
    real_batch = gen._generate_batch
    monkeypatch.setattr(
        gen,
        "_generate_batch",
        lambda m, items, *a, **kw: generated.extend(items) or real_batch(m, items, *a, **kw),
    )
    big = generate_continuations(tiny_model, prompts, k=3, seed=5, max_new_tokens=4, output_dir=tmp_path)
    assert sorted(c for _, c in generated) == [2] * len(TEXTS)
    pd.testing.assert_frame_equal(big[big["continuation_idx"] < 2].reset_index(drop=True), small)


def test_output_dir_with_other_settings_is_an_error(tiny_model, prompts, tmp_path):
    generate_continuations(tiny_model, prompts, k=1, seed=0, max_new_tokens=3, output_dir=tmp_path)
    with pytest.raises(ValueError, match="seed: on disk 0, now 1"):
        generate_continuations(tiny_model, prompts, k=1, seed=1, max_new_tokens=3, output_dir=tmp_path)


def test_long_prompt_is_left_truncated_with_a_warning(tiny_model):
    long_text = "the lazy dog " * 200  # > 256 positions of the tiny model
    ps = PromptSet.from_texts([long_text, "hello"], source="test")
    with pytest.warns(TemplateTruncationWarning, match=r"1 prompt\(s\) were left-truncated .* 252 tokens"):
        df = generate_continuations(tiny_model, ps, k=1, seed=0, max_new_tokens=4)
    assert len(df) == 2 and (df["n_tokens"] <= 4).all()


def test_chat_template_generation(tiny_chat_model, prompts):
    df = generate_continuations(tiny_chat_model, prompts, k=2, seed=0, max_new_tokens=4, template=1)
    assert set(df["template"]) == {1}
    assert df["prompt_text"].drop_duplicates().tolist() == TEXTS  # the raw prompt, not the rendered chat
    eos = set(tiny_chat_model.eos_token_ids)
    assert not any(eos & set(ids) for ids in df["token_ids"])


def test_bad_prompts(tiny_model):
    empty = pd.DataFrame({"prompt_id": ["a", "b", "c"], "text": ["hi", "  ", ""]})
    with pytest.raises(ValueError, match=r"2 of 3 prompts are empty"):
        generate_continuations(tiny_model, empty, k=1, seed=0)
    with pytest.raises(ValueError, match=r"missing columns \['prompt_id'\]"):
        generate_continuations(tiny_model, pd.DataFrame({"text": ["hi"]}), k=1, seed=0)
    with pytest.raises(TypeError, match="prompts must be a PromptSet or a DataFrame, got list"):
        generate_continuations(tiny_model, ["hi"], k=1, seed=0)
    dup = pd.DataFrame({"prompt_id": ["a", "a", "b"], "text": ["hi", "hi", "hello"]})
    with pytest.warns(PromptDataWarning, match="Removed 1 duplicate"):
        df = generate_continuations(tiny_model, dup, k=2, seed=0, max_new_tokens=2)
    assert len(df) == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be an int >= 1, got 0"),
        ({"max_new_tokens": 256}, "max_new_tokens must be < the model's context length 256, got 256"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"temperature": -1.0}, "temperature must be > 0, or 0 for greedy"),
        ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
    ],
)
def test_bad_settings(tiny_model, prompts, kwargs, match):
    settings = {"k": 1, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate_continuations(tiny_model, prompts, **settings)


@pytest.mark.slow
def test_smollm2_generates_k_continuations():
    from aligned_probing.data import embedded_prompts
    from aligned_probing.models import load_model

    model = load_model("smollm2-135m-instruct")
    ps = embedded_prompts("rtp-challenging").sample(3, stratify_by=None, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TemplateTruncationWarning)
        df = generate_continuations(model, ps, k=2, seed=0, max_new_tokens=8, batch_size=6)
    assert len(df) == 6
    assert df.groupby("prompt_id").size().tolist() == [2, 2, 2]
    assert (df["n_tokens"] <= 8).all() and (df["n_tokens"] == df["token_ids"].map(len)).all()
    assert all(0 <= t < len(model.tokenizer) for ids in df["token_ids"] for t in ids)
    assert not any(set(model.eos_token_ids) & set(ids) for ids in df["token_ids"])
    assert all(
        t == model.tokenizer.decode(ids, skip_special_tokens=True)
        for t, ids in zip(df["text"], df["token_ids"], strict=True)
    )
    # SmolLM2's real chat template: system turn kept, the span is exactly the prompt's text.
    text = ps.texts[0]
    r = render_prompt(model.tokenizer, text, 2)
    messages = [
        {"role": "system", "content": "Complete the following text."},
        {"role": "user", "content": f"Text: {text}\nContinuation:"},
    ]
    assert r.chat
    assert r.text == model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert model.tokenizer.decode(r.prompt_ids).strip() == text.strip()
    # Same seed, other batch size: same continuations (one row at a time needs no padding).
    again = generate_continuations(model, ps, k=2, seed=0, max_new_tokens=8, batch_size=2)
    assert _ids(again) == _ids(df)


@pytest.mark.parametrize(("vocab", "scale"), [(49152, 3.0), (49152, 8.0), (400, 0.5), (400, 2.0)])
def test_nucleus_keeps_the_same_tokens_as_transformers_top_p(vocab, scale):
    # Peaky rows use the top-256 candidate set; flat rows (400 tokens at scale 0.5 need > 256) use
    # the full-sort fallback. Both must keep exactly the tokens TopPLogitsWarper keeps.
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.randn(16, vocab, generator=torch.Generator().manual_seed(vocab + int(scale))) * scale
    hf_keep = torch.isfinite(TopPLogitsWarper(0.9)(torch.zeros(16, 1, dtype=torch.long), logits.clone()))
    ids, probs = gen.nucleus(logits, 0.9)
    keep = torch.zeros_like(hf_keep).scatter_(1, ids, probs > 0)
    assert torch.equal(keep, hf_keep)
    kept_probs = torch.softmax(logits, -1) * keep
    assert torch.allclose(probs.sum(-1), kept_probs.sum(-1), atol=1e-6)
    assert (probs.sum(-1) >= 0.9 - 1e-6).all()


def test_nucleus_widens_only_the_rows_that_need_it():
    # One batch with all three tiers: peaky rows (top-256), flatter rows (the 4096 topk) and one
    # row that needs the full sort. Each row equals the batch-wide full-sort nucleus (the rule
    # before rows were widened one by one), and a row's result does not depend on its batch mates.
    g = torch.Generator().manual_seed(3)
    scales = torch.tensor([8.0, 4.0, 3.5, 3.0, 2.5, 5.0]).view(-1, 1)
    logits = torch.randn(6, 49152, generator=g) * scales
    ids, probs = gen.nucleus(logits, 0.9)
    kept = (probs > 0).sum(-1)
    assert kept[0] <= 256 and 256 < kept[2] <= 4096 and kept[4] > 4096  # every tier was used
    full, order = torch.softmax(logits, -1).sort(dim=-1, descending=True)
    full = full * ((full.cumsum(-1) - full) < 0.9)
    for row in range(6):
        n = int(kept[row])
        assert n == int((full[row] > 0).sum())
        # equal probabilities may come in another order from topk than from sort: compare as sets
        assert set(ids[row, :n].tolist()) == set(order[row, :n].tolist())
        assert torch.equal(probs[row, :n], full[row, :n])
        assert (probs[row, n:] == 0).all()
        alone_ids, alone_probs = gen.nucleus(logits[row : row + 1], 0.9)
        assert torch.equal(alone_ids[0, :n], ids[row, :n]) and torch.equal(alone_probs[0, :n], probs[row, :n])


def test_nucleus_without_top_p_is_the_full_softmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    ids, probs = gen.nucleus(logits, 1.0)
    assert torch.equal(ids[0], torch.arange(50))
    assert torch.allclose(probs, torch.softmax(logits, -1))


def test_a_rows_draws_do_not_depend_on_its_batch_mates():
    # A peaky row's nucleus fits the top-256 candidates; a flat batch mate forces the full-sort
    # fallback for the whole batch. The peaky row must draw the same tokens either way (this
    # failed with torch.multinomial, whose use of the generator depends on the vector length).
    g = torch.Generator().manual_seed(0)
    peaky = torch.randn(1, 5000, generator=g) * 4
    flat = torch.randn(1, 5000, generator=g) * 0.1
    ids = torch.zeros(2, 1, dtype=torch.long)

    def draws(batch):
        gens = [torch.Generator().manual_seed(7 + i) for i in range(len(batch))]
        sampler = gen._PerRowSampler(gens, temperature=1.0, top_p=0.9)
        return [int(sampler(ids[: len(batch)], batch).argmax(-1)[0]) for _ in range(30)]

    alone, with_flat = draws(peaky), draws(torch.cat([peaky, flat]))
    assert alone == with_flat
    assert len(set(alone)) > 1  # real sampling, not a constant


def test_inverse_cdf_draw_matches_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    sampler = gen._PerRowSampler([torch.Generator().manual_seed(0)], temperature=1.0, top_p=1.0)
    counts = torch.zeros(4)
    for _ in range(3000):
        counts[sampler._draw(torch.arange(4), probs, sampler.generators[0])] += 1
    assert counts[3] == 0
    assert stats.chisquare(counts[:3].numpy(), [1500, 900, 600]).pvalue > 1e-3
