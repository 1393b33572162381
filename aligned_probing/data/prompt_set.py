"""`PromptSet`: the validated prompt table, with scoring, stratified sampling and Parquet round trips."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from aligned_probing.data.schema import (
    SCORE_PREFIX,
    PromptDataWarning,
    check_scores,
    merge_duplicates,
    order_columns,
    prompt_id,
    score_columns,
)


class Scorer(Protocol):
    """What `PromptSet.score` needs: `.attributes` and `.score(texts) -> DataFrame`."""

    attributes: Sequence[str]

    def score(self, texts: Sequence[str]) -> pd.DataFrame:
        """One row per text, one column per attribute, values in [0, 1]."""
        ...


@dataclass(frozen=True, eq=False)
class PromptSet:
    """A table of prompts with stable ids, text, source and known attribute scores.

    Build one with a loader or `PromptSet.from_texts` / `PromptSet.from_frame`; they validate
    and normalise. The constructor itself only stores an already valid table.

    Attributes:
        df: Columns `prompt_id`, `text`, `source`, `prompt_{attribute}`... (plus descriptive
            columns a loader adds). One row per unique text.
        dropped: How many input rows were removed, by reason (`empty`, `duplicate`).
    """

    df: pd.DataFrame
    dropped: dict[str, int] = field(default_factory=dict)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_texts(
        cls,
        texts: Iterable[str],
        *,
        source: str,
        scores: Mapping[str, Sequence[float]] | pd.DataFrame | None = None,
    ) -> PromptSet:
        """Build a set from texts, with optional scores keyed by attribute.

        Args:
            texts: Prompt texts.
            source: Name of where they come from (part of each `prompt_id`).
            scores: Attribute -> one score per text (`toxicity` or `prompt_toxicity` both work).

        Returns:
            The validated set (empty texts dropped, duplicates merged, with a warning each).
        """
        texts = list(texts)
        df = pd.DataFrame({"text": texts, "source": source})
        if scores is not None:
            scores_df = pd.DataFrame(scores).reset_index(drop=True)
            if len(scores_df) != len(texts):
                raise ValueError(
                    f"scores must have one value per text: got {len(scores_df)} scores for "
                    f"{len(texts)} texts."
                )
            for col in scores_df.columns:
                name = col if str(col).startswith(SCORE_PREFIX) else f"{SCORE_PREFIX}{col}"
                df[name] = scores_df[col].to_numpy()
        return cls.from_frame(df)

    @classmethod
    def from_frame(cls, df: pd.DataFrame, *, source: str | None = None) -> PromptSet:
        """Validate a table with at least `text` (and `source` or the `source` argument).

        Missing `prompt_id`s are computed; score columns must be numeric in [0, 1] or NaN.
        Empty prompts are dropped and duplicate texts merged (first row wins, missing scores
        filled from the later duplicates), each reported with a `PromptDataWarning`.

        Args:
            df: The table; it is copied, never modified.
            source: Source name for rows without one.

        Returns:
            The validated set.
        """
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}.")
        if "text" not in df.columns:
            raise ValueError(f"A prompt table needs a 'text' column; got columns {list(df.columns)}.")
        df = df.copy()
        if "source" not in df.columns:
            if source is None:
                raise ValueError("The table has no 'source' column: pass source='...'.")
            df["source"] = source
        elif source is not None:
            df["source"] = df["source"].fillna(source)
        if df["source"].isna().any():
            raise ValueError(f"{int(df['source'].isna().sum())} rows have no source: pass source='...'.")
        bad_type = [type(t).__name__ for t in df["text"] if not isinstance(t, str) and not pd.isna(t)]
        if bad_type:
            raise TypeError(f"Prompt texts must be str; got {len(bad_type)} of type {sorted(set(bad_type))}.")
        df["text"] = df["text"].fillna("").astype(str)
        df["source"] = df["source"].astype(str)
        for col in score_columns(df):
            df[col] = check_scores(df[col], col)
        dropped: dict[str, int] = {}
        empty = df["text"].str.strip() == ""
        if empty.any():
            dropped["empty"] = int(empty.sum())
            warnings.warn(
                f"Dropped {dropped['empty']} empty prompt(s) (blank or whitespace-only text).",
                PromptDataWarning,
                stacklevel=2,
            )
            df = df[~empty]
        df, n_dup = merge_duplicates(df)
        if n_dup:
            dropped["duplicate"] = n_dup
            warnings.warn(
                f"Removed {n_dup} duplicate prompt(s) (same text); kept the first, filling its missing "
                "scores from the duplicates.",
                PromptDataWarning,
                stacklevel=2,
            )
        if "prompt_id" not in df.columns:
            df["prompt_id"] = [prompt_id(s, t) for s, t in zip(df["source"], df["text"], strict=True)]
        else:
            missing = df["prompt_id"].isna()
            pairs = zip(df.loc[missing, "source"], df.loc[missing, "text"], strict=True)
            df.loc[missing, "prompt_id"] = [prompt_id(s, t) for s, t in pairs]
        if df["prompt_id"].duplicated().any():
            raise ValueError("prompt_id values must be unique after merging duplicate texts.")
        return cls(df=order_columns(df), dropped=dropped)

    @classmethod
    def concat(cls, sets: Sequence[PromptSet], *, dedupe: bool = True) -> PromptSet:
        """Stack sets; duplicate texts across sources are merged (the first set's row wins).

        Args:
            sets: Prompt sets, in priority order.
            dedupe: Merge rows with the same text (warns with the count). Without it, texts
                repeated across sources stay as separate rows with their own ids.

        Returns:
            The combined set.
        """
        if not sets:
            raise ValueError("sets must contain at least one PromptSet, got an empty sequence.")
        df = pd.concat([s.df for s in sets], ignore_index=True)
        if dedupe:
            return cls.from_frame(df)
        if df["prompt_id"].duplicated().any():
            raise ValueError("The same prompt (same source and text) appears in two sets; use dedupe=True.")
        return cls(df=order_columns(df))

    # -------------------------------------------------------------------- accessors
    def __len__(self) -> int:
        return len(self.df)

    def __repr__(self) -> str:
        sources = self.df["source"].value_counts().to_dict()
        return f"PromptSet({len(self)} prompts, sources={sources}, attributes={self.attributes})"

    @property
    def texts(self) -> list[str]:
        """The prompt texts, in table order."""
        return self.df["text"].tolist()

    @property
    def attributes(self) -> list[str]:
        """Attributes with a `prompt_{attribute}` column (known for some or all prompts)."""
        return [c[len(SCORE_PREFIX):] for c in score_columns(self.df)]

    def to_parquet(self, path: str | Path) -> Path:
        """Write the table to Parquet and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.df.to_parquet(path, index=False)
        return path

    @classmethod
    def read_parquet(cls, path: str | Path) -> PromptSet:
        """Read a table written by `to_parquet`."""
        return cls.from_frame(pd.read_parquet(path))

    # ------------------------------------------------------------------ operations
    def score(self, scorer: Scorer, *, overwrite: bool = False, batch_size: int = 256) -> PromptSet:
        """Fill missing prompt scores with `scorer`; return a new set.

        Known scores (e.g. Perspective scores from RTP) are kept unless `overwrite`. Mixing
        Perspective and another scorer in one column mixes two scales: pass `overwrite=True` to
        score every prompt with the one scorer.

        Args:
            scorer: Any object with `.attributes` and `.score(texts) -> DataFrame` (one row per
                text, one column per attribute, values in [0, 1]).
            overwrite: Re-score every prompt, replacing known scores.
            batch_size: Texts per `scorer.score` call.

        Returns:
            A new `PromptSet` with `prompt_{attribute}` for every scorer attribute.
        """
        attrs = list(getattr(scorer, "attributes", []))
        if not attrs or not callable(getattr(scorer, "score", None)):
            raise TypeError(
                "scorer must have a non-empty .attributes and a .score(texts) method; "
                f"got {type(scorer).__name__}."
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        df = self.df.copy()
        cols = [f"{SCORE_PREFIX}{a}" for a in attrs]
        for col in cols:
            if col not in df.columns:
                df[col] = np.nan
        todo = np.ones(len(df), bool) if overwrite else df[cols].isna().any(axis=1).to_numpy()
        idx = np.flatnonzero(todo)
        texts = df["text"].to_numpy()[idx].tolist()
        parts = [scorer.score(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        if parts:
            scores = pd.concat(parts, ignore_index=True)
            if len(scores) != len(texts):
                raise ValueError(f"scorer.score returned {len(scores)} rows for {len(texts)} texts.")
            for attr, col in zip(attrs, cols, strict=True):
                if attr not in scores.columns:
                    raise ValueError(
                        f"scorer.score returned columns {list(scores.columns)}, missing attribute {attr!r}."
                    )
                new = check_scores(scores[attr], attr).to_numpy()
                old = df[col].to_numpy(dtype=float)[idx]
                df.loc[df.index[idx], col] = new if overwrite else np.where(np.isnan(old), new, old)
        return PromptSet(df=order_columns(df), dropped=dict(self.dropped))

    def sample(
        self,
        n: int,
        *,
        stratify_by: str | None = "prompt_toxicity",
        bins: int = 10,
        seed: int = 0,
    ) -> PromptSet:
        """Sample `n` prompts evenly across `bins` equal-width score bins on [0, 1].

        Probes need the whole score range, but real prompt sets are mostly non-toxic, so a uniform
        sample would leave the top bins nearly empty. Each non-empty bin gets n / (non-empty
        bins) prompts; a bin with fewer prompts gives all it has and its shortfall is spread over
        the others (water-filling), so the result has exactly `n` prompts.

        Args:
            n: Number of prompts to draw (without replacement), 1 <= n <= len(self).
            stratify_by: Score column (`prompt_toxicity` or `toxicity`); None samples uniformly.
            bins: Number of equal-width bins over [0, 1]; the last bin includes 1.0.
            seed: Seed of the numpy generator.

        Returns:
            A new set with the sampled rows, in their original order.
        """
        if not 1 <= n <= len(self):
            raise ValueError(f"n must be between 1 and the set size {len(self)}, got {n}.")
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}.")
        rng = np.random.default_rng(seed)
        if stratify_by is None:
            chosen = rng.choice(len(self), size=n, replace=False)
        else:
            col = stratify_by if stratify_by.startswith(SCORE_PREFIX) else f"{SCORE_PREFIX}{stratify_by}"
            if col not in self.df.columns:
                raise ValueError(
                    f"stratify_by must be one of {score_columns(self.df)} or None, got {stratify_by!r} "
                    "(call PromptSet.score(scorer) to add scores)."
                )
            values = self.df[col].to_numpy(dtype=float)
            if np.isnan(values).any():
                raise ValueError(
                    f"{int(np.isnan(values).sum())} prompts have no {col}; call PromptSet.score(scorer) "
                    "first, or pass stratify_by=None."
                )
            bin_of = np.minimum((values * bins).astype(int), bins - 1)
            members = [np.flatnonzero(bin_of == b) for b in range(bins)]
            quota = water_fill([len(m) for m in members], n)
            chosen = np.concatenate(
                [rng.choice(m, size=q, replace=False) for m, q in zip(members, quota, strict=True) if q]
            )
        df = self.df.iloc[np.sort(chosen)].reset_index(drop=True)
        return PromptSet(df=df, dropped=dict(self.dropped))


def water_fill(sizes: list[int], n: int) -> list[int]:
    """Split `n` draws over groups of `sizes` as evenly as possible, capped by each size.

    Repeatedly give every open group an equal share of what is left (the first groups get the
    remainder of the integer division); groups that fill up close. Sum of the result is `n`.
    """
    quota = [0] * len(sizes)
    left = n
    while left > 0:
        open_ = [i for i, s in enumerate(sizes) if quota[i] < s]
        if not open_:
            raise ValueError(f"Cannot draw {n} from groups of sizes {sizes}.")
        share, extra = divmod(left, len(open_))
        for rank, i in enumerate(open_):
            take = min(share + (1 if rank < extra else 0), sizes[i] - quota[i])
            quota[i] += take
            left -= take
    return quota
