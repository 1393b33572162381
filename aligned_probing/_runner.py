"""Run a plan of stages with content-hash caching and resume.

A stage's output directory is `RUN_DIR/stages/{key}-{hash}` where the hash covers the stage's
settings and the hashes of the stages it reads. `stage.json` is written last (atomically), so its
presence marks a complete output: re-running skips the stage, while changing one setting changes
the hash of that stage and of everything downstream, and only those recompute. A stage killed
half-way leaves its directory without `stage.json`; a resumable stage (generation, encoding) picks
up its partial output there, any other stage starts again from an empty directory.

Stage functions are pure functions of (settings, input directories) plus a model loader: no global
state, so an executor can dispatch them anywhere. With the local executor stages run one after another
in plan order; with a distributed one (`aligned_probing.executors.RayExecutor`) the stages that are not
cached run in waves, every stage of a wave (all of whose dependencies are complete) as one task, and
a task that fails or is killed is retried by the executor and resumes from what it committed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aligned_probing._hashing import stable_hash
from aligned_probing.executors import Executor, LocalExecutor, Resources

logger = logging.getLogger("aligned_probing.pipeline")

STAGE_FILE = "stage.json"
RUN_FILE = "run.json"
# Bump when a stage's output format changes: old outputs are then simply not found.
STAGE_FORMAT = 1


@dataclass
class StageContext:
    """What a stage function gets.

    Attributes:
        out_dir: Its output directory (may hold partial output of an interrupted run).
        inputs: Output directory of each dependency, by stage key.
        settings: The stage's settings (exactly what its hash covers).
        load_model: Callable returning a loaded model for a model display name.
        progress: Whether to show progress bars.
        executor: Where a stage dispatches its own independent pieces (probing layer blocks).
        runtime: How to run, not what to compute (e.g. `probe_layer_block`); never hashed.
    """

    out_dir: Path
    inputs: dict[str, Path]
    settings: dict[str, Any]
    load_model: Callable[[str], Any]
    progress: bool = True
    executor: Executor = field(default_factory=LocalExecutor)
    runtime: dict[str, Any] = field(default_factory=dict)


StageFunc = Callable[[StageContext], dict[str, Any] | None]


@dataclass(frozen=True)
class Stage:
    """One step of a plan.

    Attributes:
        name: Stage kind (`generate`, `probe`, ...), what the CLI's per-stage commands select.
        key: Unique key in the plan, e.g. `generate/smollm2/t0`.
        settings: JSON-able settings that determine the output.
        deps: Keys of the stages whose outputs it reads.
        func: The stage function; writes into `ctx.out_dir` and returns a JSON-able summary.
        resumable: Whether partial output is kept and picked up after an interruption.
    """

    name: str
    key: str
    settings: dict[str, Any]
    deps: tuple[str, ...]
    func: StageFunc
    resumable: bool = False


@dataclass
class StageRecord:
    """Outcome of one stage in one run: `status` is `ran`, `cached` or `would run`/`cached` in a dry run."""

    key: str
    name: str
    hash: str
    dir: Path
    status: str
    seconds: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)


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
                "name": stage.name,
                "settings": stage.settings,
                "inputs": {d: hashes[d] for d in stage.deps},
            }
        )
    return hashes


def stage_dir(run_dir: Path, key: str, digest: str) -> Path:
    """Output directory of a stage: its key (slashes as `--`) plus the first 12 hash digits."""
    return run_dir / "stages" / f"{key.replace('/', '--')}-{digest[:12]}"


def read_stage(directory: Path) -> dict[str, Any] | None:
    """The completion record of a stage directory, or None when the stage has not finished."""
    try:
        return json.loads((directory / STAGE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


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
    run_dir: str | Path,
    *,
    load_model: Callable[[str], Any],
    dry_run: bool = False,
    progress: bool = True,
    executor: Executor | None = None,
    resources: Callable[[Stage], Resources] | None = None,
    runtime: dict[str, Any] | None = None,
) -> list[StageRecord]:
    """Run (or, with `dry_run`, list) the stages of `plan` that are not complete yet.

    Args:
        plan: Stages in dependency order.
        run_dir: Run directory; outputs go to `run_dir/stages/`.
        load_model: Model loader handed to stage functions (pickled to workers by a distributed executor).
        dry_run: Only report which stages are cached and which would run.
        progress: Show a progress bar over stages (and let stages show theirs).
        executor: None or a `LocalExecutor` runs the stages here, in plan order; another executor
            (`RayExecutor`) runs each wave of independent stages as parallel tasks.
        resources: What each stage's task needs (GPUs for model stages); None = one CPU each.
        runtime: Run settings handed to stages (`StageContext.runtime`); never part of a hash.

    Returns:
        One record per stage, in plan order; `run_dir/run.json` lists them too.
    """
    executor = executor or LocalExecutor()
    if not dry_run and not isinstance(executor, LocalExecutor):
        return _execute_waves(plan, Path(run_dir), load_model, executor, resources, dict(runtime or {}))
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    hashes = stage_hashes(plan)
    records: list[StageRecord] = []
    dirs = {s.key: stage_dir(run_dir, s.key, hashes[s.key]) for s in plan}
    bar = tqdm(plan, desc="stages", unit="stage", disable=not progress or dry_run)
    for stage in bar:
        digest, out = hashes[stage.key], dirs[stage.key]
        done = read_stage(out)
        if done is not None and done.get("hash") == digest:
            records.append(
                StageRecord(
                    stage.key,
                    stage.name,
                    digest,
                    out,
                    "cached",
                    done.get("seconds"),
                    done.get("summary") or {},
                )
            )
            logger.info("stage %s: cached (%s)", stage.key, out.name)
            continue
        if dry_run:
            partial = out.exists() and stage.resumable
            records.append(
                StageRecord(stage.key, stage.name, digest, out, "would resume" if partial else "would run")
            )
            continue
        bar.set_postfix_str(stage.key)
        records.append(_run_stage(stage, digest, out, dirs, load_model, progress, executor, runtime or {}))
        _write_run_file(run_dir, records, plan, dirs, hashes)
    if not dry_run:
        _write_run_file(run_dir, records, plan, dirs, hashes)
    return records


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
    stage, digest, out, dirs, load_model, executor, runtime = task
    if runtime.get("threads") is not None:
        import torch

        torch.set_num_threads(runtime["threads"])  # the worker's own process: nothing to restore
    return _run_stage(stage, digest, out, dirs, load_model, False, executor, runtime)


def _execute_waves(
    plan: Sequence[Stage],
    run_dir: Path,
    load_model: Callable[[str], Any],
    executor: Executor,
    resources: Callable[[Stage], Resources] | None,
    runtime: dict[str, Any],
) -> list[StageRecord]:
    """Run the incomplete stages of `plan` wave by wave, each wave's stages as parallel tasks."""
    hashes = stage_hashes(plan)
    dirs = {s.key: stage_dir(run_dir, s.key, hashes[s.key]) for s in plan}
    status: dict[str, StageRecord] = {}
    todo = []
    for stage in plan:
        done = read_stage(dirs[stage.key])
        if done is not None and done.get("hash") == hashes[stage.key]:
            status[stage.key] = StageRecord(
                stage.key,
                stage.name,
                hashes[stage.key],
                dirs[stage.key],
                "cached",
                done.get("seconds"),
                done.get("summary") or {},
            )
            logger.info("stage %s: cached (%s)", stage.key, dirs[stage.key].name)
        else:
            todo.append(stage)
    for wave in _waves(todo):
        logger.info("dispatching %d stage(s) to %r: %s", len(wave), executor, [s.key for s in wave])
        tasks = [
            (s, hashes[s.key], dirs[s.key], {d: dirs[d] for d in s.deps}, load_model, executor, runtime)
            for s in wave
        ]
        needs = [resources(s) if resources else Resources() for s in wave]
        for record in executor.map(_stage_task, tasks, resources=needs):
            status[record.key] = record
        _write_run_file(run_dir, [status[s.key] for s in plan if s.key in status], plan, dirs, hashes)
    records = [status[s.key] for s in plan]
    _write_run_file(run_dir, records, plan, dirs, hashes)
    return records


def _run_stage(
    stage: Stage,
    digest: str,
    out: Path,
    dirs: dict[str, Path],
    load_model: Callable[[str], Any],
    progress: bool,
    executor: Executor | None = None,
    runtime: dict[str, Any] | None = None,
) -> StageRecord:
    if out.exists() and not stage.resumable:
        shutil.rmtree(out)  # a non-resumable stage restarts from nothing after an interruption
    resumed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    logger.info("stage %s: %s in %s", stage.key, "resuming" if resumed else "running", out.name)
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
    )
    try:
        summary = stage.func(ctx) or {}
    except BaseException:
        logger.exception("stage %s failed after %.1f s", stage.key, time.perf_counter() - t0)
        raise
    seconds = time.perf_counter() - t0
    _write_json_atomic(
        out / STAGE_FILE,
        {
            "key": stage.key,
            "name": stage.name,
            "hash": digest,
            "settings": stage.settings,
            "inputs": {d: dirs[d].name for d in stage.deps},
            "started": started.isoformat(),
            "seconds": seconds,
            "resumed": resumed,
            "summary": summary,
        },
    )
    logger.info("stage %s: done in %.1f s", stage.key, seconds)
    return StageRecord(stage.key, stage.name, digest, out, "ran", seconds, summary)


def _write_run_file(
    run_dir: Path,
    records: list[StageRecord],
    plan: Sequence[Stage],
    dirs: dict[str, Path],
    hashes: dict[str, str],
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
                "dir": str(dirs[s.key].relative_to(run_dir)),
                "status": rec.status if rec else "pending",
                "seconds": rec.seconds if rec else None,
            }
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(run_dir / RUN_FILE, {"updated": datetime.now(UTC).isoformat(), "stages": stages})
