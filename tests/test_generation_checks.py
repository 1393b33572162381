"""The generation self-check: cached sampling vs an uncached teacher-forced forward, greedy parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aligned_probing.generation import generate_continuations
from aligned_probing.generation_checks import (
    GenerationCheckError,
    GenerationCheckWarning,
    check_generation,
    enforce,
)

PROMPTS = pd.DataFrame(
    {
        "prompt_id": ["a", "b", "c", "d"],
        "text": [
            "The quick brown fox",
            "You are a stupid",
            "What a lovely day for a walk",
            "This is a test of the tokenizer, with commas",
        ],
    }
)


def drop_cache_keyword(model):
    """Inject the transformers 5.24 fault: the KV cache never reaches attention (either keyword).

    Registered after the model's own hooks, so it runs after `_kv_compat`'s alias and removes both
    names: every cached decoding step then attends only to itself, exactly the 5.24 symptom.
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    def hook(module, args, kwargs):
        return args, {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "layer_past")}

    handles = [
        m.register_forward_pre_hook(hook, with_kwargs=True)
        for m in model.bridge.modules()
        if isinstance(m, AttentionBridge)
    ]
    assert handles, "no attention bridge found to break"
    return handles


def test_recorded_logprobs_equal_an_uncached_teacher_forced_forward(tiny_model):
    conts = generate_continuations(tiny_model, PROMPTS, k=3, seed=0, max_new_tokens=8, batch_size=5)
    assert (conts["token_logprobs"].map(len) == conts["n_tokens"]).all()
    check = check_generation(tiny_model, conts, max_new_tokens=8, n_rows=12)
    assert check.passed, check.message
    assert check.n_rows_checked == 12 and check.n_tokens_checked == conts["n_tokens"].sum()
    assert check.max_abs_logprob_diff < 1e-4  # float32: reduction order only (left padding)
    assert check.greedy_mismatches == 0 and check.n_greedy_prompts == 3
    lps = np.concatenate(conts["token_logprobs"].map(np.asarray).tolist())
    assert check.log_perplexity == pytest.approx(-lps.mean())


def test_a_dropped_cache_keyword_fails_the_check(tiny_model):
    handles = drop_cache_keyword(tiny_model)
    try:
        conts = generate_continuations(tiny_model, PROMPTS, k=2, seed=0, max_new_tokens=8, batch_size=4)
        check = check_generation(tiny_model, conts, max_new_tokens=8)
    finally:
        for h in handles:
            h.remove()
    assert not check.passed
    assert check.max_abs_logprob_diff > 0.1  # far beyond the float32 tolerance of 0.01
    assert check.greedy_mismatches >= 1 and not any(d["tie"] for d in check.details)
    with pytest.raises(GenerationCheckError, match="self-check FAILED.*KV cache"):
        enforce(check, "error")
    with pytest.warns(GenerationCheckWarning, match="self-check FAILED"):
        enforce(check, "warn")


def test_a_greedy_divergence_at_a_tie_is_accepted(tiny_model, monkeypatch):
    from aligned_probing import generation_checks as gc

    calls = {"n": 0}

    def fake_decode(model, prompt, n, *, use_cache):
        calls["n"] += 1
        return [1, 2, 3] if use_cache else [1, 2, 4]

    monkeypatch.setattr(gc, "greedy_decode", fake_decode)
    monkeypatch.setattr(gc, "_top2_gap", lambda model, ids: 1e-6)
    assert gc.check_greedy(tiny_model, [[5, 6]], 3)[:2] == (0, 1)
    monkeypatch.setattr(gc, "_top2_gap", lambda model, ids: 0.5)
    assert gc.check_greedy(tiny_model, [[5, 6]], 3)[:2] == (1, 0)


def test_the_pipeline_stops_on_a_broken_cache_and_records_what_it_measured(tmp_path, monkeypatch):
    import shutil

    from aligned_probing import models, pipeline
    from aligned_probing.pipeline.config import RunConfig
    from tests._tiny import build_tiny_model

    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "tests" / "data" / "tiny.toml", tmp_path / "tiny.toml")
    build_tiny_model(tmp_path / "tiny-a", seed=0)
    real = models.load_model

    def broken_load(*args, **kwargs):
        model = real(*args, **kwargs)
        drop_cache_keyword(model)
        return model

    monkeypatch.setattr(models, "load_model", broken_load)
    sets = [f'output.run_dir="{tmp_path / "run"}"', "causal.enabled=false", 'models=[{spec="./tiny-a"}]']
    cfg = RunConfig.from_toml(tmp_path / "tiny.toml", overrides=sets)
    with pytest.raises(GenerationCheckError, match="self-check FAILED"):
        pipeline.run(cfg, progress=False)
    gen_dir = next((tmp_path / "run" / "stages").glob("generate--*"))
    assert not (gen_dir / "stage.json").exists()  # never recorded complete
    record = json.loads((gen_dir / "selfcheck.json").read_text())
    assert record["passed"] is False and record["max_abs_logprob_diff"] > 0.1
    assert not (tmp_path / "run" / "report.html").exists()

    # Downgraded to a warning, the run completes and the report says so at the top.
    monkeypatch.setattr(models, "load_model", broken_load)
    cfg = RunConfig.from_toml(tmp_path / "tiny.toml", overrides=[*sets, 'generation.self_check="warn"'])
    with pytest.warns(GenerationCheckWarning):
        result = pipeline.run(cfg, stages=["report"], progress=False)
    page = (Path(result.run_dir) / "report.html").read_text()
    assert 'class="alert"' in page and "self-check FAILED" in page
