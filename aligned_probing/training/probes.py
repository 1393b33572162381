"""Logistic-regression toxicity probes and probe ensembles, saved as safetensors + JSON.

A probe is `StandardScaler` + L2 `LogisticRegression` (scikit-learn) on pooled residual activations
at one layer (labels: scorer toxicity >= 0.5). Because both steps are affine, a fitted probe is a
single direction in raw activation space, `logit = x @ weight_ + bias_`; the penalty and the
ensemble use that form in torch so that gradients pass through the frozen probe.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data


class LogisticProbe(ClassifierMixin, BaseEstimator):
    """L2 logistic regression on standardised features (standardisation fitted on the training part).

    Args:
        C: Inverse L2 strength of `LogisticRegression`.
        max_iter: Solver iterations.
        random_state: Seed passed to the solver (lbfgs is deterministic; kept for the contract).

    Attributes:
        scaler_: The fitted `StandardScaler`.
        classifier_: The fitted `LogisticRegression`.
        weight_: `[d]` direction in raw activation space.
        bias_: Scalar bias in raw activation space.
        classes_: The two class labels.
        n_features_in_: Feature count.
        n_iter_: Solver iterations used.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 1000, random_state: int | None = None) -> None:
        self.C = C
        self.max_iter = max_iter
        self.random_state = random_state

    def __sklearn_tags__(self):  # noqa: D105
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False  # a probe reads one binary label (toxic or not)
        return tags

    def fit(self, X: np.ndarray, y: np.ndarray) -> LogisticProbe:
        """Standardise `X` [n, d], fit the classifier on binary `y` [n], and fold both into one direction."""
        X, y = validate_data(self, X, y, reset=True, ensure_min_samples=2)
        if not self.C > 0:
            raise ValueError(f"C must be > 0, got {self.C!r}.")
        check_classification_targets(y)
        classes = np.unique(y)
        if len(classes) != 2:
            raise ValueError(
                f"Only binary classification is supported. y must contain exactly two classes "
                f"(toxic / non-toxic), got {classes.tolist()}."
            )
        self.scaler_ = StandardScaler().fit(X)
        self.classifier_ = LogisticRegression(
            C=self.C, max_iter=self.max_iter, random_state=self.random_state
        ).fit(self.scaler_.transform(X), y)
        self.classes_ = self.classifier_.classes_
        self.n_iter_ = self.classifier_.n_iter_
        # logit = ((x - mean) / scale) @ w + b = x @ (w / scale) + (b - mean @ (w / scale))
        w = self.classifier_.coef_[0] / self.scaler_.scale_
        self.weight_ = w
        self.bias_ = float(self.classifier_.intercept_[0] - self.scaler_.mean_ @ w)
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Logit of the positive class, `X @ weight_ + bias_`."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        return X @ self.weight_ + self.bias_

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """`[n, 2]` class probabilities (column 1 = toxic)."""
        check_is_fitted(self)
        p = 1.0 / (1.0 + np.exp(-self.decision_function(X)))
        return np.stack([1.0 - p, p], axis=1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class labels (threshold 0.5)."""
        check_is_fitted(self)
        return self.classes_[(self.decision_function(X) > 0).astype(int)]


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for binary `labels`, in [0, 1] (0.5 = chance).

    Returns NaN when `labels` has a single class, where AUROC is undefined.
    """
    labels = np.asarray(labels).astype(int)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


@dataclass
class ProbeSet:
    """Frozen probes at one layer as stacked raw-space directions, plus what they were fitted on.

    Attributes:
        weight: `[n_probes, d_model]` raw-space directions.
        bias: `[n_probes]` biases.
        meta: JSON-ready facts: `model`, `revision`, `hook_name`, `layer`, `pooling`, `d_model`,
            `n_probes`, seeds, `C`, and `fingerprint` of the training data.
    """

    weight: np.ndarray
    bias: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_probes(self) -> int:
        """Number of probes in the set."""
        return int(self.weight.shape[0])

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Mean logit over the probes, `[n]` (the ensemble's score; a single probe's logit for n=1)."""
        return (np.asarray(X, dtype=np.float64) @ self.weight.T + self.bias).mean(axis=1)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Mean P(toxic) over the probes, `[n]` in [0, 1]."""
        logits = np.asarray(X, dtype=np.float64) @ self.weight.T + self.bias
        return (1.0 / (1.0 + np.exp(-logits))).mean(axis=1)

    def subset(self, indices: list[int]) -> ProbeSet:
        """The probes at `indices` as a new set (e.g. probe 0 as the single training probe)."""
        return ProbeSet(self.weight[indices], self.bias[indices], {**self.meta, "n_probes": len(indices)})

    def save(self, path: str | Path) -> Path:
        """Write `probes.safetensors` and `probes.json` into directory `path`."""
        from safetensors.numpy import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {"weight": self.weight.astype(np.float32), "bias": self.bias.astype(np.float32)},
            str(path / "probes.safetensors"),
        )
        (path / "probes.json").write_text(json.dumps(self.meta, indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: str | Path, *, expect: dict[str, Any] | None = None) -> ProbeSet:
        """Load a saved set and check `expect` (e.g. `{"hook_name": ..., "d_model": ...}`) against its meta.

        Raises:
            ValueError: When a recorded fact differs from `expect` (the probe was fitted elsewhere).
        """
        from safetensors.numpy import load_file

        path = Path(path)
        tensors = load_file(str(path / "probes.safetensors"))
        meta = json.loads((path / "probes.json").read_text())
        for key, value in (expect or {}).items():
            if meta.get(key) != value:
                raise ValueError(
                    f"Probe set at {path} was fitted with {key}={meta.get(key)!r}, expected {value!r}; "
                    "refit the probes for this model/layer."
                )
        return cls(tensors["weight"].astype(np.float64), tensors["bias"].astype(np.float64), meta)


def data_fingerprint(X: np.ndarray, y: np.ndarray) -> str:
    """sha256 (16 hex digits) of the training activations and labels."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(X, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(y, dtype=np.int8).tobytes())
    return h.hexdigest()[:16]


def fit_probe_set(
    X: np.ndarray,
    y: np.ndarray,
    *,
    n_probes: int = 1,
    subsample: float = 0.8,
    C: float = 1.0,
    seed: int = 0,
    meta: dict[str, Any] | None = None,
) -> ProbeSet:
    """Fit `n_probes` probes, each on its own random subset of the rows and its own seed.

    With `n_probes=1` the single probe uses all rows. Subsets are stratified draws without
    replacement (`subsample` of each class), so every probe sees both classes.

    Args:
        X: `[n, d]` activations.
        y: `[n]` binary labels.
        n_probes: Number of probes (an ensemble when > 1).
        subsample: Fraction of each class per probe, in (0, 1].
        C: Inverse L2 strength.
        seed: Base seed; probe i uses `seed + i`.
        meta: Facts to record (model, hook name, layer, pooling ...).

    Returns:
        The fitted `ProbeSet`.
    """
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}.")
    if not 0 < subsample <= 1:
        raise ValueError(f"subsample must be in (0, 1], got {subsample}.")
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y).astype(int)
    weights, biases = [], []
    for i in range(n_probes):
        rng = np.random.default_rng(seed + i)
        if n_probes == 1 or subsample == 1:
            rows = np.arange(len(y))
        else:
            rows = np.concatenate(
                [
                    rng.choice(idx, size=max(1, int(round(subsample * len(idx)))), replace=False)
                    for idx in (np.flatnonzero(y == c) for c in (0, 1))
                ]
            )
        probe = LogisticProbe(C=C, random_state=seed + i).fit(X[rows], y[rows])
        weights.append(probe.weight_)
        biases.append(probe.bias_)
    info = {
        **(meta or {}),
        "n_probes": n_probes,
        "seeds": [seed + i for i in range(n_probes)],
        "C": C,
        "subsample": subsample,
        "d_model": int(X.shape[1]),
        "n_train": int(len(y)),
        "fingerprint": data_fingerprint(X, y),
    }
    return ProbeSet(np.stack(weights), np.asarray(biases), info)
