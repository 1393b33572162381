"""Export a probe direction as a steering vector other tools read (steering-vectors' layer -> tensor map).

The file is safetensors: one `[d_model]` float32 tensor per steered decoder block, keyed by the
block index as a decimal string (`"5"`), holding exactly what `Steering(layer, direction, alpha)`
adds to the residual stream: `alpha * direction / ||direction||`. Its string metadata records
`format`, `layer_type = "decoder_block"`, `residual_layer`, `hook_name`, `alpha` and `model`.

Layer indices. Our residual layer `l` (0 = embedding output; `resid_hook_name(l)`) is, for l >= 1,
the output of decoder block `l - 1`: TransformerLens `blocks.{l-1}.hook_resid_post`, Hugging Face
`model.model.layers[l - 1]`'s output hidden states, `hidden_states[l]` of `output_hidden_states`.
The file therefore keys the vector by `l - 1`, which is the index steering-vectors' `SteeringVector`
(`layer_type="decoder_block"`) and a forward hook on `model.model.layers[l - 1]` use. Layer 0 (the
embedding output) is not the output of any decoder block, so it cannot be exported.

Reading it back without aligned-probing (steering-vectors, or plain torch):

    >>> from safetensors.torch import load_file  # doctest: +SKIP
    >>> vectors = {int(k): v for k, v in load_file("toxicity.safetensors").items()}  # doctest: +SKIP
    >>> from steering_vectors import SteeringVector  # doctest: +SKIP
    >>> sv = SteeringVector(vectors, layer_type="decoder_block")  # doctest: +SKIP
    >>> with sv.apply(hf_model):  # doctest: +SKIP
    ...     hf_model.generate(...)

or `hf_model.model.layers[k].register_forward_hook(...)` adding `v` to the block's output hidden
states at every position (tests/test_steering_export.py does exactly that).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import save_file

from aligned_probing.causal.interventions import Steering

__all__ = ["STEERING_VECTOR_FORMAT", "export_steering_vector", "steering_vector"]

STEERING_VECTOR_FORMAT = "steering-vectors/layer_activations"


class _HasDirection(Protocol):
    def direction(self, attribute: str | int = 0) -> np.ndarray: ...


def steering_vector(
    direction: _HasDirection | np.ndarray | torch.Tensor, *, layer: int, alpha: float
) -> dict[int, torch.Tensor]:
    """The decoder-block -> vector map that adds what `Steering(layer, direction, alpha)` adds.

    Args:
        direction: A fitted 1-target probe (its `direction()`), or a `[d_model]` vector (normalised here).
        layer: Our residual layer l >= 1 (the output of decoder block l - 1).
        alpha: Signed step in residual-stream units.

    Returns:
        `{layer - 1: alpha * unit direction}`, float32 `[d_model]`.
    """
    if isinstance(layer, bool) or not isinstance(layer, int | np.integer) or layer < 1:
        raise ValueError(
            f"layer must be a residual layer >= 1 (the output of decoder block layer - 1), got {layer!r}; "
            "layer 0 is the embedding output, which no decoder block outputs."
        )
    vector = direction.direction() if hasattr(direction, "direction") else direction
    steer = Steering(int(layer), vector, alpha)
    return {int(layer) - 1: (steer.alpha * steer.unit).contiguous()}


def export_steering_vector(
    direction: _HasDirection | np.ndarray | torch.Tensor,
    path: str | Path,
    *,
    layer: int,
    alpha: float = 1.0,
    model: str | None = None,
) -> Path:
    """Write the steering vector of `direction` at residual `layer` as a steering-vectors safetensors file.

    Args:
        direction: A fitted 1-target probe (e.g. `load_results(run).probe(layer=6)`) or a `[d_model]` vector.
        path: The `.safetensors` file to write.
        layer: Our residual layer l >= 1; the file keys it by decoder block l - 1 (see the module docs).
        alpha: Signed step in residual-stream units (negative steers away from the attribute).
        model: Model name recorded in the metadata; default: the probe's fingerprint, if any.

    Returns:
        The path written.

    Example:
        >>> res = load_results("runs/quickstart")  # doctest: +SKIP
        >>> probe = res.probe(layer=14)  # doctest: +SKIP
        >>> export_steering_vector(probe, "toxicity.safetensors", layer=14, alpha=-8.0)  # doctest: +SKIP
    """
    from aligned_probing.models import resid_hook_name

    vectors = steering_vector(direction, layer=layer, alpha=alpha)
    fingerprint = getattr(direction, "fingerprint_", None)
    if fingerprint is not None and fingerprint.layer != layer:
        raise ValueError(
            f"the probe was fitted at layer {fingerprint.layer}, got layer={layer}: export it at the layer "
            "it reads, or pass its direction() as a vector to steer elsewhere on purpose."
        )
    name = model if model is not None else (fingerprint.model_name if fingerprint is not None else "")
    metadata = {
        "format": STEERING_VECTOR_FORMAT,
        "layer_type": "decoder_block",
        "residual_layer": str(layer),
        "hook_name": resid_hook_name(int(layer)),
        "alpha": json.dumps(float(alpha)),
        "model": name,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({str(k): v for k, v in vectors.items()}, path, metadata=metadata)
    return path
