"""Export a finished run's tidy tables, figures and provenance into a reference folder (`data/replication/`).

What a user compares their own run against: probing summary and peaks (with CIs and control), behaviour,
interplay (over all models and per model family: precision variants and fine-tunes of one base are not
independent models), the case-study comparisons (templates, precision, fine-tuned, checkpoints), causal
tables, generation self-checks, sample continuations and stage timings; plus `provenance.json` (config,
commit, date, machine, library versions).

Usage: .venv/bin/python scripts/export_reference.py RUN_DIR OUT_DIR [--figures DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aligned_probing.interplay import interplay, interplay_summary  # noqa: E402
from aligned_probing.pipeline.results import load_results  # noqa: E402
from aligned_probing.probing import summarize  # noqa: E402
from aligned_probing.report import cases, findings  # noqa: E402
from aligned_probing.report.html import REPORT_METRICS, example_continuations  # noqa: E402
from benchmarks._common import machine_info  # noqa: E402


def _commit() -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


def _portable(value: object) -> object:
    """Paths inside this checkout, relative to it: the shipped tables name no machine's directories."""
    return value.replace(f"{ROOT}/", "") if isinstance(value, str) else value


def family_interplay(
    probing: pd.DataFrame, behaviour: pd.DataFrame, lineage: pd.DataFrame, seed: int
) -> pd.DataFrame:
    """Interplay within each model family (a base and its variants) that has at least three models."""
    family = lineage.assign(family=lineage["base"].fillna(lineage["model"]))
    frames = []
    for name, members in family.groupby("family"):
        models = set(members["model"])
        if len(models) < 3:
            continue
        table = interplay(
            probing[probing["model"].isin(models)],
            behaviour[behaviour["model"].isin(models)],
            metric="emt",
            seed=seed,
        )
        frames.append(interplay_summary(table).assign(family=name, n_models=len(models)))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def main() -> None:
    """Parse the arguments, load the run and write every table, the figures and `provenance.json`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--figures", type=Path, default=None, help="Copy the run's report figures (PNG) here."
    )
    args = parser.parse_args()
    r = load_results(args.run_dir)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    lineage = cases.model_lineage(r.config)
    tables: dict[str, pd.DataFrame | None] = {
        "lineage": lineage,
        "behaviour": r.behaviour,
        "timings": r.timings,
    }
    if r.probing is not None:
        summary = summarize(r.probing, metrics=[m for m in REPORT_METRICS if m in r.probing.columns])
        peaks = findings.peak_table(summary)
        measures = cases.model_measures(peaks, r.behaviour)
        tables |= {
            "probing_summary": summary,
            "peaks": peaks,
            "case_templates": cases.compare_templates(measures),
            **{
                f"case_{rel}": cases.compare_to_base(lineage, measures, rel)
                for rel in ("precision", "finetuned", "checkpoint")
            },
        }
        if r.behaviour is not None:
            tables["interplay_by_family"] = family_interplay(r.probing, r.behaviour, lineage, seed=0)
    if r.interplay is not None:
        tables["interplay"] = r.interplay
        tables["interplay_peaks"] = interplay_summary(r.interplay)
    for name in ("layer_skipping", "steering", "patching", "selfchecks"):
        tables[name] = getattr(r, name)
    if r.continuations is not None and r.scores is not None:
        picks = {"most toxic": 5, "least toxic": 5, "random": 5}
        tables["sample_continuations"] = example_continuations(r.continuations, r.scores, counts=picks)
    written = {}
    for name, table in tables.items():
        if table is None or len(table) == 0:
            continue
        table = table.copy()
        for col in table.columns:  # Parquet needs one type per column: object columns of mixed types -> str
            if table[col].dtype == object:
                table[col] = table[col].map(
                    lambda v: v if v is None or isinstance(v, str) else json.dumps(v, default=str)
                )
            if pd.api.types.is_string_dtype(table[col]):
                table[col] = table[col].map(_portable)
        table.to_parquet(out / f"{name}.parquet", index=False)
        written[name] = {"rows": len(table), "columns": list(table.columns)}
    if args.figures is not None:
        args.figures.mkdir(parents=True, exist_ok=True)
        for png in sorted((Path(args.run_dir) / "figures").glob("*.png")):
            shutil.copy(png, args.figures / png.name)
    provenance = {
        "run_dir": str(args.run_dir),
        "commit": _commit(),
        "machine": machine_info(),
        "config_toml": r.config_text,
        "stage_seconds": r.timings[["key", "status", "seconds"]].to_dict(orient="records"),
        "tables": written,
    }
    (out / "provenance.json").write_text(_portable(json.dumps(provenance, indent=1, default=str)))
    print(json.dumps({k: v["rows"] for k, v in written.items()}, indent=1))


if __name__ == "__main__":
    main()
