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
    "build_preference_pairs": "dpo", "train_dpo": "dpo",
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
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aligned_probing.training' has no attribute {name!r}")
    return getattr(importlib.import_module(f"aligned_probing.training.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
