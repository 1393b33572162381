"""The SQLite score cache: hits skip scoring, keys separate scorers, concurrent writers are safe."""

from __future__ import annotations

import hashlib
import multiprocessing

import numpy as np
import pandas as pd
import pytest

from aligned_probing.scoring import CachedScorer, ScoreCache, ScoringWarning, get_scorer, text_hash
from aligned_probing.scoring.base import validate_texts, warn_failed


class LengthScorer:
    """Known answer: toxicity = len(text) / 100 (capped), threat = 0.5; counts what it scores."""

    attributes = ("toxicity", "threat")

    def __init__(self, id: str = "length-v1", fail: set[str] | None = None) -> None:
        self.id = id
        self.fail = fail or set()
        self.seen: list[str] = []

    def score(self, texts):
        texts = validate_texts(texts)
        self.seen.extend(texts)
        tox = [np.nan if t in self.fail else min(len(t), 100) / 100 for t in texts]
        frame = pd.DataFrame({"toxicity": tox, "threat": [0.5] * len(texts)})
        warn_failed(frame, {i: "remote error" for i, t in enumerate(texts) if t in self.fail}, source=self.id)
        return frame


def test_text_hash_is_sha256_of_utf8():
    assert text_hash("café") == hashlib.sha256("café".encode()).hexdigest()


def test_second_call_reuses_scores(tmp_path):
    inner = LengthScorer()
    cached = CachedScorer(inner, tmp_path / "scores.sqlite")
    first = cached.score(["a", "bb", "a", "ccc"])
    assert inner.seen == ["a", "bb", "ccc"]  # duplicates within a call are scored once
    assert cached.last_misses == 3
    second = cached.score(["ccc", "bb", "dddd"])
    assert inner.seen == ["a", "bb", "ccc", "dddd"]  # only the new text is scored
    np.testing.assert_allclose(first["toxicity"], [0.01, 0.02, 0.01, 0.03])
    np.testing.assert_allclose(second["toxicity"], [0.03, 0.02, 0.04])
    assert list(second.columns) == ["toxicity", "threat"] and cached.id == inner.id


def test_cache_persists_across_instances_and_separates_scorer_ids(tmp_path):
    path = tmp_path / "scores.sqlite"
    CachedScorer(LengthScorer(), path).score(["hello"])
    again = LengthScorer()
    CachedScorer(again, path).score(["hello"])
    assert again.seen == []
    other = LengthScorer(id="length-v2")  # a changed scorer must not read v1's scores
    CachedScorer(other, path).score(["hello"])
    assert other.seen == ["hello"]
    assert len(ScoreCache(path)) == 2


def test_nan_scores_are_not_cached_and_errors_propagate(tmp_path):
    inner = LengthScorer(fail={"bad"})
    cached = CachedScorer(inner, tmp_path / "scores.sqlite")
    with pytest.warns(ScoringWarning):
        out = cached.score(["ok", "bad", "bad"])
    assert np.isnan(out.loc[1, "toxicity"]) and np.isnan(out.loc[2, "toxicity"])
    assert out.attrs["errors"] == {1: "remote error", 2: "remote error"}
    inner.fail.clear()
    out = cached.score(["bad"])  # retried on the next run, now succeeds
    assert out.loc[0, "toxicity"] == pytest.approx(0.03)
    assert inner.seen == ["ok", "bad", "bad"]


def test_many_texts_and_empty_input(tmp_path):
    cached = CachedScorer(LengthScorer(), tmp_path / "scores.sqlite")
    texts = [f"text {i}" for i in range(1234)]  # more than one SQL chunk
    np.testing.assert_allclose(cached.score(texts)["toxicity"], [len(t) / 100 for t in texts])
    assert cached.score(texts).shape == (1234, 2) and cached.last_misses == 0
    assert cached.score([]).shape == (0, 2)


@pytest.mark.slow  # loads the embedded tox-block model
def test_get_scorer_cache_option_wraps(tmp_path):
    scorer = get_scorer("tox-block", cache=tmp_path / "c.sqlite")
    assert isinstance(scorer, CachedScorer) and scorer.id.startswith("jigsaw-bilstm/tox-block")


def _writer(path: str, worker: int, n: int) -> None:
    cache = ScoreCache(path, timeout=30)
    for i in range(n):  # many small transactions maximise lock contention
        cache.put("s", {f"w{worker}-{i}": {"toxicity": worker / 10}, "shared": {"toxicity": 0.5}})


def test_concurrent_writers_lose_nothing(tmp_path):
    path = str(tmp_path / "scores.sqlite")
    ScoreCache(path)
    ctx = multiprocessing.get_context("fork")  # workers only touch sqlite3
    procs = [ctx.Process(target=_writer, args=(path, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    cache = ScoreCache(path)
    assert len(cache) == 4 * 40 + 1
    got = cache.get("s", [f"w3-{i}" for i in range(40)] + ["shared"])
    assert all(v == {"toxicity": 0.3} for k, v in got.items() if k != "shared") and len(got) == 41
