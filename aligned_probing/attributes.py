"""Canonical toxicity attribute names, defined once for every stage (no heavy imports here)."""

ATTRIBUTES: tuple[str, ...] = (
    "toxicity",
    "severe_toxicity",
    "profanity",
    "insult",
    "threat",
    "identity_attack",
    "sexually_explicit",
)
"""Perspective-style attribute names, in the order every scorer reports them."""
