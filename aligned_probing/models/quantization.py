"""Weight-only quantization on CPU, for the quantization case study (full, half, int8, 4-bit).

We use optimum-quanto (Hugging Face's quantization library): unlike bitsandbytes it runs on CPU,
and its `QLinear` modules keep the `nn.Linear` interface, so the bridge's hooks fire unchanged.
Activations stay in the model's dtype; only the weights of linear layers are rounded.
"""

from __future__ import annotations

import torch

QUANTIZATIONS: tuple[str, ...] = ("int8", "4bit")
# The unembedding is kept in full precision, as Transformers' bitsandbytes integration does by
# default: it is tied to the embedding in the embedded models, and quantizing it would untie it.
_EXCLUDE = ["lm_head"]


def check_quantization(quantization: str | None) -> None:
    """Raise `ValueError` unless `quantization` is None or one of `QUANTIZATIONS`."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization must be None or one of {list(QUANTIZATIONS)}, got {quantization!r}."
        )


def quantize_weights(model: torch.nn.Module, quantization: str) -> torch.nn.Module:
    """Quantize the linear-layer weights of `model` in place and freeze them.

    `int8` is per-output-channel symmetric int8; `4bit` is group-wise (128) affine int4, both
    from optimum-quanto. The model is modified in place (the name says so) and returned.

    Args:
        model: A Hugging Face causal LM.
        quantization: "int8" or "4bit".

    Returns:
        The same model, quantized.
    """
    check_quantization(quantization)
    from optimum.quanto import freeze, qint4, qint8, quantize

    weights = {"int8": qint8, "4bit": qint4}[quantization]
    quantize(model, weights=weights, exclude=_EXCLUDE)
    freeze(model)
    return model
