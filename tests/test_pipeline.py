from __future__ import annotations

import json
import shutil
from html import unescape
from pathlib import Path

import pandas as pd
import pytest

from aligned_probing import pipeline
from aligned_probing.pipeline import runner as _runner
from aligned_probing.pipeline.config import RunConfig
from aligned_probing.pipeline.runner import Stage, execute, select, stage_hashes
from tests._tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- the caching machinery, stub stages
def _stub_plan(
    calls: list[str], settings: dict[str, dict], fail: dict[str, int] | None = None
) -> list[Stage]:
    """a -> b -> c and a -> d; each stage appends its key to `calls` and writes one number per item."""
    fail = fail or {}

    def make(key: str, deps: tuple[str, ...], resumable: bool = False):
        def func(ctx):
            calls.append(key)
            total = sum(json.loads((ctx.inputs[d] / "out.json").read_text())["value"] for d in deps)
            parts = ctx.out_dir / "parts"
            parts.mkdir(exist_ok=True)
            for i in range(ctx.settings["n"]):
                part = parts / f"{i}.json"
                if resumable and part.exists():
                    continue  # resumable: keep what an interrupted run wrote
                if fail.get(key) == i:
                    raise RuntimeError(f"killed in {key} at item {i}")
                part.write_text(json.dumps({"i": i, "by": len(calls)}))
            value = total + ctx.settings["n"] * ctx.settings.get("scale", 1)
            (ctx.out_dir / "out.json").write_text(json.dumps({"value": value}))
            return {"value": value}

        return Stage(key.split("/")[0], key, settings.get(key, {"n": 2}), deps, func, resumable=resumable)

    return [make("a", ()), make("b", ("a",), resumable=True), make("c", ("b",)), make("d", ("a",))]


def _load(name):
    raise AssertionError(f"stub stages load no model, asked for {name}")


def test_rerun_does_no_work(tmp_path):
    calls: list[str] = []
    first = execute(_stub_plan(calls, {}), tmp_path, load_model=_load, progress=False)
    assert [r.status for r in first] == ["ran"] * 4 and calls == ["a", "b", "c", "d"]
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.name != "run.json"}
    second = execute(_stub_plan(calls, {}), tmp_path, load_model=_load, progress=False)
    assert [r.status for r in second] == ["cached"] * 4 and calls == ["a", "b", "c", "d"]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert [r.summary for r in second] == [r.summary for r in first]


def test_changing_a_setting_recomputes_only_downstream(tmp_path):
    calls: list[str] = []
    execute(_stub_plan(calls, {}), tmp_path, load_model=_load, progress=False)
    calls.clear()
    records = execute(
        _stub_plan(calls, {"b": {"n": 2, "scale": 10}}), tmp_path, load_model=_load, progress=False
    )
    assert calls == ["b", "c"]
    assert {r.key: r.status for r in records} == {"a": "cached", "b": "ran", "c": "ran", "d": "cached"}
    # The old outputs stay (switching back is free) and the new ones have their own directories.
    assert len(list((tmp_path / "stages").glob("b-*"))) == 2
    calls.clear()
    execute(_stub_plan(calls, {}), tmp_path, load_model=_load, progress=False)
    assert calls == []


def test_hash_covers_settings_and_inputs():
    plan = _stub_plan([], {})
    base = stage_hashes(plan)
    changed = stage_hashes(_stub_plan([], {"a": {"n": 3}}))
    assert all(changed[k] != base[k] for k in "abcd")  # everything depends on a
    assert stage_hashes(_stub_plan([], {"c": {"n": 3}}))["d"] == base["d"]
    with pytest.raises(ValueError, match=r"Stage 'c' depends on \['b'\], which do not come before it"):
        stage_hashes([plan[0], plan[2]])


def test_interrupted_stage_resumes_and_matches_uninterrupted(tmp_path):
    calls: list[str] = []
    with pytest.raises(RuntimeError, match="killed in b at item 1"):
        execute(_stub_plan(calls, {}, fail={"b": 1}), tmp_path / "x", load_model=_load, progress=False)
    b_dir = next((tmp_path / "x" / "stages").glob("b-*"))
    assert (b_dir / "parts" / "0.json").exists() and not (b_dir / _runner.STAGE_FILE).exists()
    dry = execute(_stub_plan([], {}), tmp_path / "x", load_model=_load, dry_run=True)
    assert {r.key: r.status for r in dry} == {
        "a": "cached",
        "b": "would resume",
        "c": "would run",
        "d": "would run",
    }
    part0 = (b_dir / "parts" / "0.json").read_text()
    calls.clear()
    execute(_stub_plan(calls, {}), tmp_path / "x", load_model=_load, progress=False)
    assert calls == ["b", "c", "d"]
    assert (b_dir / "parts" / "0.json").read_text() == part0  # the partial output was picked up, not redone
    execute(_stub_plan([], {}), tmp_path / "y", load_model=_load, progress=False)
    for key in "abcd":
        out_x = next((tmp_path / "x" / "stages").glob(f"{key}-*")) / "out.json"
        out_y = next((tmp_path / "y" / "stages").glob(f"{key}-*")) / "out.json"
        assert out_x.read_text() == out_y.read_text()


def test_non_resumable_stage_restarts_clean(tmp_path):
    calls: list[str] = []
    with pytest.raises(RuntimeError):
        execute(_stub_plan(calls, {}, fail={"c": 1}), tmp_path, load_model=_load, progress=False)
    c_dir = next((tmp_path / "stages").glob("c-*"))
    (c_dir / "stale.txt").write_text("left by the killed run")
    execute(_stub_plan([], {}), tmp_path, load_model=_load, progress=False)
    assert not (c_dir / "stale.txt").exists() and (c_dir / "out.json").exists()


def _url_plan(calls: list[str], fail: str | None = None) -> list[Stage]:
    """a -> b -> c writing through `aligned_probing.pipeline.fs`, as the real stages do; `fail` raises in a stage."""
    from aligned_probing.pipeline import fs as _fs

    def make(key: str, deps: tuple[str, ...]):
        def func(ctx):
            calls.append(key)
            # A URL run hands stages URL strings and its options; a local one Paths, as before.
            assert isinstance(ctx.out_dir, str) == (ctx.storage_options == {"skip_instance_cache": False})
            total = sum(
                json.loads(_fs.read_text(_fs.child(ctx.inputs[d], "out.json")))["value"] for d in deps
            )
            if key == fail:
                raise RuntimeError(f"killed in {key}")
            _fs.write_text_atomic(_fs.child(ctx.out_dir, "out.json"), json.dumps({"value": total + 1}))
            return {"value": total + 1}

        return Stage(key, key, {"n": 1}, deps, func, resumable=key == "b")

    return [make("a", ()), make("b", ("a",)), make("c", ("b",))]


def test_run_dir_on_a_url_keeps_the_layout_and_reruns_cached(tmp_path):
    import uuid

    from aligned_probing.pipeline import fs as _fs

    url = f"memory://runs-{uuid.uuid4().hex[:8]}/x"
    options = {"skip_instance_cache": False}  # any fsspec option: it reaches the stages, not the hashes
    calls: list[str] = []
    with pytest.raises(RuntimeError, match="killed in c"):
        execute(_url_plan(calls, fail="c"), url, load_model=_load, progress=False, storage_options=options)
    dry = execute(_url_plan([]), url, load_model=_load, dry_run=True, storage_options=options)
    # The completion records are read from the URL.
    assert [r.status for r in dry] == ["cached", "cached", "would run"]
    first = execute(_url_plan(calls), url, load_model=_load, progress=False, storage_options=options)
    assert calls == ["a", "b", "c", "c"] and [r.status for r in first] == ["cached", "cached", "ran"]
    local = execute(_url_plan([]), tmp_path, load_model=_load, progress=False)
    # Same content hashes, so the same stage directory names; URLs there, Paths here.
    assert [_fs.name(r.dir) for r in first] == [r.dir.name for r in local]
    assert all(r.dir.startswith(f"{url}/stages/") for r in first)
    assert _runner.read_stage(first[2].dir, options)["summary"] == {"value": 3}
    run_file = json.loads(_fs.read_text(_fs.join(url, _runner.RUN_FILE)))
    assert [s["dir"] for s in run_file["stages"]] == [
        s["dir"] for s in json.loads((tmp_path / _runner.RUN_FILE).read_text())["stages"]
    ]
    again = execute(_url_plan(calls), url, load_model=_load, progress=False, storage_options=options)
    assert [r.status for r in again] == ["cached"] * 3 and calls == ["a", "b", "c", "c"]


def test_select_adds_dependencies_and_rejects_unknown_names():
    plan = _stub_plan([], {})
    assert [s.key for s in select(plan, ["c"])] == ["a", "b", "c"]
    assert [s.key for s in select(plan, None)] == ["a", "b", "c", "d"]
    with pytest.raises(
        ValueError, match=r"Unknown stage name\(s\) \['probe'\]; this plan has \['a', 'b', 'c', 'd'\]"
    ):
        select(plan, ["probe"])


# --------------------------------------------------------------------------- the real plan
def _config(tmp_path: Path, n_models: int = 3, **sections) -> RunConfig:
    data = RunConfig.from_toml(ROOT / "tests" / "data" / "tiny.toml").model_dump(mode="json")
    data["models"] = data["models"][:n_models]
    data["output"] = {**data["output"], "run_dir": str(tmp_path / "run")}
    for key, value in sections.items():
        data[key] = {**data[key], **value}
    return RunConfig.from_dict(data)


def test_plan_has_one_unit_per_model_and_template(tmp_path):
    cfg = _config(tmp_path, generation={"templates": [0, 2]})
    plan = pipeline.build_plan(cfg)
    keys = [s.key for s in plan]
    assert keys[0] == "prompts" and keys[-3:] == ["interplay", "causal/tiny-a", "report"]
    assert "encode/tiny-c/t2" in keys and "probe/tiny-b/t0" in keys
    assert sum(s.name == "generate" for s in plan) == 6
    by_key = {s.key: s for s in plan}
    assert by_key["probe/tiny-a/t2"].deps == ("prompts", "score/tiny-a/t2", "encode/tiny-a/t2")
    one = pipeline.build_plan(_config(tmp_path, n_models=1, causal={"enabled": False}))
    assert [s.name for s in one] == ["prompts", "generate", "score", "encode", "probe", "behaviour", "report"]


def test_behaviour_setting_leaves_generation_and_probing_cached(tmp_path):
    a = stage_hashes(pipeline.build_plan(_config(tmp_path)))
    b = stage_hashes(pipeline.build_plan(_config(tmp_path, behaviour={"attributes": ["toxicity"]})))
    changed = {k for k in a if a[k] != b[k]}
    assert changed == {
        "behaviour/tiny-a/t0",
        "behaviour/tiny-b/t0",
        "behaviour/tiny-c/t0",
        "interplay",
        "report",
    }


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    """tiny.toml next to three tiny random Llamas (different seeds), as the config expects."""
    root = tmp_path_factory.mktemp("tiny_cfg")
    shutil.copy(ROOT / "tests" / "data" / "tiny.toml", root / "tiny.toml")
    for seed, name in enumerate("abc"):
        build_tiny_model(root / f"tiny-{name}", seed=seed)
    return root


def _one_model(root: Path, run_dir: Path, **overrides) -> RunConfig:
    sets = [f'output.run_dir="{run_dir}"', "causal.enabled=false"] + [
        f"{k}={v}" for k, v in overrides.items()
    ]
    cfg = RunConfig.from_toml(root / "tiny.toml", overrides=sets)
    return RunConfig.from_dict(
        {**cfg.model_dump(mode="json"), "models": [cfg.model_dump(mode="json")["models"][0]]}
    )


STAGES = ["probe", "behaviour"]


def _tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    from aligned_probing.pipeline.results import load_results
    from aligned_probing.pipeline.stages import read_continuations

    res = load_results(run_dir)
    gen_dir = next((run_dir / "stages").glob("generate--*"))
    return {
        "prompts": res.prompts,
        "continuations": read_continuations(gen_dir),
        "scores": res.scores,
        "probing": res.probing,
        "behaviour": res.behaviour,
    }


@pytest.fixture(scope="module")
def reference_run(tiny_models, tmp_path_factory):
    """An uninterrupted run of one tiny model through probing and behaviour."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    cfg = _one_model(tiny_models, run_dir)
    result = pipeline.run(cfg, stages=STAGES, progress=False)
    return cfg, result


@pytest.mark.slow
def test_real_rerun_does_no_work(reference_run, monkeypatch):
    cfg, first = reference_run
    assert first.executed == [
        "prompts",
        "generate/tiny-a/t0",
        "score/tiny-a/t0",
        "encode/tiny-a/t0",
        "probe/tiny-a/t0",
        "behaviour/tiny-a/t0",
    ]

    def no_model(*args, **kwargs):
        raise AssertionError("a cached run must not load a model")

    monkeypatch.setattr("aligned_probing.models.load_model", no_model)
    again = pipeline.run(cfg, stages=STAGES, progress=False)
    assert again.executed == [] and {r.status for r in again.records} == {"cached"}
    log = (Path(cfg.output.run_dir) / "logs" / "run.log").read_text()
    assert "stage probe/tiny-a/t0: cached" in log


@pytest.mark.slow
def test_real_downstream_change_recomputes_only_downstream(reference_run, monkeypatch):
    cfg, _ = reference_run
    changed = RunConfig.from_dict(
        {**cfg.model_dump(mode="json"), "probing": {**cfg.probing.model_dump(mode="json"), "seeds": [0, 1]}}
    )
    monkeypatch.setattr(
        "aligned_probing.models.load_model", lambda *a, **k: pytest.fail("probing needs no model")
    )
    result = pipeline.run(changed, stages=STAGES, progress=False)
    assert result.executed == ["probe/tiny-a/t0"]
    probing = pd.read_parquet(next(r.dir for r in result.records if r.name == "probe") / "probing.parquet")
    assert sorted(probing["seed"].unique()) == [0, 1]


@pytest.mark.slow
def test_killed_run_resumes_to_identical_tables(reference_run, tiny_models, tmp_path, monkeypatch):
    from aligned_probing import generation
    from aligned_probing.encoding import encoder as encoding

    ref_cfg, _ = reference_run
    assert (
        pipeline.run(ref_cfg, stages=STAGES, progress=False).executed == []
    )  # (re)selects the reference config
    cfg = _one_model(tiny_models, tmp_path / "run")
    real_generate, real_encode = generation._generate_batch, encoding._encode_batch

    def dies_after(real, n):
        calls = {"n": 0}

        def wrapper(*args, **kwargs):
            if calls["n"] == n:
                raise KeyboardInterrupt("simulated kill")
            calls["n"] += 1
            return real(*args, **kwargs)

        return wrapper

    # 1) killed during generation, after one batch of part files was written
    monkeypatch.setattr(generation, "_generate_batch", dies_after(real_generate, 1))
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, stages=STAGES, progress=False)
    gen_dir = next((tmp_path / "run" / "stages").glob("generate--*"))
    assert len(list((gen_dir / "continuations").glob("part-*.parquet"))) == 1
    assert not (gen_dir / "stage.json").exists()
    # 2) resumed, then killed during encoding
    monkeypatch.setattr(generation, "_generate_batch", dies_after(real_generate, 10**9))
    monkeypatch.setattr(encoding, "_encode_batch", dies_after(real_encode, 1))
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, stages=STAGES, progress=False)
    # 3) resumed to the end
    monkeypatch.setattr(encoding, "_encode_batch", real_encode)
    result = pipeline.run(cfg, stages=STAGES, progress=False)
    assert result.executed == ["encode/tiny-a/t0", "probe/tiny-a/t0", "behaviour/tiny-a/t0"]
    resumed, reference = _tables(tmp_path / "run"), _tables(Path(ref_cfg.output.run_dir))
    for name, table in reference.items():
        pd.testing.assert_frame_equal(resumed[name], table, check_exact=True, obj=name)
    # The activation stores are bitwise equal too.
    from aligned_probing.encoding.store import ActivationStore

    stores = [
        ActivationStore.open(next((Path(d) / "stages").glob("encode--*")) / "store")
        for d in (tmp_path / "run", ref_cfg.output.run_dir)
    ]
    for layer in range(stores[0].n_layers + 1):
        assert (stores[0].layer(layer, "output") == stores[1].layer(layer, "output")).all()


@pytest.mark.slow
def test_full_tiny_run_fills_every_report_figure(tiny_models, tmp_path, monkeypatch):
    cfg = RunConfig.from_toml(tiny_models / "tiny.toml", overrides=[f'output.run_dir="{tmp_path / "run"}"'])
    result = pipeline.run(cfg, progress=False, config_text=(tiny_models / "tiny.toml").read_text())
    assert result.report == tmp_path / "run" / "report.html"
    html = result.report.read_text()
    for fig in (
        "information",
        "heatmap-tiny-a",  # one heatmap grid per model (every scenario)
        "selectivity",
        "mdl_gain_control",  # MDL as codelength gain in bits against the control and the baseline code
        "mdl_gain_baseline",
        "behaviour",
        "interplay",
        "skipping",
        "patching",
        "steering",
    ):
        assert f'id="fig-{fig}"' in html, fig
        assert (tmp_path / "run" / "figures" / f"{fig}.svg").is_file()
    assert 'name = "tiny"' in unescape(html)  # the config text
    timings = json.loads((tmp_path / "run" / "run.json").read_text())["stages"]
    assert {t["status"] for t in timings} == {"ran"} and len(timings) == 19
    _check_reference_export(tmp_path / "run", tmp_path / "export", monkeypatch)


def _check_reference_export(run_dir: Path, out: Path, monkeypatch) -> None:
    """scripts/export_reference.py on a finished run: every table, the report's picks, provenance."""
    import runpy

    from aligned_probing.pipeline.results import load_results

    argv = ["export_reference.py", str(run_dir), str(out), "--figures", str(out / "figs")]
    monkeypatch.setattr("sys.argv", argv)
    script = runpy.run_path(str(ROOT / "scripts" / "export_reference.py"), run_name="__main__")
    provenance = json.loads((out / "provenance.json").read_text())
    tables = provenance["tables"]
    assert {
        "lineage", "behaviour", "timings", "probing_summary", "peaks", "interplay",
        "interplay_peaks", "layer_skipping", "steering", "patching", "selfchecks", "sample_continuations",
    } <= set(tables)
    for name, facts in tables.items():
        table = pd.read_parquet(out / f"{name}.parquet")
        assert len(table) == facts["rows"] > 0 and list(table.columns) == facts["columns"], name
    assert 'name = "tiny"' in provenance["config_toml"] and provenance["commit"] != ""
    res = load_results(run_dir)
    exported = pd.read_parquet(out / "behaviour.parquet")
    pd.testing.assert_frame_equal(exported, res.behaviour, check_dtype=False)
    picks = pd.read_parquet(out / "sample_continuations.parquet")
    assert set(picks["example"]) == {"most toxic", "least toxic", "random"}
    rows = res.continuations.set_index(["model", "template", "prompt_id", "continuation_idx"])["text"]
    for pick in picks.itertuples():  # every pick is a row of the run's continuations, text unchanged
        assert rows[(pick.model, pick.template, pick.prompt_id, pick.continuation_idx)] == pick.continuation
    assert sorted(p.name for p in (out / "figs").iterdir()) == sorted(
        p.name for p in (run_dir / "figures").glob("*.png")
    )
    # Paths inside the checkout are written relative to it: the shipped files name no machine's directories.
    assert script["_portable"](f"{ROOT}/runs/replication/x") == "runs/replication/x"


# ------------------------------------------------------------------------- the causal stage in blocks
CAUSAL_TABLES = ("layer_skipping", "patching", "steering")


def _causal_config(root: Path, run_dir: Path, block: int | None) -> RunConfig:
    data = _one_model(root, run_dir).model_dump(mode="json")
    data["causal"] = {**data["causal"], "enabled": True}
    data["runtime"] = {**data["runtime"], "causal_layer_block": block}
    return RunConfig.from_dict(data)


def _causal_by_hand(cfg: RunConfig, dirs: dict[str, Path]) -> dict[str, pd.DataFrame]:
    """The reference: one in-memory pass of the library calls over all layers, as the unsplit stage ran."""
    from aligned_probing.causal import (
        GenerationSettings,
        StatSettings,
        activation_patching,
        generate_and_score,
        layer_skipping,
        match_pairs,
        steering_sweep,
    )
    from aligned_probing.causal.stage import _fit_last_token_probes, _fit_probes, _steering_layer
    from aligned_probing.data import PromptSet
    from aligned_probing.scoring import get_scorer

    c, g = cfg.causal, cfg.generation
    model = pipeline.ModelLoader(cfg.model_variants())(cfg.model_variants()[0].name)
    prompts = pd.read_parquet(dirs["prompts"] / "prompts.parquet")
    scorer = get_scorer(cfg.scoring.scorer, **cfg.scoring.options)
    sub = PromptSet.from_frame(prompts).sample(c.n_prompts, stratify_by="prompt_toxicity", seed=c.seed).df
    gen = GenerationSettings(
        k=c.k, seed=c.seed, max_new_tokens=c.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
        template=0, batch_size=g.batch_size,
    )
    stat = StatSettings(c.attribute, cfg.behaviour.threshold, cfg.behaviour.n_bootstrap, seed=c.seed)
    layers = sorted(c.layers)
    steer = _steering_layer(dirs["probe"], c.attribute, model.n_layers)
    pairs = match_pairs(prompts, model.tokenizer, threshold=stat.threshold, max_pairs=c.n_prompts // 2)
    # probes never see the prompts the interventions run on
    held_out = (
        frozenset(sub.prompt_id) | frozenset(pairs.toxic_prompt_id) | frozenset(pairs.nontoxic_prompt_id)
    )
    probes = _fit_probes(
        dirs["encode"] / "store", prompts, c.attribute, [steer], "mean", cfg.probing.alphas, exclude=held_out
    )
    readout = _fit_last_token_probes(
        model, prompts, c.attribute, layers, 0, cfg.probing.alphas, exclude=held_out, batch_size=g.batch_size
    )
    baseline = generate_and_score(model, sub, scorer, gen)
    skip = layer_skipping(
        model, sub, scorer, blocks=[x - 1 for x in layers], generation=gen, stats=stat, baseline=baseline
    )
    skip.insert(skip.columns.get_loc("block") + 1, "layer", skip["block"] + 1)
    patch = activation_patching(
        model,
        pairs,
        layers=layers,
        probes=readout,
        scorer=scorer,
        generation=gen,
        stats=stat,
    )
    direction = probes[steer].direction()
    steering = steering_sweep(
        model,
        sub,
        scorer,
        direction,
        layer=steer,
        alphas=c.steering_alphas,
        control_seed=c.seed,
        generation=gen,
        stats=stat,
        baseline=baseline,
    )
    summary = {"layers": layers, "steering_layer": steer, "n_pairs": len(pairs)}
    return {"layer_skipping": skip, "patching": patch, "steering": steering, "summary": summary}


@pytest.fixture(scope="module")
def unsplit_causal(tiny_models, tmp_path_factory):
    """One tiny model through the causal stage with all intervention layers in one task."""
    run_dir = tmp_path_factory.mktemp("unsplit") / "run"
    cfg = _causal_config(tiny_models, run_dir, block=None)
    result = pipeline.run(cfg, stages=["causal"], progress=False)
    return cfg, result


@pytest.mark.slow
def test_unsplit_causal_stage_equals_one_in_memory_pass_of_the_library(unsplit_causal):
    cfg, result = unsplit_causal
    dirs = {r.name: r.dir for r in result.records}
    expected = _causal_by_hand(cfg, dirs)
    assert result.records[-1].summary == expected["summary"]
    for name in CAUSAL_TABLES:
        table = pd.read_parquet(dirs["causal"] / f"{name}.parquet")
        pd.testing.assert_frame_equal(table, expected[name], check_exact=True, obj=name)


def test_steering_runs_on_its_own_larger_subset_and_its_prompts_never_fit_a_probe(tiny_models, tmp_path):
    from aligned_probing.causal import GenerationSettings, StatSettings, generate_and_score, steering_sweep
    from aligned_probing.causal.stage import _fit_probes
    from aligned_probing.data import PromptSet
    from aligned_probing.scoring import get_scorer

    data = _causal_config(tiny_models, tmp_path / "run", block=None).model_dump(mode="json")
    data["causal"] = {**data["causal"], "steering_n_prompts": 10, "patching": False}
    cfg = RunConfig.from_dict(data)
    result = pipeline.run(cfg, stages=["causal"], progress=False)
    dirs = {r.name: r.dir for r in result.records}
    skip = pd.read_parquet(dirs["causal"] / "layer_skipping.parquet")
    steer = pd.read_parquet(dirs["causal"] / "steering.parquet")
    assert set(skip["n_prompts"]) == {4} and set(steer["n_prompts"]) == {10}

    # The steering rows are one library call on the 10-prompt stratified sample, with its direction
    # fitted on every prompt except the skipping and steering prompts.
    c, g = cfg.causal, cfg.generation
    model = pipeline.ModelLoader(cfg.model_variants())(cfg.model_variants()[0].name)
    prompts = pd.read_parquet(dirs["prompts"] / "prompts.parquet")
    sample = PromptSet.from_frame(prompts)
    sub = sample.sample(10, stratify_by="prompt_toxicity", seed=c.seed).df
    skipped = sample.sample(c.n_prompts, stratify_by="prompt_toxicity", seed=c.seed).df
    held_out = frozenset(sub.prompt_id) | frozenset(skipped.prompt_id)
    layer = int(steer["layer"].iloc[0])
    probe = _fit_probes(dirs["encode"] / "store", prompts, c.attribute, [layer], "mean", cfg.probing.alphas,
                        exclude=held_out)[layer]
    gen = GenerationSettings(k=c.k, seed=c.seed, max_new_tokens=c.max_new_tokens, temperature=g.temperature,
                             top_p=g.top_p, template=0, batch_size=g.batch_size)
    stat = StatSettings(c.attribute, cfg.behaviour.threshold, cfg.behaviour.n_bootstrap, seed=c.seed)
    scorer = get_scorer(cfg.scoring.scorer, **cfg.scoring.options)
    expected = steering_sweep(model, sub, scorer, probe.direction(), layer=layer, alphas=c.steering_alphas,
                              control_seed=c.seed, generation=gen, stats=stat,
                              baseline=generate_and_score(model, sub, scorer, gen))
    pd.testing.assert_frame_equal(steer, expected, check_exact=True)


@pytest.mark.slow
def test_causal_blocks_resume_after_a_kill_and_equal_the_unsplit_tables(
    unsplit_causal, tiny_models, tmp_path, monkeypatch
):
    from aligned_probing.causal import stage as _causal_stage

    ref_cfg, ref = unsplit_causal
    ref_dir = next(r.dir for r in ref.records if r.name == "causal")
    shutil.copytree(ref_cfg.output.run_dir, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "stages" / ref_dir.name)  # the upstream stages stay cached
    cfg = _causal_config(tiny_models, tmp_path / "run", block=1)  # one task per intervention layer
    real_block = _causal_stage.block_task
    ran: list[list[int]] = []

    def killed_at_second_block(task):
        if ran:
            raise KeyboardInterrupt("simulated kill in the second block")
        ran.append(task["layers"])
        return real_block(task)

    monkeypatch.setattr(_causal_stage, "block_task", killed_at_second_block)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, stages=["causal"], progress=False)
    out = tmp_path / "run" / "stages" / ref_dir.name  # runtime settings leave the hash alone
    blocks = out / "blocks"
    assert ran == [[1]] and not (out / "stage.json").exists()
    kept = {p.name: p.read_bytes() for p in blocks.iterdir()}
    assert sorted(kept) == ["patching-layers-001-001.parquet", "skipping-layers-001-001.parquet"]
    baseline = (out / "baseline.parquet").stat().st_mtime_ns

    computed: list[list[str]] = []
    monkeypatch.setattr(_causal_stage, "block_task", lambda task: computed.append(real_block(task)))
    result = pipeline.run(cfg, stages=["causal"], progress=False)
    assert result.executed == ["causal/tiny-a"]
    assert computed == [[], ["skipping-layers-003-003.parquet", "patching-layers-003-003.parquet"]]
    assert {p.name: p.read_bytes() for p in blocks.iterdir() if p.name in kept} == kept  # kept, not redone
    assert (out / "baseline.parquet").stat().st_mtime_ns == baseline  # the shared baseline is reused
    assert (out / "blocks" / "steering.parquet").is_file()
    for name in CAUSAL_TABLES:
        pd.testing.assert_frame_equal(
            pd.read_parquet(out / f"{name}.parquet"),
            pd.read_parquet(ref_dir / f"{name}.parquet"),
            check_exact=True,
            obj=name,
        )
    assert result.records[-1].summary == ref.records[-1].summary


# ------------------------------------------------------------------- typed stage settings (issue 18)
def test_stages_receive_typed_sections_and_hash_their_content(tmp_path):
    from aligned_probing.pipeline.settings import CausalSettings, GenerateSettings, StageSettings

    cfg = _config(tmp_path, behaviour={"confidence": 0.9})
    plan = pipeline.build_plan(cfg)
    assert all(isinstance(s.settings, StageSettings) for s in plan)
    gen = next(s.settings for s in plan if s.name == "generate")
    assert isinstance(gen, GenerateSettings) and gen.generation is cfg.generation
    assert "templates" not in gen.model_dump(mode="json")["generation"]  # one stage, one template
    causal = next(s.settings for s in plan if s.name == "causal")
    assert isinstance(causal, CausalSettings)
    assert (causal.confidence, causal.n_bootstrap) == (0.9, cfg.behaviour.n_bootstrap)
    # Adding a template recomputes nothing of the first template's stages.
    more = stage_hashes(pipeline.build_plan(_config(tmp_path, generation={"templates": [0, 1]})))
    base = stage_hashes(pipeline.build_plan(_config(tmp_path)))
    assert {k for k in base if "/t0" in k and base[k] != more[k]} == set()


def test_causal_statistics_take_the_behaviour_confidence(tmp_path):
    from aligned_probing.causal.stage import _Task

    for level in (0.9, 0.8):
        cfg = _config(tmp_path, behaviour={"confidence": level, "n_bootstrap": 77})
        causal = next(s for s in pipeline.build_plan(cfg) if s.name == "causal")
        stats = _Task({"storage_options": {}, "settings": causal.settings, "out_dir": tmp_path}).stats()
        assert (stats.confidence_level, stats.n_resamples) == (level, 77)


@pytest.mark.slow
def test_causal_tables_carry_the_configured_confidence_level(unsplit_causal, tiny_models, tmp_path):
    """behaviour.confidence = 0.9 gives 90% CIs: same bootstrap resamples, so nested in the 95% ones."""
    ref_cfg, ref = unsplit_causal
    assert ref_cfg.behaviour.confidence == 0.95
    shutil.copytree(ref_cfg.output.run_dir, tmp_path / "run")
    data = _causal_config(tiny_models, tmp_path / "run", block=None).model_dump(mode="json")
    data["behaviour"] = {**data["behaviour"], "confidence": 0.9}
    result = pipeline.run(RunConfig.from_dict(data), stages=["causal"], progress=False)
    assert result.executed == ["causal/tiny-a"]  # a new level is a new causal result, the rest is cached
    new_dir = next(r.dir for r in result.records if r.name == "causal")
    ref_dir = next(r.dir for r in ref.records if r.name == "causal")
    narrower = 0
    for name in CAUSAL_TABLES:
        wide = pd.read_parquet(ref_dir / f"{name}.parquet")
        tight = pd.read_parquet(new_dir / f"{name}.parquet")
        pd.testing.assert_series_equal(wide["delta"], tight["delta"])
        ok = wide["ci_low"].notna()
        assert (tight.loc[ok, "ci_low"] >= wide.loc[ok, "ci_low"] - 1e-12).all(), name
        assert (tight.loc[ok, "ci_high"] <= wide.loc[ok, "ci_high"] + 1e-12).all(), name
        width_90, width_95 = tight["ci_high"] - tight["ci_low"], wide["ci_high"] - wide["ci_low"]
        narrower += int((width_90 < width_95 - 1e-12).sum())
    assert narrower > 0  # on the old code both runs were the same (cached) 95% tables


def test_one_stage_registry_names_plan_cli_outputs_and_resources(tmp_path):
    from aligned_probing.cli import app
    from aligned_probing.pipeline.config import ConfigError
    from aligned_probing.pipeline.registry import STAGE_NAMES, STAGES
    from aligned_probing.pipeline.results import OUTPUTS

    plan = pipeline.build_plan(_config(tmp_path))
    kinds = list(dict.fromkeys(s.name for s in plan))
    assert [n for n in STAGE_NAMES if n in kinds] == kinds  # plan order is registry order
    assert pipeline.STAGE_NAMES == STAGE_NAMES
    commands = {c.name for c in app.registered_commands}
    assert {s.name for s in STAGES if s.command} <= commands
    assert OUTPUTS["causal"] == ("layer_skipping.parquet", "patching.parquet", "steering.parquet")
    with pytest.raises(ConfigError, match=r"unknown stage kind\(s\) \['probing'\]; valid: .*'probe_block'"):
        _config(tmp_path, runtime={"resources": {"probing": {"num_cpus": 2}}})


def _scored_jsonl(path: Path, attributes, n: int = 30) -> Path:
    """An RTP-style jsonl whose prompts carry their own (dataset) scores for `attributes`."""
    rows = []
    for i in range(n):
        scores = {a: round((i * 7 % 30) / 31 + 0.001 * j, 4) for j, a in enumerate(attributes)}
        rows.append({"prompt": {"text": f"Prompt number {i} says that the weather", **scores}})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_prompt_scores_from_the_dataset_are_kept_and_recorded(tiny_models, tmp_path):
    from aligned_probing.scoring import get_scorer

    attributes = list(get_scorer("embedded").attributes)
    source = _scored_jsonl(tmp_path / "scored.jsonl", attributes)
    cfg = _one_model(tiny_models, tmp_path / "run", **{
        "data.prompt_set": json.dumps(str(source)), "data.n_prompts": 12, "data.stratify_by": "false",
        "scoring.prompt_scores": '"dataset"'})
    result = pipeline.run(cfg, stages=["prompts"], progress=False)
    stage = next(r.dir for r in result.records if r.name == "prompts")
    table = pd.read_parquet(stage / "prompts.parquet")
    expected = {f"Prompt number {i} says that the weather": round((i * 7 % 30) / 31, 4) for i in range(30)}
    assert table["prompt_toxicity"].tolist() == [expected[t] for t in table["text"]]  # not re-scored
    provenance = json.loads((stage / "score_provenance.json").read_text())
    assert provenance["prompt_scores"].startswith("dataset") and provenance["continuation_scores"] == "scorer: embedded"

    # Re-scored by the run's scorer (the default), the same prompts get other numbers and say so.
    cfg = _one_model(tiny_models, tmp_path / "run2", **{
        "data.prompt_set": json.dumps(str(source)), "data.n_prompts": 12, "data.stratify_by": "false"})
    stage = next(r.dir for r in pipeline.run(cfg, stages=["prompts"], progress=False).records if r.name == "prompts")
    rescored = pd.read_parquet(stage / "prompts.parquet")
    assert rescored["prompt_toxicity"].tolist() != [expected[t] for t in rescored["text"]]
    assert json.loads((stage / "score_provenance.json").read_text())["prompt_scores"] == "scorer: embedded"


def test_dataset_prompt_scores_missing_an_attribute_are_refused(tiny_models, tmp_path):
    from aligned_probing.data import DataError

    source = _scored_jsonl(tmp_path / "partial.jsonl", ["toxicity"])
    cfg = _one_model(tiny_models, tmp_path / "run", **{
        "data.prompt_set": json.dumps(str(source)), "data.n_prompts": 12, "data.stratify_by": "false",
        "scoring.prompt_scores": '"dataset"'})
    with pytest.raises(DataError, match=r"no scores for \['severe_toxicity'.*prompt_scores = 'scorer'"):
        pipeline.run(cfg, stages=["prompts"], progress=False)


def test_missing_scores_stop_the_behaviour_stage_unless_the_config_opts_in(tiny_models, tmp_path, monkeypatch):
    from aligned_probing.pipeline import stages

    real = stages.read_table

    def with_holes(directory, name, storage_options=None):
        table = real(directory, name, storage_options)
        if name == "scores.parquet":  # as a scorer outage recorded under `drop` would leave them
            table.loc[table.index[::3], "toxicity"] = float("nan")
        return table

    monkeypatch.setattr(stages, "read_table", with_holes)
    cfg = _one_model(tiny_models, tmp_path / "run")
    with pytest.raises(ValueError, match="missing"):
        pipeline.run(cfg, stages=["behaviour"], progress=False)
    cfg = _one_model(tiny_models, tmp_path / "run", **{"behaviour.missing": '"drop"'})
    result = pipeline.run(cfg, stages=["behaviour"], progress=False)
    table = pd.read_parquet(next(r.dir for r in result.records if r.name == "behaviour") / "behaviour.parquet")
    tox = table[table["attribute"] == "toxicity"]
    assert (tox["n_missing"] > 0).all() and (table[table["attribute"] == "insult"]["n_missing"] == 0).all()
