"""Record residual-stream activations and probe read-outs through the bridge's hooks.

Every tensor handed to the model is moved to `model.device` first; recorded activations come back
to the CPU in float32 (statistics are float32 whatever the model's dtype).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from aligned_probing.causal.interventions import Intervention
from aligned_probing.data.templates import RenderedPrompt

POOLINGS: tuple[str, ...] = ("mean", "last")


class Predictor(Protocol):
    """Anything with `predict(X [n, d_model]) -> [n]` (a fitted `RidgeProbe`, sklearn regressor)."""

    def predict(self, X: np.ndarray) -> Any:  # noqa: D102
        ...


@torch.no_grad()
def record_residuals(
    model: Any,
    input_ids: Tensor,
    layers: Sequence[int] | None = None,
    *,
    intervention: Intervention | None = None,
    attention_mask: Tensor | None = None,
) -> dict[int, Tensor]:
    """Residual stream at the given layers for one forward pass (optionally under an intervention).

    Args:
        model: A `LoadedModel`.
        input_ids: Token ids [batch, pos] (ids, never strings: no BOS is added).
        layers: Residual layers in 0..L; None means all.
        intervention: Active during the pass; recording hooks fire after its hooks, so they see
            the intervened activations.
        attention_mask: Optional [batch, pos] mask.

    Returns:
        `{layer: Tensor [batch, pos, d_model]}` (float32, on CPU).
    """
    layers = list(range(model.n_layers + 1)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x <= model.n_layers]
    if bad:
        raise ValueError(f"layers must be in 0..{model.n_layers}, got {bad}.")
    store: dict[int, Tensor] = {}

    def make(layer: int):  # small factory so each hook closes over its own layer
        def hook(resid: Tensor, hook: Any) -> None:
            store[layer] = resid.detach().to("cpu", torch.float32)

        return hook

    fwd = [(model.hook_names[x], make(x)) for x in layers]
    ctx = intervention.apply(model) if intervention is not None else _null()
    device = torch.device(model.device)
    mask = None if attention_mask is None else attention_mask.to(device)
    with ctx, model.bridge.hooks(fwd_hooks=fwd):
        # logits_to_keep=1: only the residual stream is needed; skip most of the unembedding.
        model.hf_model(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False, logits_to_keep=1)
    return store


def right_padded(model: Any, seqs: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Right-padded ids and mask [batch, width] (CPU; `record_residuals` moves them)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), model.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[row, : len(s)] = 1
    return ids, mask


def encode_prompts(
    model: Any,
    rendered: Sequence[RenderedPrompt],
    layers: Sequence[int],
    *,
    pooling: str = "mean",
    batch_size: int = 16,
    intervention: Intervention | None = None,
) -> dict[int, np.ndarray]:
    """Pooled prompt-span residuals of many prompts, in right-padded batches.

    Causal attention keeps the padding (after each row) out of the real positions, so each row
    equals its own unbatched pass up to kernel rounding.

    Args:
        model: A `LoadedModel`.
        rendered: Rendered prompts (`render_prompt`).
        layers: Residual layers 0..L.
        pooling: "mean" over the prompt span or "last" (its final position).
        batch_size: Prompts per forward pass.
        intervention: Active during the passes (e.g. a `PromptPatch`).

    Returns:
        `{layer: float32 [n_prompts, d_model]}`.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
    out = {int(x): np.zeros((len(rendered), model.d_model), dtype=np.float32) for x in layers}
    for start in range(0, len(rendered), batch_size):
        chunk = rendered[start : start + batch_size]
        ids, mask = right_padded(model, [r.input_ids for r in chunk])
        res = record_residuals(model, ids, list(out), intervention=intervention, attention_mask=mask)
        for layer, feats in out.items():
            for row, r in enumerate(chunk):
                lo = r.prompt_start if pooling == "mean" else r.prompt_end - 1
                feats[start + row] = res[layer][row, lo : r.prompt_end].mean(dim=0).numpy()
    return out


def median_residual_norm(
    model: Any, rendered: Sequence[RenderedPrompt], layer: int, *, batch_size: int = 16
) -> float:
    """Median L2 norm of the residual stream at `layer` over every prompt-span position of `rendered`.

    The scale that makes steering strengths comparable across layers and models: residual norms
    grow with depth (SmolLM2-135M: tens at layer 5, hundreds at layer 30), so a fixed step is
    large at one layer and negligible at another.
    """
    norms = []
    for start in range(0, len(rendered), batch_size):
        chunk = rendered[start : start + batch_size]
        ids, mask = right_padded(model, [r.input_ids for r in chunk])
        res = record_residuals(model, ids, [layer], attention_mask=mask)[layer]
        for row, r in enumerate(chunk):
            norms.append(res[row, r.prompt_start : r.prompt_end].norm(dim=-1))
    if not norms:
        raise ValueError("rendered must hold at least one prompt, got none.")
    return float(torch.cat(norms).median())


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def probe_readout(
    residuals: Mapping[int, Tensor],
    probes: Mapping[int, Predictor],
    span: tuple[int, int],
    pooling: str = "mean",
) -> dict[int, np.ndarray]:
    """Apply each layer's probe to the pooled residual over a token span.

    Args:
        residuals: `{layer: [batch, pos, d_model]}` from `record_residuals`.
        probes: `{layer: predictor}`; layers without a probe are skipped.
        span: `(start, end)` token positions pooled over (the prompt span).
        pooling: "mean" over the span or "last" (its final position), matching how the probe
            was trained.

    Returns:
        `{layer: predictions [batch]}`.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}.")
    start, end = span
    out: dict[int, np.ndarray] = {}
    for layer, probe in probes.items():
        if layer not in residuals:
            continue
        acts = residuals[layer][:, start:end] if pooling == "mean" else residuals[layer][:, end - 1 : end]
        out[layer] = predict_one(probe, acts.mean(dim=1).numpy(), layer)  # pooled: [batch, d_model]
    return out


def predict_one(probe: Predictor, features: np.ndarray, layer: int) -> np.ndarray:
    """A single-output probe's predictions [n] on `features` [n, d_model] (float64)."""
    pred = np.asarray(probe.predict(features), dtype=np.float64).reshape(len(features), -1)
    if pred.shape[1] != 1:
        raise ValueError(
            f"The probe for layer {layer} predicts {pred.shape[1]} outputs; pass single-output "
            "predictors (one attribute), e.g. wrap a multi-attribute probe to select a column."
        )
    return pred[:, 0]
