"""Shared helpers for benchmark scripts: machine facts and the JSON layout every result uses."""

from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
_LIBS = ("torch", "transformers", "transformer-lens", "numpy", "scipy", "scikit-learn", "zarr",
         "pandas", "trl", "peft")


def machine_info() -> dict[str, Any]:
    """Cores, torch threads and library versions, recorded with every benchmark."""
    import torch

    versions = {}
    for lib in _LIBS:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cuda": torch.cuda.is_available(),
        "versions": versions,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def save_results(name: str, headline: dict[str, Any], detail: dict[str, Any]) -> Path:
    """Write `benchmarks/results/{name}.json` as {"headline", "machine", "detail"} and print it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    payload = {"headline": headline, "machine": machine_info(), "detail": detail}
    out.write_text(json.dumps(payload, indent=2, default=float))
    print(json.dumps({"headline": headline}, indent=2, default=float))
    print(f"saved {out}")
    return out


class Timer:
    """Wall-clock context manager: `with Timer() as t: ...; t.seconds`."""

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
