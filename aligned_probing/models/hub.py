"""Hugging Face Hub names: use the local hub cache first, and fail at once when offline.

Transformers retries unreachable endpoints for a long time before giving up. A probing run that
cannot reach the hub should instead stop immediately and say how to pass a local path, so we
check the offline switches and probe the endpoint with a short timeout before any download.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_TRUE = {"1", "on", "yes", "true"}
# Hub repo ids: "name" or "org/name" with letters, digits, "-", "_", ".".
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
PROBE_TIMEOUT_S = 3.0


class HubUnavailableError(ConnectionError):
    """A hub model is not in the local cache and the hub cannot be reached."""


def looks_like_repo_id(spec: str) -> bool:
    """Whether `spec` is syntactically a hub repo id ("gpt2", "HuggingFaceTB/SmolLM2-135M")."""
    return bool(_REPO_ID.match(spec)) and ".." not in spec and not spec.endswith(".gguf")


def offline_reason() -> str | None:
    """Why the hub is not to be used, or None when it may be tried.

    Checks `HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE` (read now, not at import time, so a caller
    can set them at run time) and then probes `HF_ENDPOINT` with a short HEAD request.
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set"
    import requests

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        requests.head(endpoint, timeout=PROBE_TIMEOUT_S, allow_redirects=False)
    except requests.RequestException as exc:
        return f"the hub at {endpoint} is unreachable ({type(exc).__name__})"
    return None


def unavailable_message(spec: str, reason: str, registry: list[str]) -> str:
    """The error text for a hub name that cannot be loaded offline."""
    return (
        f"Cannot load model spec {spec!r}: it is not a registry name, not an existing local path, "
        f"and not in the local Hugging Face cache, and {reason}. Pass a local path instead (a "
        f"Hugging Face directory with config.json, a .gguf file or a PEFT adapter directory), "
        f"download it first with `hf download {spec}` where the hub is reachable, "
        f"or use a registry name: {registry}."
    )


def cached_commit(repo_id: str, revision: str = "main") -> str | None:
    """The commit of the locally cached snapshot of `repo_id` (None when it is not cached)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if not isinstance(found, str):
        return None
    parts = Path(found).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def resolved_commit(repo_id: str, revision: str | None = None) -> str | None:
    """The commit a hub name resolves to: asked of the hub when reachable, else the cached snapshot's.

    A stage keyed on the commit (not the name) recomputes when the repository moves on.
    """
    if offline_reason() is None:
        try:
            from huggingface_hub import HfApi

            sha = HfApi().model_info(repo_id, revision=revision).sha
            if sha:
                return str(sha)
        except Exception:  # noqa: BLE001 - any hub failure falls back to the local cache
            pass
    return cached_commit(repo_id, revision or "main")
