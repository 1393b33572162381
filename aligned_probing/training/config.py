"""Typed TOML config for `aligned-probing finetune CONFIG`: one small model per concern.

Pydantic models with `extra="forbid"`: a typo in a TOML key would otherwise silently change the
experiment; the error lists the valid keys of that section.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aligned_probing.generation_settings import PAPER_K, GenerationSettings

Arm = Literal["probe_dpo", "probe_dpo_ensemble", "classifier_dpo", "probe_sft"]
ARMS: tuple[Arm, ...] = ("probe_dpo", "probe_dpo_ensemble", "classifier_dpo", "probe_sft")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    """Which model to fine-tune."""

    spec: str = Field("smollm2-135m-instruct", description="Anything `load_model` accepts (registry name, "
                      "hub name, local directory).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Parameter dtype.")
    device: str = Field("cpu", description="Torch device string (`cpu`, `cuda`, `mps`).")


class DataSection(_Section):
    """Prompts: `n_train` prompts feed probes and training, `n_eval` disjoint ones measure retention."""

    prompts: str = Field("rtp-challenging", description="An embedded prompt set name (`embedded_prompts`).")
    n_train: int = Field(120, ge=4, description="Prompts for the probes and the training data.")
    n_eval: int = Field(40, ge=4, description="Disjoint prompts for the before/after evaluation.")
    seed: int = Field(0, description="Seed of the prompt split.")


class GenerationSection(GenerationSettings):
    """Sampling of continuations (for labels, pairs and the before/after toxicity)."""

    k: int = Field(PAPER_K, ge=2, description="Continuations sampled per prompt (DPO pairs need >= 2).")


class ProbeSection(_Section):
    """Logistic probes at one layer (labels: scorer toxicity >= threshold)."""

    layer: int = Field(..., ge=0, description="Residual layer the probes read (0 = embeddings).")
    C: float = Field(1.0, gt=0, description="Inverse L2 regularisation strength of the logistic probes.")
    threshold: float = Field(
        0.5, gt=0, lt=1, description="Scorer toxicity at which a continuation is labelled toxic."
    )
    n_ensemble: int = Field(5, ge=1, le=10, description="Probes in the ensemble (`probe_dpo_ensemble`).")
    n_heldout: int = Field(
        3,
        ge=1,
        description="Probes fitted on the held-out half of the training prompts, never trained against "
        "(retention).",
    )
    subsample: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Fraction of each class that each ensemble or held-out probe is fitted on.",
    )
    seed: int = Field(0, description="Seed of the probes' split and subsamples.")


class TrainingSection(_Section):
    """The arms and their shared optimisation settings (TRL/PEFT arguments)."""

    arms: list[Arm] = Field(default_factory=lambda: list(ARMS), description="Fine-tuning arms to run.")
    learning_rate: float = Field(5e-5, gt=0, description="Optimizer learning rate.")
    num_train_epochs: float = Field(1.0, gt=0, description="Training epochs (unless `max_steps` > 0).")
    max_steps: int = Field(-1, description="Optimizer steps; > 0 overrides `num_train_epochs`.")
    per_device_batch_size: int = Field(8, ge=1, description="Sequences per device and step.")
    gradient_accumulation_steps: int = Field(
        8, ge=1, description="Steps accumulated per update (effective batch = the product; paper: >= 64)."
    )
    max_length: int = Field(128, ge=8, description="Maximum tokens of a training sequence.")
    beta: float = Field(0.1, gt=0, description="DPO temperature beta.")
    sft_weight: float = Field(
        1.0, ge=0, description='LM loss weight on the chosen answer in DPO (TRL loss_type "sft").'
    )
    probe_lambda: float = Field(1.0, ge=0, description="Weight of the probe penalty in SFT.")
    sft_continuations_per_prompt: int = Field(
        1, ge=1, description="Continuations per prompt (the first N sampled) that SFT trains on."
    )
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling alpha.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    checkpoint_every: int = Field(
        0, ge=0, description="Save the adapter every N optimizer steps (retention along training); 0 = never."
    )
    seed: int = Field(0, description="Seed of the training run.")


class EvaluationSection(_Section):
    """Retention and fluency measurement."""

    n_benign: int = Field(64, ge=1, description="Benign passages for the perplexity (fluency) measurement.")
    ppl_max_length: int = Field(128, ge=8, description="Maximum tokens per perplexity passage.")
    n_boot: int = Field(1000, ge=10, description="Bootstrap resamples of the confidence intervals.")
    retrain_fraction: float = Field(
        0.5, gt=0, lt=1, description="Fraction of the evaluation prompts used to fit retrained probes."
    )


class FinetuneConfig(_Section):
    """A whole probe-based fine-tuning run (see configs/finetune_quick.toml)."""

    output_dir: str = Field("runs/finetune", description="Where the adapters, tables and logs go.")
    scorer: str = Field("embedded", description="Scorer name (`embedded`, `detoxify`, `perspective`).")
    model: ModelSection = Field(default_factory=ModelSection, description="Model.")
    data: DataSection = Field(default_factory=DataSection, description="Prompts.")
    generation: GenerationSection = Field(default_factory=GenerationSection, description="Sampling.")
    probes: ProbeSection = Field(description="Probes.")
    training: TrainingSection = Field(default_factory=TrainingSection, description="Training.")
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection, description="Evaluation.")

    @model_validator(mode="after")
    def _check_arms(self) -> FinetuneConfig:
        if len(set(self.training.arms)) != len(self.training.arms):
            raise ValueError(f"training.arms has duplicates: {self.training.arms}.")
        if not self.training.arms:
            raise ValueError(f"training.arms must name at least one of {list(ARMS)}.")
        return self


#: The sections of `aligned-probing config-docs`' fine-tuning reference, by TOML heading.
FINETUNE_SECTIONS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("(top level)", FinetuneConfig),
    ("[model]", ModelSection),
    ("[data]", DataSection),
    ("[generation]", GenerationSection),
    ("[probes]", ProbeSection),
    ("[training]", TrainingSection),
    ("[evaluation]", EvaluationSection),
)


def _valid_keys(model: type[BaseModel]) -> list[str]:
    return sorted(model.model_fields)


def _section_model(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = FinetuneConfig
    for part in loc[:-1]:
        annotation = model.model_fields[str(part)].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return model


def load_finetune_config(source: str | Path | dict) -> FinetuneConfig:
    """Read and validate a finetune config from a TOML path or a dict.

    Raises:
        ValueError: On an unknown key (the message lists the section's valid keys) or a bad value.
    """
    data = source if isinstance(source, dict) else tomllib.loads(Path(source).read_text())
    try:
        return FinetuneConfig.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "<root>"
            if e["type"] == "extra_forbidden":
                section = _section_model(e["loc"])
                lines.append(f"unknown key {where!r}; valid keys here: {_valid_keys(section)}")
            else:
                lines.append(f"{where}: {e['msg']} (got {e.get('input')!r})")
        raise ValueError(f"Invalid finetune config {source if not isinstance(source, dict) else ''}:\n  "
                         + "\n  ".join(lines)) from None
