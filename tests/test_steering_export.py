"""An exported steering vector, read back without aligned-probing and applied with plain torch hooks,
gives the same logits as our `Steering` intervention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aligned_probing.causal import Steering
from aligned_probing.causal.vectors import export_steering_vector


def _plain_hf_logits(model_dir, vector_file, ids):
    """Reference: transformers + safetensors only, one forward hook per exported decoder block."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with safe_open(vector_file, framework="pt") as f:
        meta = f.metadata()
    assert meta["layer_type"] == "decoder_block"
    handles = []
    for key, vec in load_file(vector_file).items():

        def add(module, args, output, vec=vec):
            if isinstance(output, tuple):
                return (output[0] + vec,) + output[1:]
            return output + vec

        handles.append(hf.model.layers[int(key)].register_forward_hook(add))
    try:
        with torch.no_grad():
            return hf(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("layer", [1, 3])
def test_exported_vector_with_plain_hooks_equals_steering(tiny_model, tiny_llama_dir, tmp_path, layer):
    rng = np.random.default_rng(layer)
    direction = rng.standard_normal(tiny_model.d_model)
    alpha = -4.0
    path = export_steering_vector(direction, tmp_path / "v.safetensors", layer=layer, alpha=alpha)
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        plain = tiny_model.hf_model(input_ids=ids).logits
        with Steering(layer, direction, alpha).apply(tiny_model):
            ours = tiny_model.hf_model(input_ids=ids).logits
    theirs = _plain_hf_logits(tiny_llama_dir, path, ids)
    assert (ours - plain).abs().max() > 1e-3  # the intervention changes the logits: not a vacuous comparison
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_export_keys_decoder_block_and_rejects_layer_zero(tmp_path):
    from safetensors.torch import load_file

    direction = np.array([3.0, 4.0])
    path = export_steering_vector(direction, tmp_path / "v.safetensors", layer=5, alpha=2.0)
    vectors = load_file(path)
    assert list(vectors) == ["4"]  # residual layer 5 = output of decoder block 4
    torch.testing.assert_close(vectors["4"], torch.tensor([1.2, 1.6]))  # alpha x unit direction
    with pytest.raises(ValueError, match="layer 0 is the embedding output"):
        export_steering_vector(direction, tmp_path / "w.safetensors", layer=0)
