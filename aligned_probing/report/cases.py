"""Case studies: how each variant of a model differs from its base, linked through recorded fields only.

A variant's base comes from what the run recorded, never from its display name:

* **precision**: a `[[models.variants]]` entry of a model, or another `[[models]]` entry with the same `spec`
  and a different `dtype`/`quantization` (the base is the float32, unquantized entry, else the first);
* **finetuned**: a model directory with `finetune.json` (written by `aligned-probing finetune`), whose
  `config.model.spec` is the spec of another model of the run;
* **checkpoint**: an adapter directory with `checkpoint.json` (its `step`) inside a fine-tuning arm
  (`{arm}/checkpoints/checkpoint-N`), whose arm's `merged/finetune.json` names the base spec.

`compare_to_base` puts each variant's EMT and peak information next to its base's with both CIs;
a difference counts as distinguishable from noise when the two 95% CIs do not overlap (conservative:
the runs share prompts and seeds, so a paired interval would be narrower; it is not in the tables).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: Columns of `model_lineage`.
LINEAGE_COLUMNS: tuple[str, ...] = (
    "model",
    "spec",
    "dtype",
    "quantization",
    "relation",
    "base",
    "arm",
    "step",
    "series",
)


def _default_name(spec: str) -> str:
    """The display name the config gives a model without `name` (its file stem or directory name)."""
    p = Path(spec)
    return p.stem if p.suffix == ".gguf" else (p.name or spec)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _expand(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Every analysed model of the config (variants expanded, as the pipeline names them)."""
    out = []
    for m in config.get("models", []):
        base = m.get("name") or _default_name(m["spec"])
        out.append(
            {
                "model": base,
                "spec": m["spec"],
                "dtype": m.get("dtype") or "float32",
                "quantization": m.get("quantization"),
                "variant_of": None,
            }
        )
        for v in m.get("variants") or []:
            suffix = v.get("quantization") or v.get("dtype") or "float32"
            out.append(
                {
                    "model": v.get("name") or f"{base}@{suffix}",
                    "spec": m["spec"],
                    "dtype": v.get("dtype") or "float32",
                    "quantization": v.get("quantization"),
                    "variant_of": base,
                }
            )
    return out


def model_lineage(config: dict[str, Any]) -> pd.DataFrame:
    """How each model of a run relates to another one of the same run.

    Args:
        config: The run's config as a dict (`RunResults.config`).

    Returns:
        One row per model with `LINEAGE_COLUMNS`: `relation` is "base" (nothing to compare with),
        "precision", "finetuned" or "checkpoint"; `base` names the model it is compared with; `arm` and
        `step` come from `finetune.json`/`checkpoint.json`; `series` groups checkpoints of one arm.
    """
    models = _expand(config)
    by_spec: dict[str, list[dict[str, Any]]] = {}
    for m in models:
        by_spec.setdefault(m["spec"], []).append(m)

    def reference(spec: str) -> str | None:
        same = by_spec.get(spec, [])
        full = [m for m in same if m["dtype"] == "float32" and not m["quantization"]]
        picked = full or same
        return str(picked[0]["model"]) if picked else None

    rows = []
    for m in models:
        row = {
            **{k: m[k] for k in ("model", "spec", "dtype", "quantization")},
            "relation": "base",
            "base": None,
            "arm": None,
            "step": np.nan,
            "series": None,
        }
        ref = m["variant_of"] or reference(m["spec"])
        if ref is not None and ref != m["model"]:
            row.update(relation="precision", base=ref)
        spec_dir = Path(m["spec"])
        info = _read_json(spec_dir / "finetune.json")
        ckpt = _read_json(spec_dir / "checkpoint.json")
        if ckpt is not None:
            arm_dir = spec_dir.parent.parent
            info = _read_json(arm_dir / "merged" / "finetune.json") or {}
            base_spec = (info.get("config") or {}).get("model", {}).get("spec")
            row.update(
                relation="checkpoint",
                base=reference(base_spec) if base_spec else None,
                arm=info.get("arm"),
                step=float(ckpt.get("step", np.nan)),
                series=str(arm_dir),
            )
        elif info is not None:
            base_spec = (info.get("config") or {}).get("model", {}).get("spec")
            row.update(
                relation="finetuned",
                base=reference(base_spec) if base_spec else None,
                arm=info.get("arm"),
                step=float(info.get("global_step") or np.nan),
                series=str(spec_dir.parent),
            )
        rows.append(row)
    return pd.DataFrame(rows, columns=list(LINEAGE_COLUMNS))


def overlap(a_low: Any, a_high: Any, b_low: Any, b_high: Any) -> Any:
    """Whether two intervals overlap (element-wise; NaN bounds count as overlapping)."""
    a_low, a_high, b_low, b_high = (np.asarray(x, dtype=float) for x in (a_low, a_high, b_low, b_high))
    disjoint = (a_low > b_high) | (b_low > a_high)
    return ~disjoint


def model_measures(
    peaks: pd.DataFrame | None, behaviour: pd.DataFrame | None, *, attribute: str = "toxicity"
) -> pd.DataFrame:
    """Per (model, template): EMT and the peak information of each scenario for `attribute`, with CIs.

    Returns:
        Long rows: model, template, measure ("EMT" or "peak r (scenario)"), layer (peaks), value, ci_low,
        ci_high.
    """
    frames = []
    if behaviour is not None and len(behaviour):
        b = behaviour[
            (behaviour["attribute"] == attribute)
            & (behaviour["subset"] == "all")
            & (behaviour["metric"] == "emt")
        ]
        frames.append(
            b.assign(measure="EMT", layer=np.nan)[
                ["model", "template", "measure", "layer", "value", "ci_low", "ci_high"]
            ]
        )
    if peaks is not None and len(peaks):
        p = peaks[peaks["attribute"] == attribute]
        frames.append(
            p.assign(measure=[f"peak r ({s})" for s in p["scenario"]], value=p["mean"])[
                ["model", "template", "measure", "layer", "value", "ci_low", "ci_high"]
            ]
        )
    if not frames:
        return pd.DataFrame(columns=["model", "template", "measure", "layer", "value", "ci_low", "ci_high"])
    return pd.concat(frames, ignore_index=True)


def compare_to_base(lineage: pd.DataFrame, measures: pd.DataFrame, relation: str) -> pd.DataFrame:
    """Each `relation` variant's measures next to its base's, with the difference and its verdict.

    Args:
        lineage: `model_lineage` output.
        measures: `model_measures` output.
        relation: "precision", "finetuned" or "checkpoint".

    Returns:
        Rows: base, model, dtype, quantization, arm, step, template, measure, value, ci_low, ci_high,
        base_value, base_ci_low, base_ci_high, difference, distinguishable (CIs do not overlap).
    """
    links = lineage[(lineage["relation"] == relation) & lineage["base"].notna()]
    if links.empty or measures.empty:
        return pd.DataFrame()
    keys = ["template", "measure"]
    variant = measures.merge(links[["model", "base", "dtype", "quantization", "arm", "step"]], on="model")
    base = measures.rename(
        columns={
            "model": "base",
            "value": "base_value",
            "ci_low": "base_ci_low",
            "ci_high": "base_ci_high",
            "layer": "base_layer",
        }
    )
    out = variant.merge(base, on=["base", *keys], how="inner")
    out["difference"] = out["value"] - out["base_value"]
    out["distinguishable"] = ~overlap(out["ci_low"], out["ci_high"], out["base_ci_low"], out["base_ci_high"])
    cols = [
        "base",
        "model",
        "dtype",
        "quantization",
        "arm",
        "step",
        "template",
        "measure",
        "layer",
        "value",
        "ci_low",
        "ci_high",
        "base_value",
        "base_ci_low",
        "base_ci_high",
        "difference",
        "distinguishable",
    ]
    return (
        out[cols]
        .sort_values(["base", "step", "model", "template", "measure"], kind="stable", na_position="first")
        .reset_index(drop=True)
    )


def compare_templates(measures: pd.DataFrame) -> pd.DataFrame:
    """Each template's measures next to template 0's for the same model (empty with one template)."""
    if measures.empty or measures["template"].nunique() < 2 or 0 not in set(measures["template"]):
        return pd.DataFrame()
    base = (
        measures[measures["template"] == 0]
        .drop(columns="template")
        .rename(
            columns={
                "value": "base_value",
                "ci_low": "base_ci_low",
                "ci_high": "base_ci_high",
                "layer": "base_layer",
            }
        )
    )
    out = measures[measures["template"] != 0].merge(base, on=["model", "measure"])
    out["difference"] = out["value"] - out["base_value"]
    out["distinguishable"] = ~overlap(out["ci_low"], out["ci_high"], out["base_ci_low"], out["base_ci_high"])
    return out.sort_values(["model", "measure", "template"], kind="stable").reset_index(drop=True)
