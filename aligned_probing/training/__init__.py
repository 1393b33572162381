"""Probe-based fine-tuning (Wehner & Fritz, 2025): probe-penalty SFT, probe-ranked DPO, retention.

See docs/finetuning.md. Entry point: `run_finetune(config)`; the pieces are importable on their own.
Names are resolved lazily: importing TRL and transformers takes many seconds, and `import
aligned_probing.training` (e.g. by the CLI) should not pay for it until a trainer is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "capture_residual": "activations", "pooled_response_activations": "activations",
    "ARMS": "config", "FinetuneConfig": "config", "load_finetune_config": "config",
    "LabelledSamples": "data", "benign_texts": "data", "label_continuations": "data",
    "save_samples": "data", "split_by_prompt": "data",
    "build_preference_pairs": "dpo", "train_dpo": "dpo", "preference_examples": "dpo", "dpo_trainer": "dpo",
    "AdapterCheckpointCallback": "finetuned", "load_trainable": "finetuned", "lora_config": "finetuned",
    "save_finetuned": "finetuned", "TrainingLogCallback": "finetuned",
    "ProbePenalty": "penalty",
    "LogisticProbe": "probes", "ProbeSet": "probes", "auroc": "probes", "fit_probe_set": "probes",
    "perplexity": "retention", "probe_aurocs": "retention", "retrained_auroc": "retention",
    "auroc_with_ci": "retention", "paired_auroc_difference": "retention",
    "paired_mean_difference": "retention", "weighted_auroc": "retention", "paired_comparisons": "run",
    "best_probe_layer": "sources", "load_finetune_prompts": "sources", "resolve_probe_layer": "sources",
    "sft_examples": "sft",
    "toxicity_summary": "retention",
    "completed_results": "run", "results_wide": "run", "run_finetune": "run",
    "ProbePenaltySFTTrainer": "sft", "ProbeSFTConfig": "sft", "train_probe_sft": "sft",
    "auroc_change": "trajectory", "checkpoint_aurocs": "trajectory", "list_checkpoints": "trajectory",
}
# Building blocks reachable here as attributes, but not public API (`aligned_probing.__all__`, which
# this list must not widen).
_INTERNAL = {
    "LabelledSamples", "TrainingLogCallback", "auroc", "benign_texts", "capture_residual",
    "dpo_trainer", "label_continuations", "load_trainable", "lora_config", "perplexity", "preference_examples",
    "pooled_response_activations",
    "probe_aurocs", "retrained_auroc", "save_samples", "split_by_prompt", "toxicity_summary", "train_dpo",
    "train_probe_sft",
}
__all__ = sorted(set(_EXPORTS) - _INTERNAL)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aligned_probing.training' has no attribute {name!r}")
    return getattr(importlib.import_module(f"aligned_probing.training.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(_EXPORTS)
