"""Average several scorers into one (the embedded default averages the two Jigsaw BiLSTMs)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from aligned_probing.scoring.base import Scorer, canonical_order, validate_texts


class EnsembleScorer:
    """The mean of several scorers' outputs, on the attributes they all report.

    Averaging two independently trained classifiers smooths each one's idiosyncratic errors; the
    result stays in [0, 1].

    Args:
        members: The scorers to average (at least one).

    Raises:
        ValueError: No members, or no attribute shared by all of them.
    """

    def __init__(self, members: Sequence[Scorer]) -> None:
        members = list(members)
        if not members:
            raise ValueError("members must hold at least one scorer, got an empty sequence")
        shared = set(members[0].attributes).intersection(*(m.attributes for m in members[1:]))
        if not shared:
            raise ValueError(f"members share no attribute: {[(m.id, m.attributes) for m in members]}")
        self.members = members
        self.attributes = canonical_order(shared)
        self.id = "mean(" + ",".join(m.id for m in members) + ")"

    def score(self, texts: Sequence[str]) -> pd.DataFrame:
        """Score texts with every member and average per attribute (NaN if any member is NaN)."""
        texts = validate_texts(texts)
        cols = list(self.attributes)
        total = sum(m.score(texts)[cols].to_numpy() for m in self.members)
        return pd.DataFrame(total / len(self.members), columns=cols)

    def __repr__(self) -> str:
        return f"EnsembleScorer({self.members!r})"
