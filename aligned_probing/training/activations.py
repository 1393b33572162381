"""Residual activations pooled over response tokens, differentiable or not, for any causal LM.

Probe training (no grad) and the probe penalty (with grad into LoRA weights) read the same tensor
through the same routine, so the frozen probe sees during training exactly what it was fitted on.

Why plain torch hooks and not the bridge's hook points: the `TransformerBridge` wraps the Hugging
Face modules in place (`q_proj` becomes a bridge component around `_original_component`), and PEFT's
LoRA injection and `save_pretrained` key names assume the plain module tree. We therefore train a
plain Hugging Face model and hook its decoder layers; `tests/test_training_activations.py` checks
that the tensor read here equals the bridge's `hook_names[layer]` (residual layer l = output of
decoder layer l - 1, layer 0 = the input of decoder layer 0, i.e. the embedding output).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder-layer list of a causal LM (plain, bridged or PEFT-wrapped).

    Finds the first `ModuleList` whose length equals `config.num_hidden_layers`, which covers Llama,
    Gemma-3 and their PEFT/bridge wrappers without an architecture table.
    """
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = getattr(text_config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(
        f"Could not find a ModuleList of {n_layers} decoder layers in {type(model).__name__}; "
        "pass a Hugging Face causal LM (optionally wrapped by PEFT)."
    )


@contextmanager
def capture_residual(model: torch.nn.Module, layer: int) -> Iterator[list[Tensor]]:
    """Record residual layer `layer` on every forward pass inside the block, keeping the graph.

    Args:
        model: A Hugging Face causal LM (plain, bridged or PEFT-wrapped).
        layer: Residual layer, 0 (embedding output) to L (last block's output, before the final norm).

    Yields:
        A list that receives one `[batch, pos, d_model]` tensor per forward pass (not detached, so
        gradients flow back through it).
    """
    layers = decoder_layers(model)
    if not 0 <= layer <= len(layers):
        raise ValueError(f"layer must be in [0, {len(layers)}], got {layer}.")
    captured: list[Tensor] = []

    def _pre_hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])

    def _post_hook(_module: torch.nn.Module, _args: tuple, output: Tensor | tuple) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    if layer == 0:
        handle = layers[0].register_forward_pre_hook(_pre_hook, with_kwargs=True)
    else:
        handle = layers[layer - 1].register_forward_hook(_post_hook)
    try:
        yield captured
    finally:
        handle.remove()


def masked_mean(acts: Tensor, mask: Tensor) -> Tensor:
    """Mean of `acts` [batch, pos, d] over positions where `mask` [batch, pos] is 1.

    Rows without any masked position give zeros (NaN would poison a whole batch's gradient).
    """
    weights = mask.to(acts.dtype).unsqueeze(-1)  # (B, T, 1)
    return (acts * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def pad_sequences(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad prompt + response ids into a batch with an attention mask and a response mask.

    Returns:
        `input_ids`, `attention_mask` and `response_mask`, each `[batch, max_len]`; the response mask
        is 1 exactly on the response tokens (never on prompt, template or padding).
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(
            f"prompt_ids and response_ids must have the same length, got {len(prompt_ids)} and "
            f"{len(response_ids)}."
        )
    rows = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    response = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        n_p, n_r = len(p), len(r)
        input_ids[i, : n_p + n_r] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention[i, : n_p + n_r] = 1
        response[i, n_p : n_p + n_r] = 1
    return input_ids, attention, response


@torch.no_grad()
def pooled_response_activations(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    layer: int,
    *,
    pad_token_id: int,
    batch_size: int = 16,
    progress: bool = False,
) -> np.ndarray:
    """Mean residual activation at `layer` over each response's tokens (teacher-forced).

    Args:
        model: A Hugging Face causal LM (plain, bridged or PEFT-wrapped).
        prompt_ids: Rendered prompt token ids per sample.
        response_ids: Response (continuation) token ids per sample; empty responses give zeros.
        layer: Residual layer 0..L.
        pad_token_id: Padding id (masked out).
        batch_size: Sequences per forward pass.
        progress: Show a tqdm bar over the batches.

    Returns:
        Float32 array `[n_samples, d_model]`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[np.ndarray] = []
    try:
        starts = range(0, len(prompt_ids), batch_size)
        for start in tqdm(starts, desc="activations", unit="batch", disable=not progress):
            ids, attn, resp = pad_sequences(
                prompt_ids[start : start + batch_size], response_ids[start : start + batch_size], pad_token_id
            )
            with capture_residual(model, layer) as captured:
                model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False)
            pooled = masked_mean(captured[-1].float(), resp.to(device))
            out.append(pooled.cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out, axis=0).astype(np.float32)
