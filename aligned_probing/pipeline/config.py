"""Typed, validated experiment configs loaded from TOML.

One frozen pydantic model per concern (models, data, generation, scoring, encoding, probing,
behaviour, interplay, causal, output) nested in `RunConfig`. Unknown keys are errors that list the
valid keys, because a typo would otherwise silently change the experiment. Each field's text lives
once, in its `Field(description=...)`; `docs/config.md` is generated from it (`config_reference`).

Example:
    >>> cfg = RunConfig.from_toml("configs/quickstart.toml")  # doctest: +SKIP
    >>> cfg.generation.k  # doctest: +SKIP
    4

Over 500 lines on purpose: one frozen section per stage, each field documented next to it, and the
TOML loader and reference generator that must see them all; splitting the sections apart would
scatter the one schema a user reads.
"""

from __future__ import annotations

import json
import math
import tomllib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aligned_probing.data.source import PromptSource, resolve_prompt_source

from aligned_probing.generation_settings import SamplingSettings
from aligned_probing.pipeline.registry import TASK_KINDS

# The probing scenarios as a type (`aligned_probing.probing.SCENARIOS` is the one list; a test checks
# that they agree).
Scenario = Literal["input", "forward", "output", "backward"]


def _default_scenarios() -> list[Scenario]:
    # Imported here: it imports scikit-learn, which reading a config that sets `scenarios` does not need.
    from aligned_probing.probing.scenarios import SCENARIOS

    return list(SCENARIOS)  # type: ignore[arg-type]  # checked equal to `Scenario` by tests/test_config.py


def _default_alphas() -> list[float]:
    from aligned_probing.probing.ridge import DEFAULT_ALPHAS  # the one ridge grid

    return list(DEFAULT_ALPHAS)


Template = Literal[0, 1, 2, 3, 4]
Pooling = Literal["mean", "last"]
FigureFormat = Literal["png", "svg"]


# List defaults with their declared element types (a lambda's `[0]` is a `list[int]` to mypy).
def _raw_template() -> list[Template]:
    return [0]


def _mean_pooling() -> list[Pooling]:
    return ["mean"]


def _png_and_svg() -> list[FigureFormat]:
    return ["png", "svg"]


class ConfigError(ValueError):
    """A config is invalid; the message names each offending key, the allowed values and the value."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ----------------------------------------------------------------------------- models
class VariantConfig(_Section):
    """Another precision or quantization of the same model (the quantization case study)."""

    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Parameter dtype of this variant."
    )
    quantization: Literal["int8", "4bit"] | None = Field(
        None, description="Weight-only quantization of this variant (CPU-capable), or none."
    )
    name: str | None = Field(
        None, description="Display name; default: the base name plus `@dtype` or `@quantization`."
    )


class ModelConfig(_Section):
    """One model to analyse, plus optional variants of it."""

    spec: str = Field(
        description="Registry name (`smollm2-135m-instruct`, `gemma-3-270m`), hub name, local Hugging Face "
        "directory (relative paths starting with `.` are resolved against the config file), GGUF file "
        "or LoRA adapter directory."
    )
    name: str | None = Field(None, description="Display name used in tables and plots; default: from `spec`.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Parameter dtype.")
    quantization: Literal["int8", "4bit"] | None = Field(
        None, description="Weight-only quantization, or none."
    )
    device: str = Field("cpu", description="Torch device string (`cpu`, `cuda`, `cuda:1`, `mps`).")
    variants: list[VariantConfig] = Field(
        default_factory=list, description="Extra variants of this model, each analysed as a model of its own."
    )


class ModelVariant(_Section):
    """A fully resolved model to load: what the pipeline iterates over (see `RunConfig.model_variants`)."""

    name: str
    spec: str
    dtype: str = "float32"
    quantization: str | None = None
    device: str = "cpu"


# ----------------------------------------------------------------------------- data .. output
class DataConfig(PromptSource):
    """Which prompts to use: the prompt source (shared with the fine-tuning config) and the sample."""

    n_prompts: int = Field(300, gt=0, description="Number of prompts sampled from the set.")
    stratify_by: str | None = Field(
        "prompt_toxicity",
        description="Prompt-score column to stratify the sample by (balanced toxic/non-toxic); `false` or "
        '`"none"` samples without stratification.',
    )
    seed: int = Field(0, description="Seed of the prompt sample.")

    @field_validator("stratify_by", mode="before")
    @classmethod
    def _stratify_off(cls, value: Any) -> Any:
        # TOML has no null: `false` (or "none") turns stratification off.
        if value is False or (isinstance(value, str) and value.strip().lower() in {"", "none", "null"}):
            return None
        return value


class GenerationConfig(SamplingSettings):
    """Sampling of continuations (the paper: temperature 1, top-p 0.9, 20 tokens, k = 25)."""

    templates: list[Template] = Field(
        default_factory=_raw_template,
        min_length=1,
        description="Prompt templates: 0 = raw prompt (main runs), 1-4 = instruction variants.",
    )
    self_check: Literal["error", "warn"] = Field(
        "error",
        description="What a failed generation self-check does (cached vs uncached log-probabilities and greedy "
        "decoding): `error` stops the run; `warn` continues with a loud warning shown at the top of the report.",
    )


class ScoringConfig(_Section):
    """The text classifier that scores prompts and continuations."""

    scorer: str = Field(
        "embedded",
        description="Scorer name: `embedded` (Jigsaw BiLSTM ensemble), `detoxify` or `perspective`.",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options passed to the scorer.")
    batch_size: int = Field(256, gt=0, description="Texts per scoring batch.")
    prompt_scores: Literal["scorer", "dataset"] = Field(
        "scorer",
        description="Where prompt scores come from: `scorer` re-scores every prompt with this scorer (one scale "
        "for prompts and continuations); `dataset` keeps the scores the prompt source ships (e.g. RTP's "
        "Perspective scores, as the paper did) and fails when an attribute has none. Recorded per column.",
    )


class EncodingConfig(_Section):
    """Pooled residual-stream activations per layer."""

    poolings: list[Pooling] = Field(
        default_factory=_mean_pooling, min_length=1, description="Poolings over each span's tokens."
    )
    batch_size: int = Field(8, gt=0, description="Sequences per teacher-forced forward pass.")


class ProbingConfig(_Section):
    """Layer-wise ridge probes: scenarios, cross-validation and reliability checks."""

    scenarios: list[Scenario] = Field(
        default_factory=_default_scenarios, min_length=1, description="Probing scenarios to run."
    )
    attributes: list[str] | None = Field(
        None, description="Attributes to probe; default: every attribute the scorer returns."
    )
    pooling: Literal["mean", "last"] = Field("mean", description="Which pooled encoding the probes read.")
    n_folds: int = Field(4, ge=2, description="Cross-validation folds (grouped by prompt).")
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2, 3, 4], min_length=1, description="Seeds of the fold splits."
    )
    alphas: list[float] = Field(
        default_factory=_default_alphas,
        min_length=1,
        description="Ridge regularisation strengths; the best is chosen on the training part only. Default: "
        "`aligned_probing.probing.DEFAULT_ALPHAS`, 10^-2 to 10^6 in half-decade steps (17 values).",
    )
    control: bool = Field(True, description="Also fit control probes on permuted targets (selectivity).")
    mdl: bool = Field(True, description="Also compute the online-code MDL compression.")


class BehaviourConfig(_Section):
    """Toxic behaviour metrics (EMT, toxicity probability, mean score) with bootstrap CIs."""

    attributes: list[str] | None = Field(None, description="Attributes to summarise; default: all.")
    threshold: float = Field(0.5, gt=0, lt=1, description="Score at which a text counts as toxic.")
    n_bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for the confidence intervals.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Confidence level of the intervals.")
    seed: int = Field(0, description="Seed of the bootstrap.")
    missing: Literal["error", "drop"] = Field(
        "error",
        description="Continuations without a score: `error` stops with counts per model; `drop` computes on the "
        "scored ones and every table carries `n_missing` (EMT then takes the max over fewer draws).",
    )


class InterplayConfig(_Section):
    """Correlation across models between information strength and behaviour."""

    enabled: bool | Literal["auto"] = Field(
        "auto", description="`auto` runs it when there are at least 3 models; `true` requires 3."
    )
    metric: Literal["emt", "toxicity_probability", "mean_score"] = Field(
        "emt", description="Behaviour metric correlated with information strength."
    )
    n_bootstrap: int = Field(
        1000, ge=0, description="Unused since interplay intervals are Fisher-z / exact permutation; kept for old configs."
    )
    seed: int = Field(0, description="Seed of the permutations.")


class CausalConfig(_Section):
    """Causal evidence on one model: layer skipping, activation patching and steering."""

    enabled: bool = Field(True, description="Run the causal stage.")
    model: str | None = Field(None, description="Name of the model to intervene on; default: the first.")
    attribute: str = Field("toxicity", description="Attribute whose probe direction and score are used.")
    n_prompts: int = Field(16, gt=0, description="Prompts used for layer skipping (and pairs drawn for patching: n_prompts // 2).")
    steering_n_prompts: int | None = Field(
        None,
        gt=0,
        description="Prompts for the steering sweep (default: n_prompts). Steering's probe-vs-random "
        "contrast is a paired difference of two noisy maxima, so it needs more prompts than skipping "
        "to resolve an effect of 0.1 EMT (docs/causal.md).",
    )
    k: int = Field(4, gt=0, description="Continuations per prompt under each intervention.")
    max_new_tokens: int = Field(20, gt=0, description="New tokens per continuation.")
    layers: list[int] | None = Field(None, description="Layers to intervene at; default: every layer.")
    layer_skipping: bool = Field(True, description="Measure the change in EMT when each block is bypassed.")
    patching: bool = Field(True, description="Patch the residual stream between toxic and non-toxic prompts.")
    steering: bool = Field(
        True,
        description="Add alpha times the probe direction while generating (and, as a control, a "
        "seeded random direction of the same norm at the same layer).",
    )
    steering_alphas: list[float] = Field(
        default_factory=lambda: [-0.5, -0.25, 0.0, 0.25, 0.5],
        description="Steering strengths in units of the steered layer's median residual norm "
        "(over the causal prompts' tokens): 0.25 moves every position by a quarter of a typical "
        "residual vector.",
    )
    seed: int = Field(0, description="Seed of the sampler under interventions.")


# Option names that hold credentials in the fsspec filesystems we expect (s3fs, gcsfs, adlfs).
_CREDENTIAL_OPTIONS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "session_token",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "account_key",
        "sas_token",
        "client_secret",
        "connection_string",
        "api_key",
        "apikey",
        "access_token",
        "auth_token",
        "credentials",
    }
)


def _credential_keys(options: Any, prefix: str = "") -> list[str]:
    """Dotted names of the credential options in `options`, at any depth (e.g. `client_kwargs`)."""
    if not isinstance(options, dict):
        return []
    found = []
    for key, value in options.items():
        dotted = f"{prefix}{key}"
        if str(key).lower() in _CREDENTIAL_OPTIONS:
            found.append(dotted)
        found += _credential_keys(value, dotted + ".")
    return found


class OutputConfig(_Section):
    """Where results go."""

    run_dir: str = Field(
        "runs/default",
        description="Run directory: a local path (relative to the working directory) or an fsspec URL "
        "(`s3://bucket/runs/x`, `gs://...`, `file:///...`) that every Ray worker can reach.",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for a URL `run_dir`, e.g. `endpoint_url`, `region_name`, `profile`. "
        "Credentials are refused here (the config is saved in the run directory): they come from the "
        "environment (`AWS_ACCESS_KEY_ID`, ..., instance roles), as s3fs reads them by default.",
    )
    figure_formats: list[FigureFormat] = Field(
        default_factory=_png_and_svg, min_length=1, description="Formats of the saved figures."
    )


class TaskResources(_Section):
    """What one task of a stage needs from a Ray cluster node."""

    num_cpus: float = Field(1.0, gt=0, description="CPU slots per task.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per task (a fraction shares a card).")


# A stage kind of the registry (`aligned_probing.pipeline.registry.TASK_KINDS`), checked by `RuntimeConfig`.
StageKind = str


class RuntimeConfig(_Section):
    """How to run, not what to compute: these keys are never part of a stage's cache hash."""

    threads: int | None = Field(
        None,
        gt=0,
        description="Torch CPU threads during the run (`torch.set_num_threads`); none uses every core the "
        "process may run on. Pin a number (1 on a shared or busy machine is often several times faster: no "
        "waiting on descheduled threads).",
    )
    executor: Literal["local", "ray"] = Field(
        "local",
        description="`local` runs the stages here, one after another; `ray` runs one Ray task per (model, "
        "template) stage, per block of probing layers and per block of causal layers "
        "(`pip install 'aligned-probing[ray]'`).",
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster address (`auto`, `ray://head:10001`); none joins the Ray already started "
        'in this process or starts a local one. Only with executor = "ray".',
    )
    max_retries: int = Field(
        3, ge=0, description="Ray retries of a failed or killed task; the retry resumes what it committed."
    )
    probe_layer_block: int = Field(8, gt=0, description='Layers per probing task with executor = "ray".')
    causal_layer_block: int | None = Field(
        None,
        gt=0,
        description="Intervention layers (`causal.layers`) per causal task, with any executor: layer "
        "skipping and patching run one task per block, steering one more, each written as it "
        "finishes (a killed run keeps finished blocks); none: all layers in one task. Each block "
        "shares the baseline and the patching pairs' clean continuations.",
    )
    verify_inputs: bool = Field(
        False,
        description="Re-hash every local model and prompt file instead of trusting hashes remembered by "
        "(path, size, mtime): catches a same-size rewrite that kept its old mtime (`--verify`).",
    )
    resources: dict[StageKind, TaskResources] = Field(
        default_factory=dict,
        description="Ray resources per stage kind, e.g. `[runtime.resources.generate]` `num_gpus = 1`; "
        "`probe_block` sets the probing tasks', `causal` the causal tasks' (each loads the model). "
        "Unlisted stages take one CPU.",
    )

    @field_validator("resources")
    @classmethod
    def _known_kinds(cls, resources: dict[str, TaskResources]) -> dict[str, TaskResources]:
        unknown = sorted(set(resources) - set(TASK_KINDS))
        if unknown:
            raise ValueError(f"unknown stage kind(s) {unknown}; valid: {list(TASK_KINDS)}")
        return resources


# ----------------------------------------------------------------------------- run
class RunConfig(_Section):
    """A whole experiment: every stage's settings."""

    name: str = Field("run", description="Name of the experiment (shown in the report).")
    description: str = Field("", description="Free text shown in the report.")
    models: list[ModelConfig] = Field(min_length=1, description="Models to analyse (`[[models]]` tables).")
    data: DataConfig = Field(default_factory=DataConfig, description="Prompts.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Sampling.")
    scoring: ScoringConfig = Field(default_factory=ScoringConfig, description="Scorer.")
    encoding: EncodingConfig = Field(default_factory=EncodingConfig, description="Activations.")
    probing: ProbingConfig = Field(default_factory=ProbingConfig, description="Probes.")
    behaviour: BehaviourConfig = Field(default_factory=BehaviourConfig, description="Behaviour metrics.")
    interplay: InterplayConfig = Field(default_factory=InterplayConfig, description="Interplay.")
    causal: CausalConfig = Field(default_factory=CausalConfig, description="Causal evidence.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Output.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Runtime.")

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        names = [v.name for v in self.model_variants()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"models: display names must be unique, got duplicates {dupes}; set `name`.")
        if self.interplay.enabled is True and len(names) < 3:
            raise ValueError(
                f"interplay.enabled = true needs at least 3 models, got {len(names)} ({names}); "
                'add models or set interplay.enabled = "auto".'
            )
        if self.probing.n_folds > self.data.n_prompts:
            raise ValueError(
                f"probing.n_folds ({self.probing.n_folds}) must be <= data.n_prompts ({self.data.n_prompts})."
            )
        for key in ("n_prompts", "steering_n_prompts"):
            wanted = getattr(self.causal, key)
            if self.causal.enabled and wanted is not None and wanted > self.data.n_prompts:
                raise ValueError(
                    f"causal.{key} ({wanted}) must be <= data.n_prompts ({self.data.n_prompts})."
                )
        if self.causal.enabled and self.causal.model is not None and self.causal.model not in names:
            raise ValueError(f"causal.model must be one of {names}, got {self.causal.model!r}.")
        secrets = _credential_keys(self.output.storage_options)
        if secrets:
            # Checked here, not in OutputConfig: a section's error message would echo its values.
            raise ValueError(
                f"output.storage_options must not hold credentials, got the key(s) {secrets}; set them "
                "in the environment instead (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, "
                "an AWS `profile`, or an instance role), which s3fs reads by default."
            )
        scoring_secrets = _credential_keys(self.scoring.options)
        if scoring_secrets:
            raise ValueError(
                f"scoring.options must not hold credentials, got the key(s) {scoring_secrets}; the config is "
                "saved in the run directory. Set the key in the environment instead (PERSPECTIVE_API_KEY for "
                "the Perspective scorer)."
            )
        if self.runtime.ray_address is not None and self.runtime.executor != "ray":
            raise ValueError(
                f'runtime.ray_address is only used with runtime.executor = "ray", got '
                f"ray_address={self.runtime.ray_address!r} with executor={self.runtime.executor!r}."
            )
        return self

    def model_variants(self) -> list[ModelVariant]:
        """Every model to analyse, variants expanded, in config order."""
        out: list[ModelVariant] = []
        for m in self.models:
            base = m.name or _default_name(m.spec)
            out.append(
                ModelVariant(
                    name=base, spec=m.spec, dtype=m.dtype, quantization=m.quantization, device=m.device
                )
            )
            for v in m.variants:
                suffix = v.quantization or v.dtype
                out.append(
                    ModelVariant(
                        name=v.name or f"{base}@{suffix}",
                        spec=m.spec,
                        dtype=v.dtype,
                        quantization=v.quantization,
                        device=m.device,
                    )
                )
        return out

    def interplay_active(self) -> bool:
        """Whether the interplay stage runs (`auto`: with at least 3 models)."""
        if self.interplay.enabled == "auto":
            return len(self.model_variants()) >= 3
        return bool(self.interplay.enabled)

    def causal_model(self) -> ModelVariant:
        """The model the causal stage intervenes on."""
        variants = self.model_variants()
        return next((v for v in variants if v.name == self.causal.model), variants[0])

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base_dir: str | Path | None = None) -> RunConfig:
        """Validate a nested dict; `ConfigError` lists every problem by its dotted key.

        Args:
            data: The parsed TOML.
            base_dir: Directory that relative model paths (starting with `.`) and prompt paths are
                resolved against.
        """
        data = dict(data)
        if base_dir is not None and isinstance(data.get("models"), list):
            data["models"] = [_resolve_spec(m, Path(base_dir)) for m in data["models"]]
        try:
            config = cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(_format_errors(err)) from None
        if base_dir is not None:  # prompt paths resolve against the config file, as model paths do
            config = config.model_copy(update={"data": resolve_prompt_source(config.data, base_dir)})
        return config

    @classmethod
    def from_toml(cls, path: str | Path, *, overrides: Sequence[str] = ()) -> RunConfig:
        r"""Load and validate a TOML config.

        Args:
            path: The TOML file.
            overrides: `section.key=value` strings applied on top (values parsed as TOML, else strings),
                e.g. `["generation.k=2", "output.run_dir=\\"runs/x\\""]`.

        Returns:
            The validated config.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Config file {str(path)!r} does not exist.")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML: {err}") from None
        for item in overrides:
            apply_override(data, item)
        return cls.from_dict(data, base_dir=path.parent)


def _default_name(spec: str) -> str:
    p = Path(spec)
    return p.stem if p.suffix == ".gguf" else (p.name or spec)


def _resolve_spec(model: Any, base_dir: Path) -> Any:
    if isinstance(model, dict) and isinstance(model.get("spec"), str) and model["spec"].startswith("."):
        return {**model, "spec": str((base_dir / model["spec"]).resolve())}
    return model


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `section.key=value` (value parsed as TOML, else a bare string) in a raw config dict, in place."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"An override must look like `section.key=value`, got {item!r}.")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Cannot override {key!r}: {part!r} is not a table.")
    node[leaf] = value


# ----------------------------------------------------------------------------- errors and docs
def _section_class(loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The pydantic model that owns the location `loc` (ints are list indices)."""
    cls: type[BaseModel] | None = RunConfig
    for part in loc:
        if isinstance(part, int) or cls is None:
            continue
        field = cls.model_fields.get(part)
        cls = _model_in(field.annotation) if field is not None else None
    return cls


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _dotted(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        key = _dotted(loc)
        if e["type"] == "extra_forbidden":
            owner = _section_class(loc[:-1])
            valid = ", ".join(owner.model_fields) if owner else "?"
            section = _dotted(loc[:-1]) if loc[:-1] else "top level"
            lines.append(f"Unknown key {key!r}; valid keys in [{section}]: {valid}.")
        elif e["type"] == "missing":
            lines.append(f"Missing required key {key!r}.")
        elif e["type"] == "value_error" and not loc:
            lines.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            lines.append(f"{key}: {e['msg']}; got {e.get('input')!r}.")
    return "Invalid config:\n  " + "\n  ".join(lines)


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "none"
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(a).replace("'", '"') for a in typing.get_args(annotation))
    if origin in (types.UnionType, typing.Union):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"list[{', '.join(_type_name(a) for a in typing.get_args(annotation))}]"
    if origin is dict:
        return "table"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    return getattr(annotation, "__name__", str(annotation))


def _default_text(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "-"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


_SECTIONS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("(top level)", RunConfig),
    ("[[models]]", ModelConfig),
    ("[[models.variants]]", VariantConfig),
    ("[data]", DataConfig),
    ("[generation]", GenerationConfig),
    ("[scoring]", ScoringConfig),
    ("[encoding]", EncodingConfig),
    ("[probing]", ProbingConfig),
    ("[behaviour]", BehaviourConfig),
    ("[interplay]", InterplayConfig),
    ("[causal]", CausalConfig),
    ("[output]", OutputConfig),
    ("[runtime]", RuntimeConfig),
    ("[runtime.resources.STAGE]", TaskResources),
)


def config_reference() -> str:
    """Markdown reference of every config key, generated from the field descriptions.

    The run config's sections, then the fine-tuning config's (`aligned-probing finetune`).
    `docs/config.md` embeds this text; a test checks that the two agree, so the field
    descriptions stay the single source of truth.
    """
    from aligned_probing.training.config import FINETUNE_SECTIONS

    finetune = sections_reference(FINETUNE_SECTIONS, heading="### finetune ")
    return sections_reference(_SECTIONS) + "\n" + finetune


def sections_reference(sections: Sequence[tuple[str, type[BaseModel]]], *, heading: str = "### ") -> str:
    """Markdown tables (key, type, default, meaning) of pydantic config `sections`, by title."""
    parts = []
    for title, cls in sections:
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key, field in cls.model_fields.items():
            if title == "(top level)" and _model_in(field.annotation) is not None:
                continue
            desc = (field.description or "").replace("|", "\\|")
            type_text = _type_name(field.annotation).replace("|", "\\|")
            default = _default_text(field).replace("|", "\\|")
            rows.append(f"| `{key}` | {type_text} | {default} | {desc} |")
        parts.append(f"{heading}{title}\n\n{doc}\n\n" + "\n".join(rows))
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- writing TOML
def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        items = [f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items() if v is not None]
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML: {value!r}")


def _toml_table(header: str, table: dict[str, Any]) -> list[str]:
    lines = [header] if header else []
    for key, value in table.items():
        if value is None:
            lines.append(f"# {key}: none")  # TOML has no null; absent = none for these keys
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    return lines


def config_to_toml(config: RunConfig, *, comment: str = "") -> str:
    """`config` as TOML text that `RunConfig.from_toml` reads back to an equal config.

    This is the effective config of a run (overrides applied, paths resolved), which the run
    directory keeps as `config.toml` and the report shows.

    Args:
        config: The validated config.
        comment: Text put at the top as `#` comment lines (e.g. the file and overrides it came from).
    """
    data = config.model_dump(mode="json")
    if data["data"].get("stratify_by") is None:
        data["data"]["stratify_by"] = False  # the TOML spelling of "no stratification"
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    lines += _toml_table("", {k: v for k, v in data.items() if not isinstance(v, dict | list)})
    for model in data.get("models", []):
        lines += [""] + _toml_table("[[models]]", model)
    for key, value in data.items():
        if isinstance(value, dict):
            lines += [""] + _toml_table(f"[{key}]", value)
    return "\n".join(lines) + "\n"
