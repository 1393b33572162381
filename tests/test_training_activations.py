"""Residual capture: same tensor as the bridge's hook points, exact response masks, batching invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aligned_probing.training.activations import capture_residual, pad_sequences, pooled_response_activations
from aligned_probing.training.finetuned import load_trainable, lora_config


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_capture_matches_bridge_hook(tiny_model, tiny_llama_dir, layer):
    ids = torch.tensor([[5, 9, 23, 41, 7, 12]])
    seen = {}

    def read(tensor, hook):
        seen["bridge"] = tensor.detach().clone()
        return tensor

    with torch.no_grad(), tiny_model.bridge.hooks(fwd_hooks=[(tiny_model.hook_names[layer], read)]):
        tiny_model.hf_model(input_ids=ids)
    plain, _ = load_trainable(tiny_llama_dir)
    from peft import get_peft_model

    peft_model = get_peft_model(plain, lora_config(r=2, alpha=4))  # LoRA B = 0: same function as the base
    with torch.no_grad(), capture_residual(peft_model, layer) as captured:
        peft_model(input_ids=ids)
    drift = (captured[-1] - seen["bridge"]).abs().max().item()
    name = tiny_model.hook_names[layer]
    assert drift < 1e-5, f"PEFT-wrapped capture drifts {drift:.2e} from bridge hook {name}"


def test_pad_sequences_masks_by_hand():
    ids, attn, resp = pad_sequences([[1, 2], [3]], [[4, 5, 6], [7]], pad_token_id=0)
    assert ids.tolist() == [[1, 2, 4, 5, 6], [3, 7, 0, 0, 0]]
    assert attn.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # row 0: prompt (2 tokens) then a 3-token response; row 1: 1 prompt token, 1 response token, padding
    assert resp.tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]


def test_pooled_batched_equals_unbatched(tiny_model):
    prompts = [[5, 9, 23], [41], [7, 12, 30, 31]]
    responses = [[8, 9], [10, 11, 12, 13], [14]]
    kw = {"pad_token_id": tiny_model.pad_token_id}
    batched = pooled_response_activations(tiny_model.hf_model, prompts, responses, 2, batch_size=3, **kw)
    single = pooled_response_activations(tiny_model.hf_model, prompts, responses, 2, batch_size=1, **kw)
    np.testing.assert_allclose(batched, single, atol=1e-5)
    with torch.no_grad(), capture_residual(tiny_model.hf_model, 2) as cap:
        tiny_model.hf_model(input_ids=torch.tensor([prompts[1] + responses[1]]))
    np.testing.assert_allclose(batched[1], cap[-1][0, 1:].mean(0).numpy(), atol=1e-5)


def test_bad_layer_names_range(tiny_model):
    with pytest.raises(ValueError, match=r"layer must be in \[0, 3\]"):
        with capture_residual(tiny_model.hf_model, 9):
            pass
