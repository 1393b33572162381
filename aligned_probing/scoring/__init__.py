"""Toxicity scoring: every probe target in aligned probing is a scorer output.

`get_scorer(name)` builds a `Scorer` (texts -> DataFrame with one column per canonical attribute,
values in [0, 1]). Backends: the embedded Jigsaw BiLSTM ensemble (default, offline, CPU), Detoxify
(local checkpoints) and the Perspective API; `CachedScorer` adds a persistent SQLite score cache.
See docs/scoring.md.
"""

from aligned_probing.scoring.base import ATTRIBUTES, Scorer, ScoringWarning, validate_texts
from aligned_probing.scoring.cache import CachedScorer, ScoreCache, text_hash
from aligned_probing.scoring.detoxify_backend import DetoxifyScorer
from aligned_probing.scoring.ensemble import EnsembleScorer
from aligned_probing.scoring.jigsaw import JIGSAW_MODELS, JigsawScorer, verify_embedded_scorer
from aligned_probing.scoring.perspective import PerspectiveError, PerspectiveScorer
from aligned_probing.scoring.registry import SCORER_NAMES, embedded_scorer, get_scorer

__all__ = [
    "ATTRIBUTES",
    "JIGSAW_MODELS",
    "SCORER_NAMES",
    "CachedScorer",
    "DetoxifyScorer",
    "EnsembleScorer",
    "JigsawScorer",
    "PerspectiveError",
    "PerspectiveScorer",
    "ScoreCache",
    "Scorer",
    "ScoringWarning",
    "embedded_scorer",
    "get_scorer",
    "text_hash",
    "validate_texts",
    "verify_embedded_scorer",
]
