"""load_results gives a notebook the tables, continuations, stores and probes fitted on all prompts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aligned_probing import pipeline
from aligned_probing.pipeline.config import RunConfig
from tests._tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory):
    """One tiny model (2 templates) through the probe stage; probing only the input and output scenarios."""
    root = tmp_path_factory.mktemp("results_cfg")
    shutil.copy(ROOT / "tests" / "data" / "tiny.toml", root / "tiny.toml")
    build_tiny_model(root / "tiny-a", seed=0)
    cfg = RunConfig.from_toml(
        root / "tiny.toml",
        overrides=[
            f'output.run_dir="{root / "run"}"', "causal.enabled=false", "generation.templates=[0, 1]",
            'probing.scenarios=["input", "output"]', "probing.control=false", "probing.mdl=false",
        ],
    )
    data = cfg.model_dump(mode="json")
    cfg = RunConfig.from_dict({**data, "models": data["models"][:1]})
    pipeline.run(cfg, stages=["probe"], progress=False)
    return cfg


@pytest.mark.slow
def test_results_hold_continuations_stores_and_probes(probed_run):
    from aligned_probing import load_results

    res = load_results(probed_run.output.run_dir)
    assert set(res.continuations["template"]) == {0, 1} and len(res.probing)
    assert sorted(res.stores) == [("tiny-a", 0), ("tiny-a", 1)]
    store = res.stores["tiny-a", 1]
    assert (store.model_name, store.template) == ("tiny-a", 1)
    attributes = sorted(res.probing["attribute"].unique())
    n_layers = store.n_layers + 1
    # templates x layers x scenarios x attributes
    assert len(res.probes) == 2 * n_layers * 2 * len(attributes)
    assert set(res.probes["scenario"]) == {"input", "output"}
    with pytest.raises(LookupError, match=r"template must be one of \[0, 1\]"):
        res.probe(layer=1)


@pytest.mark.slow
def test_saved_probe_is_the_ridge_fit_on_all_prompts(probed_run):
    """The saved input probe equals a RidgeProbe fitted here on the first store row of every prompt."""
    from aligned_probing import RidgeProbe, load_results

    res = load_results(probed_run.output.run_dir)
    probe = res.probe(layer=2, scenario="input", attribute="toxicity", template=0)
    store = res.stores["tiny-a", 0]
    first = ~store.index["prompt_id"].duplicated().to_numpy()
    y = store.index.loc[first, "prompt_id"].map(res.prompts.set_index("prompt_id")["prompt_toxicity"])
    X = store.layer(2, "input", "mean")[first]
    expected = RidgeProbe(alphas=probed_run.probing.alphas).fit(X, y.to_numpy())
    np.testing.assert_allclose(probe.coef_, expected.coef_, rtol=1e-10, atol=1e-12)
    assert probe.alpha_ == expected.alpha_
    fp = probe.fingerprint_
    assert (fp.model_name, fp.layer, fp.pooling, fp.d_model) == ("tiny-a", 2, "mean", store.d_model)
    assert fp.hook_name == "blocks.1.hook_resid_post"
    # A notebook's predictions with it match the input scenario's signal direction.
    pred = probe.predict(store.layer(2, "input", "mean")[first])
    assert np.corrcoef(pred, y)[0, 1] > 0


def test_causal_stage_fits_its_probes_without_the_intervention_prompts(probed_run, monkeypatch):
    # Issue 16 asks that the causal read-out/steering probes never see the prompts the interventions run
    # on, so the causal stage refits without them instead of reusing the probe stage's all-prompt probes
    # (those serve notebooks: `load_results(...).probe()`).
    from aligned_probing.causal import stage as causal_stage

    plan = pipeline.build_plan(RunConfig.from_dict({**probed_run.model_dump(mode="json"),
                                                    "causal": {"enabled": True, "layers": [1, 2]}}))
    causal = next(s for s in plan if s.name == "causal")
    seen = {}

    def record(*args, exclude=frozenset(), **kwargs):
        seen["exclude"] = exclude
        return {}

    monkeypatch.setattr(causal_stage, "_fit_probes", record)
    task = causal_stage._Task({"storage_options": {}, "settings": causal.settings, "out_dir": Path("x"),
                               "store_dir": Path("x")})
    monkeypatch.setattr(task, "held_out", lambda prompts: frozenset({"p1", "p2"}))
    task.probes(pd.DataFrame(), [2, 1, 2])
    assert seen["exclude"] == frozenset({"p1", "p2"})


@pytest.mark.slow
def test_a_saved_probe_exports_as_its_steering_vector(probed_run, tmp_path):
    from safetensors.torch import load_file

    from aligned_probing import export_steering_vector, load_results

    probe = load_results(probed_run.output.run_dir).probe(layer=2, template=0)
    path = export_steering_vector(probe, tmp_path / "tox.safetensors", layer=2, alpha=-3.0)
    vector = load_file(path)["1"].double().numpy()
    np.testing.assert_allclose(vector, -3.0 * probe.direction(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="fitted at layer 2, got layer=3"):
        export_steering_vector(probe, tmp_path / "x.safetensors", layer=3)
