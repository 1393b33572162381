"""Detoxify (unitary's BERT/RoBERTa Jigsaw classifiers) as a `Scorer`, strictly offline.

Detoxify is the scorer most users will have (it wants a GPU and the Hugging Face hub). Its own
constructor downloads the checkpoint and, through the checkpoint's `arch.args.model_type`, the
model config and tokenizer. We never let it download: the checkpoint must be a local file (given,
or already in torch's hub cache) and `model_type` a local directory or a repository already in the
Hugging Face cache; otherwise a clear error says what is missing and how to provide it.

Checkpoints are pickles (Detoxify's format, not ours). Before Detoxify unpickles one with
`weights_only=False`, we check that it loads with `weights_only=True` (plain containers and
tensors only), unless the caller sets `trust_checkpoint=True`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aligned_probing.scoring.base import LABEL_ALIASES, canonical_order, scores_frame, validate_texts

# Detoxify 0.5.4's release files (detoxify.detoxify.MODEL_URLS), looked up in torch's hub cache only.
_RELEASES = {
    "original": "https://github.com/unitaryai/detoxify/releases/download/v0.1-alpha/toxic_original-c1212f89.ckpt",
    "unbiased": "https://github.com/unitaryai/detoxify/releases/download/v0.3-alpha/toxic_debiased-c7548aa0.ckpt",
}


def _hub_cached_checkpoint(model_type: str) -> Path:
    import torch

    url = _RELEASES[model_type]
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
    if not path.is_file():
        raise FileNotFoundError(
            f"Detoxify {model_type!r} weights are not available offline (looked for {path}). Download "
            f"{url} once on a machine with network access and pass checkpoint=PATH, or place it at {path}; "
            "aligned-probing never downloads at run time"
        )
    return path


def _peek_config(path: Path, *, trust_checkpoint: bool) -> dict[str, Any]:
    """Read the checkpoint's `config` without executing pickled code (unless trusted)."""
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=not trust_checkpoint, mmap=True)
    except Exception as exc:  # torch raises UnpicklingError or RuntimeError variants
        raise ValueError(
            f"checkpoint {path} does not load as plain tensors and containers ({type(exc).__name__}: "
            f"{str(exc)[:200]}); if you trust the file, pass trust_checkpoint=True"
        ) from exc
    if not isinstance(loaded, dict) or "config" not in loaded or "state_dict" not in loaded:
        raise ValueError(f"checkpoint {path} is not in Detoxify's format: it needs 'config' and 'state_dict'")
    return loaded["config"]


def _check_model_type_local(model_type: str, huggingface_config_path: str | None) -> None:
    """Fail before Detoxify would reach the network for the model config or tokenizer."""
    if Path(model_type).is_dir():
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model_type, "config.json"), str) and (
        huggingface_config_path is not None
        or any(
            isinstance(try_to_load_from_cache(model_type, f), str)
            for f in ("tokenizer.json", "vocab.txt", "vocab.json")
        )
    ):
        return
    raise FileNotFoundError(
        f"the checkpoint's arch.args.model_type is {model_type!r}, which is neither a local directory nor in "
        "the Hugging Face cache, so Detoxify would download its config and tokenizer. Run Detoxify once "
        "online to fill the cache, or save a checkpoint whose model_type is a local directory holding "
        "config.json and the tokenizer files (see docs/scoring.md)"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class DetoxifyScorer:
    """Detoxify's `predict`, offline, with canonical attribute names.

    Class names map to canonical attributes (toxic/toxicity -> toxicity, severe_toxic ->
    severe_toxicity, obscene -> profanity, insult, threat, identity_hate/identity_attack ->
    identity_attack, sexual_explicit -> sexually_explicit); Detoxify's identity subgroup outputs
    (male, female, ...) are dropped. Texts longer than the model's position limit are truncated to
    their *first* tokens (512 for the released models); an empty text is scored as [CLS] [SEP].

    Args:
        model_type: "original" or "unbiased" (weights from torch's hub cache) when `checkpoint` is
            None; otherwise only a label for the id.
        checkpoint: A local checkpoint file in Detoxify's format.
        huggingface_config_path: Local directory with the HF config and tokenizer (Detoxify option).
        device: Torch device for the model.
        batch_size: Texts per `predict` call.
        trust_checkpoint: Allow checkpoints that need full unpickling (executes code in the file).
    """

    def __init__(
        self,
        model_type: str = "original",
        *,
        checkpoint: str | Path | None = None,
        huggingface_config_path: str | Path | None = None,
        device: str = "cpu",
        batch_size: int = 32,
        trust_checkpoint: bool = False,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if checkpoint is None:
            if model_type not in _RELEASES:
                raise ValueError(
                    f"model_type must be one of {sorted(_RELEASES)} when no checkpoint is given, "
                    f"got {model_type!r}"
                )
            path = _hub_cached_checkpoint(model_type)
        else:
            path = Path(checkpoint)
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint must be an existing file, got {str(checkpoint)!r}")
        config = _peek_config(path, trust_checkpoint=trust_checkpoint)
        hf_dir = None if huggingface_config_path is None else str(huggingface_config_path)
        _check_model_type_local(str(config["arch"]["args"]["model_type"]), hf_dir)

        from detoxify import Detoxify

        self._detoxify = Detoxify(checkpoint=str(path), device=device, huggingface_config_path=hf_dir)
        self._cap_length()
        self.batch_size = batch_size
        self._columns = {
            name: LABEL_ALIASES[name] for name in self._detoxify.class_names if name in LABEL_ALIASES
        }
        self.attributes = canonical_order(self._columns.values())
        label = model_type if checkpoint is None else "checkpoint"
        self.id = f"detoxify/{label}/sha256:{_sha256(path)[:16]}"

    def _cap_length(self) -> None:
        # Detoxify tokenizes with truncation=True, which truncates at the tokenizer's
        # model_max_length; a tokenizer saved without one (1e30) would overflow the position
        # embeddings on long texts, so cap it at what the model can take (our own instance only).
        tokenizer, config = self._detoxify.tokenizer, self._detoxify.model.config
        limit = getattr(config, "max_position_embeddings", None)
        if limit and tokenizer.model_max_length > limit:
            tokenizer.model_max_length = limit

    def score(self, texts: Sequence[str]) -> pd.DataFrame:
        """Score texts with Detoxify in batches (see the class docstring)."""
        texts = validate_texts(texts)
        names = list(self._columns)
        values = np.empty((len(texts), len(names)))
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            out = self._detoxify.predict(chunk)
            # Detoxify squeezes a batch of one into scalars.
            values[start : start + len(chunk)] = np.column_stack([np.atleast_1d(out[n]) for n in names])
        frame = scores_frame(values, [self._columns[n] for n in names], source=self.id)
        return frame[list(self.attributes)]

    def __repr__(self) -> str:
        return f"DetoxifyScorer(id={self.id!r})"
