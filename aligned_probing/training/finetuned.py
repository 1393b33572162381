"""Load a trainable Hugging Face model, attach LoRA, and save fine-tuned models without pickles.

Outputs per run: an adapter directory (PEFT `adapter_model.safetensors` + `adapter_config.json`
+ tokenizer) and a merged directory (full `model.safetensors` + config + tokenizer), both loadable
by `aligned_probing.models.load_model`. Intermediate checkpoints come from `AdapterCheckpointCallback`
rather than the Trainer's own checkpointing, which writes `training_args.bin` and optimizer state
with `torch.save` (pickles); the Trainer runs with `save_strategy="no"`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback


def load_trainable(
    source: str | Path, *, dtype: torch.dtype = torch.float32, revision: str | None = None,
    local_files_only: bool = False,
) -> tuple[Any, Any]:
    """A plain (un-bridged) Hugging Face causal LM and tokenizer from a local directory or a hub name.

    Eager attention matches what the bridge sees, so probe activations agree with `load_model`'s.
    The tokenizer gets a pad token (its EOS) on a copy if it has none; the saved directories carry it.
    A hub name is read through the Hugging Face cache (where `load_model` has already put it).

    Args:
        source: A local Hugging Face directory (with config.json) or a hub repo id.
        dtype: Parameter dtype (float32 master weights; the Trainer autocasts to bf16 on a GPU).
        revision: Hub revision, for hub names.
        local_files_only: Read a hub name from the local cache only (no request to the hub).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source).expanduser()
    if path.exists() and not (path / "config.json").exists():
        raise ValueError(
            f"source must be a Hugging Face directory with config.json or a hub name, got {path}."
        )
    name = str(path) if path.exists() else str(source)
    extra: dict[str, Any] = {} if path.exists() or revision is None else {"revision": revision}
    if local_files_only and not path.exists():
        extra["local_files_only"] = True
    tokenizer = AutoTokenizer.from_pretrained(name, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if extra.get("local_files_only"):
        # transformers 5.23 does not hand local_files_only to its PEFT-adapter lookup, which then
        # asks the hub for adapter_config.json and retries for ~23 s when the hub is unreachable.
        extra["adapter_kwargs"] = {"local_files_only": True}
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="eager", **extra)
    return model, tokenizer


def lora_config(
    *, r: int = 16, alpha: int = 32, dropout: float = 0.0, target_modules: list[str] | None = None
) -> Any:
    """A PEFT `LoraConfig` for causal LMs (attention and MLP projections by default)."""
    from peft import LoraConfig

    targets = target_modules or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM"
    )


def save_finetuned(
    peft_model: Any, tokenizer: Any, out_dir: str | Path, *, info: dict[str, Any]
) -> dict[str, Path]:
    """Save `out_dir/adapter` (LoRA weights) and `out_dir/merged` (full weights), both as safetensors.

    The merge happens on the base weights in place after the adapter is written, so `peft_model` is
    unusable as a PEFT model afterwards (the returned merged model is what remains).

    Args:
        peft_model: The trained `PeftModel`.
        tokenizer: Its tokenizer (written into both directories).
        out_dir: Run-arm directory.
        info: JSON-ready facts written as `finetune.json` in both directories.

    Returns:
        `{"adapter": path, "merged": path}`.
    """
    out_dir = Path(out_dir)
    adapter_dir, merged_dir = out_dir / "adapter", out_dir / "merged"
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    tokenizer.save_pretrained(adapter_dir)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(merged_dir, safe_serialization=True)
    tokenizer.save_pretrained(merged_dir)
    for d in (adapter_dir, merged_dir):
        (d / "finetune.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    return {"adapter": adapter_dir, "merged": merged_dir}


class AdapterCheckpointCallback(TrainerCallback):
    """Save the LoRA adapter (safetensors) every `every` optimizer steps, for training-dynamics studies.

    Writes `out_dir/checkpoint-{step}/` with the adapter, the tokenizer and `trainer_state.json`-like
    facts (step, epoch, last logged losses); nothing is pickled.
    """

    def __init__(self, out_dir: str | Path, every: int, tokenizer: Any) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}.")
        self.out_dir = Path(out_dir)
        self.every = every
        self.tokenizer = tokenizer

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: D102
        if state.global_step % self.every == 0 and model is not None:
            directory = self.out_dir / f"checkpoint-{state.global_step}"
            model.save_pretrained(directory, safe_serialization=True)
            self.tokenizer.save_pretrained(directory)
            facts = {"step": state.global_step, "epoch": state.epoch, "log_history": state.log_history[-3:]}
            (directory / "checkpoint.json").write_text(json.dumps(facts, indent=2, default=str))
        return control


class TrainingLogCallback(TrainerCallback):
    """Keep the final optimizer step and the Trainer's log history (losses), for `finetune.json`.

    The Trainer itself only writes these into its pickled checkpoints, which we never save.
    """

    def __init__(self) -> None:
        self.global_step = 0
        self.log_history: list[dict[str, Any]] = []

    def on_train_end(self, args, state, control, **kwargs):  # noqa: D102
        self.global_step = int(state.global_step)
        self.log_history = [dict(entry) for entry in state.log_history]
        return control
