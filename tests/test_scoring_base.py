"""The scorer contract: input validation, result table checks, the ensemble and `get_scorer`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from aligned_probing.scoring import ATTRIBUTES, EnsembleScorer, Scorer, get_scorer, validate_texts
from aligned_probing.scoring.base import ScoringWarning, canonical_order, scores_frame, warn_failed


class ConstantScorer:
    """Scores every text with fixed per-attribute values (a known answer for wrappers)."""

    def __init__(self, values: dict[str, float], id: str = "constant") -> None:
        self.values = values
        self.attributes = canonical_order(values)
        self.id = id

    def score(self, texts):
        texts = validate_texts(texts)
        return pd.DataFrame({a: [self.values[a]] * len(texts) for a in self.attributes}, dtype=float)


def test_attributes_are_canonical_and_ordered():
    assert ATTRIBUTES == (
        "toxicity",
        "severe_toxicity",
        "profanity",
        "insult",
        "threat",
        "identity_attack",
        "sexually_explicit",
    )
    assert canonical_order(["threat", "toxicity", "made_up"]) == ("toxicity", "threat")


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        (["ok", None], r"texts\[1\] must be str, got NoneType"),
        (["ok", "fine", 3], r"texts\[2\] must be str, got int"),
        (pd.Series(["a", np.nan]), r"texts\[1\] must be str, got float"),
        (["ok", b"bytes"], r"texts\[1\] must be str, got bytes"),
        ("just one string", r"single str; wrap it: \[text\]"),
        (42, r"sequence of str, got int"),
        ({"a": 1}, r"sequence of str, got dict"),
    ],
)
def test_validate_texts_rejects_non_strings_naming_the_index(texts, message):
    with pytest.raises(TypeError, match=message):
        validate_texts(texts)


def test_validate_texts_accepts_sequences_and_copies():
    original = ["a", "b"]
    out = validate_texts(original)
    assert out == original and out is not original
    assert validate_texts(np.array(["x", "y"])) == ["x", "y"]
    assert validate_texts(pd.Series(["x"], index=[7])) == ["x"]
    assert validate_texts(("", "z")) == ["", "z"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -0.1, 1.5])
def test_scores_frame_refuses_values_outside_unit_interval(bad):
    values = np.array([[0.2, 0.3], [0.4, bad]])
    with pytest.raises(ValueError, match=r"texts\[1\] attribute 'threat'"):
        scores_frame(values, ["toxicity", "threat"], source="x")


def test_scores_frame_is_tidy_float64():
    frame = scores_frame(np.array([[0.1, 0.9]], dtype=np.float32), ["toxicity", "insult"], source="x")
    assert list(frame.columns) == ["toxicity", "insult"]
    assert frame.dtypes.eq(np.float64).all()
    assert isinstance(frame.index, pd.RangeIndex)


def test_warn_failed_attaches_errors_and_warns():
    frame = pd.DataFrame({"toxicity": [0.1, np.nan]})
    with pytest.warns(ScoringWarning, match=r"1 of 2 texts .* texts\[1\]: boom"):
        warn_failed(frame, {1: "boom"}, source="x")
    assert frame.attrs["errors"] == {1: "boom"}


def test_ensemble_is_the_mean_on_shared_attributes():
    a = ConstantScorer({"toxicity": 0.2, "threat": 0.4, "insult": 0.0}, id="a")
    b = ConstantScorer({"toxicity": 0.6, "threat": 0.0, "sexually_explicit": 1.0}, id="b")
    ens = EnsembleScorer([a, b])
    assert isinstance(ens, Scorer)
    assert ens.attributes == ("toxicity", "threat")
    assert ens.id == "mean(a,b)"
    out = ens.score(["x", "y", "z"])
    np.testing.assert_allclose(out.to_numpy(), [[0.4, 0.2]] * 3)


def test_ensemble_needs_members_with_shared_attributes():
    with pytest.raises(ValueError, match="at least one scorer"):
        EnsembleScorer([])
    with pytest.raises(ValueError, match="share no attribute"):
        EnsembleScorer([ConstantScorer({"toxicity": 0.1}), ConstantScorer({"threat": 0.1})])


def test_get_scorer_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match=r"name must be one of \[.*'embedded'.*\], got 'toxic-bert'"):
        get_scorer("toxic-bert")
    with pytest.raises(
        ValueError, match=r"takes the options \['batch_size', 'num_threads'\].*unknown \['qps'\]"
    ):
        get_scorer("tox-block", qps=3)
    with pytest.raises(ValueError, match=r"unknown \['model'\]"):
        get_scorer("tox-block", model="toxic-comment-classifier")
