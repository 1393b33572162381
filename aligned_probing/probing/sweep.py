"""`run_probing`: the layer x scenario x attribute x fold x seed probing sweep over an activation store.

Per layer, each position's activations are read once; per (seed, fold) one `RidgeProbe` fit (one
eigendecomposition) serves every scenario that reads that position, every attribute, every alpha, and the
control targets, which are appended as extra target columns. With the numpy backend, the Gram matrix of
a layer's rows is computed once and downdated to each fold's training rows (`_foldgram.FoldGram`). With
`backend="torch"`, `layer_batch` layers are read together and fitted as one batched float64 fit (on a GPU
when there is one).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd

from aligned_probing.probing._foldgram import FoldGram
from aligned_probing.probing._metrics import regression_metrics
from aligned_probing.probing.mdl import MDL_FRACTIONS, online_codelength
from aligned_probing.probing.ridge import DEFAULT_ALPHAS, RidgeProbe, check_alphas, check_backend
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
    "n_rows_lost",
)
#: MDL columns (appended when `mdl=True`). The headline quantities are the gains in bits per sample,
#: `mdl_gain_control = (control - online) / mdl_n` and `mdl_gain_baseline = (baseline - online) / mdl_n`,
#: and `mdl_compression_baseline = baseline / online`; `compression` (= uniform / online) is kept for
#: reference only (it is > 1 for pure noise whenever the targets are skewed).
MDL_COLUMNS: tuple[str, ...] = (
    "mdl_gain_control",
    "mdl_gain_baseline",
    "mdl_compression_baseline",
    "online_codelength",
    "control_codelength",
    "baseline_codelength",
    "uniform_codelength",
    "mdl_n",
    "compression",
)


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
    backend: str = "numpy",
    layer_batch: int = 8,
    device: str | None = None,
    show_progress: bool = False,
) -> pd.DataFrame:
    """Probe every layer for every scenario and attribute with prompt-grouped K-fold CV over seeds.

    For each seed, prompts are assigned to `n_folds` folds (shuffled by the seed; the same assignment for
    every scenario), so no prompt has rows on both sides of a split. Standardisation and alpha are fitted
    on the training folds only; alpha by leave-one-out, or by leave-one-prompt-out when a prompt has
    several rows (`output_continuations="all"`), so that a prompt's other continuations cannot vouch for
    a memorising alpha. Information strength is the test-fold Pearson r. With `control=True`, the same
    probe is fitted on targets permuted across prompts (seeded), and `selectivity = pearson -
    control_pearson`. With `mdl=True`, the online codes of the training part's real targets, control
    targets (the same permutation) and a features-free baseline are added, with prompts in a seeded random
    order and whole prompts per block (see `online_codelength`); report the gains `mdl_gain_*`.
    Rows whose activations are not finite (empty continuations, stored as NaN) are left out of that
    design; `n_rows_lost` counts them per row of the table.

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
        mdl: Add the MDL columns `MDL_COLUMNS` (about 10 extra fits per row group; slow).
        pooling: Store pooling to read ("mean" or "last").
        output_continuations: Continuation index used by forward/output (the reference used 0), or "all"
            (every continuation, folds still grouped by prompt).
        layers: Residual layers to probe; None = 0..store.n_layers.
        alphas: Ridge penalty grid (standardised features).
        dropna: Drop target rows with NaN (with a warning) instead of raising.
        mdl_precision: Target quantisation step for MDL (targets must lie in [0, 1]); the MDL gains do
            not depend on it.
        backend: "numpy" or "torch" (same table to rounding; torch fits `layer_batch` layers at once).
        layer_batch: Layers per batched fit with `backend="torch"` (memory: layer_batch x n x d floats).
        device: torch device; None = "cuda" when available, else "cpu".
        show_progress: Show a tqdm bar ("probe") with one step per (position design, layer batch):
            every fold, seed and control fit of those layers.

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

    backend = check_backend(backend)
    alphas = tuple(float(a) for a in check_alphas(alphas))
    if not isinstance(layer_batch, int | np.integer) or layer_batch < 1:
        raise ValueError(f"layer_batch must be an int >= 1, got {layer_batch!r}.")
    batch = int(layer_batch) if backend == "torch" else 1
    from tqdm.auto import tqdm

    keyed: list[tuple[tuple[int, int, int, int], list[dict[str, Any]]]] = []
    n_steps, unit = len(designs) * len(list(_chunks(layers, batch))), "layer" if batch == 1 else "batch"
    bar = tqdm(total=n_steps, desc="probe", unit=unit, disable=not show_progress)
    for di, (d, code, ctrl) in enumerate(zip(designs, codes, controls, strict=True)):
        for chunk in _chunks(layers, batch):
            Xc = np.stack([_read_layer(store, layer, d, pooling, len(index)) for layer in chunk])  # (B, n, p)
            keyed.extend(
                _probe_chunk(
                    Xc,
                    chunk,
                    di,
                    d,
                    code,
                    ctrl,
                    folds,
                    n_folds,
                    seeds,
                    control,
                    mdl,
                    alphas,
                    mdl_precision,
                    backend,
                    device,
                )
            )
            bar.update()
    bar.close()
    keyed.sort(key=lambda item: item[0])  # the table's order: layer, position, seed, fold
    records = [row for _, rows in keyed for row in rows]
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


def _chunks(values: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(values), size):
        yield values[i : i + size]


def _probe_chunk(
    Xc: np.ndarray,
    chunk: list[int],
    di: int,
    d: ProbingDesign,
    code: np.ndarray,
    ctrl: dict[int, np.ndarray],
    folds: dict[int, np.ndarray],
    n_folds: int,
    seeds: list[int],
    control: bool,
    mdl: bool,
    alphas: Sequence[float],
    mdl_precision: float,
    backend: str,
    device: str | None,
) -> list[tuple[tuple[int, int, int, int], list[dict[str, Any]]]]:
    """All (seed, fold) fits of one design on a chunk of layers `Xc` `[B, n, p]`; records keyed for sorting.

    Rows with non-finite activations (empty continuations) are left out and counted in `n_rows_lost`.
    With several rows per prompt, alpha is selected leaving whole prompts out (grouped CV). The B layers
    are fitted in one batched torch call when they share the same finite rows, else one by one. With the
    numpy backend, each layer's Gram matrix is computed once over its finite rows (`FoldGram`) and
    downdated to every fold's training rows (when they are at least as many as the features).
    """
    groups = code if len(np.unique(code)) < len(code) else None
    finite_all = np.isfinite(Xc).all(axis=2)  # (B, n): empty continuations are stored as NaN
    shared = len(chunk) > 1 and bool((finite_all == finite_all[0]).all())
    grams: dict[int, FoldGram] = {}  # per layer of the chunk, built on first use

    def fit_one(b: int, train: np.ndarray, test: np.ndarray, Y: np.ndarray) -> list[dict[str, Any]]:
        if backend == "numpy" and train.sum() >= Xc.shape[2]:
            if b not in grams:
                grams[b] = FoldGram(Xc[b], rows=finite_all[b])
            return _fit_fold_gram(grams[b], Xc[b], Y, d.columns, train, test, alphas, control, groups)
        probe = RidgeProbe(alphas=alphas, backend=backend, device=device)
        return _fit_fold(probe, Xc[b], Y, d.columns, train, test, control, groups)

    out = []
    for seed in seeds:
        fold_of_row = folds[seed][code]
        Y = np.hstack([d.targets, d.targets[ctrl[seed]]]) if control else d.targets
        for fold in range(n_folds):
            splits = [(f & (fold_of_row != fold), f & (fold_of_row == fold)) for f in finite_all]
            if shared:
                per_layer = _fit_fold_batched(Xc, Y, d.columns, *splits[0], alphas, control, groups, device)
            else:
                per_layer = [fit_one(b, *splits[b], Y) for b in range(len(chunk))]
            for b, (layer, rows) in enumerate(zip(chunk, per_layer, strict=True)):
                if mdl:
                    ctrl_y = d.targets[ctrl[seed]] if control else None
                    _add_mdl(
                        rows,
                        Xc[b],
                        d.targets,
                        ctrl_y,
                        code,
                        splits[b][0],
                        (seed, fold),
                        alphas,
                        mdl_precision,
                        backend,
                        device,
                    )
                lost = int((~finite_all[b]).sum())
                rows = [{"layer": layer, "fold": fold, "seed": seed, **r, "n_rows_lost": lost} for r in rows]
                out.append(((layer, di, seed, fold), rows))
    return out


def _records(
    columns: list[tuple[str, str]],
    m: dict[str, np.ndarray],
    alpha: np.ndarray,
    n_train: int,
    n_test: int,
    control: bool,
) -> list[dict[str, Any]]:
    """One record per real target column from the metrics `m` of all columns (real, then control)."""
    k = len(columns)
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
                "alpha": alpha[j],
                "n_train": n_train,
                "n_test": n_test,
                "control_pearson": control_r,
                "selectivity": m["pearson"][j] - control_r,
            }
        )
    return rows


def _fit_fold(
    probe: RidgeProbe,
    X: np.ndarray,
    Y: np.ndarray,
    columns: list[tuple[str, str]],
    train: np.ndarray,
    test: np.ndarray,
    control: bool,
    groups: np.ndarray | None,
) -> list[dict[str, Any]]:
    """Fit one probe on the training rows (all target columns at once); one record per real column.

    `Y` holds the real targets in its first `len(columns)` columns and, with `control`, their control
    (permuted) versions in the same order after them. `groups` (prompt codes) switch alpha selection
    to leave-one-prompt-out.
    """
    probe.fit(X[train], Y[train], groups=None if groups is None else groups[train])
    m = regression_metrics(Y[test], probe.predict(X[test]))
    return _records(columns, m, probe.alpha_, int(train.sum()), int(test.sum()), control)


def _fit_fold_gram(
    gram: FoldGram,
    X: np.ndarray,
    Y: np.ndarray,
    columns: list[tuple[str, str]],
    train: np.ndarray,
    test: np.ndarray,
    alphas: Sequence[float],
    control: bool,
    groups: np.ndarray | None,
) -> list[dict[str, Any]]:
    """`_fit_fold` with the fold's Gram matrix downdated from `gram` (built on the finite rows of `X`)."""
    coef, intercept, alpha, _ = gram.fit(
        train,
        Y[train],
        np.asarray(alphas, dtype=np.float64),
        groups=None if groups is None else groups[train],
    )
    m = regression_metrics(Y[test], X[test] @ coef.T + intercept)
    return _records(columns, m, alpha, int(train.sum()), int(test.sum()), control)


def _fit_fold_batched(
    X: np.ndarray,
    Y: np.ndarray,
    columns: list[tuple[str, str]],
    train: np.ndarray,
    test: np.ndarray,
    alphas: Sequence[float],
    control: bool,
    groups: np.ndarray | None,
    device: str | None,
) -> list[list[dict[str, Any]]]:
    """`_fit_fold` for B layers `X` `[B, n, p]` in one torch fit (same rows for all B); records per layer."""
    from aligned_probing.probing._gcv_torch import ridge_fit_torch

    fit = ridge_fit_torch(
        X[:, train],
        Y[train],
        np.asarray(alphas, dtype=np.float64),
        groups=None if groups is None else groups[train],
        device=device,
    )
    out = []
    for b in range(X.shape[0]):
        pred = X[b, test] @ fit.coef[b].T + fit.intercept[b]  # (n_test, k)
        m = regression_metrics(Y[test], pred)
        out.append(_records(columns, m, fit.alpha[b], int(train.sum()), int(test.sum()), control))
    return out


def _add_mdl(
    rows: list[dict[str, Any]],
    X: np.ndarray,
    Y: np.ndarray,
    Y_control: np.ndarray | None,
    code: np.ndarray,
    train: np.ndarray,
    seed_fold: tuple[int, int],
    alphas: Sequence[float],
    precision: float,
    backend: str,
    device: str | None = None,
) -> None:
    """Add the MDL columns of the training part to `rows`: real, control and baseline online codes.

    The training prompts are put in a random order seeded by (seed, fold) with each prompt's rows kept
    together; with several rows per prompt the blocks end between prompts, so a later block never codes
    continuations of a prompt the probe has already seen.
    """
    rows_train = np.flatnonzero(train)
    prompts = np.unique(code[rows_train])
    rank = np.zeros(int(code.max()) + 1, dtype=np.int64)
    rank[prompts] = np.random.default_rng([*seed_fold, 1]).permutation(len(prompts))
    order = rows_train[np.argsort(rank[code[rows_train]], kind="stable")]
    grouped = len(prompts) < len(rows_train)
    res = online_codelength(
        X[order],
        Y[order],
        fractions=MDL_FRACTIONS,
        precision=precision,
        alphas=alphas,
        control=None if Y_control is None else Y_control[order],
        groups=code[order] if grouped else None,
        backend=backend,
        device=device,
    )
    for j, row in enumerate(rows):
        row["mdl_gain_control"] = res.gain_vs_control[j]
        row["mdl_gain_baseline"] = res.gain_vs_baseline[j]
        row["mdl_compression_baseline"] = res.compression_vs_baseline[j]
        row["online_codelength"] = res.online_codelength[j]
        row["control_codelength"] = res.control_codelength[j]
        row["baseline_codelength"] = res.baseline_codelength[j]
        row["uniform_codelength"] = res.uniform_codelength[j]
        row["mdl_n"] = len(order)
        row["compression"] = res.compression[j]
