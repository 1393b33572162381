"""Prompt folds and group permutations: balance, determinism, groups kept whole."""

from __future__ import annotations

import numpy as np
import pytest

from aligned_probing.probing.splits import group_permutation, prompt_folds


def test_prompt_folds_balanced_seeded():
    folds = prompt_folds(103, 4, seed=0)
    assert sorted(np.bincount(folds).tolist()) == [25, 26, 26, 26]
    np.testing.assert_array_equal(folds, prompt_folds(103, 4, seed=0))
    assert not np.array_equal(folds, prompt_folds(103, 4, seed=1))


@pytest.mark.parametrize(
    ("n", "k", "match"), [(7, 4, "need at least 8 prompts"), (10, 1, "n_folds must be an int >= 2")]
)
def test_prompt_folds_errors(n, k, match):
    with pytest.raises(ValueError, match=match):
        prompt_folds(n, k, seed=0)


def test_group_permutation_one_row_per_group_is_a_permutation(rng):
    groups = rng.permutation(50)
    idx = group_permutation(groups, np.random.default_rng(1))
    assert sorted(idx.tolist()) == list(range(50))
    assert (idx != np.arange(50)).mean() > 0.9


def test_group_permutation_moves_whole_groups(rng):
    sizes = rng.integers(1, 5, size=30)
    groups = rng.permutation(np.repeat(np.arange(30), sizes))  # rows of a group are scattered
    idx = group_permutation(groups, np.random.default_rng(2))
    for g in range(30):
        sources = set(groups[idx[groups == g]].tolist())
        assert len(sources) == 1  # all rows of group g receive targets from a single group
    # every group is the source of exactly one group
    assert sorted(groups[idx[np.unique(groups, return_index=True)[1]]].tolist()) == list(range(30))
