"""Local prompt files (text, CSV/TSV, RTP jsonl), with UTF-8 repair and line-numbered errors."""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aligned_probing.data.prompt_set import PromptSet
from aligned_probing.data.schema import (
    CANONICAL_ATTRIBUTES,
    EXTRA_ATTRIBUTES,
    SCORE_PREFIX,
    PromptDataWarning,
)


def read_text_file(path: str | Path) -> str:
    """Read a file as UTF-8, replacing undecodable bytes and reporting their line numbers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such prompt file: {path}")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    lines, bad = [], []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(line.decode("utf-8", errors="replace"))
            bad.append(lineno)
    shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
    warnings.warn(
        f"{path}: {len(bad)} line(s) are not valid UTF-8 (line {shown}); undecodable bytes were "
        "replaced with U+FFFD. Re-encode the file as UTF-8 to keep them.",
        PromptDataWarning,
        stacklevel=3,
    )
    text = "\n".join(lines)
    return text[1:] if text.startswith("\ufeff") else text


def load_text(path: str | Path, *, source: str | None = None) -> PromptSet:
    """Load a plain text file with one prompt per line (blank lines are dropped and counted).

    Args:
        path: The file (UTF-8; other bytes are replaced and reported).
        source: Source name; defaults to the file name.
    """
    text = read_text_file(path)
    lines = text.splitlines()
    if lines and lines[-1] == "":
        lines = lines[:-1]
    return PromptSet.from_texts(lines, source=source or Path(path).name)


def load_csv(
    path: str | Path,
    *,
    text_column: str = "text",
    source: str | None = None,
    score_columns_map: Mapping[str, str] | None = None,
    **read_csv_kwargs: Any,
) -> PromptSet:
    """Load a CSV (or a TSV, passing `sep` through) with a named text column.

    Columns named like a canonical attribute (`toxicity`) or already prefixed (`prompt_toxicity`)
    become prompt scores; `score_columns_map` maps other column names to attributes. Other
    columns are kept as they are.

    Args:
        path: The file (UTF-8; other bytes are replaced and reported).
        text_column: Column holding the prompt text.
        source: Source name; defaults to the file name.
        score_columns_map: Extra column -> attribute mapping, e.g. `{"tox": "toxicity"}`.
        **read_csv_kwargs: Passed to `pandas.read_csv`.
    """
    raw = pd.read_csv(io.StringIO(read_text_file(path)), **read_csv_kwargs)
    if text_column not in raw.columns:
        raise ValueError(
            f"text_column must be one of the CSV's columns {list(raw.columns)}, got {text_column!r}."
        )
    mapping = dict(score_columns_map or {})
    missing = [c for c in mapping if c not in raw.columns]
    if missing:
        raise ValueError(f"score_columns_map names columns {missing} that are not in {list(raw.columns)}.")
    renames = {text_column: "text"}
    for col in raw.columns:
        if col in mapping:
            renames[col] = f"{SCORE_PREFIX}{mapping[col]}"
        elif col in CANONICAL_ATTRIBUTES or col in EXTRA_ATTRIBUTES:
            renames[col] = f"{SCORE_PREFIX}{col}"
    df = raw.rename(columns=renames)
    if "source" not in df.columns:
        df["source"] = source or Path(path).name
    return PromptSet.from_frame(df)


def rtp_row(record: Any, where: str) -> dict[str, Any]:
    """Flatten one RTP record: `prompt.text` plus its Perspective scores (nulls -> NaN)."""
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), dict):
        raise ValueError(f"{where}: expected an object with a nested 'prompt' object (RTP layout).")
    prompt = record["prompt"]
    text = prompt.get("text")
    if not isinstance(text, str):
        raise ValueError(f"{where}: 'prompt.text' must be a string, got {type(text).__name__}.")
    row: dict[str, Any] = {"text": text}
    for attr in (*CANONICAL_ATTRIBUTES, *EXTRA_ATTRIBUTES):
        value = prompt.get(attr)
        row[f"{SCORE_PREFIX}{attr}"] = np.nan if value is None else float(value)
    row["challenging"] = record.get("challenging")
    return row


def load_rtp_jsonl(path: str | Path, *, source: str = "rtp") -> PromptSet:
    """Load RealToxicityPrompts `prompts.jsonl` in its official layout.

    Each line is `{"filename", "begin", "end", "challenging", "prompt": {"text", "toxicity", ...},
    "continuation": {...}}`; Perspective scores may be null (kept as NaN). The human
    continuation is not a model output and is not loaded.

    Args:
        path: The jsonl file.
        source: Source name (part of every `prompt_id`).

    Raises:
        ValueError: A line is not valid JSON or lacks `prompt.text` (message: file and line).
    """
    text = read_text_file(path)
    rows = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: malformed JSON ({err.msg} at column {err.colno}).") from None
        rows.append(rtp_row(record, where))
    if not rows:
        raise ValueError(f"{path}: no prompts found (empty file).")
    df = pd.DataFrame(rows)
    df["challenging"] = df["challenging"].astype("boolean")
    df["source"] = source
    return PromptSet.from_frame(df)
