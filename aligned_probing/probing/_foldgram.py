"""One Gram matrix per design, downdated to each cross-validation fold's training rows.

The sweep fits every (seed, fold) of a design on the same activations. The training Gram matrix of a
fold is the Gram matrix of all rows minus that of the held-out rows, so one `syrk` over all rows plus a
small one over each test block replaces a full `syrk` per fold (the fold's mean and scale are computed
from its training rows, two O(n p) passes, exactly as `StandardScaler`). The rows are first centred on
the mean of all rows, so that the downdate's rank-one centring correction is small (a fold mean differs
from the full mean by O(sd / sqrt(n))) and loses no precision to cancellation, even for features with
large offsets. A feature that is (nearly) constant on the training rows but not on the held-out ones
would lose precision in the downdate; such folds get their Gram matrix computed directly.
"""

from __future__ import annotations

import numpy as np

from aligned_probing.probing._gcv import ridge_gcv

#: Largest (all-rows sum of squares) / (training sum of squares) of a feature for which the fold's Gram
#: matrix is downdated; beyond it (relative error above about 1e6 * eps) it is computed directly.
AMPLIFICATION_LIMIT: float = 1e6


class FoldGram:
    """The rows of a design `X` `[n, p]` centred on their mean, and their Gram matrix, for fold fits.

    Args:
        X: All rows of one design (float64, finite).

    Example:
        >>> fg = FoldGram(X)
        >>> coef, intercept, alpha, loo_mse = fg.fit(train_mask, Y[train_mask], alphas)
    """

    def __init__(self, X: np.ndarray):
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2:
            raise ValueError(f"X must have shape (n, p), got {X.shape}.")
        self.offset = X.mean(axis=0)
        self.Xg = X - self.offset
        self.gram = self.Xg.T @ self.Xg  # one syrk over all rows

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
        if train.shape != (self.Xg.shape[0],):
            raise ValueError(f"train must be a boolean mask of length {self.Xg.shape[0]}, got {train.shape}.")
        n = int(train.sum())
        if n < 2:
            raise ValueError(f"train must select at least 2 rows, got {n}.")
        Xc = self.Xg[train]
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
            held = self.Xg[~train]
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
            train: Boolean mask `[n]` of the training rows.
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
