"""The pipeline: typed config, the plan (one stage registry), stages, runner, executors, run-directory fs.

Stages: prompts -> generate -> score -> encode -> probe -> behaviour -> interplay -> causal -> report.
Modules: `config` (RunConfig and its sections), `registry` (the one table of stages), `settings` (each
stage's typed settings), `plan` (`build_plan`, `run`), `stages` (the stage functions), `probes` (the probe
stage's saved probes), `runner` (content-keyed execution), `executors` (local, Ray), `fs` (local or fsspec run
directories), `results` (`load_results`), `hashing`.

Names of `plan` resolve lazily here, so `from aligned_probing.pipeline import fs` (used by the
generation and encoding modules) does not import every stage.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = {
    "config", "registry", "settings", "plan", "stages", "probes", "runner", "executors", "fs", "results",
    "hashing",
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"aligned_probing.pipeline.{name}")
    plan = importlib.import_module("aligned_probing.pipeline.plan")
    try:
        return getattr(plan, name)
    except AttributeError:
        raise AttributeError(f"module 'aligned_probing.pipeline' has no attribute {name!r}") from None
