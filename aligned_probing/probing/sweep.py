"""`run_probing`: the layer x scenario x attribute x fold x seed probing sweep over an activation store.

Per layer, each position's activations are read once; per (seed, fold) one `RidgeProbe` fit (one
eigendecomposition) serves every scenario that reads that position, every attribute, every alpha, and the
control targets, which are appended as extra target columns.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd

from aligned_probing.probing._metrics import regression_metrics
from aligned_probing.probing.mdl import MDL_FRACTIONS, online_codelength
from aligned_probing.probing.ridge import DEFAULT_ALPHAS, RidgeProbe
from aligned_probing.probing.scenarios import (
    SCENARIOS,
    ProbingDesign,
    build_designs,
    check_coverage,
    check_scenarios,
    check_targets,
    infer_attributes,
)
from aligned_probing.probing.splits import group_permutation, prompt_folds

#: Columns of `run_probing`'s result, in order (MDL columns are appended when `mdl=True`).
RESULT_COLUMNS: tuple[str, ...] = (
    "model",
    "template",
    "scenario",
    "attribute",
    "layer",
    "n_layers",
    "relative_depth",
    "fold",
    "seed",
    "pearson",
    "r2",
    "rmse",
    "alpha",
    "n_train",
    "n_test",
    "control_pearson",
    "selectivity",
)
MDL_COLUMNS: tuple[str, ...] = ("online_codelength", "uniform_codelength", "compression")


class ProbingStore(Protocol):
    """What `run_probing` needs from `aligned_probing.encoding.store.ActivationStore` (read-only)."""

    @property
    def index(self) -> pd.DataFrame: ...  # noqa: D102
    @property
    def n_layers(self) -> int: ...  # noqa: D102
    @property
    def model_name(self) -> str: ...  # noqa: D102
    @property
    def template(self) -> int: ...  # noqa: D102
    @property
    def positions(self) -> tuple[str, ...]: ...  # noqa: D102
    @property
    def poolings(self) -> tuple[str, ...]: ...  # noqa: D102

    def layer(self, layer: int, position: str = "input", pooling: str = "mean") -> np.ndarray:
        """Activations `[n_samples, d_model]` of one residual layer."""
        ...


def run_probing(
    store: ProbingStore,
    targets: pd.DataFrame,
    *,
    scenarios: Sequence[str] = SCENARIOS,
    attributes: Sequence[str] | None = None,
    n_folds: int = 4,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    control: bool = True,
    mdl: bool = False,
    pooling: str = "mean",
    output_continuations: int | Literal["all"] = 0,
    layers: Sequence[int] | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    dropna: bool = False,
    mdl_precision: float = 0.01,
) -> pd.DataFrame:
    """Probe every layer for every scenario and attribute with prompt-grouped K-fold CV over seeds.

    For each seed, prompts are assigned to `n_folds` folds (shuffled by the seed; the same assignment for
    every scenario), so no prompt has rows on both sides of a split. Standardisation and alpha (LOO on the
    training part) are fitted on the training folds only. Information strength is the test-fold Pearson r.
    With `control=True`, the same probe is fitted on targets permuted across prompts (seeded), and
    `selectivity = pearson - control_pearson`. With `mdl=True`, the online code length of the training
    part's targets (in a seeded random order; see `online_codelength`) is added.

    Args:
        store: An `ActivationStore` (or anything with its `layer`, `index`, `n_layers`, `model_name`,
            `template`, `positions` and `poolings`).
        targets: One row per continuation: `prompt_id`, `continuation_idx`, `prompt_{a}` (repeated per
            prompt) and `{a}` for each attribute a.
        scenarios: Subset of ("input", "forward", "output", "backward").
        attributes: Attributes to probe; None = every a with both `prompt_{a}` and `{a}` columns.
        n_folds: Folds K (>= 2); needs at least 2 prompts per fold.
        seeds: One fold assignment and one control permutation per seed.
        control: Fit control tasks (permuted targets).
        mdl: Add the online code length columns (about 10 extra fits per row group; slow).
        pooling: Store pooling to read ("mean" or "last").
        output_continuations: Continuation index used by forward/output (the reference used 0), or "all"
            (every continuation, folds still grouped by prompt).
        layers: Residual layers to probe; None = 0..store.n_layers.
        alphas: Ridge penalty grid (standardised features).
        dropna: Drop target rows with NaN (with a warning) instead of raising.
        mdl_precision: Target quantisation step for MDL (targets must lie in [0, 1]).

    Returns:
        Tidy DataFrame, one row per (scenario, attribute, layer, fold, seed), columns `RESULT_COLUMNS`
        (+ `MDL_COLUMNS` when `mdl=True`).

    Example:
        >>> store = ActivationStore.open("runs/smollm2/t0")
        >>> df = run_probing(store, targets, attributes=["toxicity", "insult"])
        >>> df.groupby(["scenario", "layer"]).pearson.mean()
    """
    scenarios = check_scenarios(scenarios)
    attributes = list(
        infer_attributes(targets)
        if attributes is None
        else ([attributes] if isinstance(attributes, str) else attributes)
    )
    if not attributes:
        raise ValueError(
            "attributes is empty and none could be inferred: targets needs prompt_{a} and {a} "
            f"columns, it has {list(targets.columns)}."
        )
    if (
        isinstance(seeds, int | np.integer)
        or not len(seeds)
        or not all(isinstance(s, int | np.integer) for s in seeds)
    ):
        raise ValueError(f"seeds must be a non-empty sequence of ints, e.g. (0, 1, 2), got {seeds!r}.")
    seeds = [int(s) for s in seeds]
    if pooling not in store.poolings:
        raise ValueError(f"pooling must be one of {tuple(store.poolings)} in this store, got {pooling!r}.")
    index = store.index.reset_index(drop=True)
    clean = check_targets(targets, scenarios, attributes, dropna=dropna)
    check_coverage(index, targets, scenarios=scenarios, output_continuations=output_continuations)
    designs = build_designs(
        index, clean, scenarios=scenarios, attributes=attributes, output_continuations=output_continuations
    )
    for d in designs:
        if d.position not in store.positions:
            raise ValueError(
                f"Scenarios {sorted({s for s, _ in d.columns})} need the "
                f"{d.position!r} position, but the store has positions {tuple(store.positions)}."
            )
    all_prompts = np.unique(np.concatenate([d.prompt_ids for d in designs]))
    folds = {seed: prompt_folds(len(all_prompts), n_folds, seed) for seed in seeds}
    codes = [np.searchsorted(all_prompts, d.prompt_ids) for d in designs]
    controls = [
        {seed: group_permutation(c, np.random.default_rng([seed, 0])) for seed in seeds} for c in codes
    ]
    layers = list(range(store.n_layers + 1)) if layers is None else list(layers)
    if not layers or not all(isinstance(x, int | np.integer) and 0 <= x <= store.n_layers for x in layers):
        raise ValueError(
            f"layers must be a non-empty sequence of ints in [0, {store.n_layers}], got {layers!r}."
        )
    layers = [int(x) for x in layers]
    if mdl and any(np.nanmin(d.targets) < 0 or np.nanmax(d.targets) > 1 for d in designs):
        raise ValueError("mdl=True needs targets in [0, 1] (scores); got values outside that range.")

    records: list[dict[str, Any]] = []
    dropped = 0
    for layer in layers:
        for d, code, ctrl in zip(designs, codes, controls, strict=True):
            X = _read_layer(store, layer, d, pooling, len(index))
            finite = np.isfinite(X).all(axis=1)  # empty continuations are stored as NaN vectors
            dropped = max(dropped, int((~finite).sum()))
            for seed in seeds:
                fold_of_row = folds[seed][code]
                Y = np.hstack([d.targets, d.targets[ctrl[seed]]]) if control else d.targets
                for fold in range(n_folds):
                    train, test = finite & (fold_of_row != fold), finite & (fold_of_row == fold)
                    rows = _fit_fold(X, Y, d.columns, train, test, alphas, control)
                    if mdl:
                        _add_mdl(rows, X, d.targets, train, seed, fold, alphas, mdl_precision)
                    records.extend({"layer": layer, "fold": fold, "seed": seed, **row} for row in rows)
    if dropped:
        warnings.warn(
            f"Dropped up to {dropped} rows with non-finite activations (empty continuations) per layer.",
            UserWarning,
            stacklevel=2,
        )
    df = pd.DataFrame.from_records(records)
    n_nan = int(df["pearson"].isna().sum())
    if n_nan:
        warnings.warn(
            f"{n_nan} of {len(df)} rows have pearson = NaN: the test fold's target or the "
            "prediction was constant (Pearson r is undefined).",
            UserWarning,
            stacklevel=2,
        )
    df = df.assign(
        model=store.model_name,
        template=store.template,
        n_layers=store.n_layers,
        relative_depth=df["layer"] / store.n_layers,
    )
    return df[list(RESULT_COLUMNS) + (list(MDL_COLUMNS) if mdl else [])]


def _read_layer(store: ProbingStore, layer: int, d: ProbingDesign, pooling: str, n_index: int) -> np.ndarray:
    """One layer's activations at the design's rows, float64 `[n_rows, d_model]`; checks the length."""
    X = np.asarray(store.layer(layer, position=d.position, pooling=pooling))
    if X.ndim != 2 or X.shape[0] != n_index:
        raise ValueError(
            f"store.layer({layer}, {d.position!r}) has shape {X.shape}, but the store "
            f"index has {n_index} rows: mismatched lengths."
        )
    return X[d.rows].astype(np.float64)


def _fit_fold(
    X: np.ndarray,
    Y: np.ndarray,
    columns: list[tuple[str, str]],
    train: np.ndarray,
    test: np.ndarray,
    alphas: Sequence[float],
    control: bool,
) -> list[dict[str, Any]]:
    """Fit one probe on the training rows (all target columns at once); one record per real column.

    `Y` holds the real targets in its first `len(columns)` columns and, with `control`, their control
    (permuted) versions in the same order after them.
    """
    k = len(columns)
    probe = RidgeProbe(alphas=alphas).fit(X[train], Y[train])
    m = regression_metrics(Y[test], probe.predict(X[test]))
    rows = []
    for j, (scenario, attribute) in enumerate(columns):
        control_r = m["pearson"][k + j] if control else np.nan
        rows.append(
            {
                "scenario": scenario,
                "attribute": attribute,
                "pearson": m["pearson"][j],
                "r2": m["r2"][j],
                "rmse": m["rmse"][j],
                "alpha": probe.alpha_[j],
                "n_train": int(train.sum()),
                "n_test": int(test.sum()),
                "control_pearson": control_r,
                "selectivity": m["pearson"][j] - control_r,
            }
        )
    return rows


def _add_mdl(
    rows: list[dict[str, Any]],
    X: np.ndarray,
    Y: np.ndarray,
    train: np.ndarray,
    seed: int,
    fold: int,
    alphas: Sequence[float],
    precision: float,
) -> None:
    """Add the online code of the training part's real targets (order seeded by (seed, fold)) to `rows`."""
    order = np.flatnonzero(train)
    order = order[np.random.default_rng([seed, fold, 1]).permutation(len(order))]
    code = online_codelength(X[order], Y[order], fractions=MDL_FRACTIONS, precision=precision, alphas=alphas)
    for j, row in enumerate(rows):
        row["online_codelength"] = code.online_codelength[j]
        row["uniform_codelength"] = code.uniform_codelength[j]
        row["compression"] = code.compression[j]
