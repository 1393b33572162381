"""Every tensor the causal code feeds the model is moved to `model.device` (CPU CI catches GPU bugs).

A CUDA model rejects CPU inputs, but CI has no GPU. So the model here reports the device "cpu:0":
torch runs it on the CPU, yet `torch.device("cpu:0") != torch.device("cpu")`. `Tensor.to` (and
the tensor factories) are wrapped to tag every tensor moved to or created on exactly "cpu:0", and
the model's top-level calls (`forward` and `generate`; not the calls `generate` makes itself)
record every input tensor that lacks the tag. A tensor built on the CPU and handed to the model
without `.to(model.device)`, or moved to a hard-coded "cpu", is reported, which is the bug that
fails on CUDA.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from aligned_probing.causal import (
    GenerationSettings,
    StatSettings,
    activation_patching,
    layer_skipping,
    match_pairs,
    steering_sweep,
)

SENTINEL = torch.device("cpu:0")
GEN = GenerationSettings(k=2, seed=0, max_new_tokens=4, temperature=1.0, batch_size=4)
STATS = StatSettings(n_resamples=50)
TAG = "_ap_on_model_device"
FACTORIES = ("tensor", "as_tensor", "full", "zeros", "ones", "arange", "empty")


def _is_sentinel(device: Any) -> bool:
    try:
        return isinstance(device, str | torch.device) and torch.device(device) == SENTINEL
    except (RuntimeError, TypeError):
        return False


class _Scorer:
    attributes = ("toxicity",)

    def score(self, texts: list[str]) -> pd.DataFrame:
        return pd.DataFrame({"toxicity": [sum(c in "aeiou" for c in t) / max(len(t), 1) for t in texts]})


class _Probe:
    def __init__(self, w: np.ndarray) -> None:
        self.w = w

    def predict(self, X: np.ndarray) -> np.ndarray:
        return X @ self.w


@pytest.fixture
def checked(tiny_model, monkeypatch) -> Iterator[tuple[Any, list[str], list[int]]]:
    """(model reporting device cpu:0, offending inputs, number of top-level calls checked)."""
    model = dataclasses.replace(tiny_model, device="cpu:0")
    original_to = torch.Tensor.to

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = original_to(self, *args, **kwargs)
        if _is_sentinel(kwargs.get("device", args[0] if args else None)):
            setattr(out, TAG, True)
        return out

    monkeypatch.setattr(torch.Tensor, "to", to)
    for name in FACTORIES:
        factory = getattr(torch, name)

        def make(*args: Any, _factory: Any = factory, **kwargs: Any) -> torch.Tensor:
            out = _factory(*args, **kwargs)
            if _is_sentinel(kwargs.get("device")):
                setattr(out, TAG, True)
            return out

        monkeypatch.setattr(torch, name, make)

    bad: list[str] = []
    calls = [0]
    inside_generate = [0]

    def check(where: str, args: tuple, kwargs: dict) -> None:
        calls[0] += 1
        named = [(f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
        bad.extend(
            f"{where}:{k}" for k, v in named if isinstance(v, torch.Tensor) and not getattr(v, TAG, False)
        )

    def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
        if not inside_generate[0]:
            check("forward", args, kwargs)

    hf = model.hf_model
    original_generate = hf.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        check("generate", args, kwargs)
        inside_generate[0] += 1
        try:
            return original_generate(*args, **kwargs)
        finally:
            inside_generate[0] -= 1

    handle = hf.register_forward_pre_hook(pre_hook, with_kwargs=True)
    hf.__dict__["generate"] = generate
    try:
        yield model, bad, calls
    finally:
        handle.remove()
        del hf.__dict__["generate"]


PROMPTS = pd.DataFrame(
    {
        "prompt_id": ["a", "b", "c", "d"],
        "text": ["You are a stupid idiot", "What a lovely day", "I hate you", "hello world"],
        "prompt_toxicity": [0.9, 0.1, 0.8, 0.2],
    }
)


def test_the_check_catches_a_cpu_tensor(checked):
    model, bad, calls = checked
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        model.hf_model(input_ids=ids)  # built on the CPU, never moved: reported
        model.hf_model(input_ids=ids.to("cpu"))  # moved to a hard-coded "cpu": reported
        model.hf_model(input_ids=ids.to(model.device))  # moved to the model's device: fine
    assert bad == ["forward:input_ids", "forward:input_ids"] and calls[0] == 3


def test_layer_skipping_and_steering_feed_the_model_only_tensors_on_its_device(checked, rng):
    model, bad, calls = checked
    layer_skipping(model, PROMPTS, _Scorer(), blocks=[1], generation=GEN, stats=STATS)
    steering_sweep(
        model,
        PROMPTS,
        _Scorer(),
        rng.normal(size=model.d_model),
        layer=2,
        alphas=[0.5],
        generation=GEN,
        stats=STATS,
    )
    assert calls[0] > 0
    assert bad == [], f"inputs not moved to model.device: {sorted(set(bad))}"


def test_activation_patching_feeds_the_model_only_tensors_on_its_device(checked, rng):
    model, bad, calls = checked
    pairs = match_pairs(PROMPTS, model.tokenizer)
    probes = {x: _Probe(rng.normal(size=model.d_model)) for x in range(model.n_layers + 1)}
    activation_patching(
        model, pairs, layers=[1], probes=probes, scorer=_Scorer(), generation=GEN, stats=STATS
    )
    assert calls[0] > 0
    assert bad == [], f"inputs not moved to model.device: {sorted(set(bad))}"


def test_interventions_run_on_a_bfloat16_model(tiny_llama_dir, rng):
    """Stored vectors (float32, CPU) are cast to the activation's dtype inside the hooks."""
    from aligned_probing.models import load_model

    model = load_model(tiny_llama_dir, dtype="bfloat16")
    pairs = match_pairs(PROMPTS, model.tokenizer)
    probes = {x: _Probe(rng.normal(size=model.d_model)) for x in range(model.n_layers + 1)}
    patch = activation_patching(
        model, pairs, layers=[1], probes=probes, scorer=_Scorer(), generation=GEN, stats=STATS
    )
    steer = steering_sweep(
        model,
        PROMPTS,
        _Scorer(),
        rng.normal(size=model.d_model),
        layer=2,
        alphas=[0.5],
        operator="ablate_then_add",
        generation=GEN,
        stats=STATS,
    )
    assert next(model.hf_model.parameters()).dtype == torch.bfloat16
    for table in (patch, steer):
        assert np.isfinite(table["value"].to_numpy(float)).all()
