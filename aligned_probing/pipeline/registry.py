"""The one table of pipeline stages: names, order, CLI help and output tables.

Everything that lists stages reads it: the plan's `STAGE_NAMES`, the config's `runtime.resources`
keys, the CLI's per-stage commands and `load_results`' tables. It imports nothing heavy, so the
config module can use it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    """One stage kind.

    Attributes:
        name: The kind (`generate`, `probe`, ...): plan keys start with it, `run --stages` selects it.
        summary: One line of what it does (the CLI command's help).
        outputs: The Parquet tables in its directory that `load_results` concatenates, by file name.
        command: Whether the CLI has a command of this name that runs it (with what it needs).
    """

    name: str
    summary: str
    outputs: tuple[str, ...] = ()
    command: bool = True


#: Every stage kind, in plan order.
STAGES: tuple[StageSpec, ...] = (
    StageSpec("prompts", "Load, score and sample the prompts", ("prompts.parquet",), command=False),
    StageSpec("generate", "Sample k continuations per prompt for every model and template"),
    StageSpec("score", "Score every continuation with the configured scorer", ("scores.parquet",)),
    StageSpec("encode", "Encode prompts and continuations into the activation store"),
    StageSpec("probe", "Fit layer-wise probes for every scenario and attribute", ("probing.parquet",)),
    StageSpec(
        "behaviour", "Compute EMT, toxicity probability and mean score with CIs", ("behaviour.parquet",)
    ),
    StageSpec(
        "interplay",
        "Correlate information strength with behaviour across models (>= 3 models)",
        ("interplay.parquet",),
    ),
    StageSpec(
        "causal",
        "Run layer skipping, activation patching and steering",
        ("layer_skipping.parquet", "patching.parquet", "steering.parquet"),
    ),
    StageSpec("report", "Write the HTML report and its figures", command=False),
)

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
#: Kinds of executor task that `runtime.resources` can size: every stage plus probing's layer blocks.
TASK_KINDS: tuple[str, ...] = (*STAGE_NAMES, "probe_block")


def stage_spec(name: str) -> StageSpec:
    """The registry entry of stage kind `name`.

    Raises:
        ValueError: `name` is not a stage kind (the message lists them).
    """
    for spec in STAGES:
        if spec.name == name:
            return spec
    raise ValueError(f"stage must be one of {list(STAGE_NAMES)}, got {name!r}.")
