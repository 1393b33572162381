"""The embedded Jigsaw BiLSTM scorer reproduces the real Keras models (recorded reference outputs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aligned_probing.scoring import ATTRIBUTES, get_scorer, jigsaw, verify_embedded_scorer
from aligned_probing.scoring.jigsaw import JIGSAW_LABELS, JigsawScorer, bilstm_max_pool

FIXTURE = Path(__file__).parent / "fixtures" / "keras_reference.json"
MODELS = ["tox-block", "toxic-comment-classifier"]
TOL = 1e-5  # the port matches Keras to ~1.2e-7 (float32 rounding); 1e-5 is the contract


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module", params=MODELS)
def scorer(request) -> JigsawScorer:
    return JigsawScorer(request.param)


# --- the LSTM loop itself (no wheels needed) -------------------------------------------------


def _random_lstm(rng: np.random.Generator, hidden: int = 5, emb: int = 4):
    w = {
        k: rng.normal(0, 0.5, size=s).astype(np.float32)
        for k, s in {
            "fwd_kernel": (emb, 4 * hidden),
            "bwd_kernel": (emb, 4 * hidden),
            "fwd_recurrent": (hidden, 4 * hidden),
            "bwd_recurrent": (hidden, 4 * hidden),
            "fwd_bias": (4 * hidden,),
            "bwd_bias": (4 * hidden,),
        }.items()
    }
    return w


def test_sigmoid_loop_matches_torch_lstm(rng):
    # With the plain sigmoid gate our loop must equal torch's fused nn.LSTM (same Keras->torch
    # weight mapping: W^T, U^T, bias in bias_ih, zero bias_hh; gate order i, f, g, o).
    w = _random_lstm(rng)
    x = torch.from_numpy(rng.normal(size=(3, 7, 4)).astype(np.float32))  # (B, T, E)
    lstm = torch.nn.LSTM(4, 5, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for suffix, d in (("", "fwd"), ("_reverse", "bwd")):
            getattr(lstm, f"weight_ih_l0{suffix}").copy_(torch.from_numpy(w[f"{d}_kernel"].T))
            getattr(lstm, f"weight_hh_l0{suffix}").copy_(torch.from_numpy(w[f"{d}_recurrent"].T))
            getattr(lstm, f"bias_ih_l0{suffix}").copy_(torch.from_numpy(w[f"{d}_bias"]))
            getattr(lstm, f"bias_hh_l0{suffix}").zero_()
        expected = lstm(x)[0].max(dim=1).values  # (B, 2H)
        proj = {
            d: (x @ torch.from_numpy(w[f"{d}_kernel"]) + torch.from_numpy(w[f"{d}_bias"])).transpose(0, 1)
            for d in ("fwd", "bwd")
        }  # (T, B, 4H)
        recurrent = torch.stack([torch.from_numpy(w["fwd_recurrent"]), torch.from_numpy(w["bwd_recurrent"])])
        joint = torch.stack([proj["fwd"], proj["bwd"].flip(0)], dim=1)  # (T, 2, B, 4H)
        ours = bilstm_max_pool(joint, recurrent, torch.sigmoid)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("activation", ["hard_sigmoid", "sigmoid"])
def test_shared_padding_shortcut_equals_full_recurrence(rng, activation):
    # JigsawBiLSTM skips the leading padding columns (forward: precomputed state; backward: one
    # shared projection). It must equal running all T steps on the full sequences.
    w = _random_lstm(rng, hidden=5, emb=4)
    w.update(
        embedding=rng.normal(size=(30, 4)).astype(np.float32),
        dense_kernel=rng.normal(size=(10, 3)).astype(np.float32),
        dense_bias=np.zeros(3, np.float32),
        out_kernel=rng.normal(size=(3, 6)).astype(np.float32),
        out_bias=np.zeros(6, np.float32),
    )
    model = jigsaw.JigsawBiLSTM(w, activation, maxlen=12)
    ids = torch.zeros(3, 12, dtype=torch.int64)
    ids[0, 9:] = torch.tensor([5, 7, 9])  # 9 leading padding columns shared by all rows
    ids[1, 10:] = torch.tensor([3, 3])
    ids[2, 11:] = torch.tensor([29])
    empty = torch.zeros(2, 12, dtype=torch.int64)  # all padding: nothing to skip for the backward pass
    with torch.no_grad():
        for batch in (ids, empty):
            torch.testing.assert_close(model(batch), _full_recurrence(model, batch), atol=1e-6, rtol=0)


def _full_recurrence(model: jigsaw.JigsawBiLSTM, ids: torch.Tensor) -> torch.Tensor:
    """The model without the padding shortcut: all T steps in both directions."""
    joint = model.table[torch.stack([ids.T, ids.T.flip(0) + model.vocab], dim=1)]  # (T, 2, B, 4H)
    pooled = bilstm_max_pool(joint, model.recurrent, model.gate)
    return torch.sigmoid(model.out(torch.relu(model.dense(pooled))))


def test_hard_sigmoid_is_tf_keras_2_definition():
    x = torch.tensor([-3.0, -2.5, -1.0, 0.0, 1.0, 2.5, 3.0])
    # clip(0.2 x + 0.5, 0, 1): saturates at |x| = 2.5 (Keras 3's slope 1/6 would give 1/3 at x = -1).
    expected = torch.tensor([0.0, 0.0, 0.3, 0.5, 0.7, 1.0, 1.0])
    torch.testing.assert_close(jigsaw._hard_sigmoid(x), expected)


def test_missing_wheel_names_pip_command(monkeypatch):
    monkeypatch.setattr(jigsaw.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps tox-block==0\.1\.2"):
        jigsaw._package_dir(jigsaw.JIGSAW_MODELS["tox-block"])


def test_bad_options_are_named():
    with pytest.raises(ValueError, match=r"model must be one of .*got 'tox_block'"):
        JigsawScorer("tox_block")
    with pytest.raises(ValueError, match=r"batch_size must be a positive int, got 0"):
        JigsawScorer("tox-block", batch_size=0)


# --- reference parity with the real Keras models -----------------------------------------------


@pytest.mark.slow
def test_tokenizer_matches_keras(scorer, reference):
    expected = np.asarray(reference["models"][scorer.spec.name]["input_ids"])
    np.testing.assert_array_equal(scorer.encode(reference["texts"]), expected)


@pytest.mark.slow
def test_outputs_match_keras(scorer, reference):
    expected = np.asarray(reference["models"][scorer.spec.name]["outputs"])
    ours = scorer.predict_raw(reference["texts"])
    diff = np.abs(ours - expected)
    worst = np.unravel_index(diff.argmax(), diff.shape)
    assert diff.max() < TOL, (
        f"{scorer.spec.name}: max |torch - keras| = {diff.max():.2e} at text {worst[0]} "
        f"({reference['texts'][worst[0]][:40]!r}), label {JIGSAW_LABELS[worst[1]]}: check the gate "
        "activation (tf.keras 2 hard_sigmoid) and the tokenizer filters"
    )


@pytest.mark.slow
def test_score_maps_jigsaw_labels_to_canonical_names(scorer, reference):
    raw = scorer.predict_raw(reference["texts"])
    frame = scorer.score(reference["texts"])
    assert tuple(frame.columns) == scorer.attributes == ATTRIBUTES[:6]
    for label, attribute in [
        ("toxic", "toxicity"),
        ("severe_toxic", "severe_toxicity"),
        ("obscene", "profanity"),
        ("threat", "threat"),
        ("insult", "insult"),
        ("identity_hate", "identity_attack"),
    ]:
        np.testing.assert_allclose(frame[attribute], raw[:, JIGSAW_LABELS.index(label)], atol=1e-7)
    assert frame.dtypes.eq(np.float64).all() and list(frame.index) == list(range(len(frame)))


@pytest.mark.slow
def test_batching_and_order_do_not_change_scores(scorer, reference):
    texts = reference["texts"]
    whole = scorer.predict_raw(texts)
    sample = [0, 6, 10, 20, 31, 32]  # empty, short, threat, odd whitespace, both long texts
    one_by_one = np.vstack([scorer.predict_raw([texts[i]]) for i in sample])
    np.testing.assert_allclose(one_by_one, whole[sample], atol=1e-6)
    perm = np.random.default_rng(0).permutation(len(texts))
    np.testing.assert_allclose(scorer.predict_raw([texts[i] for i in perm]), whole[perm], atol=1e-6)


@pytest.mark.slow
def test_empty_and_unknown_texts_score_as_all_padding(scorer):
    out = scorer.predict_raw(["", "   ", "!!!", "qqqzzzxxyy"])
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, np.repeat(out[:1], 4, axis=0), atol=1e-7)
    assert out[0, 0] < 0.1  # an empty text is not toxic
    assert scorer.score([]).shape == (0, 6)


@pytest.mark.slow
def test_long_text_keeps_last_100_words(scorer):
    tail = " ".join(["you are a stupid idiot"] * 20)  # exactly 100 words, all in both vocabularies
    long_text = "what a lovely sunny day " * 200 + tail
    ids = scorer.encode([long_text, tail])
    np.testing.assert_array_equal(ids[0], ids[1])
    np.testing.assert_allclose(scorer.predict_raw([long_text]), scorer.predict_raw([tail]), atol=1e-7)


@pytest.mark.slow
def test_bad_items_raise_type_error_naming_index(scorer):
    with pytest.raises(TypeError, match=r"texts\[1\] must be str, got NoneType"):
        scorer.score(["fine", None])
    with pytest.raises(TypeError, match=r"single str"):
        scorer.score("a bare string")


@pytest.mark.slow
def test_embedded_is_mean_of_both_models(reference):
    texts = reference["texts"]
    ensemble = get_scorer("embedded")
    expected = (
        JigsawScorer("tox-block").score(texts) + JigsawScorer("toxic-comment-classifier").score(texts)
    ) / 2
    np.testing.assert_allclose(ensemble.score(texts).to_numpy(), expected.to_numpy(), atol=1e-12)
    assert ensemble.attributes == ATTRIBUTES[:6]
    assert "tox-block==0.1.2" in ensemble.id and "toxic-comment-classifier==0.3.0" in ensemble.id


@pytest.mark.slow
def test_id_is_stable_and_distinguishes_models():
    a, b = JigsawScorer("tox-block"), JigsawScorer("tox-block")
    assert a.id == b.id
    assert a.id != JigsawScorer("toxic-comment-classifier").id
    assert "sha256:" in a.id


@pytest.mark.slow
def test_verify_embedded_scorer_uses_packaged_reference(reference):
    packaged = jigsaw.load_keras_reference()
    assert packaged == reference  # the packaged copy is the test fixture
    assert verify_embedded_scorer() < TOL
