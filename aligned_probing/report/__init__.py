"""The HTML report and the plot functions: they take results objects and tables, never run stages.

Modules: `html` (`render_report`; `aligned_probing.pipeline.results.build_report` loads a run and calls
it), `plots` (seaborn-style functions: data first, column names as keywords, `ax=None`, return the Axes),
`findings` (peaks with their control, behaviour headline, causal effects in words), `cases` (variants linked
to their base through recorded fields), `sections`/`case_sections`/`layout` (the report's parts).
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {"render_report": "html", "library_versions": "html"}


def __getattr__(name: str) -> Any:
    if name in {"html", "plots", "findings", "cases", "sections", "case_sections", "layout"}:
        return importlib.import_module(f"aligned_probing.report.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(f"aligned_probing.report.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'aligned_probing.report' has no attribute {name!r}")
