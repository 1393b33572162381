"""Save and load a fitted `RidgeProbe` as safetensors weights plus a JSON config and fingerprint (no pickle).

The fingerprint says what the probe was fitted on (model, revision, hook, layer, pooling, d_model), so
that a probe is never silently applied to activations of another model or layer: `load_probe(expect=...)`
raises on any mismatch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from aligned_probing.probing.ridge import RidgeProbe

_FORMAT = "aligned-probing/ridge-probe"
_VERSION = 1
WEIGHTS_FILE = "probe.safetensors"
CONFIG_FILE = "probe.json"


@dataclass(frozen=True)
class ProbeFingerprint:
    """What a probe was fitted on; compared field by field when loading.

    Args:
        model_name: Model name (as in the activation store).
        revision: Model revision or weights hash (None when unknown).
        hook_name: TransformerLens hook of the layer, e.g. "blocks.4.hook_resid_post".
        layer: Residual layer index (0 = embeddings).
        pooling: Pooling of the activations ("mean", "last", ...).
        d_model: Feature width; must equal the probe's `n_features_in_`.
    """

    model_name: str
    revision: str | None
    hook_name: str
    layer: int
    pooling: str
    d_model: int


def save_probe(probe: RidgeProbe, path: str | Path, fingerprint: ProbeFingerprint) -> Path:
    """Write `path/probe.safetensors` (arrays) and `path/probe.json` (params, target names, fingerprint).

    Args:
        probe: A fitted `RidgeProbe`.
        path: Directory (created if missing).
        fingerprint: What the probe was fitted on; `d_model` must equal `probe.n_features_in_`.

    Returns:
        The directory.
    """
    if not isinstance(fingerprint, ProbeFingerprint):
        raise TypeError(f"fingerprint must be a ProbeFingerprint, got {type(fingerprint).__name__}.")
    if not hasattr(probe, "coef_"):
        raise ValueError("probe must be fitted before saving (call fit first).")
    if fingerprint.d_model != probe.n_features_in_:
        raise ValueError(
            f"fingerprint.d_model ({fingerprint.d_model}) must equal the probe's n_features_in_ "
            f"({probe.n_features_in_})."
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    one_d = np.ndim(probe.coef_) == 1
    tensors = {
        "coef": np.atleast_2d(probe.coef_),
        "intercept": np.atleast_1d(probe.intercept_),
        "alpha": np.atleast_1d(probe.alpha_),
        "loo_mse": np.atleast_1d(probe.loo_mse_),
        "x_mean": probe.x_mean_,
        "x_scale": probe.x_scale_,
    }
    save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()}, path / WEIGHTS_FILE)
    config = {
        "format": _FORMAT,
        "version": _VERSION,
        "params": {"alphas": [float(a) for a in np.atleast_1d(probe.alphas)]},
        "target_names": list(probe.target_names_),
        "one_d_target": one_d,
        "fingerprint": asdict(fingerprint),
    }
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return path


def load_probe(path: str | Path, *, expect: ProbeFingerprint | None = None) -> RidgeProbe:
    """Read a probe written by `save_probe`; the result has a `fingerprint_` attribute.

    Args:
        path: The directory given to `save_probe`.
        expect: If given, every fingerprint field must equal the saved one.

    Returns:
        A fitted `RidgeProbe` with the saved parameters and learned attributes.

    Raises:
        ValueError: The files are not a probe, or the fingerprint differs from `expect`.
    """
    path = Path(path)
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("format") != _FORMAT or config.get("version") != _VERSION:
        raise ValueError(
            f"{path / CONFIG_FILE} is not a {_FORMAT} v{_VERSION} file (format={config.get('format')!r}, "
            f"version={config.get('version')!r})."
        )
    saved = ProbeFingerprint(**{f.name: config["fingerprint"][f.name] for f in fields(ProbeFingerprint)})
    if expect is not None:
        diffs = [
            f"{f.name}: saved {getattr(saved, f.name)!r}, expected {getattr(expect, f.name)!r}"
            for f in fields(ProbeFingerprint)
            if getattr(saved, f.name) != getattr(expect, f.name)
        ]
        if diffs:
            raise ValueError(f"Probe fingerprint mismatch in {path}: " + "; ".join(diffs) + ".")
    t = load_file(path / WEIGHTS_FILE)
    probe = RidgeProbe(alphas=tuple(config["params"]["alphas"]))
    probe.x_mean_, probe.x_scale_ = t["x_mean"], t["x_scale"]
    probe.n_features_in_ = int(t["coef"].shape[1])
    probe.target_names_ = list(config["target_names"])
    if config["one_d_target"]:
        probe.coef_, probe.intercept_ = t["coef"][0], float(t["intercept"][0])
        probe.alpha_, probe.loo_mse_ = float(t["alpha"][0]), float(t["loo_mse"][0])
    else:
        probe.coef_, probe.intercept_, probe.alpha_, probe.loo_mse_ = (
            t["coef"],
            t["intercept"],
            t["alpha"],
            t["loo_mse"],
        )
    probe.fingerprint_ = saved
    return probe
