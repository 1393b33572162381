"""Exact tests of the causal interventions on tiny random models (Llama and Gemma-3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aligned_probing.causal import (
    Compose,
    LayerSkip,
    PromptPatch,
    ResidualPatch,
    Steering,
    probe_readout,
    record_residuals,
)
from aligned_probing.models import load_model

ARCHS = ["llama", "gemma3"]


@pytest.fixture(scope="module")
def models(tiny_llama_dir, tiny_gemma_dir):
    return {"llama": load_model(tiny_llama_dir), "gemma3": load_model(tiny_gemma_dir)}


@pytest.fixture(scope="module")
def dirs(tiny_llama_dir, tiny_gemma_dir):
    return {"llama": tiny_llama_dir, "gemma3": tiny_gemma_dir}


def _ids(model, text: str) -> torch.Tensor:
    return torch.tensor([model.tokenizer(text)["input_ids"]])


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.hf_model(input_ids=ids, use_cache=False).logits


def _without_block(path, block: int):
    """A fresh eager HF model with decoder layer `block` deleted by hand."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    layers = hf.model.layers
    del layers[block]
    hf.config.num_hidden_layers -= 1
    if getattr(hf.config, "layer_types", None) is not None:  # Gemma: per-layer sliding/full pattern
        hf.config.layer_types = [t for i, t in enumerate(hf.config.layer_types) if i != block]
    for i, layer in enumerate(layers):  # the KV cache is indexed by layer_idx
        layer.self_attn.layer_idx = i
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = i
    return hf


# ------------------------------------------------------------------------- layer skipping


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("block", [0, 1, 2])
def test_skip_equals_block_removed_by_hand(models, dirs, arch, block):
    model = models[arch]
    ids = _ids(model, "The quick brown fox jumps over the lazy dog and the idiot")
    pruned = _without_block(dirs[arch], block)
    with torch.no_grad():
        expected = pruned(input_ids=ids, use_cache=False).logits
    with LayerSkip(block).apply(model):
        got = _logits(model, ids)
    drift = (got - expected).abs().max().item()
    assert drift < 1e-4, f"skip({block}) drifts {drift:.2e} from the pruned {arch} model"
    # the skip really changes the model (else the test would be vacuous)
    assert (got - _logits(model, ids)).abs().max().item() > 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_skip_in_cached_generation_matches_pruned_model(models, dirs, arch):
    # Gemma's sliding window is 8: 14 new tokens after a 6-token prompt cross it.
    model = models[arch]
    ids = _ids(model, "You are a stupid")
    pruned = _without_block(dirs[arch], 1)
    kw = dict(max_new_tokens=14, do_sample=False, pad_token_id=model.pad_token_id)
    expected = pruned.generate(ids, **kw)
    with LayerSkip(1).apply(model):
        got = model.hf_model.generate(ids, **kw)
    assert got.tolist() == expected.tolist()


def test_skip_residual_post_equals_residual_pre(tiny_model):
    ids = _ids(tiny_model, "hello world, what a lovely day")
    res = record_residuals(tiny_model, ids, intervention=LayerSkip(1))
    assert torch.equal(res[2], res[1])  # block 1 maps layer 1 -> layer 2


# ------------------------------------------------------------------------- patching


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layer", [0, 2, 3])
def test_self_patch_changes_nothing(models, arch, layer):
    model = models[arch]
    ids = _ids(model, "What a lovely day for a walk")
    clean = _logits(model, ids)
    acts = record_residuals(model, ids, [layer])[layer]  # [1, pos, d]
    positions = list(range(ids.shape[1]))
    with ResidualPatch(layer, acts[0], positions).apply(model):
        patched = _logits(model, ids)
    assert torch.equal(patched, clean)


@pytest.mark.parametrize("arch", ARCHS)
def test_patching_every_layer_makes_target_logits_equal_source(models, arch):
    model = models[arch]
    src = _ids(model, "You are a stupid idiot")
    tgt = _ids(model, "What a lovely day for")
    tgt = tgt[:, : src.shape[1]]
    if tgt.shape[1] < src.shape[1]:
        src = src[:, : tgt.shape[1]]
    assert not torch.equal(src, tgt)
    source_logits = _logits(model, src)
    acts = record_residuals(model, src)
    positions = list(range(src.shape[1]))
    patch = Compose(*[ResidualPatch(layer, acts[layer][0], positions) for layer in acts])
    with patch.apply(model):
        got = _logits(model, tgt)
    assert (got - source_logits).abs().max().item() < 1e-6
    assert (_logits(model, tgt) - source_logits).abs().max().item() > 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_patch_in_cached_generation_equals_uncached(models, arch):
    """The patch hits the prompt's last position in the prefill only, with and without the KV cache."""
    model = models[arch]
    src, tgt = _ids(model, "I hate you, idiot"), _ids(model, "The lazy dog")
    last_src = record_residuals(model, src, [2])[2][0, -1:]  # [1, d]
    patch = ResidualPatch(2, last_src, [tgt.shape[1] - 1])
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=model.pad_token_id)
    with patch.apply(model):
        cached = model.hf_model.generate(tgt, use_cache=True, **kw)
        uncached = model.hf_model.generate(tgt, use_cache=False, **kw)
    assert cached.tolist() == uncached.tolist()
    # the patched prefill's next-token logits differ from the clean ones
    with patch.apply(model):
        patched_logits = _logits(model, tgt)
    assert (patched_logits[0, -1] - _logits(model, tgt)[0, -1]).abs().max() > 1e-3
    assert torch.equal(patched_logits[0, :-1], _logits(model, tgt)[0, :-1])  # causal: earlier untouched


def test_patch_positions_outside_the_run_are_ignored(tiny_model):
    ids = _ids(tiny_model, "hello world")
    values = torch.full((1, tiny_model.d_model), 7.0)
    with ResidualPatch(1, values, [ids.shape[1] + 5]).apply(tiny_model):
        assert torch.equal(_logits(tiny_model, ids), _logits_clean := _logits(tiny_model, ids))
    assert torch.equal(_logits_clean, _logits(tiny_model, ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_patch_in_a_left_padded_batch_equals_each_row_patched_alone(models, arch):
    """PromptPatch finds each row's prompt by its tokens, whatever the padding: a left-padded batched
    greedy generation (KV cache) equals each prompt generated alone under a plain ResidualPatch."""
    model = models[arch]
    src = _ids(model, "I hate you, idiot")
    vec = record_residuals(model, src, [1])[1][0, -1:]  # [1, d]: source's last position
    prompts = [model.tokenizer(t)["input_ids"] for t in ("The lazy dog jumps over", "hello world")]
    table = {tuple(p): ([len(p) - 1], vec) for p in prompts}
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[model.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=model.pad_token_id)
    with PromptPatch(1, table).apply(model):
        batched = model.hf_model.generate(ids, attention_mask=mask, **kw)[:, width:]
        uncached = model.hf_model.generate(ids, attention_mask=mask, use_cache=False, **kw)[:, width:]
    assert batched.tolist() == uncached.tolist()
    changed = 0
    for row, p in enumerate(prompts):
        with ResidualPatch(1, vec, [len(p) - 1]).apply(model):
            alone = model.hf_model.generate(torch.tensor([p]), **kw)[0, len(p) :]
        assert batched[row].tolist() == alone.tolist()
        changed += alone.tolist() != model.hf_model.generate(torch.tensor([p]), **kw)[0, len(p) :].tolist()
    assert changed  # the patch does change the generations (else the test would be vacuous)
    with pytest.raises(RuntimeError, match="without a patch entry"):
        with PromptPatch(1, {tuple(prompts[0]): ([0], vec)}).apply(model):
            _logits(model, torch.tensor([prompts[1]]))


# ------------------------------------------------------------------------- steering


@pytest.mark.parametrize("arch", ARCHS)
def test_steering_alpha_zero_is_identity(models, arch, rng):
    model = models[arch]
    ids = _ids(model, "The quick brown fox")
    direction = rng.normal(size=model.d_model)
    with Steering(1, direction, alpha=0.0).apply(model):
        got = _logits(model, ids)
    assert torch.equal(got, _logits(model, ids))


class _LinearProbe:
    def __init__(self, w: np.ndarray) -> None:
        self.w = w

    def predict(self, X: np.ndarray) -> np.ndarray:
        return X @ self.w


@pytest.mark.parametrize("arch", ARCHS)
def test_large_alpha_moves_probe_readout_in_predicted_direction(models, arch, rng):
    model = models[arch]
    ids = _ids(model, "You are a stupid idiot and I hate you")
    direction = rng.normal(size=model.d_model)
    unit = direction / np.linalg.norm(direction)
    probes = {layer: _LinearProbe(unit) for layer in range(1, model.n_layers + 1)}
    span = (0, ids.shape[1])

    def readout(alpha: float) -> dict[int, float]:
        res = record_residuals(model, ids, intervention=Steering(1, direction, alpha))
        return {k: float(v[0]) for k, v in probe_readout(res, probes, span).items()}

    base, up, down = readout(0.0), readout(50.0), readout(-50.0)
    # At the steered layer the read-out moves by exactly alpha (mean-pooled, unit direction).
    assert up[1] - base[1] == pytest.approx(50.0, abs=1e-3)
    assert down[1] - base[1] == pytest.approx(-50.0, abs=1e-3)
    # Downstream the residual connection carries the shift: same sign, most of the size.
    for layer in range(2, model.n_layers + 1):
        assert up[layer] - base[layer] > 25.0
        assert down[layer] - base[layer] < -25.0


@pytest.mark.parametrize("arch", ARCHS)
def test_steering_in_cached_generation_equals_uncached(models, arch, rng):
    model = models[arch]
    ids = _ids(model, "The lazy dog")
    steer = Steering(2, rng.normal(size=model.d_model), alpha=3.0)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=model.pad_token_id)
    with steer.apply(model):
        cached = model.hf_model.generate(ids, use_cache=True, **kw)
        uncached = model.hf_model.generate(ids, use_cache=False, **kw)
    assert cached.tolist() == uncached.tolist()


# ------------------------------------------------------------------------- scoping


def test_hooks_are_removed_on_exception_and_by_handle(tiny_model, rng):
    ids = _ids(tiny_model, "hello world")
    clean = _logits(tiny_model, ids)
    steer = Steering(2, rng.normal(size=tiny_model.d_model), alpha=10.0)
    with pytest.raises(RuntimeError, match="boom"):
        with steer.apply(tiny_model):
            assert not torch.equal(_logits(tiny_model, ids), clean)
            raise RuntimeError("boom")
    assert torch.equal(_logits(tiny_model, ids), clean)
    assert not any(hp.fwd_hooks for hp in tiny_model.bridge.hook_dict.values())

    handle = steer.attach(tiny_model)
    assert not torch.equal(_logits(tiny_model, ids), clean)
    handle.remove()
    handle.remove()  # idempotent
    assert torch.equal(_logits(tiny_model, ids), clean)
    assert not tiny_model.hf_model._forward_pre_hooks


def test_invalid_arguments_name_the_parameter(tiny_model):
    ids = _ids(tiny_model, "hello")
    with pytest.raises(ValueError, match=r"blocks must be in 0\.\.2 .* got 3"):
        with LayerSkip(3).apply(tiny_model):
            _logits(tiny_model, ids)
    with pytest.raises(ValueError, match=r"layer must be in 0\.\.3 .* got -1"):
        Steering(-1, np.ones(tiny_model.d_model), 1.0).attach(tiny_model)
    with pytest.raises(ValueError, match="direction must be finite and non-zero"):
        Steering(1, np.zeros(tiny_model.d_model), 1.0)
    with pytest.raises(ValueError, match="n_pos = len\\(positions\\) = 2"):
        ResidualPatch(1, torch.zeros(3, tiny_model.d_model), [0, 1])
    with pytest.raises(ValueError, match="d_model is 32"):
        Steering(1, np.ones(5), 1.0).attach(tiny_model)
    assert not tiny_model.hf_model._forward_pre_hooks
