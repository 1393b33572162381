"""Run a plan of stages with content-hash caching and resume.

A stage's output directory is `RUN_DIR/stages/{key}-{hash}` where the hash covers the stage's
settings and the hashes of the stages it reads. `stage.json` is written last (atomically), so its
presence marks a complete output: re-running skips the stage, while changing one setting changes
the hash of that stage and of everything downstream, and only those recompute. A stage killed
half-way leaves its directory without `stage.json`; a resumable stage (generation, encoding) picks
up its partial output there, any other stage starts again from an empty directory.

Stage functions are pure functions of (settings, input directories) plus a model loader: no global
state, so an executor can dispatch them anywhere. With the local executor stages run one after another
in plan order; with a distributed one (`aligned_probing.pipeline.executors.RayExecutor`) the stages that are not
cached run in waves, every stage of a wave (all of whose dependencies are complete) as one task, and
a task that fails or is killed is retried by the executor and resumes from what it committed.

The run directory is a local path or an fsspec URL (`s3://bucket/runs/x`): every read and write
goes through `aligned_probing.pipeline.fs` with the run's `storage_options`, so completion records are read
from wherever the run lives and a re-run on the same URL does no work. Locally, directories stay
`Path`s and the layout is the same either way.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aligned_probing.pipeline import fs as _fs
from aligned_probing.pipeline.executors import Executor, LocalExecutor, Resources
from aligned_probing.pipeline.hashing import json_default, stable_hash

logger = logging.getLogger("aligned_probing.pipeline")

STAGE_FILE = "stage.json"
RUN_FILE = "run.json"
# Bump when a stage's output format changes: old outputs are then simply not found.
STAGE_FORMAT = 1
#: Version of what each stage computes, hashed into its key: bump a stage's number whenever its
#: computation or output format changes, so existing run directories recompute it (and everything
#: downstream, whose keys include it) instead of serving stale outputs. Absent = 1.
#: generate 2: continuations carry `token_logprobs` and pass the self-check (a transformers 5.24
#: install produced token salad that version 1 would have served from cache).
#: probe 2 also saves one probe per (layer, scenario, attribute) fitted on all rows (`probes/`).
#: probe 2, behaviour 2, interplay 2: MDL gains against control and baseline codes, grouped alpha
#: selection, corrected CV intervals; `n_missing` columns; Fisher-z/exact-permutation interplay with FWER.
#: prompts 2, score 2: a text the scorer fails on fails the stage (version 1 could record NaN scores
#: of a scorer outage as complete); prompts are read by `load_prompt_source`.
#: encode 2: prompts truncated with generation's budget (context_length - max_new_tokens); the
#: activation store records checksums (`checksums.json`) verified on read.
#: causal 2: steering in norm units with a random-direction control; patching with same-class
#: controls, fluency, last-token read-out probes fitted on prompts disjoint from the pairs.
STAGE_VERSIONS: dict[str, int] = {
    "prompts": 2, "generate": 2, "score": 2, "encode": 2, "probe": 2, "behaviour": 2, "interplay": 2,
    "causal": 2,
}


@dataclass
class StageContext:
    """What a stage function gets.

    Attributes:
        out_dir: Its output directory (may hold partial output of an interrupted run): a `Path`
            locally, a URL string on object storage; read and write it through `aligned_probing.pipeline.fs`.
        inputs: Output directory of each dependency, by stage key (same types as `out_dir`).
        settings: The stage's settings (exactly what its hash covers): a frozen
            `aligned_probing.pipeline.settings.StageSettings` in a plan from `build_plan`.
        load_model: Callable returning a loaded model for a model display name.
        progress: Whether to show progress bars.
        executor: Where a stage dispatches its own independent pieces (probing layer blocks).
        runtime: How to run, not what to compute (e.g. `probe_layer_block`); never hashed.
        storage_options: fsspec options of the run directory (`endpoint_url`, ...); never hashed.
    """

    out_dir: _fs.Resolved
    inputs: dict[str, _fs.Resolved]
    settings: Any
    load_model: Callable[[str], Any]
    progress: bool = True
    executor: Executor = field(default_factory=LocalExecutor)
    runtime: dict[str, Any] = field(default_factory=dict)
    # Not in the repr: programmatic callers may pass credentials here (the config refuses them).
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)


StageFunc = Callable[[StageContext], dict[str, Any] | None]


@dataclass(frozen=True)
class Stage:
    """One step of a plan.

    Attributes:
        name: Stage kind (`generate`, `probe`, ...), what the CLI's per-stage commands select.
        key: Unique key in the plan, e.g. `generate/smollm2/t0`.
        settings: What determines the output: typed `StageSettings` (hashed as their
            `model_dump(mode="json")`) or a JSON-able dict.
        deps: Keys of the stages whose outputs it reads.
        func: The stage function; writes into `ctx.out_dir` and returns a JSON-able summary.
        resumable: Whether partial output is kept and picked up after an interruption.
    """

    name: str
    key: str
    settings: Any
    deps: tuple[str, ...]
    func: StageFunc
    resumable: bool = False


@dataclass
class StageRecord:
    """Outcome of one stage in one run: `status` is `ran`, `cached` or `would run`/`cached` in a dry run."""

    key: str
    name: str
    hash: str
    dir: _fs.Resolved
    status: str
    seconds: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def failed_stage(err: BaseException) -> str | None:
    """The key of the stage an exception escaped from (None: it did not come from a stage).

    The runner lets a stage's exception propagate unchanged (callers catch the types they know)
    and only tags it with the stage's key, so the CLI can say which stage failed.
    """
    return getattr(err, "stage_key", None)


def stage_hashes(plan: Sequence[Stage]) -> dict[str, str]:
    """Content hash of every stage: settings plus the hashes of its dependencies, in plan order."""
    hashes: dict[str, str] = {}
    for stage in plan:
        missing = [d for d in stage.deps if d not in hashes]
        if missing:
            raise ValueError(
                f"Stage {stage.key!r} depends on {missing}, which do not come before it in the plan."
            )
        hashes[stage.key] = stable_hash(
            {
                "format": STAGE_FORMAT,
                "version": STAGE_VERSIONS.get(stage.name, 1),
                "name": stage.name,
                "settings": stage.settings,
                "inputs": {d: hashes[d] for d in stage.deps},
            }
        )
    return hashes


def stage_dir(run_dir: _fs.Location, key: str, digest: str) -> _fs.Resolved:
    """Output directory of a stage: its key (slashes as `--`) plus the first 12 hash digits.

    A `Path` for a local run directory, a URL string for one on object storage.
    """
    return _fs.child(_fs.resolve(run_dir), "stages", f"{key.replace('/', '--')}-{digest[:12]}")


def read_stage(directory: _fs.Location, storage_options: _fs.StorageOptions = None) -> dict[str, Any] | None:
    """The completion record of a stage directory, or None when the stage has not finished."""
    try:
        return json.loads(_fs.read_text(_fs.join(directory, STAGE_FILE), storage_options))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json_atomic(location: _fs.Location, obj: Any, storage_options: _fs.StorageOptions) -> None:
    _fs.write_text_atomic(location, json.dumps(obj, indent=2, default=json_default), storage_options)


def select(plan: Sequence[Stage], names: Sequence[str] | None) -> list[Stage]:
    """The stages named `names` (by kind) plus everything they depend on, in plan order."""
    if not names:
        return list(plan)
    kinds = sorted({s.name for s in plan})
    unknown = [n for n in names if n not in kinds]
    if unknown:
        raise ValueError(f"Unknown stage name(s) {unknown}; this plan has {kinds}.")
    by_key = {s.key: s for s in plan}
    wanted: set[str] = set()
    todo = [s.key for s in plan if s.name in names]
    while todo:
        key = todo.pop()
        if key not in wanted:
            wanted.add(key)
            todo.extend(by_key[key].deps)
    return [s for s in plan if s.key in wanted]


def execute(
    plan: Sequence[Stage],
    run_dir: _fs.Location,
    *,
    load_model: Callable[[str], Any],
    dry_run: bool = False,
    progress: bool = True,
    executor: Executor | None = None,
    resources: Callable[[Stage], Resources] | None = None,
    runtime: dict[str, Any] | None = None,
    storage_options: _fs.StorageOptions = None,
) -> list[StageRecord]:
    """Run (or, with `dry_run`, list) the stages of `plan` that are not complete yet.

    Args:
        plan: Stages in dependency order.
        run_dir: Run directory, a local path or an fsspec URL; outputs go to `run_dir/stages/`.
        load_model: Model loader handed to stage functions (pickled to workers by a distributed executor).
        dry_run: Only report which stages are cached and which would run.
        progress: Show a progress bar over stages (and let stages show theirs).
        executor: None or a `LocalExecutor` runs the stages here, in plan order; another executor
            (`RayExecutor`) runs each wave of independent stages as parallel tasks.
        resources: What each stage's task needs (GPUs for model stages); None = one CPU each.
        runtime: Run settings handed to stages (`StageContext.runtime`); never part of a hash.
        storage_options: fsspec options of a URL `run_dir` (handed to stages); never part of a hash.

    Returns:
        One record per stage, in plan order; `run_dir/run.json` lists them too.
    """
    executor = executor or LocalExecutor()
    root = _fs.resolve(run_dir)
    options = dict(storage_options or {})
    if not dry_run and not isinstance(executor, LocalExecutor):
        return _execute_waves(plan, root, load_model, executor, resources, dict(runtime or {}), options)
    from tqdm.auto import tqdm

    hashes = stage_hashes(plan)
    records: list[StageRecord] = []
    dirs = {s.key: stage_dir(root, s.key, hashes[s.key]) for s in plan}
    bar = tqdm(plan, desc="stages", unit="stage", disable=not progress or dry_run)
    for stage in bar:
        digest, out = hashes[stage.key], dirs[stage.key]
        cached = _cached_record(stage, digest, out, options)
        if cached is not None:
            records.append(cached)
            continue
        if dry_run:
            partial = stage.resumable and _fs.exists(out, options)
            records.append(
                StageRecord(stage.key, stage.name, digest, out, "would resume" if partial else "would run")
            )
            continue
        bar.set_postfix_str(stage.key)
        records.append(
            _run_stage(stage, digest, out, dirs, load_model, progress, executor, runtime or {}, options)
        )
        _write_run_file(root, records, plan, dirs, hashes, options)
    if not dry_run:
        _write_run_file(root, records, plan, dirs, hashes, options)
    return records


def _cached_record(
    stage: Stage, digest: str, out: _fs.Resolved, storage_options: dict[str, Any]
) -> StageRecord | None:
    """The `cached` record of `stage` when its completion record (with this hash) exists, else None."""
    done = read_stage(out, storage_options)
    if done is None or done.get("hash") != digest:
        return None
    logger.info("stage %s: cached (%s)", stage.key, _fs.name(out))
    return StageRecord(
        stage.key, stage.name, digest, out, "cached", done.get("seconds"), done.get("summary") or {}
    )


def _waves(stages: Sequence[Stage]) -> list[list[Stage]]:
    """`stages` grouped by dependency depth among themselves: each wave needs only earlier waves."""
    depth: dict[str, int] = {}
    for stage in stages:  # plan order: dependencies come first
        depth[stage.key] = 1 + max((depth[d] for d in stage.deps if d in depth), default=-1)
    waves: list[list[Stage]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for stage in stages:
        waves[depth[stage.key]].append(stage)
    return waves


def _stage_task(task: tuple[Any, ...]) -> StageRecord:
    """One stage as an executor task (module level, so that workers can unpickle it)."""
    stage, digest, out, dirs, load_model, executor, runtime, storage_options = task
    if runtime.get("threads") is not None:
        import torch

        torch.set_num_threads(runtime["threads"])  # the worker's own process: nothing to restore
    return _run_stage(stage, digest, out, dirs, load_model, False, executor, runtime, storage_options)


def _execute_waves(
    plan: Sequence[Stage],
    run_dir: _fs.Resolved,
    load_model: Callable[[str], Any],
    executor: Executor,
    resources: Callable[[Stage], Resources] | None,
    runtime: dict[str, Any],
    storage_options: dict[str, Any],
) -> list[StageRecord]:
    """Run the incomplete stages of `plan` wave by wave, each wave's stages as parallel tasks."""
    hashes = stage_hashes(plan)
    dirs = {s.key: stage_dir(run_dir, s.key, hashes[s.key]) for s in plan}
    status: dict[str, StageRecord] = {}
    todo = []
    for stage in plan:
        cached = _cached_record(stage, hashes[stage.key], dirs[stage.key], storage_options)
        if cached is not None:
            status[stage.key] = cached
        else:
            todo.append(stage)
    for wave in _waves(todo):
        logger.info("dispatching %d stage(s) to %r: %s", len(wave), executor, [s.key for s in wave])
        tasks = [
            (
                s,
                hashes[s.key],
                dirs[s.key],
                {d: dirs[d] for d in s.deps},
                load_model,
                executor,
                runtime,
                storage_options,
            )
            for s in wave
        ]
        needs = [resources(s) if resources else Resources() for s in wave]
        for record in executor.map(_stage_task, tasks, resources=needs):
            status[record.key] = record
        records = [status[s.key] for s in plan if s.key in status]
        _write_run_file(run_dir, records, plan, dirs, hashes, storage_options)
    records = [status[s.key] for s in plan]
    _write_run_file(run_dir, records, plan, dirs, hashes, storage_options)
    return records


def _run_stage(
    stage: Stage,
    digest: str,
    out: _fs.Resolved,
    dirs: dict[str, _fs.Resolved],
    load_model: Callable[[str], Any],
    progress: bool,
    executor: Executor | None = None,
    runtime: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> StageRecord:
    options = dict(storage_options or {})
    if not stage.resumable and _fs.exists(out, options):
        _fs.rmtree(out, options)  # a non-resumable stage restarts from nothing after an interruption
    resumed = _fs.exists(out, options)
    _fs.makedirs(out, options)
    logger.info("stage %s: %s in %s", stage.key, "resuming" if resumed else "running", _fs.name(out))
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    ctx = StageContext(
        out,
        {d: dirs[d] for d in stage.deps},
        stage.settings,
        load_model,
        progress,
        executor or LocalExecutor(),
        dict(runtime or {}),
        options,
    )
    try:
        summary = stage.func(ctx) or {}
    except BaseException as err:
        # The traceback goes to the run log (INFO), not the console: the CLI prints one line.
        logger.info("stage %s failed after %.1f s", stage.key, time.perf_counter() - t0, exc_info=True)
        if isinstance(err, Exception) and getattr(err, "stage_key", None) is None:
            err.stage_key = stage.key  # type: ignore[attr-defined]  # read by `failed_stage`
        raise
    seconds = time.perf_counter() - t0
    _write_json_atomic(
        _fs.child(out, STAGE_FILE),
        {
            "key": stage.key,
            "name": stage.name,
            "hash": digest,
            "settings": stage.settings,
            "inputs": {d: _fs.name(dirs[d]) for d in stage.deps},
            "started": started.isoformat(),
            "seconds": seconds,
            "resumed": resumed,
            "summary": summary,
        },
        options,
    )
    logger.info("stage %s: done in %.1f s", stage.key, seconds)
    return StageRecord(stage.key, stage.name, digest, out, "ran", seconds, summary)


def _write_run_file(
    run_dir: _fs.Resolved,
    records: list[StageRecord],
    plan: Sequence[Stage],
    dirs: dict[str, _fs.Resolved],
    hashes: dict[str, str],
    storage_options: dict[str, Any],
) -> None:
    status = {r.key: r for r in records}
    stages = []
    for s in plan:
        rec = status.get(s.key)
        stages.append(
            {
                "key": s.key,
                "name": s.name,
                "hash": hashes[s.key],
                "dir": f"stages/{_fs.name(dirs[s.key])}",  # relative to the run directory
                "status": rec.status if rec else "pending",
                "seconds": rec.seconds if rec else None,
            }
        )
    _fs.makedirs(run_dir, storage_options)
    _write_json_atomic(
        _fs.child(run_dir, RUN_FILE),
        {"updated": datetime.now(UTC).isoformat(), "stages": stages},
        storage_options,
    )
