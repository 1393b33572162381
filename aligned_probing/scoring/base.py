"""The scorer contract: texts in, a tidy table of attribute scores in [0, 1] out.

Every probe target in aligned probing is a scorer output, so all backends share one shape: row i
scores `texts[i]`, one float column per canonical attribute, and a stable `id` that changes whenever
the scores could change (backend, model version, weights), so caches and later stages invalidate.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd

from aligned_probing.attributes import ATTRIBUTES

# Label spellings used by the Jigsaw data sets, Detoxify and Perspective, mapped to canonical names.
LABEL_ALIASES: dict[str, str] = {
    "toxic": "toxicity",
    "toxicity": "toxicity",
    "severe_toxic": "severe_toxicity",
    "severe_toxicity": "severe_toxicity",
    "obscene": "profanity",
    "profanity": "profanity",
    "insult": "insult",
    "threat": "threat",
    "identity_hate": "identity_attack",
    "identity_attack": "identity_attack",
    "sexual_explicit": "sexually_explicit",
    "sexually_explicit": "sexually_explicit",
}


class ScoringWarning(UserWarning):
    """Some texts could not be scored and were given NaN (see the result's `attrs["errors"]`)."""


@runtime_checkable
class Scorer(Protocol):
    """What every toxicity scorer provides.

    Attributes:
        id: Stable identifier of backend, model version and weights; cache keys use it.
        attributes: The canonical attributes this scorer reports, in `ATTRIBUTES` order.
    """

    id: str
    attributes: tuple[str, ...]

    def score(self, texts: Sequence[str]) -> pd.DataFrame:
        """Score texts: one row per text (same order), one column per attribute, values in [0, 1]."""
        ...


def canonical_order(names: Iterable[str]) -> tuple[str, ...]:
    """Return the canonical attributes among `names`, in `ATTRIBUTES` order."""
    present = set(names)
    return tuple(a for a in ATTRIBUTES if a in present)


def validate_texts(texts: Sequence[str]) -> list[str]:
    """Check that `texts` is a sequence of `str` and return it as a list.

    A bare string is refused: iterating it would score single characters.

    Args:
        texts: A list, tuple, pandas Series or 1-d array of strings.

    Returns:
        The texts as a new list (the argument is not modified).

    Raises:
        TypeError: `texts` is a string or not iterable, or an item is not a `str` (the message names
            the first bad index, its type and its value).
    """
    if isinstance(texts, str | bytes):
        raise TypeError(
            f"texts must be a sequence of str, got a single {type(texts).__name__}; wrap it: [text]"
        )
    if isinstance(texts, Mapping) or not isinstance(texts, Iterable):
        raise TypeError(f"texts must be a sequence of str, got {type(texts).__name__}")
    items = list(texts)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(
                f"texts[{i}] must be str, got {type(item).__name__} ({item!r:.60}); "
                "drop or fill missing texts before scoring"
            )
    return items


def scores_frame(values: np.ndarray, attributes: Sequence[str], *, source: str) -> pd.DataFrame:
    """Wrap a [n_texts, n_attributes] array as the scorer's result table, checking its range.

    Model backends never produce NaN legitimately, so a non-finite or out-of-range value is a bug
    (or broken weights) and raises instead of leaking into probe targets.

    Args:
        values: Scores, shape [n_texts, n_attributes].
        attributes: Column names, in the column order of `values`.
        source: Scorer id, for the error message.

    Returns:
        A float64 DataFrame with a RangeIndex and one column per attribute.

    Raises:
        ValueError: A value is NaN, infinite or outside [0, 1].
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1, len(attributes))
    bad = ~np.isfinite(values) | (values < 0.0) | (values > 1.0)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"scorer {source!r} produced {values[row, col]!r} for texts[{row}] attribute "
            f"{attributes[col]!r}; scores must be finite and in [0, 1]"
        )
    return pd.DataFrame(values, columns=list(attributes))


def warn_failed(frame: pd.DataFrame, errors: Mapping[int, str], *, source: str) -> None:
    """Attach per-text errors to `frame.attrs["errors"]` and warn when there are any.

    NaN scores are allowed only for remote backends, and then never silently: the caller sees a
    `ScoringWarning` and can inspect which texts failed and why.
    """
    frame.attrs["errors"] = dict(errors)
    if errors:
        first = min(errors)
        warnings.warn(
            f"scorer {source!r}: {len(errors)} of {len(frame)} texts could not be scored and are NaN "
            f"(first: texts[{first}]: {errors[first]}); see result.attrs['errors']",
            ScoringWarning,
            stacklevel=3,
        )
