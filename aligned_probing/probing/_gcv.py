"""Closed-form ridge; exact leave-one-out (LOO) or leave-one-group-out alpha selection from one eigh.

Why hand-written rather than `sklearn.linear_model.RidgeCV(gcv_mode="svd")`: sklearn takes an SVD of the
`n x p` design matrix, which on the probing sweep's shapes (1500 x 576, two cores) measured about 1.4 s
per fit against about 0.3 s for an eigendecomposition of the smaller of the two Gram matrices
(`X^T X`, `p x p`, when n >= p; `X X^T`, `n x n`, otherwise). The sweep runs thousands of fits, so this
is the difference between minutes and an hour. The solution and the LOO errors are the same
(`tests/test_probing_ridge.py` checks both against `Ridge` and `RidgeCV`).

Notation: `Xs` is the standardised, centred design (`n x p`), `Yc` the centred targets (`n x k`),
`Xs = U diag(s) V^T` its thin SVD (obtained from the Gram eigendecomposition). For a penalty alpha,
    coef(alpha)   = V diag(s / (s^2 + alpha)) U^T Yc
    fitted(alpha) = U diag(s^2 / (s^2 + alpha)) U^T Yc                  (+ mean of y)
    H_ii(alpha)   = 1/n + sum_j U_ij^2 s_j^2 / (s_j^2 + alpha)          (1/n: the unpenalised intercept)
    LOO residual  = (y_i - fitted_i) / (1 - H_ii)
and the LOO mean squared error is the mean over i of the squared LOO residual.

Grouped selection (leave-one-group-out, LOGO). When rows come in groups that share information (the k
continuations of one prompt share its prompt), leaving out one row keeps its siblings in the fit and
rewards memorising the prompt: LOO then picks too small an alpha. Deleting a whole group G is exact for a
linear smoother too (Woodbury):
    e_G = (I - H_GG)^{-1} (y_G - fitted_G),   H_GG = 1/n + U_G diag(s^2 / (s^2 + alpha)) U_G^T
(`H` is the hat matrix of the model with an unpenalised intercept; `U_G` the rows of U in G). The LOGO
mean squared error is sum_G ||e_G||^2 / n. With one row per group this is the LOO error above.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class _RidgeGCVResult:
    coef: np.ndarray  # (k, p): coefficients in the standardised space, one row per target
    alpha: np.ndarray  # (k,): the selected penalty per target
    loo_mse: np.ndarray  # (k,): LOO (or leave-one-group-out) mean squared error at the selected penalty
    y_mean: np.ndarray  # (k,)


def _thin_svd(
    Xc: np.ndarray, scale: np.ndarray | None = None, gram: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`U (n x r), s (r,), V (p x r)` of `Xs = Xc / scale`, from the smaller Gram matrix; near-null dropped.

    `Xc` is the centred design and `scale` its column scales (None = 1): the standardised design is never
    formed; its Gram matrix is `(Xc^T Xc) / (scale scale^T)` and `U = Xc (V / scale / s)` (one BLAS `syrk`,
    one `eigh` and one `gemm`; the scalings cost O(p^2) instead of O(n p)). The eigendecomposition is
    LAPACK's divide-and-conquer `dsyevd` in float64 (`numpy.linalg.eigh`). `gram`, when given (n >= p only), is
    that scaled `p x p` Gram matrix computed elsewhere (e.g. downdated from all rows of a design by
    `_foldgram.FoldGram`); it is overwritten.

    Directions whose Gram eigenvalue is below `max(n, p) * eps * lambda_max` are dropped: that is the
    rounding level of the Gram matrix, so such an eigenvalue (and its vector) is noise, and with a
    positive penalty their contribution to coef and fitted values is O(s / alpha) anyway. (A threshold on
    s itself at `eps * s_max` would keep rounding-noise directions, whose arbitrary vectors then differ
    between BLAS builds and backends.)
    """
    n, p = Xc.shape
    inv_scale = None if scale is None else 1.0 / scale
    primal = n >= p
    if primal and gram is not None:
        if gram.shape != (p, p):
            raise ValueError(f"gram must have shape ({p}, {p}), got {gram.shape}.")
        G = gram
    elif primal:
        G = Xc.T @ Xc  # (p, p): numpy runs A.T @ A as one syrk
        if inv_scale is not None:
            G *= inv_scale[:, None]
            G *= inv_scale[None, :]
    else:
        Xs = Xc if inv_scale is None else Xc * inv_scale
        G = Xs @ Xs.T  # (n, n)
    # numpy's eigh (LAPACK dsyevd, as scipy's driver="evd") and not scipy's: scipy ships its own OpenBLAS,
    # whose thread pool fights numpy's (measured, the quickstart's probe stage, one torch thread, 2-core
    # machine with one other job: 95 s with scipy.linalg.eigh, 31 s with numpy's).
    evals, vecs = np.linalg.eigh(G)
    evals = np.clip(evals, 0.0, None)
    keep = evals > (max(n, p) * np.finfo(np.float64).eps * (evals.max() if evals.size else 0.0))
    s = np.sqrt(evals[keep])
    if primal:
        V = vecs[:, keep]
        W = V / s if inv_scale is None else V * inv_scale[:, None] / s  # (p, r): Xs V / s = Xc W
        U = Xc @ W  # (n, r)
    else:
        U = vecs[:, keep]
        V = (Xs.T @ U) / s  # (p, r)
    return U, s, V


def group_buckets(groups: np.ndarray) -> list[np.ndarray]:
    """Row indices of each group, bucketed by group size: a list of `[m_s, s]` int arrays (one per size s).

    Bucketing lets the per-group `s x s` solves of the grouped CV run as a few batched solves.
    """
    _, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    buckets = []
    for size in np.unique(counts):
        which = np.flatnonzero(counts == size)
        buckets.append(order[starts[which][:, None] + np.arange(size)[None, :]])  # (m_s, s)
    return buckets


#: Relative tolerance under which two CV errors count as tied (see `_select`).
TIE_RTOL: float = 1e-9


def _select(mse: np.ndarray) -> np.ndarray:
    """Index of the selected alpha per target from CV errors `[a, k]` (alphas ascending).

    The largest alpha whose error is within `TIE_RTOL` of the minimum. Errors that are equal in exact
    arithmetic (e.g. with 2 training rows every alpha has the same LOO error) differ by rounding, which
    would make the choice arbitrary and backend-dependent; among tied penalties the strongest is the
    safest. Away from ties this is the argmin, as `RidgeCV`'s.
    """
    near = mse <= mse.min(axis=0, keepdims=True) * (1 + TIE_RTOL)
    return mse.shape[0] - 1 - np.argmax(near[::-1], axis=0)


def check_groups(groups: np.ndarray | None, n: int) -> np.ndarray | None:
    """`groups` as an array of length n, or None when absent or every group has one row (plain LOO)."""
    if groups is None:
        return None
    groups = np.asarray(groups).reshape(-1)
    if len(groups) != n:
        raise ValueError(f"groups must have one entry per row: got {len(groups)} groups for {n} rows.")
    if len(np.unique(groups)) == n:
        return None
    if len(np.unique(groups)) < 2:
        raise ValueError("groups must hold at least 2 distinct groups for leave-one-group-out selection.")
    return groups


def ridge_gcv(
    Xs: np.ndarray,
    Y: np.ndarray,
    alphas: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    scale: np.ndarray | None = None,
    centred: bool = False,
    gram: np.ndarray | None = None,
) -> _RidgeGCVResult:
    """Fit ridge for every target and every alpha at once; pick alpha per target by exact LOO error.

    With `groups`, the selection error is the exact leave-one-group-out error instead (see the module
    docstring); groups of one row reduce to LOO.

    Args:
        Xs: Standardised design `[n, p]` (float64), or, with `scale`, a design whose standardised form
            is `Xs / scale` (e.g. the centred raw features; the division is folded into the Gram matrix
            and the projection, so it costs O(p^2)). It is centred here unless `centred`.
        Y: Targets `[n, k]` (float64).
        alphas: Penalties `[a]`, all > 0.
        groups: Optional group label per row `[n]` (e.g. prompt id) for leave-one-group-out selection.
        scale: Optional column scales `[p]` (> 0) of `Xs`; None = `Xs` is already standardised.
        centred: Whether the columns of `Xs` already have mean zero (skips a copy of `Xs`).
        gram: Optional Gram matrix `[p, p]` of the centred standardised design, computed elsewhere
            (used when n >= p; overwritten).

    Returns:
        Coefficients `[k, p]` in the standardised space (`Xs / scale`), the selected alpha per target,
        its LOO MSE and the target means (the intercept in the centred space).
    """
    n = Xs.shape[0]
    y_mean = Y.mean(axis=0)
    Yc = Y - y_mean
    U, s, V = _thin_svd(Xs if centred else Xs - Xs.mean(axis=0), scale, gram)
    UtY = U.T @ Yc  # (r, k)
    s2 = s**2
    shrink = s2[:, None] / (s2[:, None] + alphas[None, :])  # (r, a)
    # fitted values for all alphas and targets in one product: (n, r) @ (r, a*k)
    fitted = (U @ (shrink[:, :, None] * UtY[:, None, :]).reshape(len(s), -1)).reshape(n, len(alphas), -1)
    groups = check_groups(groups, n)
    if groups is None:
        h = 1.0 / n + (U**2) @ shrink  # (n, a): diagonal of the hat matrix
        loo = (Yc[:, None, :] - fitted) / (1.0 - h)[:, :, None]  # (n, a, k)
        mse = np.mean(loo**2, axis=0)  # (a, k)
    else:
        resid = Yc[:, None, :] - fitted  # (n, a, k)
        sse = np.zeros((len(alphas), Y.shape[1]))
        for rows in group_buckets(groups):  # rows: (m, s)
            UG = U[rows]  # (m, s, r)
            H = 1.0 / n + np.einsum("msr,ra,mtr->mast", UG, shrink, UG, optimize=True)  # (m, a, s, s)
            A = np.eye(rows.shape[1]) - H
            e = np.linalg.solve(A, resid[rows].transpose(0, 2, 1, 3))  # (m, a, s, k)
            sse += (e**2).sum(axis=(0, 2))
        mse = sse / n
    best = _select(mse)
    alpha = alphas[best]
    coef = (V @ ((s[:, None] / (s2[:, None] + alpha[None, :])) * UtY)).T  # (k, p)
    return _RidgeGCVResult(coef=coef, alpha=alpha, loo_mse=mse[best, np.arange(mse.shape[1])], y_mean=y_mean)
