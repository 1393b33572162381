"""Generation on the real embedded models is fluent and KV-cache exact (slow: loads the models).

These are the tests that a broken transformers / TransformerLens pair fails (transformers 5.24 with
TransformerLens 4.3 produced token salad at 6.2-6.7 nats of log-perplexity while every tiny-model
test passed).
"""

from __future__ import annotations

import pytest
import torch

from aligned_probing import embedded_prompts, load_model
from aligned_probing.causal.interventions import LayerSkip, ResidualPatch, Steering
from aligned_probing.data.templates import render_prompt
from aligned_probing.generation import generate_continuations
from aligned_probing.generation_checks import check_generation, check_greedy

pytestmark = pytest.mark.slow

#: Upper bound on the log-perplexity (nats/token) of sampled continuations under their own model.
#: Measured on 8 RTP prompts x k = 2 x 20 tokens (seed 0), transformers 5.23: SmolLM2 2.98, Gemma-3
#: base 2.81 (cached vs uncached max |diff| 1.2e-5 and 1.4e-5 nats); the broken 5.24 install gave
#: 6.2-6.7. Sampling at temperature 1 with top-p 0.9 keeps samples near the model's entropy, so 4.5
#: leaves ~1.5 nats for prompt-set noise and sits 1.7 below salad. For the embedded models only.
FLUENT_LOG_PPL = 4.5
MODELS = ["smollm2-135m-instruct", "gemma-3-270m"]


@pytest.fixture(scope="module", params=MODELS)
def real_model(request):
    return load_model(request.param)


@pytest.fixture(scope="module")
def prompts():
    return embedded_prompts("rtp-challenging").sample(8, stratify_by=None, seed=0)


def test_sampled_continuations_are_fluent_and_pass_the_self_check(real_model, prompts):
    conts = generate_continuations(real_model, prompts, k=2, seed=0, max_new_tokens=20, batch_size=8)
    check = check_generation(real_model, conts, max_new_tokens=20, n_rows=6, n_greedy_prompts=3)
    assert check.passed, check.message
    assert check.log_perplexity < FLUENT_LOG_PPL, (
        f"{real_model.name}: sampled continuations have log-perplexity {check.log_perplexity:.2f} nats under the "
        f"model itself (bound {FLUENT_LOG_PPL}); e.g. {conts['text'].iloc[0]!r}. Likely a broken KV cache path."
    )
    assert check.max_abs_logprob_diff < 1e-3


def _interventions(model):
    layer = model.n_layers // 3
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    return {
        "none": None,
        "layer skip": LayerSkip(layer),
        "steering": Steering(layer, direction / direction.norm(), alpha=4.0),
        # Patch the first two prompt positions with a fixed vector: positions persist through the cache.
        "patch": ResidualPatch(layer, torch.zeros(2, model.d_model), positions=[0, 1]),
    }


@pytest.mark.parametrize("which", ["none", "layer skip", "steering", "patch"])
def test_cached_greedy_equals_uncached_greedy_for_20_tokens(real_model, prompts, which):
    ids = [render_prompt(real_model.tokenizer, t, 0).input_ids for t in prompts.df["text"].head(3)]
    intervention = _interventions(real_model)[which]
    if intervention is None:
        mismatches, ties, details = check_greedy(real_model, ids, 20)
    else:
        with intervention.apply(real_model):
            mismatches, ties, details = check_greedy(real_model, ids, 20)
    assert mismatches == 0, f"{real_model.name} with {which}: cached and uncached greedy differ: {details}"
    assert ties == 0, f"{real_model.name} with {which}: a divergence at a numerical tie: {details}"
