"""Record residual-stream activations and probe read-outs through the bridge's hooks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from aligned_probing.causal.interventions import Intervention


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
    with ctx, model.bridge.hooks(fwd_hooks=fwd):
        # logits_to_keep=1: only the residual stream is needed; skip most of the unembedding.
        model.hf_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    return store


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
    if pooling not in ("mean", "last"):
        raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}.")
    start, end = span
    out: dict[int, np.ndarray] = {}
    for layer, probe in probes.items():
        if layer not in residuals:
            continue
        acts = residuals[layer][:, start:end] if pooling == "mean" else residuals[layer][:, end - 1 : end]
        pooled = acts.mean(dim=1).numpy()  # [batch, d_model]
        pred = np.asarray(probe.predict(pooled), dtype=np.float64).reshape(len(pooled), -1)
        if pred.shape[1] != 1:
            raise ValueError(
                f"The probe for layer {layer} predicts {pred.shape[1]} outputs; pass single-output "
                "predictors (one attribute), e.g. wrap a multi-attribute probe to select a column."
            )
        out[layer] = pred[:, 0]
    return out
