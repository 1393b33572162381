"""`RidgeProbe`: a scikit-learn regressor for layer-wise probing (standardise, ridge, LOO-selected alpha).

One fit handles every target (attribute) at once and every alpha at once: the training data are
standardised, one eigendecomposition is taken, and each target gets the alpha with the smallest exact
leave-one-out error on the *training* data (leave-one-*group*-out when `fit` gets `groups`, e.g. the
prompt of each continuation). Nothing is fitted on test data (the reference code min-max scaled its
labels on the whole data set). Two backends compute the same numbers: numpy (default) and torch
(float64, on a GPU when available; `_gcv_torch.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted, validate_data

from aligned_probing.probing._gcv import ridge_gcv

#: Backends of the closed-form solver.
BACKENDS: tuple[str, ...] = ("numpy", "torch")

if TYPE_CHECKING:  # persistence imports this module; import it lazily at run time
    from aligned_probing.probing.persistence import ProbeFingerprint

#: Default penalty grid for standardised features: 1e-2 .. 1e6 in half-decade steps (17 values).
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(10.0**e) for e in np.arange(-2.0, 6.01, 0.5))


def _target_names(y: Any) -> list[str] | None:
    if isinstance(y, pd.DataFrame):
        return [str(c) for c in y.columns]
    if isinstance(y, pd.Series) and y.name is not None:
        return [str(y.name)]
    return None


def check_alphas(alphas: Any) -> np.ndarray:
    """`alphas` as a float64 array; a ValueError unless it is a non-empty sequence of finite values > 0."""
    values = np.asarray(alphas, dtype=np.float64).reshape(-1)
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"alphas must be a non-empty sequence of finite values > 0, got {alphas!r}.")
    return values


def check_backend(backend: Any) -> str:
    """`backend` if it is one of `BACKENDS`; a ValueError names the allowed values otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    return str(backend)


class RidgeProbe(RegressorMixin, BaseEstimator):
    """Standardised ridge regression with one alpha per target chosen by leave-one-out error.

    Features are standardised with the training mean and standard deviation (`StandardScaler`), the
    ridge solution is computed in closed form, and the learned `coef_` and `intercept_` are mapped back
    to the original feature space, so `predict(X) = X @ coef_.T + intercept_` and `direction()` gives a
    vector that can be added to raw residual activations (steering).

    Args:
        alphas: Penalty grid (> 0) on the standardised features; the selected value per target is
            `alpha_`. A single value fixes alpha.
        backend: "numpy" (default) or "torch" (float64, same results to rounding; GPU when available).
        device: torch device for `backend="torch"`; None = "cuda" when available, else "cpu".

    Attributes:
        coef_: `[n_targets, n_features]` (or `[n_features]` for a 1-D `y`) in the original feature space.
        intercept_: `[n_targets]` (or a float).
        alpha_: Selected penalty per target (or a float).
        loo_mse_: Leave-one-out (leave-one-group-out with `groups`) mean squared error on the training
            data at `alpha_`.
        x_mean_, x_scale_: The standardisation fitted on the training data, `[n_features]`.
        target_names_: Target names (the columns of a DataFrame `y`, else "0", "1", ...).
        n_features_in_: Number of features seen in `fit`.

    Example:
        >>> probe = RidgeProbe().fit(X_train, targets[["toxicity", "insult"]])
        >>> r = np.corrcoef(probe.predict(X_test)[:, 0], y_test)[0, 1]
        >>> v = probe.direction("toxicity")  # unit vector in activation space
    """

    def __init__(
        self, alphas: Sequence[float] = DEFAULT_ALPHAS, backend: str = "numpy", device: str | None = None
    ):
        self.alphas = alphas
        self.backend = backend
        self.device = device

    def __sklearn_tags__(self):  # noqa: D105
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def fit(self, X: Any, y: Any, groups: Any = None) -> RidgeProbe:
        """Standardise `X`, fit every target and alpha at once, and keep the CV-best alpha per target.

        Args:
            X: Features `[n_samples, n_features]`.
            y: Targets `[n_samples]` or `[n_samples, n_targets]` (a DataFrame names the targets).
            groups: Optional group per sample (e.g. prompt id). Alpha is then chosen by exact
                leave-one-group-out error, so that rows sharing a group cannot vouch for each other;
                None (or all groups distinct) = leave-one-out.

        Returns:
            self.
        """
        names = _target_names(y)
        alphas = check_alphas(self.alphas)
        backend = check_backend(self.backend)
        X, y = validate_data(
            self, X, y, multi_output=True, y_numeric=True, dtype=np.float64, ensure_min_samples=2
        )
        y2 = y.reshape(len(y), -1)
        if backend == "torch":
            from aligned_probing.probing._gcv_torch import ridge_fit_torch

            tf = ridge_fit_torch(X[None], y2, alphas, groups=groups, device=self.device)
            coef, intercept, alpha, mse = tf.coef[0], tf.intercept[0], tf.alpha[0], tf.cv_mse[0]
            self.x_mean_, self.x_scale_ = tf.x_mean[0], tf.x_scale[0]
        else:
            scaler = StandardScaler().fit(X)
            Xc = X - scaler.mean_  # the standardisation X_s = Xc / scale is folded into the solver
            fit = ridge_gcv(Xc, y2, alphas, groups=groups, scale=scaler.scale_, centred=True)
            coef = fit.coef / scaler.scale_  # back to the original feature space
            intercept = fit.y_mean - coef @ scaler.mean_
            alpha, mse = fit.alpha, fit.loo_mse
            self.x_mean_, self.x_scale_ = scaler.mean_, scaler.scale_
        self.target_names_ = names if names is not None else [str(i) for i in range(y2.shape[1])]
        if y.ndim == 1:
            self.coef_, self.intercept_ = coef[0], float(intercept[0])
            self.alpha_, self.loo_mse_ = float(alpha[0]), float(mse[0])
        else:
            self.coef_, self.intercept_, self.alpha_, self.loo_mse_ = coef, intercept, alpha, mse
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Predictions `[n_samples]` or `[n_samples, n_targets]` (same dimensionality as the fitted `y`)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return X @ self.coef_.T + self.intercept_

    def direction(self, attribute: str | int = 0) -> np.ndarray:
        """Unit probe direction `coef / ||coef||` of one target, in the original (raw activation) space.

        This is the direction along which the probe's prediction rises fastest per unit of activation
        norm, i.e. what steering adds or subtracts.

        Args:
            attribute: A target name from `target_names_`, or its position.

        Returns:
            A float64 vector `[n_features]` of unit Euclidean norm.
        """
        check_is_fitted(self)
        if isinstance(attribute, str):
            if attribute not in self.target_names_:
                raise ValueError(f"attribute must be one of {self.target_names_}, got {attribute!r}.")
            index = self.target_names_.index(attribute)
        elif isinstance(attribute, int | np.integer) and 0 <= attribute < len(self.target_names_):
            index = int(attribute)
        else:
            raise ValueError(
                f"attribute must be a target name or an int in [0, {len(self.target_names_) - 1}], "
                f"got {attribute!r}."
            )
        coef = np.atleast_2d(self.coef_)[index]
        norm = float(np.linalg.norm(coef))
        if norm == 0.0:
            raise ValueError(
                f"The probe for {self.target_names_[index]!r} has an all-zero coefficient vector."
            )
        return coef / norm

    def save(self, path: str | Path, fingerprint: ProbeFingerprint) -> Path:
        """Write weights (safetensors) and config plus fingerprint (JSON); see `save_probe`."""
        from aligned_probing.probing.persistence import save_probe

        return save_probe(self, path, fingerprint)

    @classmethod
    def load(cls, path: str | Path, *, expect: ProbeFingerprint | None = None) -> RidgeProbe:
        """Read a probe written by `save`; `expect` (a `ProbeFingerprint`) must match; see `load_probe`."""
        from aligned_probing.probing.persistence import load_probe

        return load_probe(path, expect=expect)
