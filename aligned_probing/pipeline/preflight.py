"""Check everything a run needs before its first stage (and in a dry run), without loading weights.

A typo in `probing.attributes` used to surface after generation, scoring and encoding; a hub model
on an offline machine or `device = "cuda"` on a CPU-only one used to pass a dry run. `preflight`
collects every problem it can find and raises once:

- `ConfigError` for settings that cannot work: attribute names the scorer does not return,
  `max_new_tokens` beyond a model's context (read from its `config.json`), a CUDA/MPS device that
  is not there, a model spec that names nothing, scorer options the scorer does not take;
- `DataError` for inputs that cannot be read: a missing or malformed prompt file, a hub model or
  dataset that is not cached while the hub is unreachable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aligned_probing.data.schema import DataError
from aligned_probing.pipeline.config import ConfigError, ModelVariant, RunConfig


def _device_problem(v: ModelVariant) -> str | None:
    import torch

    device = v.device.lower()
    if device.startswith("cuda") and not torch.cuda.is_available():
        return (
            f"model {v.name!r}: device = {v.device!r}, but torch sees no CUDA device on this machine "
            '(torch.cuda.is_available() is False); set device = "cpu" or run where a GPU is visible.'
        )
    if device.startswith("cuda") and ":" in device:
        suffix = device.split(":", 1)[1]
        if not suffix.isdigit():
            return f'model {v.name!r}: device = {v.device!r} is not a torch device; use "cuda" or "cuda:0".'
        if int(suffix) >= torch.cuda.device_count():
            return f"model {v.name!r}: device = {v.device!r}, but only {torch.cuda.device_count()} CUDA device(s) exist."
    if device == "mps" and not torch.backends.mps.is_available():
        return f'model {v.name!r}: device = "mps", but MPS is not available here; set device = "cpu".'
    return None


def _model_config_json(v: ModelVariant) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """(config.json of the model when readable without loading it, config problem, data problem)."""
    from aligned_probing.models import hub as _hub
    from aligned_probing.models import registry as _registry

    text = v.spec
    if text in _registry.REGISTRY:
        from aligned_probing.models.cache import models_dir

        entry = _registry.get_entry(text)
        path = models_dir() / f"{entry.name}-{entry.version}" / "config.json"
        return (_read_json(path) if path.is_file() else None), None, None
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            return None, f"model {v.name!r}: spec {text!r} is a file but not a .gguf file.", None
        return None, None, None
    if path.is_dir():
        if (path / "config.json").is_file():
            return _read_json(path / "config.json"), None, None
        if (path / "adapter_config.json").is_file():
            return None, None, None
        return None, f"model {v.name!r}: directory {text!r} holds neither config.json nor adapter_config.json.", None
    path_like = text.startswith((".", "/", "~")) or text.lower().endswith(".gguf")
    if path_like or not _hub.looks_like_repo_id(text):
        return None, (
            f"model {v.name!r}: spec {text!r} is not a registry name {_registry.registry_names()} and no such "
            "file or directory exists (relative paths starting with `.` are read against the config file)."
        ), None
    if _hub.cached_commit(text) is None:
        reason = _hub.offline_reason()
        if reason is not None:
            return None, None, _hub.unavailable_message(text, reason, _registry.registry_names())
        return None, None, None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(text, "config.json")
    except ImportError:
        found = None
    return (_read_json(Path(found)) if isinstance(found, str) else None), None, None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def context_length(model_config: dict[str, Any]) -> int | None:
    """The longest sequence a model accepts, from its `config.json` (None when it does not say)."""
    configs = [model_config, model_config.get("text_config") or {}]
    for cfg in configs:
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx"):
            value = cfg.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _scorer_attributes(config: RunConfig) -> tuple[tuple[str, ...] | None, str | None]:
    from aligned_probing.scoring import get_scorer

    s = config.scoring
    try:
        scorer = get_scorer(s.scorer, **s.options)
    except (ValueError, TypeError, ImportError, OSError) as err:
        return None, f"scoring: {err}"
    return tuple(scorer.attributes), None


def _attribute_problems(config: RunConfig, attributes: tuple[str, ...]) -> list[str]:
    known = list(attributes)
    problems = []
    checks: list[tuple[str, list[str]]] = [
        ("probing.attributes", list(config.probing.attributes or [])),
        ("behaviour.attributes", list(config.behaviour.attributes or [])),
    ]
    if config.causal.enabled:
        checks.append(("causal.attribute", [config.causal.attribute]))
    for key, names in checks:
        unknown = [a for a in names if a not in known]
        if unknown:
            problems.append(
                f"{key} must name attributes of scorer {config.scoring.scorer!r}, which returns {known}; "
                f"got unknown {unknown}."
            )
    return problems


def preflight(config: RunConfig) -> None:
    """Check `config` against this machine, its models, its prompts and its scorer; raise on any problem.

    Reads `config.json` files and prompt files, builds the scorer (not its weights' forward pass),
    and loads no model weights.

    Raises:
        ConfigError: Settings that cannot work here (every problem listed, each naming its key).
        DataError: Inputs that cannot be read (missing or malformed prompt file, hub unreachable).
    """
    config_problems: list[str] = []
    data_problems: list[str] = []
    for v in config.model_variants():
        problem = _device_problem(v)
        if problem:
            config_problems.append(problem)
        model_config, bad_config, bad_data = _model_config_json(v)
        config_problems += [bad_config] if bad_config else []
        data_problems += [bad_data] if bad_data else []
        n_ctx = context_length(model_config) if model_config else None
        if n_ctx is not None:
            lengths = [("generation.max_new_tokens", config.generation.max_new_tokens)]
            if config.causal.enabled:
                lengths.append(("causal.max_new_tokens", config.causal.max_new_tokens))
            for key, value in lengths:
                if value >= n_ctx:
                    config_problems.append(
                        f"{key} ({value}) must be smaller than the context of model {v.name!r} ({n_ctx} tokens, "
                        "from its config.json), which must also hold the prompt."
                    )
    attributes, bad_scorer = _scorer_attributes(config)
    if bad_scorer:
        config_problems.append(bad_scorer)
    elif attributes is not None:
        config_problems += _attribute_problems(config, attributes)
    prompts = _load_prompts(config, data_problems)
    if prompts is not None and config.data.stratify_by is not None and attributes is not None:
        # The prompts stage scores every prompt with the run's scorer, so its columns are known now.
        columns = set(prompts.df.columns) | {f"prompt_{a}" for a in attributes}
        if config.data.stratify_by not in columns:
            config_problems.append(
                f"data.stratify_by must be a prompt-score column {sorted(c for c in columns if c.startswith('prompt_'))} "
                f"or false, got {config.data.stratify_by!r}."
            )
    if config_problems:
        raise ConfigError("Invalid config:\n  " + "\n  ".join(config_problems + data_problems))
    if data_problems:
        raise DataError("Cannot read the run's inputs:\n  " + "\n  ".join(data_problems))


def _load_prompts(config: RunConfig, problems: list[str]) -> Any:
    from aligned_probing.data.source import load_prompt_source

    try:
        return load_prompt_source(config.data)
    except (FileNotFoundError, ValueError, ConnectionError, UnicodeError, ImportError) as err:
        problems.append(f"data.prompt_set = {config.data.prompt_set!r}: {err}")
        return None
