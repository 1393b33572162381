"""Build a scorer from a name, so configs and the CLI can say `scorer = "embedded"`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aligned_probing.scoring.base import Scorer
from aligned_probing.scoring.cache import CachedScorer
from aligned_probing.scoring.detoxify_backend import DetoxifyScorer
from aligned_probing.scoring.ensemble import EnsembleScorer
from aligned_probing.scoring.jigsaw import JigsawScorer
from aligned_probing.scoring.perspective import PerspectiveScorer


def embedded_scorer(*, batch_size: int = 256, num_threads: int | None = 1) -> EnsembleScorer:
    """The default scorer: the mean of the tox-block and toxic-comment-classifier BiLSTMs."""
    return EnsembleScorer(
        [
            JigsawScorer("tox-block", batch_size=batch_size, num_threads=num_threads),
            JigsawScorer("toxic-comment-classifier", batch_size=batch_size, num_threads=num_threads),
        ]
    )


def _partial(cls: Callable[..., Scorer], first: str) -> Callable[..., Scorer]:
    def build(**options: Any) -> Scorer:
        return cls(first, **options)

    return build


# name -> (builder, callable whose keyword parameters are the accepted options)
_BUILDERS: dict[str, tuple[Callable[..., Scorer], Callable[..., Any]]] = {
    "embedded": (embedded_scorer, embedded_scorer),
    "tox-block": (_partial(JigsawScorer, "tox-block"), JigsawScorer),
    "toxic-comment-classifier": (_partial(JigsawScorer, "toxic-comment-classifier"), JigsawScorer),
    "detoxify": (DetoxifyScorer, DetoxifyScorer),
    "detoxify-original": (_partial(DetoxifyScorer, "original"), DetoxifyScorer),
    "detoxify-unbiased": (_partial(DetoxifyScorer, "unbiased"), DetoxifyScorer),
    "perspective": (PerspectiveScorer, PerspectiveScorer),
}
SCORER_NAMES: tuple[str, ...] = tuple(_BUILDERS)
"""Names accepted by `get_scorer`."""


def _options(name: str) -> list[str]:
    builder, target = _BUILDERS[name]
    names = list(inspect.signature(target).parameters)
    # A name such as "tox-block" already fixes the target's first (positional) argument.
    return names[1:] if builder is not target else names


def get_scorer(name: str = "embedded", *, cache: str | Path | None = None, **options: Any) -> Scorer:
    """Build a scorer by name.

    Args:
        name: "embedded" (default: mean of the two Jigsaw BiLSTMs), "tox-block",
            "toxic-comment-classifier", "detoxify-original", "detoxify-unbiased", "detoxify"
            (with `checkpoint=`), or "perspective" (key in PERSPECTIVE_API_KEY).
        cache: Path of a SQLite score cache; when given, the scorer is wrapped in a `CachedScorer`.
        **options: Keyword options of the backend (e.g. `batch_size`, `checkpoint`, `qps`).

    Returns:
        A `Scorer`.

    Raises:
        ValueError: Unknown name, or an option the backend does not take (the message lists the
            valid ones).

    Example:
        >>> scorer = get_scorer("embedded")
        >>> bool(scorer.score(["you are an idiot"])["toxicity"].item() > 0.5)
        True
    """
    if name not in _BUILDERS:
        raise ValueError(f"name must be one of {list(SCORER_NAMES)}, got {name!r}")
    valid = _options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"scorer {name!r} takes the options {valid} (and cache), got unknown {unknown}")
    scorer = _BUILDERS[name][0](**options)
    return scorer if cache is None else CachedScorer(scorer, cache)
