"""Content hashes of stage settings, so a stage's output directory names exactly what made it."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def json_default(obj: Any) -> Any:
    """`json.dumps`' fallback: a pydantic model as its JSON content (typed stage settings), else `str`."""
    dump = getattr(obj, "model_dump", None)
    return dump(mode="json") if callable(dump) else str(obj)


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal settings give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=json_default, ensure_ascii=True)


def stable_hash(obj: Any, *, length: int = 16) -> str:
    """sha256 (hex, truncated to `length`) of the canonical JSON of `obj`.

    Args:
        obj: Any JSON-able value (dicts, lists, strings, numbers, None, pydantic models as their
            `model_dump(mode="json")`; other values via `str`).
        length: Number of hex digits kept (16 = 64 bits: collisions are not a practical concern).

    Returns:
        The hex digest prefix.
    """
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]
