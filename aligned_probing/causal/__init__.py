"""Causal evidence: layer skipping, activation patching and steering through TransformerLens hooks.

`interventions` holds the scoped, reversible hooks (`LayerSkip`, `ResidualPatch`, `PromptPatch`,
`Steering` with its operators, `Compose`); `sweep.paired_sweep` turns conditions into paired effects,
and `skipping`, `patching` and `steering` build their conditions on it and return tidy DataFrames.
"""

from aligned_probing.causal._activations import (
    encode_prompts,
    median_residual_norm,
    probe_readout,
    record_residuals,
)
from aligned_probing.causal._runs import (
    GenerationSettings,
    StatSettings,
    continuation_log_perplexity,
    generate_and_score,
    paired_effects,
)
from aligned_probing.causal.interventions import (
    OPERATORS,
    Compose,
    Intervention,
    InterventionHandle,
    LayerSkip,
    PromptPatch,
    ResidualPatch,
    Steering,
    SteeringOperator,
    ablation_operator,
    ablation_then_addition_operator,
    addition_operator,
    steering_operator,
)
from aligned_probing.causal.patching import activation_patching, clean_pair_continuations, match_pairs
from aligned_probing.causal.skipping import layer_skipping
from aligned_probing.causal.steering import random_direction, steering_sweep
from aligned_probing.causal.sweep import Condition, Contrast, paired_sweep

__all__ = [
    "OPERATORS",
    "Compose",
    "Condition",
    "Contrast",
    "GenerationSettings",
    "Intervention",
    "InterventionHandle",
    "LayerSkip",
    "PromptPatch",
    "ResidualPatch",
    "StatSettings",
    "Steering",
    "SteeringOperator",
    "ablation_operator",
    "ablation_then_addition_operator",
    "activation_patching",
    "addition_operator",
    "clean_pair_continuations",
    "continuation_log_perplexity",
    "encode_prompts",
    "generate_and_score",
    "layer_skipping",
    "match_pairs",
    "median_residual_norm",
    "paired_effects",
    "paired_sweep",
    "probe_readout",
    "random_direction",
    "record_residuals",
    "steering_operator",
    "steering_sweep",
]
