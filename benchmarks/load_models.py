"""Cold (from GGUF) and warm (from the safetensors cache) load time of the embedded models.

Every load runs in a fresh interpreter, so the figure is what a user waits for in a new process
(the one-off import of torch/transformers/transformer-lens is reported separately). The cold load
uses an empty cache directory (`ALIGNED_PROBING_CACHE`), so it includes locating/assembling the
GGUF, dequantising it and writing the cache entry; warm loads reuse that entry. The machine's
load average is recorded with each run: on a shared machine it explains most of the spread.

Usage: .venv/bin/python benchmarks/load_models.py [--models smollm2-135m-instruct gemma-3-270m]
       [--warm-reps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import save_results  # noqa: E402

_CHILD = """
import json, os, sys, time
t0 = time.perf_counter()
from aligned_probing.models import load_model
t1 = time.perf_counter()
model = load_model(sys.argv[1])
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "n_layers": model.n_layers,
                  "d_model": model.d_model, "loadavg_1m": os.getloadavg()[0]}))
"""


def timed_load(name: str, cache: Path) -> dict:
    """Load `name` in a fresh interpreter with the given cache directory; return its timings."""
    env = {**os.environ, "ALIGNED_PROBING_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-c", _CHILD, name], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma-3-270m"])
    parser.add_argument("--warm-reps", type=int, default=2)
    args = parser.parse_args(argv)
    headline, detail = {}, {}
    with tempfile.TemporaryDirectory(prefix="ap-load-bench-") as tmp:
        for name in args.models:
            cache = Path(tmp) / name
            cold = timed_load(name, cache)
            warm = [timed_load(name, cache) for _ in range(args.warm_reps)]
            entry_bytes = sum(f.stat().st_size for f in (cache / "models").rglob("*") if f.is_file())
            best_warm = min(w["load_s"] for w in warm)
            headline[name] = {"cold_s": round(cold["load_s"], 1), "warm_s": round(best_warm, 1),
                              "speedup": round(cold["load_s"] / best_warm, 1)}
            detail[name] = {"cold": cold, "warm": warm, "cache_entry_bytes": entry_bytes}
            print(name, headline[name], flush=True)
    save_results("load_models", headline, detail)


if __name__ == "__main__":
    main()
