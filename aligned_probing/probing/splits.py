"""Prompt-grouped cross-validation folds and group-level permutations for control tasks.

Folds are assigned to *prompts*, once per seed, and every scenario maps its rows through that
assignment: the continuations of one prompt never straddle train and test, and the four scenarios of a
(fold, seed) are evaluated on the same prompts (paired comparisons).
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import KFold


def prompt_folds(n_prompts: int, n_folds: int, seed: int) -> np.ndarray:
    """Fold id in `[0, n_folds)` for each of `n_prompts` prompts, shuffled by `seed`.

    Uses `KFold(shuffle=True, random_state=seed)` over the prompts (each prompt is one group), so the
    fold sizes differ by at most one prompt.

    Raises:
        ValueError: If `n_folds < 2` or there are fewer than 2 prompts per test fold.
    """
    if not isinstance(n_folds, int | np.integer) or n_folds < 2:
        raise ValueError(f"n_folds must be an int >= 2, got {n_folds!r}.")
    if n_prompts < 2 * n_folds:
        raise ValueError(
            f"Too few samples for n_folds={n_folds}: need at least {2 * n_folds} prompts (2 per test fold, "
            f"so that Pearson r is defined), got {n_prompts}. Lower n_folds or add prompts."
        )
    folds = np.empty(n_prompts, dtype=np.int64)
    for fold, (_, test) in enumerate(
        KFold(n_folds, shuffle=True, random_state=seed).split(np.arange(n_prompts))
    ):
        folds[test] = fold
    return folds


def group_permutation(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row indices that move each group's targets onto another group's rows (a control permutation).

    A random permutation pi of the groups is drawn; the rows of group g receive, in order, the rows of
    group pi(g) (cycled or cut with `np.resize` when the group sizes differ). With one row per group this
    is a plain permutation of the rows. Permuting whole prompts keeps the within-prompt structure of the
    targets, so the control task is as hard to memorise as the real one, but unrelated to the features.

    Args:
        groups: Group code per row `[n]` (e.g. prompt index).
        rng: Seeded generator.

    Returns:
        `idx [n]` such that `targets[idx]` are the control targets.
    """
    uniq, inverse = np.unique(groups, return_inverse=True)
    perm = rng.permutation(len(uniq))
    if len(uniq) == len(groups):  # one row per group: a plain permutation of the rows
        order = np.argsort(inverse)  # rows sorted by group
        idx = np.empty(len(groups), dtype=np.int64)
        idx[order] = order[perm]
        return idx
    order = np.argsort(inverse, kind="stable")
    rows_of = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
    idx = np.empty(len(groups), dtype=np.int64)
    for g, rows in enumerate(rows_of):
        idx[rows] = np.resize(rows_of[perm[g]], len(rows))
    return idx
