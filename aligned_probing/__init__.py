"""aligned-probing: relate what language models say (toxicity) to what they encode, and test it causally.

The public API is declared once here. Names resolve lazily (PEP 562), so `import aligned_probing`
is instant and does not import torch or transformers until a name that needs them is used.

Example:
    >>> from aligned_probing import load_model, embedded_prompts, get_scorer  # doctest: +SKIP
    >>> model = load_model("smollm2-135m-instruct")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # models
    **dict.fromkeys(
        ["load_model", "LoadedModel", "list_registry", "registry_names", "DEFAULT_MODEL", "list_cache",
         "clear_cache", "CacheEntry", "CorruptCacheWarning", "HubUnavailableError", "QUANTIZATIONS",
         "resid_hook_name", "bridge_model", "load_local_hf", "tokenizer_fingerprint"],
        "aligned_probing.models",
    ),
    # scoring
    **dict.fromkeys(
        ["ATTRIBUTES", "Scorer", "get_scorer", "ScoreCache", "CachedScorer", "JigsawScorer",
         "EnsembleScorer", "DetoxifyScorer", "PerspectiveScorer", "ScoringWarning",
         "verify_embedded_scorer", "SCORER_NAMES", "PerspectiveError", "JIGSAW_MODELS", "embedded_scorer",
         "text_hash", "validate_texts"],
        "aligned_probing.scoring",
    ),
    # prompts, templates, generation
    **dict.fromkeys(
        ["PromptSet", "PromptDataWarning", "embedded_prompts", "load_prompts", "load_rtp_jsonl",
         "load_hf_dataset", "load_text", "load_csv", "EMBEDDED_SETS", "CANONICAL_ATTRIBUTES",
         "EXTRA_ATTRIBUTES", "SCORE_PREFIX", "prompt_id", "score_columns"],
        "aligned_probing.data",
    ),
    **dict.fromkeys(
        ["render_prompt", "RenderedPrompt", "TemplateTruncationWarning", "TEMPLATES"],
        "aligned_probing.data.templates",
    ),
    **dict.fromkeys(
        ["generate_continuations", "read_continuations", "CONTINUATION_COLUMNS"],
        "aligned_probing.generation",
    ),
    **dict.fromkeys(["GenerationSettings", "SamplingSettings"], "aligned_probing.generation_settings"),
    # encoding and the store
    **dict.fromkeys(["encode", "EmptyContinuationWarning", "PADDING_SIDES", "StoreCorruptError"], "aligned_probing.encoding"),
    # prompt sources (one schema for every config) and data errors
    **dict.fromkeys(
        ["DataError", "PromptSource", "load_prompt_source", "prompt_source_key", "resolve_prompt_source"],
        "aligned_probing.data",
    ),
    "rows_lost": "aligned_probing.probing",
    # probe-based fine-tuning statistics and sources
    **dict.fromkeys(
        ["auroc_with_ci", "best_probe_layer", "load_finetune_prompts", "paired_auroc_difference",
         "paired_comparisons", "paired_mean_difference", "resolve_probe_layer", "sft_examples", "weighted_auroc"],
        "aligned_probing.training",
    ),
    "ActivationStore": "aligned_probing.encoding.store",
    **dict.fromkeys(
        ["Aggregator", "mean_aggregator", "last_aggregator", "max_aggregator", "get_aggregator"],
        "aligned_probing.encoding.pooling",
    ),
    # probing
    **dict.fromkeys(
        ["RidgeProbe", "run_probing", "summarize", "peak_layers", "SCENARIOS", "ProbeFingerprint",
         "save_probe", "load_probe", "LayerwiseProbe", "online_codelength", "OnlineCode", "DEFAULT_ALPHAS",
         "RESULT_COLUMNS", "MDL_COLUMNS", "MDL_FRACTIONS", "SCENARIO_POSITION", "build_designs"],
        "aligned_probing.probing",
    ),
    # behaviour, interplay, causal
    **dict.fromkeys(
        ["behaviour_metrics", "per_prompt_metrics", "UnstableEMTWarning"], "aligned_probing.behaviour"
    ),
    **dict.fromkeys(["interplay", "information_strength"], "aligned_probing.interplay"),
    **dict.fromkeys(
        ["LayerSkip", "ResidualPatch", "Steering", "Compose", "Intervention", "InterventionHandle",
         "layer_skipping", "activation_patching", "match_pairs", "clean_pair_continuations", "steering_sweep",
         "StatSettings", "generate_and_score", "paired_effects", "continuation_log_perplexity",
         "probe_readout", "record_residuals", "paired_sweep", "Condition", "Contrast", "PromptPatch",
         "random_direction", "median_residual_norm", "encode_prompts", "steering_operator", "SteeringOperator",
         "OPERATORS", "addition_operator", "ablation_operator", "ablation_then_addition_operator"],
        "aligned_probing.causal",
    ),
    **dict.fromkeys(["export_steering_vector", "steering_vector"], "aligned_probing.causal.vectors"),
    # probe-based fine-tuning
    **dict.fromkeys(
        ["run_finetune", "results_wide", "FinetuneConfig", "load_finetune_config", "LogisticProbe",
         "ProbeSet", "fit_probe_set", "ProbePenalty", "ProbeSFTConfig", "ProbePenaltySFTTrainer",
         "build_preference_pairs", "save_finetuned", "checkpoint_aurocs", "ARMS", "completed_results",
         "auroc_change", "list_checkpoints", "AdapterCheckpointCallback"],
        "aligned_probing.training",
    ),
    # experiment config and pipeline
    "RunConfig": "aligned_probing.pipeline.config",
    **dict.fromkeys(["load_results", "RunResults", "build_report"], "aligned_probing.pipeline.results"),
    "render_report": "aligned_probing.report.html",
    **dict.fromkeys(
        ["run_pipeline", "RunResult", "build_plan", "load_config", "STAGE_NAMES"],
        "aligned_probing.pipeline.plan",
    ),
    # executors (local by default; Ray is an optional extra)
    **dict.fromkeys(
        ["get_executor", "LocalExecutor", "RayExecutor", "Resources"], "aligned_probing.pipeline.executors"
    ),
}

# public name -> submodule exposed as an attribute (`from aligned_probing import plots`)
_MODULES: dict[str, str] = {"plots": "aligned_probing.report.plots"}

__all__ = sorted(_EXPORTS) + sorted(_MODULES) + ["__version__"]

# names whose attribute differs from the public name
_ALIASES: dict[str, str] = {"run_pipeline": "run"}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None and name in _MODULES:
        value: Any = importlib.import_module(_MODULES[name])
    elif module is None:
        raise AttributeError(f"module 'aligned_probing' has no attribute {name!r}")
    else:
        value = getattr(importlib.import_module(module), _ALIASES.get(name, name))
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
