"""Minimum description length of a probe's targets given the activations (online code, Voita & Titov 2020).

A sender transmits the targets of the training data block by block. The first block is sent with the
uniform code; every later block is sent with a Gaussian code whose mean is the prediction of a
`RidgeProbe` fitted on all earlier blocks. Three codes share the same blocks, so their differences are
about information, not about the coding conventions:

* **online** (real targets, probe on the activations),
* **control**: the same probe on the control (permuted) targets, i.e. what memorising arbitrary labels of
  these activations costs,
* **baseline**: a features-free online code: each block coded with the mean and the leave-one-out variance
  of the earlier blocks' targets (the probe's code in the limit alpha -> infinity).

Code lengths, in bits, for targets quantised to precision `eps` on a range `[lo, hi]`:
    uniform:  L_unif = n * log2((hi - lo) / eps)
    Gaussian: L(y | mu, sigma) = -log2(N(y; mu, sigma^2) * eps)
                               = 0.5 * log2(2 pi sigma^2) + (y - mu)^2 / (2 sigma^2 ln 2) - log2(eps)
with sigma^2 the leave-one-out mean squared error of the probe on the block's training part, shrunk towards
the uniform variance (hi - lo)^2 / 12 with 2 pseudo-observations (`shrunk_variance`) and floored at eps^2
so that one bin never gets probability above ~0.4. Each block is coded with a mixture of that Gaussian
(weight 0.99, mean clipped to the target range) and the uniform code (weight 0.01), which bounds what one
wild prediction can cost (`mixture_codelength`). What is reported is the **gain in bits per
sample**: `(L_baseline - L_online) / n` and `(L_control - L_online) / n`. Every sample costs the same
`-log2 eps` (and the same uniform first block) in all three codes, so the gain does not depend on eps
(as long as sigma >= eps), and it is about 0 for activations without decodable information, whatever the
target distribution. `uniform / online` (the old "compression") is kept for reference only: it exceeds
1 for pure noise whenever the targets are skewed, and it moves with eps.

Blocks hold whole groups: with `groups` (the prompt of each continuation), rows must come grouped and
block ends fall between groups, so a later block never codes a prompt that an earlier block has shown
the probe (which would reward memorising prompts), and alpha is chosen by leave-one-group-out.
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
    """Code lengths per target (bits), `[n_targets]` each, and the gains derived from them.

    Attributes:
        online_codelength: Online code length of the real targets (first block uniform, then Gaussian).
        uniform_codelength: `n * log2((hi - lo) / eps)`, in bits.
        compression: `uniform_codelength / online_codelength` (reference only; not a measure of
            information: > 1 for pure noise when the targets are skewed).
        boundaries: Block ends (sample counts) used.
        baseline_codelength: Features-free online code length (running mean and variance), bits.
        control_codelength: Online code length of the control targets (NaN when none were given).
        gain_vs_baseline: `(baseline - online) / n`, bits per sample; about 0 without information.
        gain_vs_control: `(control - online) / n`, bits per sample (NaN without control targets).
        compression_vs_baseline: `baseline / online`, in (0, inf); about 1 without information.
    """

    online_codelength: np.ndarray
    uniform_codelength: np.ndarray
    compression: np.ndarray
    boundaries: np.ndarray
    baseline_codelength: np.ndarray
    control_codelength: np.ndarray
    gain_vs_baseline: np.ndarray
    gain_vs_control: np.ndarray
    compression_vs_baseline: np.ndarray


def block_boundaries(n: int, fractions: Sequence[float] = MDL_FRACTIONS, min_first: int = 2) -> np.ndarray:
    """Block ends `floor(f * n)` for each fraction, de-duplicated, each >= `min_first`, the last = n."""
    ends = np.unique(np.floor(np.asarray(fractions, dtype=np.float64) * n).astype(np.int64))
    ends = ends[(ends >= min_first) & (ends <= n)]
    if len(ends) == 0 or ends[-1] != n:
        ends = np.append(ends, n)
    return ends


def group_block_boundaries(
    groups: np.ndarray, fractions: Sequence[float] = MDL_FRACTIONS, min_first: int = 2
) -> np.ndarray:
    """Block ends (row counts) that fall between groups: `block_boundaries` over groups, mapped to rows.

    Args:
        groups: Group per row `[n]`, each group's rows contiguous (e.g. rows sorted by prompt).
        fractions: Block boundaries as fractions of the number of groups.
        min_first: Fewest groups in the first block.

    Raises:
        ValueError: A group's rows are not contiguous.
    """
    groups = np.asarray(groups)
    change = np.flatnonzero(groups[1:] != groups[:-1]) + 1  # first row of every group but the first
    starts = np.concatenate([[0], change])
    if len(np.unique(groups)) != len(starts):
        raise ValueError(
            "groups must be contiguous (all rows of a group together); sort rows by group first."
        )
    group_ends = np.append(starts[1:], len(groups))  # row count after each group
    ends = block_boundaries(len(starts), fractions, min_first=min_first)
    return group_ends[ends - 1]


#: Pseudo-observations of the variance prior (see `shrunk_variance`).
PRIOR_N: float = 2.0
#: Weight of the uniform component of every block's code (see `mixture_codelength`).
ESCAPE: float = 0.01


def mixture_codelength(
    y: np.ndarray,
    mu: np.ndarray,
    sigma2: np.ndarray,
    precision: float,
    target_range: tuple[float, float] = (0.0, 1.0),
    escape: float = ESCAPE,
) -> np.ndarray:
    """Bits to send `y` `[m, k]` with a Gaussian-uniform mixture; summed over rows, `[k]`.

    `L = sum_i -log2(((1 - escape) N(y_i; clip(mu_i), sigma^2) + escape / (hi - lo)) * eps)`.
    The predictions are clipped to the target range (sender and receiver both know it), and the uniform
    component bounds the cost of any one sample by `log2((hi - lo) / eps) + log2(1 / escape)` bits
    (6.6 bits above the uniform code for escape = 0.01). Without it, a probe whose cross-validated
    variance is optimistic (small blocks, n close to the number of features) pays without bound for one
    wild prediction, and a single fold's code length dominates every mean. The mixture costs at most
    `-log2(1 - escape)` (0.015 bits) per sample where the Gaussian fits. `sigma2` is floored at eps^2.
    """
    lo, hi = target_range
    sigma2 = np.maximum(sigma2, precision**2)
    mu = np.clip(mu, lo, hi)
    density = np.exp(-((y - mu) ** 2) / (2 * sigma2)) / np.sqrt(2 * np.pi * sigma2)
    return -np.log2(((1 - escape) * density + escape / (hi - lo)) * precision).sum(axis=0)


def shrunk_variance(mse: np.ndarray, m: int, width: float, prior_n: float = PRIOR_N) -> np.ndarray:
    """Variance of a block's Gaussian code: `(prior_n * width^2 / 12 + m * mse) / (prior_n + m)`.

    The cross-validated error of a predictor fitted on m earlier samples is shrunk towards the variance
    of the uniform distribution on the target range (`width^2 / 12`) with `prior_n` pseudo-observations.
    Without it, the first blocks (2, 4, ... samples) of skewed targets can get a variance near 0 and one
    ordinary value then costs hundreds of bits: the code lengths become heavy-tailed and a single fold
    dominates the mean. The same rule applies to the real, control and baseline codes, and its effect
    vanishes as m grows.
    """
    return (prior_n * width**2 / 12.0 + m * np.asarray(mse, dtype=np.float64)) / (prior_n + m)


def baseline_codelength(
    Y: np.ndarray,
    ends: np.ndarray,
    precision: float,
    uniform_bits: float,
    target_range: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """Features-free online code length `[k]` of `Y` `[n, k]` with block ends `ends`, in bits.

    The first block is uniform (`uniform_bits` per sample); block (start, stop] is coded with a Gaussian of
    mean `m = mean(Y[:start])` and variance `mean((Y[:start] - m)^2) * (start / (start - 1))^2`, the
    leave-one-out mean squared error of the mean predictor, i.e. exactly what the probe's code uses for
    its own predictor (`loo_mse_`) in the limit alpha -> infinity; both are then shrunk with
    `shrunk_variance` and coded with `mixture_codelength`, as the probe's code is.
    """
    total = np.full(Y.shape[1], ends[0] * uniform_bits)
    for start, stop in zip(ends[:-1], ends[1:], strict=True):
        past = Y[:start]
        mu = past.mean(axis=0)
        sigma2 = ((past - mu) ** 2).mean(axis=0) * (start / (start - 1)) ** 2
        sigma2 = shrunk_variance(sigma2, start, target_range[1] - target_range[0])
        total += mixture_codelength(
            Y[start:stop], np.broadcast_to(mu, Y[start:stop].shape), sigma2, precision, target_range
        )
    return total


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
    control: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    backend: str = "numpy",
    device: str | None = None,
) -> OnlineCode:
    """Online (prequential) code lengths of `Y`, of its control and of a features-free baseline.

    The rows are coded in the order given: shuffle beforehand (by group, when there are groups).

    Args:
        X: Features `[n, p]`.
        Y: Targets `[n]` or `[n, k]`, inside `target_range`.
        fractions: Block boundaries as fractions of n (default 1/1024 ... 1/2, 1).
        precision: Quantisation step eps of the targets (> 0).
        target_range: `(lo, hi)` of the targets; the uniform code spends log2((hi - lo) / eps) bits each.
        alphas: Ridge penalty grid of each block's probe (alpha chosen by LOO on the block's training part).
        control: Control targets, same shape as `Y` (e.g. targets permuted across prompts), coded with
            the same probe protocol and blocks; None = no control code (NaN columns).
        groups: Group per row (e.g. prompt), each group's rows contiguous: blocks end between groups and
            alpha is selected by leave-one-group-out. None = every row its own group.
        backend: `RidgeProbe` backend ("numpy" or "torch").
        device: torch device for `backend="torch"` (None: CUDA when available).

    Returns:
        An `OnlineCode` with per-target code lengths and the gains in bits per sample.

    Example:
        >>> code = online_codelength(X[perm], y[perm], control=y[perm][shuffle])
        >>> code.gain_vs_baseline  # bits per sample; > 0 when y is linearly decodable from X
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
    k = Y.shape[1]
    if control is not None:
        control = np.asarray(control, dtype=np.float64).reshape(len(Y), -1)
        if control.shape != Y.shape:
            raise ValueError(f"control must have the shape of Y {Y.shape}, got {control.shape}.")
        if not np.all(np.isfinite(control)) or control.min() < lo or control.max() > hi:
            raise ValueError(f"control must be finite and inside target_range={target_range!r}.")
    if groups is not None:
        groups = np.asarray(groups).reshape(-1)
        if len(groups) != len(Y):
            raise ValueError(f"groups must have one entry per row: got {len(groups)} for {len(Y)} rows.")
        ends = group_block_boundaries(groups, fractions)
    else:
        ends = block_boundaries(len(Y), fractions)
    if len(ends) < 2:
        raise ValueError(f"Too few samples for an online code: n={len(Y)} gives block ends {ends.tolist()}.")
    uniform_bits = np.log2((hi - lo) / precision)
    Yall = Y if control is None else np.hstack([Y, control])
    coded = np.full(Yall.shape[1], ends[0] * uniform_bits)  # first block: uniform code
    for start, stop in zip(ends[:-1], ends[1:], strict=True):
        probe = RidgeProbe(alphas=alphas, backend=backend, device=device).fit(
            X[:start], Yall[:start], groups=None if groups is None else groups[:start]
        )
        coded += mixture_codelength(
            Yall[start:stop],
            probe.predict(X[start:stop]),
            shrunk_variance(probe.loo_mse_, start, hi - lo),
            precision,
            target_range,
        )
    online = coded[:k]
    ctrl = coded[k:] if control is not None else np.full(k, np.nan)
    baseline = baseline_codelength(Y, ends, precision, uniform_bits, target_range)
    uniform = np.full(k, len(Y) * uniform_bits)
    return OnlineCode(
        online_codelength=online,
        uniform_codelength=uniform,
        compression=uniform / online,
        boundaries=ends,
        baseline_codelength=baseline,
        control_codelength=ctrl,
        gain_vs_baseline=(baseline - online) / len(Y),
        gain_vs_control=(ctrl - online) / len(Y),
        compression_vs_baseline=baseline / online,
    )
