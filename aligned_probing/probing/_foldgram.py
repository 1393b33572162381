"""One Gram matrix per design, downdated to each cross-validation fold's training rows.

The sweep fits every (seed, fold) of a design on the same activations. The training Gram matrix of a
fold is the Gram matrix of all rows minus that of the held-out rows, so one `syrk` over all rows plus a
small one over each test block replaces a full `syrk` per fold (the fold's mean and scale are computed
from its training rows, two O(n p) passes, exactly as `StandardScaler`). The rows are first centred on
the mean of all rows, so that the downdate's rank-one centring correction is small (a fold mean differs
from the full mean by O(sd / sqrt(n))) and loses no precision to cancellation, even for features with
large offsets. A feature that is (nearly) constant on the training rows but not on the held-out ones
would lose precision in the downdate; such folds get their Gram matrix computed directly. Memory: `X`
is referenced, not copied (the all-rows Gram is accumulated over blocks of rows); a fold copies its
training rows once (centred in place) and its held-out rows once.
"""

from __future__ import annotations

import numpy as np

from aligned_probing.probing._gcv import ridge_gcv

#: Largest (all-rows sum of squares) / (training sum of squares) of a feature for which the fold's Gram
#: matrix is downdated; beyond it (relative error above about 1e6 * eps) it is computed directly.
AMPLIFICATION_LIMIT: float = 1e6
#: Rows per block when the all-rows Gram matrix is accumulated (bounds the temporary copy).
BLOCK_ROWS: int = 4096


class FoldGram:
    """The Gram matrix of the usable rows of a design `X` `[n, p]`, centred on their mean, for fold fits.

    Args:
        X: One design (float64); referenced, not copied.
        rows: Boolean mask `[n]` of the usable (finite) rows; None = all. Every training mask passed
            later must lie within it; the held-out rows of a fold are `rows & ~train`.

    Example:
        >>> fg = FoldGram(X, rows=np.isfinite(X).all(axis=1))
        >>> coef, intercept, alpha, loo_mse = fg.fit(train_mask, Y[train_mask], alphas)
    """

    def __init__(self, X: np.ndarray, rows: np.ndarray | None = None):
        if not isinstance(X, np.ndarray) or X.ndim != 2 or X.dtype != np.float64:
            raise ValueError(f"X must be a float64 array of shape (n, p), got {getattr(X, 'shape', X)!r}.")
        self.X = X
        self.rows = np.ones(len(X), dtype=bool) if rows is None else np.asarray(rows, dtype=bool)
        if self.rows.shape != (len(X),) or not self.rows.any():
            raise ValueError(f"rows must be a non-empty boolean mask of length {len(X)}.")
        index = np.flatnonzero(self.rows)
        self.offset = X[index].mean(axis=0) if len(index) <= BLOCK_ROWS else _blocked_mean(X, index)
        self.gram = np.zeros((X.shape[1], X.shape[1]))
        for start in range(0, len(index), BLOCK_ROWS):
            block = X[index[start : start + BLOCK_ROWS]] - self.offset
            self.gram += block.T @ block  # syrk per block

    def standardise(self, train: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Centred training rows, their mean and scale, and the Gram matrix of `Xc / scale`.

        The scale follows scikit-learn's `StandardScaler` (population sd; 1 for a feature that is
        constant on the training rows, by its rule `var <= n eps var + (n mean eps)^2`).

        Args:
            train: Boolean mask `[n]` of the training rows.

        Returns:
            `Xc [n_train, p]`, `mean [p]`, `scale [p]`, `gram [p, p]`.
        """
        train = np.asarray(train, dtype=bool)
        if train.shape != self.rows.shape or np.any(train & ~self.rows):
            raise ValueError(
                f"train must be a boolean mask of length {len(self.rows)} within the usable rows, "
                f"got shape {train.shape}."
            )
        n = int(train.sum())
        if n < 2:
            raise ValueError(f"train must select at least 2 rows, got {n}.")
        Xc = self.X[train]
        Xc -= self.offset
        m = Xc.mean(axis=0)  # training mean relative to the offset
        Xc -= m
        var = np.einsum("ij,ij->j", Xc, Xc) / n  # two-pass variance, as StandardScaler's
        mean = self.offset + m
        eps = np.finfo(np.float64).eps
        constant = var <= n * eps * var + (n * mean * eps) ** 2
        scale = np.where(constant, 1.0, np.sqrt(var))
        diag = np.diag(self.gram)
        # The downdate loses about eps * (all-rows sum of squares) / (training sum of squares) relative
        # precision per feature; where that factor exceeds AMPLIFICATION_LIMIT (a feature that is nearly
        # constant on the training rows but not on the held-out ones) the fold's Gram is computed directly.
        if np.any(diag[~constant] > AMPLIFICATION_LIMIT * n * var[~constant]):
            G = Xc.T @ Xc
        else:
            held = self.X[self.rows & ~train]
            held -= self.offset
            G = self.gram - held.T @ held
            G -= n * np.outer(m, m)
            G[constant, :] = 0.0  # pure cancellation noise: these columns of Xc are (near) zero
            G[:, constant] = 0.0
        inv = 1.0 / scale
        G *= inv[:, None]
        G *= inv[None, :]
        return Xc, mean, scale, G

    def fit(
        self,
        train: np.ndarray,
        Y: np.ndarray,
        alphas: np.ndarray,
        groups: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`RidgeProbe().fit(X[train], Y, groups)` from the shared Gram matrix (same numbers to rounding).

        Args:
            train: Boolean mask `[n]` of the training rows (within `rows`).
            Y: Targets of the training rows `[n_train, k]`.
            alphas: Penalties `[a]`, all > 0.
            groups: Optional group label per training row, for leave-one-group-out selection.

        Returns:
            `coef [k, p]` and `intercept [k]` in the original feature space, the selected `alpha [k]`
            and its leave-one-out (or leave-one-group-out) error `[k]`.
        """
        Xc, mean, scale, G = self.standardise(train)
        Y = np.asarray(Y, dtype=np.float64).reshape(len(Xc), -1)
        fit = ridge_gcv(
            Xc, Y, alphas, groups=groups, scale=scale, centred=True, gram=G if len(Xc) >= G.shape[0] else None
        )
        coef = fit.coef / scale
        return coef, fit.y_mean - coef @ mean, fit.alpha, fit.loo_mse


def _blocked_mean(X: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Column means of `X[index]` without copying all of those rows at once."""
    total = np.zeros(X.shape[1])
    for start in range(0, len(index), BLOCK_ROWS):
        total += X[index[start : start + BLOCK_ROWS]].sum(axis=0)
    return total / len(index)
