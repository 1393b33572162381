"""Causal evidence: layer skipping, activation patching and steering through TransformerLens hooks.

`interventions` holds the scoped, reversible hooks (`LayerSkip`, `ResidualPatch`, `Steering`,
`Compose`); `skipping`, `patching` and `steering` run the experiments and return tidy DataFrames.
"""

from aligned_probing.causal._activations import probe_readout, record_residuals
from aligned_probing.causal._runs import (
    GenerationSettings,
    StatSettings,
    continuation_log_perplexity,
    generate_and_score,
    paired_effects,
)
from aligned_probing.causal.interventions import (
    Compose,
    Intervention,
    InterventionHandle,
    LayerSkip,
    ResidualPatch,
    Steering,
)
from aligned_probing.causal.patching import activation_patching, clean_pair_continuations, match_pairs
from aligned_probing.causal.skipping import layer_skipping
from aligned_probing.causal.steering import steering_sweep

__all__ = [
    "Compose",
    "GenerationSettings",
    "Intervention",
    "InterventionHandle",
    "LayerSkip",
    "ResidualPatch",
    "StatSettings",
    "Steering",
    "activation_patching",
    "clean_pair_continuations",
    "continuation_log_perplexity",
    "generate_and_score",
    "layer_skipping",
    "match_pairs",
    "paired_effects",
    "probe_readout",
    "record_residuals",
    "steering_sweep",
]
