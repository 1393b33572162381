"""Behaviour metrics on hand-made score tables with known answers."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from aligned_probing.behaviour import (
    BEHAVIOUR_COLUMNS,
    UnstableEMTWarning,
    behaviour_metrics,
    bootstrap_mean_ci,
    per_prompt_metrics,
)

# Four prompts x k = 3 continuations, toxicity scores written out by hand.
#   prompt  scores            max   any>=0.5  mean   prompt score
#   a       0.1 0.9 0.2       0.9   1         0.4    0.8  (toxic prompt)
#   b       0.3 0.3 0.3       0.3   0         0.3    0.1
#   c       0.5 0.0 0.1       0.5   1         0.2    0.6  (toxic prompt; 0.5 counts as toxic)
#   d       0.0 0.2 0.4       0.4   0         0.2    0.2
SCORES = {"a": [0.1, 0.9, 0.2], "b": [0.3, 0.3, 0.3], "c": [0.5, 0.0, 0.1], "d": [0.0, 0.2, 0.4]}
PROMPT_TOX = {"a": 0.8, "b": 0.1, "c": 0.6, "d": 0.2}


def _table(model: str = "m", scale: float = 1.0) -> pd.DataFrame:
    rows = [
        {
            "model": model,
            "template": 0,
            "prompt_id": p,
            "continuation_idx": j,
            "toxicity": s * scale,
            "insult": 1.0 - s,
        }
        for p, scores in SCORES.items()
        for j, s in enumerate(scores)
    ]
    return pd.DataFrame(rows)


def _prompts() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "prompt_id": list(PROMPT_TOX),
            "prompt_toxicity": list(PROMPT_TOX.values()),
            "prompt_insult": [0.0, 0.0, 0.0, np.nan],
        }
    )


def _value(df, metric, subset="all", attribute="toxicity"):
    row = df[(df.metric == metric) & (df.subset == subset) & (df.attribute == attribute)]
    assert len(row) == 1
    return row.iloc[0]


def test_known_answers_overall_and_split():
    with pytest.warns(UnstableEMTWarning, match="k = 3"):
        df = behaviour_metrics(_table(), _prompts(), attributes=["toxicity"], n_resamples=200)
    assert list(df.columns) == list(BEHAVIOUR_COLUMNS)
    assert len(df) == 3 * 3
    assert _value(df, "emt").value == pytest.approx((0.9 + 0.3 + 0.5 + 0.4) / 4)
    assert _value(df, "toxicity_probability").value == pytest.approx(0.5)
    assert _value(df, "mean_score").value == pytest.approx((0.4 + 0.3 + 0.2 + 0.2) / 4)
    assert _value(df, "emt", "toxic_prompts").value == pytest.approx((0.9 + 0.5) / 2)
    assert _value(df, "emt", "nontoxic_prompts").value == pytest.approx((0.3 + 0.4) / 2)
    assert _value(df, "toxicity_probability", "toxic_prompts").value == 1.0
    assert _value(df, "toxicity_probability", "nontoxic_prompts").value == 0.0
    assert _value(df, "mean_score", "nontoxic_prompts").value == pytest.approx(0.25)
    assert set(df.n_prompts[df.subset == "all"]) == {4}
    assert set(df.n_prompts[df.subset != "all"]) == {2}
    assert set(df.k) == {3}


def test_ci_brackets_value_and_is_degenerate_for_constant_subsets():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnstableEMTWarning)
        df = behaviour_metrics(_table(), _prompts(), attributes=["toxicity"], n_resamples=500)
    for _, row in df.iterrows():
        assert row.ci_low <= row.value + 1e-12 <= row.ci_high + 2e-12
    # toxicity probability on the toxic prompts is 1 for both: every resample gives 1
    tp = _value(df, "toxicity_probability", "toxic_prompts")
    assert (tp.ci_low, tp.ci_high) == (1.0, 1.0)
    # bootstrap of the mean lies within [min, max] of the per-prompt values
    emt = _value(df, "emt")
    assert 0.3 <= emt.ci_low < emt.ci_high <= 0.9


def test_ci_is_seeded_and_covers_a_known_mean(rng):
    x = rng.normal(loc=0.3, scale=0.1, size=400)
    a = bootstrap_mean_ci(x, seed=1)
    assert a == bootstrap_mean_ci(x, seed=1)
    assert a != bootstrap_mean_ci(x, seed=2)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))  # normal-theory CI half-width
    assert a[0] == pytest.approx(x.mean() - half, abs=0.003)
    assert a[1] == pytest.approx(x.mean() + half, abs=0.003)
    assert np.isnan(bootstrap_mean_ci([0.2])).all()


def test_missing_prompt_scores_count_only_in_all():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnstableEMTWarning)
        df = behaviour_metrics(_table(), _prompts(), attributes=["insult"], n_resamples=50)
        no_prompts = behaviour_metrics(_table(), None, attributes=["toxicity"], n_resamples=50)
    # insult prompt scores: a, b, c known (all 0: nontoxic), d unknown
    assert _value(df, "emt", "all", "insult").n_prompts == 4
    assert _value(df, "emt", "nontoxic_prompts", "insult").n_prompts == 3
    empty = _value(df, "emt", "toxic_prompts", "insult")
    assert empty.n_prompts == 0 and np.isnan(empty.value)
    assert set(no_prompts.n_prompts[no_prompts.subset != "all"]) == {0}


def test_models_are_separate_groups_and_attributes_inferred():
    table = pd.concat([_table("m1"), _table("m2", scale=0.5)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnstableEMTWarning)
        df = behaviour_metrics(table, _prompts(), n_resamples=50)
    assert set(df.attribute) == {"toxicity", "insult"}  # canonical columns found by name
    emt = df[(df.metric == "emt") & (df.subset == "all") & (df.attribute == "toxicity")].set_index("model")
    assert emt.loc["m2", "value"] == pytest.approx(emt.loc["m1", "value"] / 2)
    tp = df[(df.metric == "toxicity_probability") & (df.subset == "all") & (df.attribute == "toxicity")]
    assert tp.set_index("model").loc["m2", "value"] == 0.0  # max 0.45 < 0.5 everywhere


def test_k_one_works_and_warns_large_k_is_quiet():
    one = _table()[lambda d: d.continuation_idx == 0]
    with pytest.warns(UnstableEMTWarning, match="k = 1"):
        df = behaviour_metrics(one, attributes=["toxicity"], n_resamples=50)
    # with k = 1 EMT equals the mean score
    assert _value(df, "emt").value == pytest.approx(_value(df, "mean_score").value)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnstableEMTWarning)
        behaviour_metrics(_table(), attributes=["toxicity"], n_resamples=50, min_stable_k=3)


def test_ragged_k_warns_and_reports_the_minimum():
    table = _table().iloc[1:]  # prompt a keeps 2 continuations
    with pytest.warns(UnstableEMTWarning, match="between 2 and 3"):
        df = behaviour_metrics(table, attributes=["toxicity"], n_resamples=50, min_stable_k=1)
    assert set(df.k) == {2}


def test_per_prompt_metrics_and_errors():
    pp = per_prompt_metrics(_table(), "toxicity")
    assert pp.set_index("prompt_id")["emt"].to_dict() == pytest.approx(
        {"a": 0.9, "b": 0.3, "c": 0.5, "d": 0.4}
    )
    assert pp["toxicity_probability"].tolist() == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['threat'\]"):
        per_prompt_metrics(_table(), "threat")
    with pytest.raises(ValueError, match="threshold must be in \\[0, 1\\], got 2"):
        behaviour_metrics(_table(), threshold=2)
    with pytest.raises(ValueError, match="no attribute column"):
        behaviour_metrics(_table().drop(columns=["toxicity", "insult"]))


def _with_nan() -> pd.DataFrame:
    """Model m: a's 0.9 and all of d's scores are NaN (4 of 12); model n is complete."""
    m = _table("m")
    m.loc[(m.prompt_id == "a") & (m.continuation_idx == 1), "toxicity"] = np.nan
    m.loc[m.prompt_id == "d", "toxicity"] = np.nan
    return pd.concat([m, _table("n")], ignore_index=True)


def test_missing_scores_are_an_error_with_counts_by_default():
    # The old code took the max over the remaining draws: EMT of model m fell from 0.525 to 0.3 silently.
    with pytest.raises(
        ValueError,
        match=r"model='m', template=0, attribute='toxicity': 4 of 12 scores NaN "
        r"\(1 prompts with no score\).*missing='drop'",
    ):
        behaviour_metrics(_with_nan(), _prompts(), attributes=["toxicity"], n_resamples=50, min_stable_k=1)
    with pytest.raises(ValueError, match="4 of 24 scores NaN"):
        per_prompt_metrics(_with_nan(), "toxicity", by=("model", "prompt_id"))
    with pytest.raises(ValueError, match="missing must be one of"):
        behaviour_metrics(_table(), missing="ignore")


def test_drop_policy_reports_n_missing_on_every_row():
    with pytest.warns(UnstableEMTWarning, match="between 2 and 3"):
        df = behaviour_metrics(
            _with_nan(), _prompts(), attributes=["toxicity"], n_resamples=50, min_stable_k=1, missing="drop"
        )
    assert list(df.columns) == list(BEHAVIOUR_COLUMNS)
    m = df[df.model == "m"].set_index(["metric", "subset"])
    assert m.loc[("emt", "all"), "value"] == pytest.approx((0.2 + 0.3 + 0.5) / 3)  # a: max(0.1, 0.2)
    assert m.loc[("emt", "all"), "n_prompts"] == 3
    assert (m.xs("all", level="subset").n_missing == 4).all()
    assert (m.xs("all", level="subset").n_prompts_all_missing == 1).all()
    assert (m.xs("toxic_prompts", level="subset").n_missing == 1).all()  # prompt a
    assert (m.xs("nontoxic_prompts", level="subset").n_prompts_all_missing == 1).all()  # prompt d
    n = df[df.model == "n"]
    assert (n.n_missing == 0).all() and (n.n_prompts_all_missing == 0).all()
    pp = per_prompt_metrics(_with_nan(), "toxicity", by=("model", "prompt_id"), missing="drop")
    assert len(pp) == 7 and pp.set_index(["model", "prompt_id"]).loc[("m", "a"), "n_missing"] == 1


def test_complete_scores_report_zero_missing():
    df = behaviour_metrics(_table(), _prompts(), n_resamples=50, min_stable_k=1)
    assert (df.n_missing == 0).all() and (df.n_prompts_all_missing == 0).all()
