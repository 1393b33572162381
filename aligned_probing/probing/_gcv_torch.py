"""The closed-form ridge of `_gcv.py` in torch: batched over layers, on a GPU when there is one.

Same mathematics as `_gcv.ridge_gcv` (see its module docstring): standardise on the training rows,
eigendecompose the smaller Gram matrix (`X^T X` when n >= p, the dual `X X^T` when n < p), score every
alpha by exact leave-one-out (or leave-one-group-out) error and keep the best per target. Everything
runs in float64, the eigendecomposition included, so that the selected alphas and the coefficients match
the numpy backend to rounding (tested to 1e-6). A leading batch dimension B (layers) turns B separate
fits into one batched `eigh` and a few batched products, which is what makes the GPU worthwhile.

Near-null singular directions are masked (set to zero) rather than dropped, so every batch element keeps
the same shapes; a zero singular value contributes nothing to coef, fitted values or the hat matrix, so
the result equals the numpy backend's, which drops them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from aligned_probing.probing._gcv import TIE_RTOL, check_groups, group_buckets


@dataclass(frozen=True)
class TorchRidgeFit:
    """Batched ridge fits, all numpy float64 on the host.

    Attributes:
        coef: `[B, k, p]` in the original (unstandardised) feature space.
        intercept: `[B, k]`.
        alpha: `[B, k]` selected penalty per layer and target.
        cv_mse: `[B, k]` LOO (or leave-one-group-out) mean squared error at `alpha`.
        x_mean, x_scale: `[B, p]` the standardisation of the training rows.
    """

    coef: np.ndarray
    intercept: np.ndarray
    alpha: np.ndarray
    cv_mse: np.ndarray
    x_mean: np.ndarray
    x_scale: np.ndarray


def default_device() -> str:
    """The default torch device: `cuda` when torch sees a GPU, else `cpu`."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _standardise(X: Any) -> tuple[Any, Any, Any]:
    """`(X - mean) / scale` per batch element, with scikit-learn's `StandardScaler` rule for constants.

    scikit-learn treats a feature as constant when `var <= n eps var + (n mean eps)^2` and then uses
    scale 1 (`sklearn.preprocessing._data._is_constant_feature`); the same rule here keeps parity.
    """
    import torch

    n = X.shape[-2]
    mean = X.mean(dim=-2)  # (B, p)
    var = X.var(dim=-2, unbiased=False)
    eps = torch.finfo(torch.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    scale = torch.where(constant, torch.ones_like(var), var.sqrt())
    return (X - mean[:, None, :]) / scale[:, None, :], mean, scale


def ridge_fit_torch(
    X: Any,
    Y: Any,
    alphas: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    device: str | None = None,
) -> TorchRidgeFit:
    """Standardise, fit ridge for every alpha and target, select alpha by LOO/LOGO; batched over B.

    Args:
        X: Features `[B, n, p]` (numpy or torch; B layers that share the rows).
        Y: Targets `[n, k]` (shared by all B) or `[B, n, k]`.
        alphas: Penalties `[a]`, all > 0.
        groups: Optional group label per row `[n]` for leave-one-group-out selection.
        device: torch device; None = "cuda" when available, else "cpu".

    Returns:
        A `TorchRidgeFit` (host numpy arrays).
    """
    import torch

    dev = torch.device(device or default_device())
    f64 = torch.float64
    X = torch.as_tensor(X).to(device=dev, dtype=f64)
    if X.ndim != 3:
        raise ValueError(f"X must have shape (B, n, p), got {tuple(X.shape)}.")
    B, n, p = X.shape
    Y = torch.as_tensor(Y).to(device=dev, dtype=f64)
    if Y.ndim == 2:
        Y = Y.expand(B, *Y.shape)
    if Y.ndim != 3 or Y.shape[:2] != (B, n):
        raise ValueError(f"Y must have shape (n, k) or (B, n, k) with n={n}, B={B}; got {tuple(Y.shape)}.")
    a = torch.as_tensor(np.asarray(alphas, dtype=np.float64), device=dev)
    groups = check_groups(groups, n)

    Xs, x_mean, x_scale = _standardise(X)
    Xs = Xs - Xs.mean(dim=-2, keepdim=True)
    y_mean = Y.mean(dim=-2)  # (B, k)
    Yc = Y - y_mean[:, None, :]
    # thin SVD from the smaller Gram matrix (float64 eigendecomposition), near-null directions masked
    if n >= p:
        evals, V = torch.linalg.eigh(Xs.transpose(-1, -2) @ Xs)  # (B, p), (B, p, p)
    else:
        evals, U = torch.linalg.eigh(Xs @ Xs.transpose(-1, -2))  # (B, n), (B, n, n)
    evals = evals.clamp_min(0.0)
    s = evals.sqrt()
    keep = evals > max(n, p) * torch.finfo(f64).eps * evals.amax(dim=-1, keepdim=True)  # as _gcv._thin_svd
    s = torch.where(keep, s, torch.zeros_like(s))
    inv_s = torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))
    if n >= p:
        U = (Xs @ V) * inv_s[:, None, :]  # (B, n, r)
    else:
        V = (Xs.transpose(-1, -2) @ U) * inv_s[:, None, :]  # (B, p, r)
    UtY = U.transpose(-1, -2) @ Yc  # (B, r, k)
    s2 = s**2
    shrink = s2[..., None] / (s2[..., None] + a)  # (B, r, a)
    shrink = shrink * keep[..., None]
    r, n_a, k = s.shape[-1], len(a), Y.shape[-1]
    # fitted values for all alphas and targets as one batched product (einsum here is ~40x slower on CPU)
    coefs = (shrink[..., None] * UtY[:, :, None, :]).reshape(B, r, n_a * k)  # (B, r, a*k)
    fitted = (U @ coefs).reshape(B, n, n_a, k)  # (B, n, a, k)
    resid = Yc[:, :, None, :] - fitted
    if groups is None:
        h = 1.0 / n + (U**2) @ shrink  # (B, n, a)
        mse = ((resid / (1.0 - h)[..., None]) ** 2).mean(dim=1)  # (B, a, k)
    else:
        mse = torch.zeros(B, n_a, k, dtype=f64, device=dev)
        for rows in group_buckets(groups):
            idx = torch.as_tensor(rows, device=dev)  # (m, s)
            UG = U[:, idx]  # (B, m, s, r)
            m, sz = rows.shape
            outer = (UG[:, :, :, None, :] * UG[:, :, None, :, :]).reshape(B, m * sz * sz, r)
            H = 1.0 / n + (outer @ shrink).reshape(B, m, sz, sz, n_a).permute(
                0, 1, 4, 2, 3
            )  # (B, m, a, s, s)
            eye = torch.eye(rows.shape[1], dtype=f64, device=dev)
            RG = resid[:, idx].permute(0, 1, 3, 2, 4)  # (B, m, a, s, k)
            e = torch.linalg.solve(eye - H, RG)
            mse += (e**2).sum(dim=(1, 3))
        mse = mse / n
    near = mse <= mse.amin(dim=1, keepdim=True) * (1 + TIE_RTOL)  # ties as in _gcv._select
    best = len(a) - 1 - torch.argmax(near.flip(1).to(torch.int8), dim=1)  # (B, k)
    alpha = a[best]  # (B, k)
    cv_mse = torch.gather(mse, 1, best[:, None, :])[:, 0, :]
    factor = torch.where(
        keep[..., None], s[..., None] / (s2[..., None] + alpha[:, None, :]), 0.0
    )  # (B, r, k)
    coef_s = (V @ (factor * UtY)).transpose(-1, -2)  # (B, k, p) in the standardised space
    coef = coef_s / x_scale[:, None, :]
    intercept = y_mean - (coef * x_mean[:, None, :]).sum(dim=-1)

    def host(t: Any) -> np.ndarray:
        return t.detach().cpu().numpy()

    return TorchRidgeFit(
        coef=host(coef),
        intercept=host(intercept),
        alpha=host(alpha),
        cv_mse=host(cv_mse),
        x_mean=host(x_mean),
        x_scale=host(x_scale),
    )
