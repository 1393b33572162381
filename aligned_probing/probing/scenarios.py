"""The four probing scenarios: which activations predict which score, and the row-aligned targets.

| scenario | target                                   | features (position) |
|----------|------------------------------------------|---------------------|
| input    | prompt score `prompt_{a}`                | input encoding      |
| forward  | prompt score `prompt_{a}`                | output encoding     |
| output   | continuation score `{a}`                 | output encoding     |
| backward | max of `{a}` over the prompt's continuations | input encoding  |

Scenarios that share a position share the feature matrix, so they are fitted together: one
`ProbingDesign` per position holds the store rows and a target matrix with one column per
(scenario, attribute).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

SCENARIOS: tuple[str, ...] = ("input", "forward", "output", "backward")
#: Activation position each scenario reads.
SCENARIO_POSITION: dict[str, str] = {
    "input": "input",
    "backward": "input",
    "forward": "output",
    "output": "output",
}


@dataclass(frozen=True)
class ProbingDesign:
    """Rows and targets of the scenarios that read one position.

    Attributes:
        position: "input" or "output".
        rows: Store sample index of each row `[n]`.
        prompt_ids: Prompt of each row `[n]` (the grouping for folds and control permutations).
        columns: (scenario, attribute) of each target column.
        targets: `[n, len(columns)]` float64.
    """

    position: str
    rows: np.ndarray
    prompt_ids: np.ndarray
    columns: list[tuple[str, str]]
    targets: np.ndarray


def check_scenarios(scenarios: Sequence[str]) -> tuple[str, ...]:
    """`scenarios` as a tuple; a ValueError names the allowed values if it is empty or has unknown ones."""
    values = (scenarios,) if isinstance(scenarios, str) else tuple(scenarios)
    if not values or any(v not in SCENARIOS for v in values):
        raise ValueError(f"scenarios must be a non-empty subset of {SCENARIOS}, got {values!r}.")
    return values


def infer_attributes(targets: pd.DataFrame) -> list[str]:
    """Attributes that have both a prompt column `prompt_{a}` and a continuation column `{a}`."""
    return [
        c[len("prompt_") :]
        for c in targets.columns
        if c.startswith("prompt_") and c != "prompt_id" and c[len("prompt_") :] in targets.columns
    ]


def check_targets(
    targets: pd.DataFrame, scenarios: Sequence[str], attributes: Sequence[str], *, dropna: bool = False
) -> pd.DataFrame:
    """Validate the targets table for `scenarios` x `attributes`; drop NaN rows only if `dropna`.

    Raises:
        ValueError: A required column is missing, or has NaN values and `dropna` is False.
    """
    if not isinstance(targets, pd.DataFrame):
        raise TypeError(f"targets must be a pandas DataFrame, got {type(targets).__name__}.")
    needed = ["prompt_id", "continuation_idx"]
    for a in attributes:
        if {"input", "forward"} & set(scenarios):
            needed.append(f"prompt_{a}")
        if {"output", "backward"} & set(scenarios):
            needed.append(a)
    missing = [c for c in needed if c not in targets.columns]
    if missing:
        raise ValueError(f"targets is missing columns {missing}; it has {list(targets.columns)}.")
    counts = targets[needed].isna().sum()
    counts = counts[counts > 0]
    if len(counts):
        text = ", ".join(f"{c!r}: {n}" for c, n in counts.items())
        if not dropna:
            raise ValueError(
                f"targets has NaN values ({text} of {len(targets)} rows). Score every text, or pass "
                "dropna=True to drop those rows."
            )
        keep = targets[needed].notna().all(axis=1)
        warnings.warn(
            f"dropna=True: dropped {int((~keep).sum())} of {len(targets)} target rows with NaN ({text}).",
            UserWarning,
            stacklevel=3,
        )
        targets = targets[keep]
    return targets


def _prompt_table(targets: pd.DataFrame, scenarios: Sequence[str], attributes: Sequence[str]) -> pd.DataFrame:
    """One row per prompt: `prompt_{a}` (must be constant within a prompt) and `max_{a}` (backward)."""
    grouped = targets.groupby("prompt_id", sort=False)
    out = {}
    if {"input", "forward"} & set(scenarios):
        cols = [f"prompt_{a}" for a in attributes]
        spread = grouped[cols].nunique()
        bad = spread.columns[(spread > 1).any()].tolist()
        if bad:
            raise ValueError(
                f"targets columns {bad} must repeat one value per prompt_id, but some prompts have several."
            )
        out.update(grouped[cols].first().to_dict("series"))
    if "backward" in scenarios:
        out.update({f"max_{a}": s for a, s in grouped[list(attributes)].max().to_dict("series").items()})
    return pd.DataFrame(out)


def build_designs(
    index: pd.DataFrame,
    targets: pd.DataFrame,
    *,
    scenarios: Sequence[str] = SCENARIOS,
    attributes: Sequence[str],
    output_continuations: int | Literal["all"] = 0,
) -> list[ProbingDesign]:
    """Align the targets with the store rows, one `ProbingDesign` per position needed by `scenarios`.

    Input encodings do not depend on the continuation, so the input design has one row per prompt (its
    first store row). The output design has one row per (prompt, continuation) with
    `continuation_idx == output_continuations`, or every continuation when it is "all".

    Args:
        index: The store index (`prompt_id`, `continuation_idx`), row i = sample i.
        targets: Validated targets (see `check_targets`), one row per continuation.
        scenarios: Subset of `SCENARIOS`.
        attributes: Attribute names.
        output_continuations: Designated continuation index, or "all".

    Raises:
        ValueError: Store samples without targets, or no rows left for a position.
    """
    scenarios = check_scenarios(scenarios)
    if not (
        output_continuations == "all"
        or (isinstance(output_continuations, int | np.integer) and output_continuations >= 0)
    ):
        raise ValueError(f"output_continuations must be an int >= 0 or 'all', got {output_continuations!r}.")
    prompts = _prompt_table(targets, scenarios, attributes)
    designs = []
    if {"input", "backward"} & set(scenarios):
        first = index.reset_index(drop=True).drop_duplicates("prompt_id")
        known = first["prompt_id"].isin(prompts.index).to_numpy()
        first = first[known]
        cols, mats = [], []
        for scenario, source in (("input", "prompt_{}"), ("backward", "max_{}")):
            if scenario in scenarios:
                for a in attributes:
                    cols.append((scenario, a))
                    mats.append(prompts.loc[first["prompt_id"], source.format(a)].to_numpy(np.float64))
        designs.append(_design("input", first, cols, mats))
    if {"forward", "output"} & set(scenarios):
        rows = index.reset_index(drop=True)
        rows = (
            rows[rows["continuation_idx"] >= 0]
            if output_continuations == "all"
            else rows[rows["continuation_idx"] == output_continuations]
        )
        keep = ["prompt_id", "continuation_idx"] + [
            c for a in attributes for c in (f"prompt_{a}", a) if c in targets.columns
        ]
        merged = rows.reset_index().merge(
            targets[keep], on=["prompt_id", "continuation_idx"], how="inner", validate="one_to_one"
        )
        cols, mats = [], []
        for scenario in ("forward", "output"):
            if scenario in scenarios:
                for a in attributes:
                    cols.append((scenario, a))
                    mats.append(merged[f"prompt_{a}" if scenario == "forward" else a].to_numpy(np.float64))
        designs.append(_design("output", merged.set_index("index"), cols, mats))
    return designs


def check_coverage(
    index: pd.DataFrame,
    targets: pd.DataFrame,
    *,
    scenarios: Sequence[str] = SCENARIOS,
    output_continuations: int | Literal["all"] = 0,
) -> None:
    """Every store sample that a scenario uses must have a target row (a length mismatch otherwise).

    Raises:
        ValueError: With the number of store samples lacking targets and an example.
    """
    need = index
    if not ({"input", "backward"} & set(scenarios)):
        need = (
            index[index["continuation_idx"] >= 0]
            if output_continuations == "all"
            else index[index["continuation_idx"] == output_continuations]
        )
    missing = ~need["prompt_id"].isin(set(targets["prompt_id"]))
    if {"forward", "output"} & set(scenarios):
        used = (
            index[index["continuation_idx"] >= 0]
            if output_continuations == "all"
            else index[index["continuation_idx"] == output_continuations]
        )
        pairs = pd.MultiIndex.from_frame(targets[["prompt_id", "continuation_idx"]])
        lacking = ~pd.MultiIndex.from_frame(used[["prompt_id", "continuation_idx"]]).isin(pairs)
        if lacking.any():
            first = used[lacking].iloc[0]
            example = (str(first["prompt_id"]), int(first["continuation_idx"]))
            raise ValueError(
                f"Mismatched store and targets: {int(lacking.sum())} of {len(used)} output samples have no "
                f"target row (prompt_id, continuation_idx), e.g. {example}."
            )
    if missing.any():
        raise ValueError(
            f"Mismatched store and targets: {int(missing.sum())} of {len(need)} store samples have no "
            f"target row for their prompt_id, e.g. {need['prompt_id'][missing].iloc[0]!r}."
        )


def _design(
    position: str, rows: pd.DataFrame, cols: list[tuple[str, str]], mats: list[np.ndarray]
) -> ProbingDesign:
    if len(rows) == 0:
        raise ValueError(
            f"No store rows with targets for the {position!r} position: check that the store "
            "index and the targets share prompt_id/continuation_idx values."
        )
    return ProbingDesign(
        position=position,
        rows=rows.index.to_numpy(np.int64),
        prompt_ids=rows["prompt_id"].to_numpy(),
        columns=cols,
        targets=np.column_stack(mats),
    )
