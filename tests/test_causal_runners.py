"""Experiment runners (skipping, patching, steering) on the tiny model with fake scorers and probes."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from aligned_probing.behaviour import behaviour_metrics
from aligned_probing.causal import (
    GenerationSettings,
    LayerSkip,
    StatSettings,
    Steering,
    activation_patching,
    continuation_log_perplexity,
    generate_and_score,
    layer_skipping,
    match_pairs,
    random_direction,
    record_residuals,
    steering_sweep,
)
from aligned_probing.causal.steering import STEERING_COLUMNS
from aligned_probing.data.templates import render_prompt

GREEDY = GenerationSettings(k=2, seed=0, max_new_tokens=6, temperature=0.0, batch_size=8)
SAMPLED = GenerationSettings(k=3, seed=0, max_new_tokens=6, temperature=1.0, batch_size=8)
STATS = StatSettings(n_resamples=200)


class WordScorer:
    """Fake scorer: toxicity = share of words equal to `word` (a deterministic function of the text)."""

    attributes = ("toxicity",)
    id = "fake-word"

    def __init__(self, word: str = "idiot") -> None:
        self.word = word

    def score(self, texts):
        vals = [(t.split().count(self.word) / max(len(t.split()), 1)) for t in texts]
        return pd.DataFrame({"toxicity": vals})


class LengthScorer:
    """Fake scorer with spread: toxicity = share of characters that are vowels."""

    attributes = ("toxicity",)
    id = "fake-vowels"

    def score(self, texts):
        return pd.DataFrame({"toxicity": [sum(c in "aeiou" for c in t) / max(len(t), 1) for t in texts]})


class LinearProbe:
    def __init__(self, w: np.ndarray) -> None:
        self.w = w

    def predict(self, X: np.ndarray) -> np.ndarray:
        return X @ self.w


PROMPTS = pd.DataFrame(
    {
        "prompt_id": [f"p{i}" for i in range(6)],
        "text": [
            "You are a stupid idiot",
            "What a lovely day",
            "I hate you",
            "The lazy dog",
            "hello world",
            "the quick brown fox",
        ],
    }
)


# ------------------------------------------------------------------------- skipping


def test_layer_skipping_rows_match_behaviour_of_the_skipped_generations(tiny_model):
    scorer = LengthScorer()
    base = generate_and_score(tiny_model, PROMPTS, scorer, SAMPLED)
    out = layer_skipping(
        tiny_model, PROMPTS, scorer, blocks=[0, 2], generation=SAMPLED, stats=STATS, baseline=base
    )
    assert len(out) == 2 * 4
    assert out.relative_depth.tolist() == pytest.approx([1 / 3] * 4 + [1.0] * 4)
    skipped = generate_and_score(tiny_model, PROMPTS, scorer, SAMPLED, intervention=LayerSkip(2))
    # Fluency: per-prompt mean log perplexity under the unmodified model, skipped vs baseline.
    lp = out[(out.block == 2) & (out.metric == "log_perplexity")].iloc[0]
    per_prompt = [
        c.assign(lp=continuation_log_perplexity(tiny_model, c)).groupby("prompt_id")["lp"].mean()
        for c in (skipped, base)
    ]
    assert lp["value"] == pytest.approx(per_prompt[0].mean())
    assert lp["baseline"] == pytest.approx(per_prompt[1].mean())
    assert lp["delta"] == pytest.approx((per_prompt[0] - per_prompt[1]).mean())
    no_fluency = layer_skipping(
        tiny_model, PROMPTS, scorer, blocks=[2], generation=SAMPLED, stats=STATS, baseline=base, fluency=False
    )
    assert "log_perplexity" not in set(no_fluency.metric)
    out = out[out.metric != "log_perplexity"]
    with pytest.warns(UserWarning):
        expect = behaviour_metrics(skipped, attributes=["toxicity"], n_resamples=50).query("subset == 'all'")
        expect_base = behaviour_metrics(base, attributes=["toxicity"], n_resamples=50).query(
            "subset == 'all'"
        )
    row = out[out.block == 2].set_index("metric")
    for metric, value in expect.set_index("metric")["value"].items():
        assert row.loc[metric, "value"] == pytest.approx(value)
        assert row.loc[metric, "baseline"] == pytest.approx(
            expect_base.set_index("metric").loc[metric, "value"]
        )
    assert np.allclose(out.delta, out.value - out.baseline)
    assert (out.ci_low <= out.delta + 1e-12).all() and (out.delta <= out.ci_high + 1e-12).all()
    # the same seeds with a no-op scorer difference: a constant scorer gives exactly zero effects
    assert set(out.n_prompts) == {6} and set(out.k) == {3}


def test_layer_skipping_with_constant_scores_is_exactly_null(tiny_model):
    class Constant:
        attributes = ("toxicity",)

        def score(self, texts):
            return pd.DataFrame({"toxicity": [0.7] * len(texts)})

    out = layer_skipping(tiny_model, PROMPTS.head(3), Constant(), blocks=[1], generation=GREEDY, stats=STATS)
    out = out[out.metric != "log_perplexity"]  # the text does change; only its scores are constant
    assert (out.delta == 0).all() and (out.ci_low == 0).all() and (out.ci_high == 0).all()
    assert not out.excludes_zero.any()
    with pytest.raises(ValueError, match=r"blocks must be in 0\.\.2, got \[3\]"):
        layer_skipping(tiny_model, PROMPTS, Constant(), blocks=[3])


# ------------------------------------------------------------------------- steering


def _idiot_direction(model) -> np.ndarray:
    t = model.tokenizer.convert_tokens_to_ids("Ġidiot")
    return model.hf_model.get_output_embeddings().weight[t].detach().numpy().copy()


def test_planted_direction_beats_the_random_control_and_alpha_zero_is_null(tiny_model):
    """The token's unembedding direction at the last layer is a planted causal direction for a scorer
    that counts that token; a random direction of the same strength is not."""
    out = steering_sweep(
        tiny_model,
        PROMPTS,
        WordScorer("idiot"),
        _idiot_direction(tiny_model),
        layer=tiny_model.n_layers,
        alphas=[-1000.0, 0.0, 1000.0],
        units="absolute",
        generation=GREEDY,
        stats=STATS,
    )
    assert list(out.columns) == list(STEERING_COLUMNS)
    assert set(out.metric) == {"emt", "toxicity_probability", "mean_score", "log_perplexity"}
    assert set(out.direction) == {"probe", "random", "probe_vs_random"}
    zero = out[out.alpha == 0.0]
    assert (zero.delta == 0).all() and (zero.value == zero.baseline).all()
    rows = out[out.alpha == 1000.0].set_index(["direction", "metric"])
    # greedy decoding along the token's unembedding direction emits only " idiot"
    assert rows.loc[("probe", "mean_score"), "value"] == pytest.approx(1.0)
    assert rows.loc[("probe", "emt"), "delta"] > 0.5 and rows.loc[("probe", "emt"), "excludes_zero"]
    # ... the same push along a random direction does not, and the paired contrast credits the probe
    assert rows.loc[("random", "mean_score"), "value"] < 0.2
    contrast = rows.loc[("probe_vs_random", "emt")]
    assert contrast["delta"] > 0.5 and contrast["ci_low"] > 0
    assert contrast["value"] == pytest.approx(rows.loc[("probe", "emt"), "value"])
    assert contrast["baseline"] == pytest.approx(rows.loc[("random", "emt"), "value"])
    down = out[(out.alpha == -1000.0) & (out.direction == "probe")].set_index("metric")
    assert down.loc["emt", "value"] == 0.0
    # the fluency cost sits beside every effect: pushing 1000 residual units breaks the text
    assert rows.loc[("probe", "log_perplexity"), "delta"] > 1.0


def test_random_direction_is_seeded_unit_and_orthogonal(rng):
    u = rng.normal(size=32)
    a, b = random_direction(32, seed=3, orthogonal_to=u), random_direction(32, seed=3, orthogonal_to=u)
    assert np.array_equal(a, b) and np.linalg.norm(a) == pytest.approx(1.0)
    assert abs(a @ u) < 1e-10
    assert not np.allclose(a, random_direction(32, seed=4, orthogonal_to=u))


def test_steering_strength_is_in_units_of_the_median_residual_norm(tiny_model):
    """units='norm' equals units='absolute' at alpha x the median residual norm of the prompts'
    prompt-span positions at that layer, measured here by hand."""
    layer, direction = 2, _idiot_direction(tiny_model)
    norms = []
    for text in PROMPTS.text:
        r = render_prompt(tiny_model.tokenizer, text, 0)
        res = record_residuals(tiny_model, torch.tensor([r.input_ids]), [layer])[layer][0]
        norms.append(res[r.prompt_start : r.prompt_end].norm(dim=-1))
    median = float(torch.cat(norms).median())
    kw = dict(layer=layer, generation=SAMPLED, stats=STATS, random_control=False)
    rel = steering_sweep(tiny_model, PROMPTS, LengthScorer(), direction, alphas=[0.5], **kw)
    absolute = steering_sweep(
        tiny_model, PROMPTS, LengthScorer(), direction, alphas=[0.5 * median], units="absolute", **kw
    )
    assert rel.residual_norm.iloc[0] == pytest.approx(median, rel=1e-5)
    assert rel.alpha_norm_units.tolist() == [0.5] * 4
    assert absolute.alpha_norm_units.to_numpy() == pytest.approx([0.5] * 4, rel=1e-5)
    cols = ["value", "baseline", "delta"]
    assert np.allclose(rel[cols].to_numpy(float), absolute[cols].to_numpy(float), atol=1e-6)
    assert not np.allclose(rel.delta, 0.0)  # half the norm does change the continuations


@pytest.mark.parametrize("operator", ["ablate", "ablate_then_add"])
def test_steering_operators(tiny_model, rng, operator):
    ids = torch.tensor([tiny_model.tokenizer("You are a stupid idiot")["input_ids"]])
    direction = rng.normal(size=tiny_model.d_model)
    unit = torch.tensor(direction / np.linalg.norm(direction), dtype=torch.float32)
    res = record_residuals(tiny_model, ids, [2], intervention=Steering(2, direction, 3.0, operator))[2][0]
    clean = record_residuals(tiny_model, ids, [2])[2][0]
    expect = 0.0 if operator == "ablate" else 3.0
    assert (res @ unit).numpy() == pytest.approx(np.full(ids.shape[1], expect), abs=1e-4)
    # orthogonal complement untouched
    assert torch.allclose(
        res - (res @ unit)[:, None] * unit, clean - (clean @ unit)[:, None] * unit, atol=1e-5
    )
    with pytest.raises(ValueError, match="operator must be one of"):
        Steering(2, direction, 1.0, "multiply")


def test_log_perplexity_batched_equals_single_forward(tiny_model):
    conts = generate_and_score(tiny_model, PROMPTS.head(3), LengthScorer(), SAMPLED)
    # Ragged continuations (cut to 1..n tokens, one empty) so batches mix lengths and the rows are
    # sorted by length internally; the output must stay in the rows' order.
    cuts = [len(t) if i % 3 == 0 else i % 3 for i, t in enumerate(conts["token_ids"])]
    conts["token_ids"] = [list(t)[:n] for t, n in zip(conts["token_ids"], cuts, strict=True)]
    conts.loc[1, "token_ids"] = []
    batched = continuation_log_perplexity(tiny_model, conts, batch_size=4)
    assert np.isnan(batched[1]) and np.isfinite(np.delete(batched, 1)).all()
    for i, row in conts.iterrows():
        if not row.token_ids:
            continue
        prompt = render_prompt(tiny_model.tokenizer, row.prompt_text, 0).input_ids
        ids = torch.tensor([prompt + list(row.token_ids)])
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model.hf_model(input_ids=ids).logits[0], -1)
        nll = -np.mean([logp[len(prompt) + j - 1, tok].item() for j, tok in enumerate(row.token_ids)])
        assert batched[i] == pytest.approx(nll, abs=1e-5)


def test_log_perplexity_memo_reuses_values_exactly(tiny_model):
    # A sweep shares one memo: a continuation already scored (same prompt, same tokens) is looked up,
    # in any row order, so a condition that reproduces the baseline's text has exactly its fluency.
    conts = generate_and_score(tiny_model, PROMPTS.head(3), LengthScorer(), SAMPLED)
    memo: dict = {}
    full = continuation_log_perplexity(tiny_model, conts, batch_size=4, memo=memo)
    assert len(memo) == len({(r.prompt_text, tuple(r.token_ids)) for r in conts.itertuples()})
    calls = []
    handle = tiny_model.hf_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        again = continuation_log_perplexity(tiny_model, conts.iloc[::-1], batch_size=2, memo=memo)
    finally:
        handle.remove()
    assert calls == [] and np.array_equal(again, full[::-1])
    fresh = continuation_log_perplexity(tiny_model, conts.iloc[::-1], batch_size=2)
    assert fresh == pytest.approx(full[::-1], abs=1e-5)


# ------------------------------------------------------------------------- patching


def _scored_prompts() -> pd.DataFrame:
    texts = [
        "You are a stupid idiot",
        "the quick brown fox",
        "I hate you",
        "The lazy dog",
        "you idiot",
        "hello world",
        "What a lovely day",
        "a walk in the park",
    ]
    scores = [0.9, 0.1, 0.8, 0.2, 0.95, 0.05, 0.1, 0.3]
    return pd.DataFrame(
        {"prompt_id": [f"q{i}" for i in range(len(texts))], "text": texts, "prompt_toxicity": scores}
    )


def test_match_pairs_exact_and_nearest(tiny_model):
    prompts = _scored_prompts()
    exact = match_pairs(prompts, tiny_model.tokenizer, exact_length=True)
    assert (exact.toxic_length == exact.nontoxic_length).all()
    assert (exact.toxic_score >= 0.5).all() and (exact.nontoxic_score < 0.5).all()
    # toxic lengths 5, 3, 2 vs non-toxic 5, 3, 4, 4, 6: exact pairs exist for 5 and 3 only
    assert sorted(exact.toxic_length) == [3, 5]
    nearest = match_pairs(prompts, tiny_model.tokenizer)
    assert len(nearest) == 3
    # optimal total |length difference| by brute force over assignments
    tl = [len(tiny_model.tokenizer(t)["input_ids"]) for t in prompts.text[prompts.prompt_toxicity >= 0.5]]
    nl = [len(tiny_model.tokenizer(t)["input_ids"]) for t in prompts.text[prompts.prompt_toxicity < 0.5]]
    best = min(
        sum(abs(a - b) for a, b in zip(tl, perm, strict=False)) for perm in itertools.permutations(nl, 3)
    )
    assert (nearest.toxic_length - nearest.nontoxic_length).abs().sum() == best
    with pytest.raises(ValueError, match="score the prompts first"):
        match_pairs(prompts.drop(columns="prompt_toxicity"), tiny_model.tokenizer)


def test_patching_all_positions_transfers_the_source_completely(tiny_model, rng):
    """Template 0 has no template tokens, so patching every prompt position makes the target's prompt
    residuals identical to the source's from the patched layer on: read-outs equal the source's
    (fraction of the gap = 1). Generated tokens also attend to the blocks below the patched layer,
    whose KV cache still holds the target prompt, so only a patch at layer 0 (the embeddings) makes
    greedy continuations equal the source's."""
    pairs = match_pairs(_scored_prompts(), tiny_model.tokenizer, exact_length=True)
    probes = {
        layer: LinearProbe(rng.normal(size=tiny_model.d_model)) for layer in range(tiny_model.n_layers + 1)
    }
    out = activation_patching(
        tiny_model,
        pairs,
        layers=[0, 2],
        probes=probes,
        scorer=LengthScorer(),
        generate_layers=[0],
        positions="all",
        generation=GREEDY,
        stats=STATS,
    )
    read = out[out.measure == "readout"]
    assert set(read.direction) == {"toxic_to_nontoxic", "nontoxic_to_toxic"}
    assert (read.readout_layer >= read.layer).all()
    assert len(read) == 2 * (4 + 2)  # layer 0 -> read-outs 0..3, layer 2 -> 2..3, both directions
    assert np.allclose(read.value, read.source, atol=1e-4)
    assert np.allclose(read.fraction_of_gap, 1.0, atol=1e-3)
    # exact-length pairs of lengths 5 and 3: no two toxic (or non-toxic) prompts share a length,
    # so no same-class control can patch every position
    assert not out.control.any()
    beh = out[out.measure != "readout"]
    assert beh.readout_layer.isna().all() and set(beh.k) == {2} and set(beh.layer) == {0}
    assert len(beh) == 2 * 4  # emt, toxicity_probability, mean_score, log_perplexity
    beh = beh[beh.measure != "log_perplexity"]  # fluency is judged given the target prompt
    assert np.allclose(beh.value, beh.source)  # greedy continuations of the source, exactly
    assert not np.allclose(beh.baseline, beh.source)  # ... which differ from the target's
    assert set(out.n_pairs) == {len(pairs)}


def test_patching_last_position_moves_last_token_readout_exactly(tiny_model, rng):
    pairs = match_pairs(_scored_prompts(), tiny_model.tokenizer)
    probes = {
        layer: LinearProbe(rng.normal(size=tiny_model.d_model)) for layer in range(tiny_model.n_layers + 1)
    }
    out = activation_patching(
        tiny_model, pairs, layers=[0, 2], probes=probes, pooling="last", positions="last", stats=STATS
    )
    same = out[out.readout_layer == out.layer]
    assert np.allclose(same.value, same.source, atol=1e-5)  # the patched position itself
    later = out[(out.layer == 0) & (out.readout_layer == 3)]
    assert not np.allclose(later.value, later.source, atol=1e-3)  # earlier tokens still the target's
    with pytest.raises(ValueError, match="positions='all' needs pairs of equal rendered length"):
        activation_patching(
            tiny_model,
            pairs[pairs.toxic_length != pairs.nontoxic_length],
            layers=[1],
            probes=probes,
            positions="all",
        )
    with pytest.raises(ValueError, match="got neither"):
        activation_patching(tiny_model, pairs, layers=[1])


def _same_ending_prompts() -> pd.DataFrame:
    """Toxic prompts all end with " idiot", non-toxic ones with " day" (one token each)."""
    toxic = ["You are a stupid idiot", "you idiot", "I hate you idiot", "the lazy idiot"]
    benign = ["What a lovely day", "hello day", "a walk in the park day", "the quick brown fox day"]
    return pd.DataFrame(
        {
            "prompt_id": [f"s{i}" for i in range(8)],
            "text": toxic + benign,
            "prompt_toxicity": [0.9] * 4 + [0.1] * 4,
        }
    )


def test_same_class_control_is_exactly_null_when_same_class_activations_agree(tiny_model, rng):
    """Planted null: at layer 0 the last position's residual is the last token's embedding, which all
    toxic (all non-toxic) prompts share. Patching it between same-class prompts changes nothing, so
    the controls must be exactly zero, read-out and behaviour alike; across classes it does not."""
    pairs = match_pairs(_same_ending_prompts(), tiny_model.tokenizer)
    probes = {x: LinearProbe(rng.normal(size=tiny_model.d_model)) for x in range(tiny_model.n_layers + 1)}
    out = activation_patching(
        tiny_model, pairs, layers=[0], probes=probes, scorer=LengthScorer(), generation=GREEDY, stats=STATS
    )
    assert set(out.direction) == {
        "toxic_to_nontoxic",
        "nontoxic_to_toxic",
        "toxic_to_toxic",
        "nontoxic_to_nontoxic",
    }
    assert (out.control == out.direction.isin(["toxic_to_toxic", "nontoxic_to_nontoxic"])).all()
    described = out.drop_duplicates("direction").set_index("direction").description
    assert (
        described["nontoxic_to_toxic"] == "the non-toxic prompt's activations patched into the toxic prompt"
    )
    assert set(out.readout_pooling) == {"last"} and set(out.n_pairs) == {4}
    control, cross = out[out.control], out[~out.control]
    assert (control.delta == 0).all() and (control.ci_low == 0).all() and (control.ci_high == 0).all()
    assert (cross[cross.measure == "readout"].delta.abs() > 1e-3).all()
    assert "log_perplexity" in set(out.measure)  # the fluency guard sits beside the effects
    # fluency has no source end point: its fraction of the gap is undefined, not a noisy ratio
    assert out[out.measure == "log_perplexity"].fraction_of_gap.isna().all()
    with pytest.raises(ValueError, match="pooling='mean' does not match positions='last'"):
        activation_patching(tiny_model, pairs, layers=[0], probes=probes, pooling="mean")


def test_batched_patching_equals_one_pair_at_a_time(tiny_model, rng):
    """All pairs in one batched pass (read-outs and generation) give the mean of the single-pair runs,
    and the batch size does not change any number."""
    pairs = match_pairs(_scored_prompts(), tiny_model.tokenizer)
    probes = {x: LinearProbe(rng.normal(size=tiny_model.d_model)) for x in range(tiny_model.n_layers + 1)}
    kw = dict(layers=[1, 2], probes=probes, scorer=LengthScorer(), generate_layers=[1], stats=STATS)
    batched = activation_patching(tiny_model, pairs, controls=False, generation=GREEDY, **kw)
    singles = pd.concat(
        [
            activation_patching(tiny_model, pairs.iloc[[i]], controls=False, generation=GREEDY, **kw)
            for i in range(len(pairs))
        ]
    )
    keys = ["direction", "layer", "readout_layer", "measure"]
    expect = singles.groupby(keys, dropna=False)[["value", "baseline", "source", "delta"]].mean()
    got = batched.set_index(keys)[["value", "baseline", "source", "delta"]].sort_index()
    assert len(got) == len(expect) == 2 * (3 + 2) + 2 * 4  # read-outs 1..3 and 2..3; 4 measures
    assert np.allclose(got.to_numpy(float), expect.loc[got.index].to_numpy(float), atol=1e-5)
    one = GenerationSettings(**{**GREEDY.__dict__, "batch_size": 1})
    small = activation_patching(tiny_model, pairs, generation=one, batch_size=1, **kw)
    full = activation_patching(tiny_model, pairs, generation=GREEDY, batch_size=16, **kw)
    cols = ["value", "baseline", "source", "delta", "ci_low", "ci_high"]
    assert np.allclose(small[cols].to_numpy(float), full[cols].to_numpy(float), atol=1e-5, equal_nan=True)
    assert full.control.any()


def test_paired_sweep_identity_conditions_sources_and_label_check(tiny_model):
    """Identity conditions reuse the baseline (delta exactly 0); with `sources`, `source` is the mean of
    the sources' baseline values and `fraction_of_gap` = delta / mean(source - baseline)."""
    from aligned_probing.causal import Condition, paired_sweep

    base = generate_and_score(tiny_model, PROMPTS, LengthScorer(), SAMPLED)
    sources = {"p0": "p1", "p2": "p3"}
    conds = [
        Condition({"name": "all"}, None),
        Condition({"name": "two"}, None, PROMPTS[PROMPTS.prompt_id.isin(["p0", "p2"])], sources),
    ]
    out = paired_sweep(
        tiny_model,
        PROMPTS,
        LengthScorer(),
        conds,
        generation=SAMPLED,
        stats=STATS,
        baseline=base,
        fluency=False,
    )
    assert (out.delta == 0).all() and set(out.loc[out.name == "all", "n_prompts"]) == {6}
    two = out[out.name == "two"].set_index("metric")
    per = base.groupby("prompt_id")["toxicity"].mean()
    assert two.loc["mean_score", "source"] == pytest.approx((per["p1"] + per["p3"]) / 2)
    assert two.loc["mean_score", "fraction_of_gap"] == 0.0 and two.loc["mean_score", "n_prompts"] == 2
    with pytest.raises(ValueError, match="same label keys"):
        paired_sweep(
            tiny_model,
            PROMPTS,
            LengthScorer(),
            [conds[0], Condition({"other": 1}, None)],
            generation=SAMPLED,
            stats=STATS,
            baseline=base,
            fluency=False,
        )
