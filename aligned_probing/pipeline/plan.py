"""Run an experiment end to end, each stage cached by a content hash of its settings and inputs.

Stages: prompts -> generation -> scoring -> encoding -> probing -> behaviour -> interplay -> causal -> report.

`build_plan(config)` turns a `RunConfig` into stages (one per model and template where it
applies); `run(config)` executes them with `aligned_probing.pipeline.runner.execute`: re-running does no
work, changing one setting recomputes only the stages downstream of it, and a killed run resumes
(generation and encoding pick up their partial output) to the same tables as an uninterrupted run.

`runtime.executor = "ray"` dispatches the work to a Ray cluster (`aligned_probing.pipeline.executors`): every
generation, scoring and encoding stage as one task per (model, template), with the resources of
`runtime.resources`, probing as one task per (model, template, block of layers) and the causal stage
as one task per block of intervention layers (`runtime.causal_layer_block`) plus one for steering.
The run directory layout and the tables are the same as a local run's; a failed task is retried and a
re-run resumes (see docs/scaling.md).

`output.run_dir` may be an fsspec URL (`s3://bucket/runs/x`) with `output.storage_options`: every
stage then reads and writes its outputs there, so that workers on several machines share one run.

Example:
    >>> from aligned_probing.pipeline.config import RunConfig
    >>> cfg = RunConfig.from_toml("configs/quickstart.toml")  # doctest: +SKIP
    >>> result = run(cfg)  # doctest: +SKIP
    >>> result.report  # doctest: +SKIP
    PosixPath('runs/quickstart/report.html')
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aligned_probing.pipeline import fs as _fs
from aligned_probing.pipeline import stages as _stages
from aligned_probing.pipeline.config import ModelVariant, RunConfig
from aligned_probing.pipeline.executors import Resources, get_executor
from aligned_probing.pipeline.registry import STAGE_NAMES
from aligned_probing.pipeline.results import RunResults, load_results
from aligned_probing.pipeline.runner import Stage, StageRecord, execute, select
from aligned_probing.pipeline.settings import (
    BehaviourSettings,
    CausalSettings,
    EncodeSettings,
    GenerateSettings,
    InterplaySettings,
    ModelSettings,
    ProbeSettings,
    PromptsSettings,
    ReportSettings,
    ScoreSettings,
)

logger = logging.getLogger("aligned_probing.pipeline")

__all__ = ["STAGE_NAMES", "RunResult", "RunResults", "build_plan", "load_config", "load_results", "run"]

CONFIG_FILE = "config.json"
CONFIG_TOML = "config.toml"
CONFIG_SOURCE = "config.source.toml"
REPORT_FILE = "report.html"


@dataclass
class RunResult:
    """What `run` did.

    Attributes:
        run_dir: The run directory: a `Path`, or a URL string when it is on object storage.
        records: One record per stage in plan order (`ran`, `cached`, or `would run` in a dry run).
        report: Location of the HTML report (same type as `run_dir`), when the report stage was part
            of the run.
    """

    run_dir: _fs.Resolved
    records: list[StageRecord]
    report: _fs.Resolved | None

    @property
    def executed(self) -> list[str]:
        """Keys of the stages that did work in this run."""
        return [r.key for r in self.records if r.status == "ran"]


def unit_key(name: str, model: str | None = None, template: int | None = None) -> str:
    """Plan key of a stage: `name`, `name/model` or `name/model/t{template}`."""
    parts = (
        [name] + ([model] if model is not None else []) + ([f"t{template}"] if template is not None else [])
    )
    return "/".join(parts)


def _model_settings(v: ModelVariant, *, verify: bool = False) -> ModelSettings:
    # Where a model runs (`device`) does not change what it computes (to tolerance): not a setting.
    from aligned_probing.models.sources import model_revision

    # Keyed by content (local weights and tokenizer files, a .gguf's bytes) or by the hub commit, so a
    # rebuilt or updated model invalidates its stages.
    return ModelSettings(
        name=v.name,
        spec=v.spec,
        dtype=v.dtype,
        quantization=v.quantization,
        revision=model_revision(v.spec, verify=verify),
    )


def _prompt_settings(config: RunConfig) -> PromptsSettings:
    """The prompts stage's settings: the data section plus what the prompt source's content keys on."""
    from aligned_probing.data.source import prompt_source_key

    # An edited prompt file gives a new key.
    return PromptsSettings(data=config.data, scoring=config.scoring, source=prompt_source_key(config.data))


def build_plan(config: RunConfig) -> list[Stage]:
    """The stages of `config`, in dependency order, each with its typed settings.

    Args:
        config: The validated experiment config.

    Returns:
        The plan: `prompts`, then per model and template `generate`, `score`, `encode`, `probe`,
        `behaviour`, then `interplay` (with >= 3 models), `causal` (when enabled) and `report`.
        Each stage's `settings` is a frozen `aligned_probing.pipeline.settings.StageSettings`
        holding the config sections it reads.
    """
    c = config
    verify = c.runtime.verify_inputs
    prompts = Stage("prompts", "prompts", _prompt_settings(c), (), _stages.prompts_stage
    )
    plan = [prompts]
    probe_keys, behaviour_keys = [], []
    for v in c.model_variants():
        model = _model_settings(v, verify=verify)
        for t in c.generation.templates:
            g = Stage(
                "generate",
                unit_key("generate", v.name, t),
                GenerateSettings(model=model, template=t, generation=c.generation),
                (prompts.key,),
                _stages.generate_stage,
                resumable=True,
            )
            s = Stage(
                "score",
                unit_key("score", v.name, t),
                ScoreSettings(scoring=c.scoring),
                (g.key,),
                _stages.score_stage,
            )
            e = Stage(
                "encode",
                unit_key("encode", v.name, t),
                EncodeSettings(model=model, template=t, encoding=c.encoding),
                (prompts.key, g.key),
                _stages.encode_stage,
                resumable=True,
            )
            p = Stage(
                "probe",
                unit_key("probe", v.name, t),
                ProbeSettings(probing=c.probing),
                (prompts.key, s.key, e.key),
                _stages.probe_stage,
                resumable=True,  # finished layer blocks are kept
            )
            b = Stage(
                "behaviour",
                unit_key("behaviour", v.name, t),
                BehaviourSettings(behaviour=c.behaviour),
                (prompts.key, s.key),
                _stages.behaviour_stage,
            )
            plan += [g, s, e, p, b]
            probe_keys.append(p.key)
            behaviour_keys.append(b.key)
    downstream = probe_keys + behaviour_keys
    if c.interplay_active():
        i = Stage(
            "interplay",
            "interplay",
            InterplaySettings(interplay=c.interplay, n_models=len(c.model_variants())),
            tuple(downstream),
            _stages.interplay_stage,
        )
        plan.append(i)
        downstream.append(i.key)
    if c.causal.enabled:
        v = c.causal_model()
        t = c.generation.templates[0]
        cs = Stage(
            "causal",
            unit_key("causal", v.name),
            CausalSettings(
                model=_model_settings(v, verify=verify),
                template=t,
                causal=c.causal,
                generation=c.generation,
                scoring=c.scoring,
                threshold=c.behaviour.threshold,
                n_bootstrap=c.behaviour.n_bootstrap,
                confidence=c.behaviour.confidence,
                pooling=c.probing.pooling,
                alphas=c.probing.alphas,
            ),
            (prompts.key, unit_key("encode", v.name, t), unit_key("probe", v.name, t)),
            _stages.causal_stage,
            resumable=True,  # finished layer blocks (and the shared baseline) are kept
        )
        plan.append(cs)
        downstream.append(cs.key)
    plan.append(
        Stage(
            "report",
            "report",
            ReportSettings(formats=list(c.output.figure_formats)),
            tuple(downstream),
            _stages.report_stage,
        )
    )
    return plan


class ModelLoader:
    """Loads the run's models by display name, keeping only the most recently used one in memory.

    Stages of one model run consecutively, so one slot avoids reloading while bounding memory.
    """

    def __init__(self, variants: Sequence[ModelVariant]) -> None:
        self._variants = {v.name: v for v in variants}
        self._name: str | None = None
        self._model: Any = None

    def __call__(self, name: str) -> Any:
        """The loaded model called `name` (a `LoadedModel` whose `.name` is the display name)."""
        if name not in self._variants:
            raise ValueError(f"model must be one of {sorted(self._variants)}, got {name!r}.")
        if name != self._name:
            from aligned_probing.models import load_model

            self._model = None  # release the previous model before loading the next
            v = self._variants[name]
            logger.info("loading model %s (%s, %s, quantization=%s)", name, v.spec, v.dtype, v.quantization)
            loaded = load_model(v.spec, dtype=v.dtype, device=v.device, quantization=v.quantization)
            self._model, self._name = dataclasses.replace(loaded, name=name), name
        return self._model


@contextlib.contextmanager
def _run_log(run_dir: _fs.Resolved, storage_options: dict[str, Any]) -> Iterator[None]:
    """Log INFO of `aligned_probing` to `RUN_DIR/logs/run.log` (appended) while the block runs.

    A logging handler needs a local file: for a run directory on object storage the log is written
    to a local scratch file (seeded with the log already there) and uploaded when the block exits,
    also on error. A run killed outright loses that run's log lines there, not its outputs.
    """
    remote = not isinstance(run_dir, Path)
    scratch = Path(tempfile.mkdtemp(prefix="aligned-probing-log-")) if remote else None
    target = _fs.child(run_dir, "logs", "run.log")
    local = scratch / "run.log" if scratch is not None else Path(target)
    if scratch is not None and _fs.exists(target, storage_options):
        local.write_bytes(_fs.read_bytes(target, storage_options))
    local.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(local)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("aligned_probing")
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        if scratch is not None:
            _fs.write_bytes_atomic(target, local.read_bytes(), storage_options)
            shutil.rmtree(scratch, ignore_errors=True)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask; `os.cpu_count()` where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _set_threads(threads: int | None) -> int | None:
    """Set torch's CPU threads for the run (None: every available core); return the previous count."""
    if threads is None:
        threads = available_cores()
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    return previous


def stage_resources(config: RunConfig) -> dict[str, Resources]:
    """Resources of each stage kind's tasks on a cluster (`runtime.resources`; default one CPU)."""
    return {
        name: Resources(num_cpus=r.num_cpus, num_gpus=r.num_gpus)
        for name, r in config.runtime.resources.items()
    }


def run_dir_of(config: RunConfig) -> _fs.Resolved:
    """The run directory named by `config.output.run_dir`: a `Path`, or a URL string for object storage."""
    return _fs.resolve(config.output.run_dir)


def _publish_report(record: StageRecord, run_dir: _fs.Resolved, storage_options: dict[str, Any]) -> None:
    """Copy the report stage's HTML and figures to the top of the run directory."""
    if isinstance(run_dir, Path) and isinstance(record.dir, Path):
        shutil.copyfile(record.dir / REPORT_FILE, run_dir / REPORT_FILE)
        shutil.copytree(record.dir / "figures", run_dir / "figures", dirs_exist_ok=True)
        return
    files = [_fs.child(record.dir, REPORT_FILE)] + _fs.glob(
        _fs.child(record.dir, "figures"), "*", storage_options
    )
    for source in files:
        relative = [REPORT_FILE] if _fs.name(source) == REPORT_FILE else ["figures", _fs.name(source)]
        target = _fs.child(run_dir, *relative)
        _fs.write_bytes_atomic(target, _fs.read_bytes(source, storage_options), storage_options)


def run(
    config: RunConfig,
    *,
    stages: Sequence[str] | None = None,
    dry_run: bool = False,
    progress: bool = True,
    config_text: str | None = None,
    overrides: Sequence[str] = (),
    check: bool = True,
) -> RunResult:
    """Run the stages of `config` that are not cached yet.

    Everything that can be checked is checked first (`aligned_probing.pipeline.preflight`), in a
    dry run too, and nothing is written before those checks pass. The run directory keeps the
    effective config that ran: `config.json` (machine-readable) and `config.toml` (what the report
    shows, overrides applied, with the overrides listed at its top).

    Args:
        config: The experiment config.
        stages: Stage names (`generate`, `probe`, ...) to run, with everything they depend on;
            None runs the whole plan.
        dry_run: Only list which stages are cached and which would run.
        progress: Show progress bars (tqdm; notebook-friendly).
        config_text: The TOML text the config was loaded from, kept as `config.source.toml`.
        overrides: The `--set` overrides applied on top of that file (listed in `config.toml`).
        check: Run the pre-flight checks (`preflight`) before anything else.

    Returns:
        The records of every stage and the report path.

    Raises:
        ConfigError: A setting that cannot work (before anything is written).
        DataError: An input that cannot be read (before anything is written).
        RunLockedError: Another run holds the run directory.
    """
    from aligned_probing.pipeline.config import config_to_toml
    from aligned_probing.pipeline.lock import run_lock

    run_dir = run_dir_of(config)
    options = dict(config.output.storage_options)
    if check:
        from aligned_probing.pipeline.preflight import preflight

        preflight(config)
    plan = select(build_plan(config), stages)
    if dry_run:
        loader = ModelLoader(config.model_variants())
        records = execute(plan, run_dir, load_model=loader, dry_run=True, storage_options=options)
        return RunResult(run_dir, records, None)
    rt = config.runtime
    # Before touching the run directory: executor="ray" without Ray fails here with the install hint.
    executor = get_executor(rt.executor, address=rt.ray_address, max_retries=rt.max_retries)
    _fs.makedirs(run_dir, options)
    with run_lock(run_dir, options):
        _write_configs(config, run_dir, options, config_text, overrides, config_to_toml)
        records = _execute_locked(config, plan, run_dir, options, executor, progress)
    report = None
    rec = next((r for r in records if r.name == "report"), None)
    if rec is not None:  # publish the report and figures at the top of the run directory
        _publish_report(rec, run_dir, options)
        report = _fs.child(run_dir, REPORT_FILE)
    return RunResult(run_dir, records, report)


def _write_configs(
    config: RunConfig,
    run_dir: _fs.Resolved,
    options: dict[str, Any],
    config_text: str | None,
    overrides: Sequence[str],
    to_toml: Any,
) -> None:
    """Write the effective config (JSON and TOML) and the source text into the run directory."""
    config_json = json.dumps(config.model_dump(mode="json"), indent=2)  # holds no credentials (validated)
    _fs.write_text_atomic(_fs.child(run_dir, CONFIG_FILE), config_json, options)
    comment = "Effective config of this run (every default filled in, overrides applied)."
    if overrides:
        comment += "\nOverrides (--set): " + "; ".join(overrides)
    _fs.write_text_atomic(_fs.child(run_dir, CONFIG_TOML), to_toml(config, comment=comment), options)
    if config_text is not None:
        _fs.write_text_atomic(_fs.child(run_dir, CONFIG_SOURCE), config_text, options)


def _execute_locked(
    config: RunConfig,
    plan: list[Stage],
    run_dir: _fs.Resolved,
    options: dict[str, Any],
    executor: Any,
    progress: bool,
) -> list[StageRecord]:
    rt = config.runtime
    needs = stage_resources(config)
    runtime = {
        "threads": rt.threads,
        "probe_layer_block": rt.probe_layer_block if rt.executor != "local" else None,
        "probe_resources": needs.get("probe_block"),
        "causal_layer_block": rt.causal_layer_block,
        "causal_resources": needs.get("causal"),
    }

    def stage_needs(stage: Stage) -> Resources:
        # The causal stage only dispatches its block tasks, which load the model and take
        # `resources.causal`; holding a GPU while they wait for one could deadlock a small cluster.
        return Resources() if stage.name == "causal" else needs.get(stage.name, Resources())

    threads = _set_threads(rt.threads)
    try:
        with _run_log(run_dir, options):
            logger.info("run %s: %d stages in %s (executor %r)", config.name, len(plan), run_dir, executor)
            return execute(
                plan,
                run_dir,
                load_model=ModelLoader(config.model_variants()),
                progress=progress,
                executor=executor,
                resources=stage_needs,
                runtime=runtime,
                storage_options=options,
            )
    finally:
        _set_threads(threads)


def load_config(run_dir: _fs.Location, storage_options: _fs.StorageOptions = None) -> RunConfig:
    """The config a run directory (local path or fsspec URL) was last run with."""
    location = _fs.child(_fs.resolve(run_dir), CONFIG_FILE)
    if not _fs.exists(location, storage_options):
        raise FileNotFoundError(f"{location} does not exist: is {str(run_dir)!r} a run directory?")
    return RunConfig.from_dict(json.loads(_fs.read_text(location, storage_options)))
