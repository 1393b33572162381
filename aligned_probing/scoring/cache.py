"""A persistent score cache, so re-runs (and other stages) never score the same text twice.

Scores are keyed by (scorer id, sha256 of the UTF-8 text) in a SQLite database. The scorer id
includes the backend, model version and a weights hash, so a changed scorer never reads stale
scores. SQLite in WAL mode with a busy timeout lets several processes read and write one cache file
concurrently; writes are single `INSERT OR REPLACE` transactions, so a crash leaves no partial row.
NaN scores (a remote backend failed) are not cached: the next run retries them.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from aligned_probing.scoring.base import Scorer, validate_texts

# SQLite's default limit on bound parameters is 32766 since 3.32; stay well below it.
_CHUNK = 500
_SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    scorer_id TEXT NOT NULL,
    text_sha256 TEXT NOT NULL,
    scores TEXT NOT NULL,
    PRIMARY KEY (scorer_id, text_sha256)
) WITHOUT ROWID
"""


def text_hash(text: str) -> str:
    """Hex sha256 of the text's UTF-8 bytes (the cache key; surrogates are escaped, not refused)."""
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


class ScoreCache:
    """Scores stored by (scorer id, text hash) in one SQLite file.

    Args:
        path: Database file (created with its parent directories).
        timeout: Seconds a writer waits for another process's lock before failing.
    """

    def __init__(self, path: str | Path, *, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # One short-lived connection per operation: safe across threads and forked processes.
        with closing(sqlite3.connect(self.path, timeout=self.timeout)) as conn:
            conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            with conn:  # commit on success, roll back on error
                yield conn

    def get(self, scorer_id: str, hashes: Sequence[str]) -> dict[str, dict[str, float]]:
        """Cached scores for the given text hashes (missing hashes are absent from the result)."""
        found: dict[str, dict[str, float]] = {}
        unique = list(dict.fromkeys(hashes))
        with self._connect() as conn:
            for start in range(0, len(unique), _CHUNK):
                chunk = unique[start : start + _CHUNK]
                rows = conn.execute(
                    f"SELECT text_sha256, scores FROM scores WHERE scorer_id = ? "
                    f"AND text_sha256 IN ({','.join('?' * len(chunk))})",
                    [scorer_id, *chunk],
                )
                found.update((h, json.loads(s)) for h, s in rows)
        return found

    def put(self, scorer_id: str, scores: Mapping[str, Mapping[str, float]]) -> int:
        """Store scores by text hash; entries with a NaN are skipped. Returns the number stored."""
        rows = [
            (scorer_id, h, json.dumps({k: float(v) for k, v in s.items()}))
            for h, s in scores.items()
            if not any(math.isnan(float(v)) for v in s.values())
        ]
        with self._connect() as conn:
            conn.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?)", rows)
        return len(rows)

    def __len__(self) -> int:
        with self._connect() as conn:
            return conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0]


class CachedScorer:
    """A scorer that looks texts up in a `ScoreCache` first and scores only the misses.

    Same `id` and `attributes` as the wrapped scorer, so cached and uncached results are
    interchangeable. Duplicate texts within one call are scored once.

    Args:
        scorer: The scorer to wrap.
        cache: A `ScoreCache`, or a path to create one at.
    """

    def __init__(self, scorer: Scorer, cache: ScoreCache | str | Path) -> None:
        self.scorer = scorer
        self.cache = cache if isinstance(cache, ScoreCache) else ScoreCache(cache)
        self.id = scorer.id
        self.attributes = tuple(scorer.attributes)
        self.last_misses = 0

    def score(self, texts: Sequence[str]) -> pd.DataFrame:
        """Score texts, reusing cached scores (`last_misses` counts the texts actually scored)."""
        texts = validate_texts(texts)
        hashes = [text_hash(t) for t in texts]
        cols = list(self.attributes)
        # An entry missing one of our attributes (written by an older scorer version) is a miss.
        known = {h: v for h, v in self.cache.get(self.id, hashes).items() if all(a in v for a in cols)}
        missing = {h: t for h, t in zip(hashes, texts, strict=True) if h not in known}
        errors: dict[int, str] = {}
        if missing:
            fresh = self.scorer.score(list(missing.values()))
            new = dict(zip(missing, fresh[cols].to_dict("records"), strict=True))
            self.cache.put(self.id, new)
            known.update(new)
            order = list(missing)
            failed = {order[i]: msg for i, msg in fresh.attrs.get("errors", {}).items()}
            errors = {i: failed[h] for i, h in enumerate(hashes) if h in failed}
        self.last_misses = len(missing)
        values = np.array([[known[h][a] for a in cols] for h in hashes], dtype=np.float64).reshape(
            -1, len(cols)
        )
        frame = pd.DataFrame(values, columns=cols)
        frame.attrs["errors"] = errors
        return frame

    def __repr__(self) -> str:
        return f"CachedScorer({self.scorer!r}, {str(self.cache.path)!r})"


class ScoringFailedError(RuntimeError):
    """Some texts could not be scored (a remote scorer's outage, quota or key problem).

    The message gives the scorer's own error for the first failed texts. Scores that succeeded
    stay in the score cache, so the next run scores only the texts that failed.
    """


def score_or_raise(
    scorer: Scorer, texts: Sequence[str], *, batch_size: int, what: str = "texts", show_progress: bool = False
) -> pd.DataFrame:
    """Score `texts` in batches; raise `ScoringFailedError` if any text got no score.

    A failed text (NaN, with its reason in the batch's `attrs["errors"]`) never passes as a
    result: every batch is still tried, so with a `CachedScorer` every score that succeeded is
    stored and a re-run scores only the failures.

    Args:
        scorer: The scorer (usually a `CachedScorer`).
        texts: Texts to score.
        batch_size: Texts per `scorer.score` call.
        what: What the texts are, for the message ("continuations", "prompts").
        show_progress: Show a tqdm bar ("score {what}") over the texts, one update per batch.

    Returns:
        One row per text, one column per attribute, no NaN.
    """
    from tqdm.auto import tqdm

    cols = list(scorer.attributes)
    parts: list[pd.DataFrame] = []
    errors: dict[int, str] = {}
    with tqdm(total=len(texts), desc=f"score {what}", unit="text", disable=not show_progress) as bar:
        for start in range(0, len(texts), batch_size):
            frame = scorer.score(list(texts[start : start + batch_size]))
            parts.append(frame[cols].reset_index(drop=True))
            errors.update({start + int(i): str(msg) for i, msg in frame.attrs.get("errors", {}).items()})
            bar.update(len(texts[start : start + batch_size]))
    scores = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols, dtype=float)
    for i in np.flatnonzero(scores[cols].isna().any(axis=1).to_numpy()):
        errors.setdefault(int(i), "the scorer returned NaN without a reason")
    if errors:
        first = sorted(errors)[:3]
        shown = "; ".join(f"{what}[{i}]: {errors[i]}" for i in first)
        kept = len(texts) - len(errors)
        where = f" in the score cache {scorer.cache.path}" if isinstance(scorer, CachedScorer) else ""
        raise ScoringFailedError(
            f"scorer {scorer.id!r} could not score {len(errors)} of {len(texts)} {what} ({shown}). "
            f"The {kept} scores that succeeded are kept{where}; fix the scorer (network, API key, quota) and "
            "run again: only the failed texts are scored again."
        )
    return scores
