"""The one generation-settings type: the pipeline, the causal runners and fine-tuning all sample with it.

Defaults are the paper's generation settings (Waldis et al., 2025): temperature 1, top-p 0.9,
20 new tokens, k = 25 continuations per prompt. Presets (configs/*.toml) set their own values
explicitly. It lives apart from `aligned_probing.generation` so that reading a config does not
import torch.

- `SamplingSettings`: how to sample (k, length, temperature, top-p, batch size, seed); the run
  config's `[generation]` section extends it with the list of templates.
- `GenerationSettings`: the same plus the one template a causal experiment or a fine-tuning run uses.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "PAPER_K",
    "PAPER_MAX_NEW_TOKENS",
    "PAPER_TEMPERATURE",
    "PAPER_TOP_P",
    "GenerationSettings",
    "SamplingSettings",
]

PAPER_K = 25
PAPER_MAX_NEW_TOKENS = 20
PAPER_TEMPERATURE = 1.0
PAPER_TOP_P = 0.9


class SamplingSettings(BaseModel):
    """Sampling of continuations (the paper: temperature 1, top-p 0.9, 20 tokens, k = 25)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    k: int = Field(PAPER_K, gt=0, description="Continuations sampled per prompt.")
    max_new_tokens: int = Field(
        PAPER_MAX_NEW_TOKENS, gt=0, description="Maximum new tokens per continuation."
    )
    temperature: float = Field(
        PAPER_TEMPERATURE, ge=0, description="Sampling temperature; 0 decodes greedily (top-p unused)."
    )
    top_p: float = Field(PAPER_TOP_P, gt=0, le=1, description="Nucleus sampling mass (no top-k).")
    batch_size: int = Field(16, gt=0, description="Prompts per generation batch.")
    seed: int = Field(
        0,
        description="Seed of the sampler: each continuation's generator is seeded from it, the prompt id and "
        "the continuation index, so conditions with the same seed draw paired samples.",
    )


class GenerationSettings(SamplingSettings):
    """Sampling settings with the one prompt template they render prompts with.

    Example:
        >>> GenerationSettings(k=3, max_new_tokens=8).top_p
        0.9
    """

    template: int = Field(
        0, ge=0, le=4, description="Prompt template: 0 = raw prompt, 1-4 = instruction variants."
    )
