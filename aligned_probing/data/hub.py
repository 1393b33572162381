"""Hugging Face datasets as prompt sets: RTP's nested layout or any dataset with a text column."""

from __future__ import annotations

import os
from typing import Any

import pandas as pd

from aligned_probing.data.files import rtp_row
from aligned_probing.data.prompt_set import PromptSet
from aligned_probing.data.schema import CANONICAL_ATTRIBUTES, EXTRA_ATTRIBUTES, SCORE_PREFIX


def hub_offline_reason() -> str | None:
    """Why the Hugging Face hub cannot be reached, or None when it answers (2 s timeout)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return f"{var} is set"
    import requests

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        requests.head(endpoint, timeout=2)
    except requests.RequestException as err:
        return f"{endpoint} is unreachable ({type(err).__name__})"
    return None


def load_hf_dataset(
    dataset: Any = "allenai/real-toxicity-prompts",
    *,
    split: str = "train",
    text_column: str | None = None,
    source: str | None = None,
    **load_kwargs: Any,
) -> PromptSet:
    """Load a Hugging Face dataset: RTP's nested layout, or any dataset with a text column.

    Needs the hub: offline it fails at once (no retries) and says how to use a local file.

    Args:
        dataset: A hub name, or an already loaded `datasets.Dataset`.
        split: Split to load from the hub.
        text_column: Column with the text; None means RTP layout when there is a `prompt`
            struct column, else `text`.
        source: Source name; defaults to the dataset name.
        **load_kwargs: Passed to `datasets.load_dataset` (e.g. `revision`).
    """
    if isinstance(dataset, str):
        reason = hub_offline_reason()
        if reason is not None:
            raise ConnectionError(
                f"Cannot load {dataset!r} from the Hugging Face hub: {reason}. Download the file "
                "elsewhere and load it locally: load_rtp_jsonl('prompts.jsonl') for RealToxicityPrompts, "
                "load_csv(path, text_column=...) or load_text(path) for other sets."
            )
        from datasets import load_dataset

        name = dataset
        dataset = load_dataset(dataset, split=split, **load_kwargs)
    else:
        name = getattr(getattr(dataset, "info", None), "dataset_name", None) or "hf-dataset"
    columns = list(dataset.column_names)
    source = source or str(name)
    if text_column is None and "prompt" in columns and isinstance(dataset[0]["prompt"], dict):
        rows = [rtp_row(record, f"{name}[{i}]") for i, record in enumerate(dataset)]
        df = pd.DataFrame(rows)
        df["challenging"] = df["challenging"].astype("boolean")
        df["source"] = source
        return PromptSet.from_frame(df)
    text_column = text_column or "text"
    if text_column not in columns:
        raise ValueError(f"text_column must be one of the dataset's columns {columns}, got {text_column!r}.")
    df = dataset.to_pandas().rename(columns={text_column: "text"})
    known = (*CANONICAL_ATTRIBUTES, *EXTRA_ATTRIBUTES)
    renames = {c: f"{SCORE_PREFIX}{c}" for c in df.columns if c in known}
    df = df.rename(columns=renames)
    df["source"] = source
    return PromptSet.from_frame(df)
