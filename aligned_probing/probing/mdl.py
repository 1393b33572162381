"""Minimum description length of a probe's targets given the activations (online code, Voita & Titov 2020).

A sender transmits the targets of the training data block by block. The first block is sent with the
uniform code; every later block is sent with a Gaussian code whose mean is the prediction of a
`RidgeProbe` fitted on all earlier blocks. Strong, simply (linearly) decodable information makes the
online code short; the compression `uniform / online` is then well above 1.

Code lengths, in bits, for targets quantised to precision `eps` on a range `[lo, hi]`:
    uniform:  L_unif = n * log2((hi - lo) / eps)
    Gaussian: L(y | mu, sigma) = -log2(N(y; mu, sigma^2) * eps)
                               = 0.5 * log2(2 pi sigma^2) + (y - mu)^2 / (2 sigma^2 ln 2) - log2(eps)
with sigma^2 the leave-one-out mean squared error of the probe on the block's training part (floored at
eps^2 so that one bin never gets probability above ~0.4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aligned_probing.probing.ridge import DEFAULT_ALPHAS, RidgeProbe

#: Block boundaries as fractions of the data: 1/1024, 1/512, ..., 1/2, 1.
MDL_FRACTIONS: tuple[float, ...] = tuple(2.0**-e for e in range(10, 0, -1)) + (1.0,)


@dataclass(frozen=True)
class OnlineCode:
    """Code lengths per target (bits), `[n_targets]` each.

    Attributes:
        online_codelength: Online code length (first block uniform, then Gaussian), in bits.
        uniform_codelength: `n * log2((hi - lo) / eps)`, in bits.
        compression: `uniform_codelength / online_codelength`, in (0, inf); about 1 (or below) without
            decodable information, > 1 with it.
        boundaries: Block ends (sample counts) used.
    """

    online_codelength: np.ndarray
    uniform_codelength: np.ndarray
    compression: np.ndarray
    boundaries: np.ndarray


def block_boundaries(n: int, fractions: Sequence[float] = MDL_FRACTIONS, min_first: int = 2) -> np.ndarray:
    """Block ends `floor(f * n)` for each fraction, de-duplicated, each >= `min_first`, the last = n."""
    ends = np.unique(np.floor(np.asarray(fractions, dtype=np.float64) * n).astype(np.int64))
    ends = ends[(ends >= min_first) & (ends <= n)]
    if len(ends) == 0 or ends[-1] != n:
        ends = np.append(ends, n)
    return ends


def gaussian_codelength(y: np.ndarray, mu: np.ndarray, sigma2: np.ndarray, precision: float) -> np.ndarray:
    """Bits to send `y` `[m, k]` given predictions `mu` `[m, k]` and variances `sigma2` `[k]` ; sum over rows.

    `L = sum_i 0.5 log2(2 pi sigma^2) + (y_i - mu_i)^2 / (2 sigma^2 ln 2) - log2(eps)`; range (-inf, inf) in
    general, > 0 for `sigma >= eps`.
    """
    sigma2 = np.maximum(sigma2, precision**2)
    per = 0.5 * np.log2(2 * np.pi * sigma2) + (y - mu) ** 2 / (2 * sigma2 * np.log(2)) - np.log2(precision)
    return per.sum(axis=0)


def online_codelength(
    X: np.ndarray,
    Y: np.ndarray,
    *,
    fractions: Sequence[float] = MDL_FRACTIONS,
    precision: float = 0.01,
    target_range: tuple[float, float] = (0.0, 1.0),
    alphas: Sequence[float] = DEFAULT_ALPHAS,
) -> OnlineCode:
    """Online (prequential) code length of `Y` given `X`, in the order given (shuffle beforehand).

    Args:
        X: Features `[n, p]`.
        Y: Targets `[n]` or `[n, k]`, inside `target_range`.
        fractions: Block boundaries as fractions of n (default 1/1024 ... 1/2, 1).
        precision: Quantisation step eps of the targets (> 0).
        target_range: `(lo, hi)` of the targets; the uniform code spends log2((hi - lo) / eps) bits each.
        alphas: Ridge penalty grid of each block's probe (alpha chosen by LOO on the block's training part).

    Returns:
        An `OnlineCode` with per-target code lengths and compression.

    Example:
        >>> code = online_codelength(X[perm], y[perm], precision=0.01)
        >>> code.compression  # > 1 when y is linearly decodable from X
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    Y = Y.reshape(len(Y), -1)
    lo, hi = target_range
    if not precision > 0 or not hi - lo > precision:
        raise ValueError(
            f"precision must be > 0 and below the target range width; got precision={precision!r}, "
            f"target_range={target_range!r}."
        )
    if len(X) != len(Y):
        raise ValueError(f"X and Y must have the same number of rows, got {len(X)} and {len(Y)}.")
    if not np.all(np.isfinite(Y)) or Y.min() < lo or Y.max() > hi:
        raise ValueError(
            f"Y must be finite and inside target_range={target_range!r}, got values in "
            f"[{np.nanmin(Y)}, {np.nanmax(Y)}]."
        )
    ends = block_boundaries(len(Y), fractions)
    if len(ends) < 2:
        raise ValueError(f"Too few samples for an online code: n={len(Y)} gives block ends {ends.tolist()}.")
    uniform_bits = np.log2((hi - lo) / precision)
    online = np.full(Y.shape[1], ends[0] * uniform_bits)  # first block: uniform code
    for start, stop in zip(ends[:-1], ends[1:], strict=True):
        probe = RidgeProbe(alphas=alphas).fit(X[:start], Y[:start])
        online += gaussian_codelength(Y[start:stop], probe.predict(X[start:stop]), probe.loo_mse_, precision)
    uniform = np.full(Y.shape[1], len(Y) * uniform_bits)
    return OnlineCode(
        online_codelength=online, uniform_codelength=uniform, compression=uniform / online, boundaries=ends
    )
