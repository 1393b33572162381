"""Scenario designs: rows and targets written out by hand for a 3-prompt x 2-continuation store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from aligned_probing.probing.scenarios import build_designs, check_coverage, check_targets, infer_attributes


@pytest.fixture
def index():
    # store row: 0    1    2    3    4    5
    return pd.DataFrame({"prompt_id": ["a", "a", "b", "b", "c", "c"], "continuation_idx": [0, 1, 0, 1, 0, 1]})


@pytest.fixture
def targets(index):
    # listed in a different order than the store on purpose
    return pd.DataFrame(
        {
            "prompt_id": ["c", "c", "b", "b", "a", "a"],
            "continuation_idx": [1, 0, 1, 0, 1, 0],
            "prompt_toxicity": [0.3, 0.3, 0.2, 0.2, 0.1, 0.1],
            "toxicity": [0.9, 0.5, 0.4, 0.6, 0.7, 0.8],
            "text": list("uvwxyz"),
        }
    )


def test_designs_by_hand(index, targets):
    inp, out = build_designs(index, targets, attributes=["toxicity"])
    assert inp.position == "input" and inp.columns == [("input", "toxicity"), ("backward", "toxicity")]
    np.testing.assert_array_equal(inp.rows, [0, 2, 4])  # first store row of a, b, c
    np.testing.assert_allclose(
        inp.targets, [[0.1, 0.8], [0.2, 0.6], [0.3, 0.9]]
    )  # prompt score, max continuation
    assert out.columns == [("forward", "toxicity"), ("output", "toxicity")]
    np.testing.assert_array_equal(out.rows, [0, 2, 4])  # continuation 0
    np.testing.assert_allclose(out.targets, [[0.1, 0.8], [0.2, 0.6], [0.3, 0.5]])
    (all_out,) = build_designs(
        index, targets, scenarios=["output"], attributes=["toxicity"], output_continuations="all"
    )
    np.testing.assert_array_equal(all_out.rows, [0, 1, 2, 3, 4, 5])
    np.testing.assert_allclose(all_out.targets[:, 0], [0.8, 0.7, 0.6, 0.4, 0.5, 0.9])
    np.testing.assert_array_equal(all_out.prompt_ids, ["a", "a", "b", "b", "c", "c"])


def test_input_only_store(targets):
    index = pd.DataFrame({"prompt_id": ["b", "a", "c"], "continuation_idx": [-1, -1, -1]})
    (inp,) = build_designs(index, targets, scenarios=["backward"], attributes=["toxicity"])
    np.testing.assert_array_equal(inp.rows, [0, 1, 2])
    np.testing.assert_allclose(inp.targets[:, 0], [0.6, 0.8, 0.9])


def test_infer_attributes(targets):
    assert infer_attributes(targets) == ["toxicity"]


def test_prompt_score_must_repeat(index, targets):
    targets.loc[0, "prompt_toxicity"] = 0.99
    with pytest.raises(ValueError, match=r"\['prompt_toxicity'\] must repeat one value per prompt_id"):
        build_designs(index, targets, attributes=["toxicity"])


def test_check_targets_errors(targets):
    with pytest.raises(ValueError, match=r"missing columns \['prompt_insult', 'insult'\]"):
        check_targets(targets, ["input", "output"], ["toxicity", "insult"])
    targets.loc[2, "prompt_toxicity"] = np.nan
    with pytest.raises(ValueError, match=r"'prompt_toxicity': 1 of 6 rows"):
        check_targets(targets, ["input"], ["toxicity"])
    # a column not needed by the scenarios may hold NaN
    assert len(check_targets(targets, ["output"], ["toxicity"])) == 6


def test_check_coverage(index, targets):
    check_coverage(index, targets)
    with pytest.raises(ValueError, match=r"1 of 3 output samples have no target row .* \('b', 0\)"):
        check_coverage(index, targets.drop(index=3))
    with pytest.raises(ValueError, match="2 of 6 store samples have no target row for their prompt_id"):
        check_coverage(index, targets[targets.prompt_id != "b"], scenarios=["input"])
