"""Probe retention along training: frozen-probe AUROC on fixed texts, read through each checkpoint.

`run_finetune` measures retention on each fine-tuned model's *own* generations. This module asks the
complementary question on *fixed* inputs: the base model's labelled evaluation continuations are
teacher-forced through the base model, every saved adapter checkpoint and the final merged model,
and the frozen probes score the pooled activations. Inputs and labels never change, so a falling
AUROC means the representation moved away from the probe, not that the texts got easier or harder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aligned_probing.training.activations import pooled_response_activations
from aligned_probing.training.probes import ProbeSet
from aligned_probing.training.retention import probe_aurocs

_CHECKPOINT = re.compile(r"checkpoint-(\d+)$")
SAMPLE_COLUMNS = ("prompt_token_ids", "token_ids", "label")


def list_checkpoints(arm_dir: str | Path) -> list[tuple[str, int, Path]]:
    """`(name, step, directory)` of an arm's models in training order: adapter checkpoints, then `final`.

    `final` is the merged model; its step comes from `merged/finetune.json` (`global_step`), or is
    one past the last checkpoint when an older run did not record it.
    """
    arm_dir = Path(arm_dir)
    found = []
    for d in (arm_dir / "checkpoints").glob("checkpoint-*"):
        match = _CHECKPOINT.search(d.name)
        if match and (d / "adapter_config.json").exists():
            found.append((d.name, int(match.group(1)), d))
    found.sort(key=lambda item: item[1])
    merged = arm_dir / "merged"
    if (merged / "config.json").exists():
        facts = merged / "finetune.json"
        info = json.loads(facts.read_text()) if facts.exists() else {}
        last = found[-1][1] if found else 0
        step = int(info.get("global_step") or last + 1)
        if not found or step > last:
            found.append(("final", step, merged))
    return found


def _load(base_dir: Path, model_dir: Path | None) -> tuple[Any, Any]:
    """The base model, a base + adapter checkpoint, or a merged model, with its tokenizer."""
    from aligned_probing.training.finetuned import load_trainable

    if model_dir is None or (model_dir / "config.json").exists():
        return load_trainable(model_dir or base_dir)
    from peft import PeftModel

    model, tokenizer = load_trainable(base_dir)
    return PeftModel.from_pretrained(model, model_dir), tokenizer


def checkpoint_aurocs(
    base_dir: str | Path,
    arm_dirs: Sequence[str | Path],
    samples: pd.DataFrame,
    probe_sets: Mapping[str, ProbeSet],
    *,
    layer: int,
    batch_size: int = 16,
) -> pd.DataFrame:
    """AUROC of each frozen probe set on fixed labelled texts, for the base model and every checkpoint.

    Args:
        base_dir: The base model's Hugging Face directory (the arms' adapters sit on it).
        arm_dirs: Arm directories of a `run_finetune` output (each with `checkpoints/` and `merged/`).
        samples: Fixed texts with `prompt_token_ids`, `token_ids` and `label`, e.g. the base model's
            `base/eval_samples.parquet` (written by `save_samples`).
        probe_sets: Frozen probes by name, e.g. `{"frozen": ..., "heldout": ...}`.
        layer: Residual layer the probes read (their `meta["layer"]`).
        batch_size: Sequences per forward pass.

    Returns:
        Tidy rows: `arm` (`base` for step 0), `seed` (-1 outside seed dirs), `checkpoint`, `step`,
        `probe`, `auroc`, `n_test`, `n_toxic`. The base rows are repeated for every arm so each
        arm's curve starts at step 0.
    """
    missing = sorted(set(SAMPLE_COLUMNS) - set(samples.columns))
    if missing:
        raise ValueError(
            f"samples lacks {missing}; pass a table written by `save_samples` "
            "(e.g. base/eval_samples.parquet)."
        )
    for name, ps in probe_sets.items():
        if ps.meta.get("layer", layer) != layer:
            raise ValueError(f"probe set {name!r} reads layer {ps.meta['layer']}, not layer {layer}.")
    samples = samples[samples["token_ids"].map(len) > 0].reset_index(drop=True)
    prompts = [list(map(int, p)) for p in samples["prompt_token_ids"]]
    responses = [list(map(int, r)) for r in samples["token_ids"]]
    y = samples["label"].to_numpy(dtype=int)
    base_dir = Path(base_dir)

    def score(model_dir: Path | None) -> pd.DataFrame:
        model, tokenizer = _load(base_dir, model_dir)
        X = pooled_response_activations(
            model, prompts, responses, layer, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size
        )
        return probe_aurocs(probe_sets, X, y)

    base = score(None)
    frames = []
    for arm_dir in map(Path, arm_dirs):
        # `run_finetune` writes {arm}/seed{s}/; the arm is then the parent directory's name.
        is_seed_dir = arm_dir.name.startswith("seed") and arm_dir.name[4:].lstrip("-").isdigit()
        label = arm_dir.parent.name if is_seed_dir else arm_dir.name
        seed = int(arm_dir.name[4:]) if is_seed_dir else -1
        frames.append(base.assign(arm=label, seed=seed, checkpoint="base", step=0))
        for name, step, directory in list_checkpoints(arm_dir):
            frames.append(score(directory).assign(arm=label, seed=seed, checkpoint=name, step=step))
    if not frames:
        frames.append(base.assign(arm="base", seed=-1, checkpoint="base", step=0))
    table = pd.concat(frames, ignore_index=True)
    table["auroc"] = table["auroc"].astype(float)
    return table[["arm", "seed", "checkpoint", "step", "probe", "auroc", "n_test", "n_toxic"]]


def auroc_change(table: pd.DataFrame) -> pd.DataFrame:
    """Per (arm, probe): AUROC at step 0 and at the last checkpoint, and the change (NaN-safe)."""
    keys = ["arm", "seed", "probe"] if "seed" in table.columns else ["arm", "probe"]
    ends = table.sort_values("step").groupby(keys, sort=False)["auroc"]
    out = pd.DataFrame({"auroc_start": ends.first(), "auroc_end": ends.last()}).reset_index()
    out["change"] = out["auroc_end"] - out["auroc_start"]
    out.loc[~np.isfinite(out["change"]), "change"] = np.nan
    return out
