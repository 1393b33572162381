"""What each stage computes from: frozen, typed settings built from the run config's sections.

`build_plan` gives every stage one of these instead of a string-keyed dict, so a stage reads
`settings.behaviour.confidence`, checked by the type checker, and nothing is renamed on the way
(string keys once let `behaviour.confidence` get lost before the causal stage). The stage's cache
key hashes `model_dump(mode="json")`, which is exactly the settings' content: equal settings give
equal keys, and a field the stage does not read (a generation stage's list of all templates) is
left out of its dump, so changing it recomputes nothing.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, field_serializer, model_serializer

from aligned_probing.pipeline.config import (
    BehaviourConfig,
    CausalConfig,
    DataConfig,
    EncodingConfig,
    GenerationConfig,
    InterplayConfig,
    ProbingConfig,
    ScoringConfig,
)

__all__ = [
    "BehaviourSettings",
    "CausalSettings",
    "EncodeSettings",
    "GenerateSettings",
    "InterplaySettings",
    "ModelSettings",
    "ProbeSettings",
    "PromptsSettings",
    "ReportSettings",
    "ScoreSettings",
    "StageSettings",
    "settings_of",
]


class StageSettings(BaseModel):
    """Base of every stage's settings: frozen (hashable content) and closed (no unknown fields)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def _generation_content(generation: GenerationConfig) -> dict[str, Any]:
    # One stage serves one template: the run's list of templates is not part of what it computes.
    return generation.model_dump(mode="json", exclude={"templates"})


class ModelSettings(StageSettings):
    """The model a stage loads: its display name, what to load and how; where it runs is left out.

    Attributes:
        name: Display name (what `StageContext.load_model` takes).
        spec: What `load_model` loads.
        dtype: Parameter dtype.
        quantization: Weight-only quantization, or None.
        revision: Content revision of a local model directory (a rebuilt model recomputes its stages).
    """

    name: str
    spec: str
    dtype: str
    quantization: str | None = None
    revision: str | None = None

    @model_serializer(mode="wrap")
    def _content(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        if out.get("revision") is None:
            out.pop("revision", None)  # hub and registry models: the keys of older run directories
        return out


class PromptsSettings(StageSettings):
    """The prompts stage: which prompts, and the scorer that scores and stratifies them."""

    data: DataConfig
    scoring: ScoringConfig
    source: Any = None  # the prompt source's content key (`data.source.prompt_source_key`): an edited file recomputes


class GenerateSettings(StageSettings):
    """One (model, template) generation stage."""

    model: ModelSettings
    template: int
    generation: GenerationConfig

    @field_serializer("generation")
    def _generation(self, generation: GenerationConfig) -> dict[str, Any]:
        return _generation_content(generation)


class ScoreSettings(StageSettings):
    """One (model, template) scoring stage."""

    scoring: ScoringConfig


class EncodeSettings(StageSettings):
    """One (model, template) encoding stage."""

    model: ModelSettings
    template: int
    encoding: EncodingConfig


class ProbeSettings(StageSettings):
    """One (model, template) probing stage."""

    probing: ProbingConfig


class BehaviourSettings(StageSettings):
    """One (model, template) behaviour stage."""

    behaviour: BehaviourConfig


class InterplaySettings(StageSettings):
    """The cross-model interplay stage."""

    interplay: InterplayConfig
    n_models: int


class CausalSettings(StageSettings):
    """The causal stage: its own section plus what it reads of the others, under their own names.

    Attributes:
        model: The model intervened on.
        template: The template its prompts are rendered with (the run's first).
        causal: The causal section.
        generation: Sampling temperature, top-p and batch size (k, seed and length are `causal`'s).
        scoring: The scorer of the continuations.
        threshold: `behaviour.threshold`.
        n_bootstrap: `behaviour.n_bootstrap`.
        confidence: `behaviour.confidence`: the level of every causal CI.
        pooling: `probing.pooling`: the encoding the probes read.
        alphas: `probing.alphas`: the ridge grid of the probes.
    """

    model: ModelSettings
    template: int
    causal: CausalConfig
    generation: GenerationConfig
    scoring: ScoringConfig
    threshold: float
    n_bootstrap: int
    confidence: float
    pooling: str
    alphas: list[float]

    @field_serializer("generation")
    def _generation(self, generation: GenerationConfig) -> dict[str, Any]:
        return _generation_content(generation)


class ReportSettings(StageSettings):
    """The report stage: figure formats, and a version bumped when the report changes."""

    formats: list[str]
    version: int = 1


S = TypeVar("S", bound=StageSettings)


def settings_of(settings: object, kind: type[S]) -> S:
    """`settings` as the stage settings type `kind` (a stage's typed view of `StageContext.settings`).

    Raises:
        TypeError: `settings` is not a `kind` (a plan built by hand passed the wrong settings).
    """
    if not isinstance(settings, kind):
        raise TypeError(
            f"settings must be a {kind.__name__} (built by `build_plan`), got {type(settings).__name__}."
        )
    return settings
