"""Probe save/load: exact round trip, no pickle, fingerprint checked."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from aligned_probing.probing import ProbeFingerprint, RidgeProbe, load_probe


@pytest.fixture
def fingerprint():
    return ProbeFingerprint(
        model_name="smollm2-135m-instruct",
        revision="abc123",
        hook_name="blocks.3.hook_resid_post",
        layer=4,
        pooling="mean",
        d_model=8,
    )


@pytest.mark.parametrize("two_d", [True, False])
def test_round_trip(rng, tmp_path, fingerprint, two_d):
    X = rng.normal(size=(40, 8))
    y = (
        pd.DataFrame(rng.normal(size=(40, 2)), columns=["toxicity", "insult"])
        if two_d
        else rng.normal(size=40)
    )
    probe = RidgeProbe(alphas=(0.1, 1.0, 10.0)).fit(X, y)
    probe.save(tmp_path / "p", fingerprint)
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["probe.json", "probe.safetensors"]
    loaded = RidgeProbe.load(tmp_path / "p", expect=fingerprint)
    X_new = rng.normal(size=(10, 8))
    np.testing.assert_array_equal(loaded.predict(X_new), probe.predict(X_new))
    np.testing.assert_array_equal(loaded.direction(0), probe.direction(0))
    assert loaded.get_params()["alphas"] == (0.1, 1.0, 10.0)
    assert loaded.target_names_ == probe.target_names_
    np.testing.assert_array_equal(loaded.alpha_, probe.alpha_)
    assert loaded.fingerprint_ == fingerprint
    config = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert config["fingerprint"]["hook_name"] == "blocks.3.hook_resid_post"


def test_fingerprint_mismatch_is_an_error(rng, tmp_path, fingerprint):
    RidgeProbe().fit(rng.normal(size=(20, 8)), rng.normal(size=20)).save(tmp_path, fingerprint)
    other = dataclasses.replace(fingerprint, layer=5, model_name="gemma-3-270m")
    with pytest.raises(
        ValueError,
        match="model_name: saved 'smollm2-135m-instruct', expected 'gemma-3-270m'; "
        "layer: saved 4, expected 5",
    ):
        load_probe(tmp_path, expect=other)


def test_save_errors(rng, tmp_path, fingerprint):
    with pytest.raises(ValueError, match="must be fitted"):
        RidgeProbe().save(tmp_path, fingerprint)
    probe = RidgeProbe().fit(rng.normal(size=(20, 5)), rng.normal(size=20))
    with pytest.raises(
        ValueError, match=r"fingerprint.d_model \(8\) must equal the probe's n_features_in_ \(5\)"
    ):
        probe.save(tmp_path, fingerprint)
    with pytest.raises(TypeError, match="fingerprint must be a ProbeFingerprint"):
        probe.save(tmp_path, {"layer": 1})
