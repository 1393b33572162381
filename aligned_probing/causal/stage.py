"""The pipeline's causal stage: layer skipping, activation patching and steering on one model.

Probes are ridge probes on prompt encodings -> prompt score, refitted here on every prompt *except*
those the interventions run on (the steering/skipping subset and the patching pairs), so read-outs
and directions are never scored in-sample; the probing stage's probes are cross-validated fold
models, and we want one probe per layer.

* Steering uses the mean-pooled input probe (from the activation store) at the layer where input
  information peaks in the probing stage's results. `causal.steering_alphas` are in units of that
  layer's median residual norm over the subset's prompt tokens, and every strength is also run
  along a seeded random direction (same norm, layer and operator): `direction` = "probe",
  "random" and "probe_vs_random" rows (see `steering_sweep`).
* Patching writes the last prompt position and reads out with *last-token* probes (computed here
  from the model: the store may hold only mean pooling), so the read-out pools what was patched;
  it runs the same-class controls and reports fluency (see `activation_patching`).

The stage runs as tasks through `ctx.executor`, like probing's layer blocks:

1. one *setup* task generates the unmodified model's scored continuations (`baseline.parquet`,
   shared by layer skipping and steering; `steering_baseline.parquet` when steering runs on its
   own number of prompts, `causal.steering_n_prompts`), matches the patching pairs (`pairs.parquet`) and
   generates their unpatched continuations (`pairs_clean.parquet`, shared by the patching blocks);
2. one task per block of `runtime["causal_layer_block"]` intervention layers runs layer skipping
   and patching for those layers (`blocks/skipping-layers-XXX-YYY.parquet`,
   `blocks/patching-layers-XXX-YYY.parquet`), and one task runs the steering sweep
   (`blocks/steering.parquet`).

Every file is written atomically and a task skips what is already written, so a killed run keeps
its finished blocks and resumes. The final tables are the blocks' rows in layer order (patching's
re-sorted as one `activation_patching` call sorts them): every row depends only on its own layer,
the shared baseline and per-row seeds (generation) and fixed bootstrap seeds, so they equal the
tables of one unsplit run number for number. Each task loads the model itself (`ctx.load_model`,
one load per task on a cluster) and takes `runtime["causal_resources"]`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from aligned_probing.pipeline import fs as _fs
from aligned_probing.pipeline.config import CausalConfig
from aligned_probing.pipeline.executors import LocalExecutor, per_task
from aligned_probing.pipeline.runner import StageContext
from aligned_probing.pipeline.settings import CausalSettings, settings_of
from aligned_probing.pipeline.stages import build_scorer, input_dir, read_prompts, read_table, write_table

if TYPE_CHECKING:
    from aligned_probing.causal import GenerationSettings, StatSettings
    from aligned_probing.models import LoadedModel

logger = logging.getLogger("aligned_probing.pipeline")

BASELINE_FILE = "baseline.parquet"
STEERING_BASELINE_FILE = "steering_baseline.parquet"
PAIRS_FILE = "pairs.parquet"
PAIRS_CLEAN_FILE = "pairs_clean.parquet"
OUTPUT_FILES = {
    "skipping": "layer_skipping.parquet",
    "patching": "patching.parquet",
    "steering": "steering.parquet",
}
# Patching rows in the order one `activation_patching` call gives them: read-outs, then behaviour,
# each sorted by its group keys (its `groupby(..., sort=True)`).
_READOUT_ORDER = ["direction", "layer", "readout_layer"]
_BEHAVIOUR_ORDER = ["direction", "layer", "measure"]


def _fit_probes(
    store_dir: _fs.Resolved,
    prompts: pd.DataFrame,
    attribute: str,
    layers: list[int],
    pooling: str,
    alphas: list[float],
    storage_options: dict[str, Any] | None = None,
    exclude: frozenset[str] = frozenset(),
) -> dict[int, Any]:
    """One `RidgeProbe` per layer on the stored input encodings (first row of each prompt) -> prompt score.

    Prompts in `exclude` (those the interventions run on) are left out of the fit.
    """
    from aligned_probing.encoding.store import ActivationStore
    from aligned_probing.probing import RidgeProbe

    store = ActivationStore.open(store_dir, storage_options=storage_options)
    index = store.index.reset_index(drop=True)
    first = ~index["prompt_id"].duplicated() & ~index["prompt_id"].astype(str).isin(exclude)
    target = index.loc[first, "prompt_id"].map(prompts.set_index("prompt_id")[f"prompt_{attribute}"])
    keep = first.to_numpy().copy()
    keep[first.to_numpy()] = target.notna().to_numpy()
    y = target.dropna().to_numpy(dtype=np.float64)
    return {
        layer: RidgeProbe(alphas=alphas).fit(store.layer(layer, "input", pooling)[keep], y)
        for layer in layers
    }


def _fit_last_token_probes(
    model: Any,
    prompts: pd.DataFrame,
    attribute: str,
    layers: list[int],
    template: int,
    alphas: list[float],
    exclude: frozenset[str] = frozenset(),
    batch_size: int = 16,
) -> dict[int, Any]:
    """One `RidgeProbe` per layer on the last prompt token's residual -> prompt score (not in `exclude`).

    The read-out of last-position patching: a probe on the position that was patched.
    """
    from aligned_probing.causal import encode_prompts
    from aligned_probing.data.templates import render_prompt
    from aligned_probing.probing import RidgeProbe

    col = f"prompt_{attribute}"
    use = prompts[~prompts["prompt_id"].astype(str).isin(exclude)].dropna(subset=[col])
    rendered = [render_prompt(model.tokenizer, t, template) for t in use["text"]]
    feats = encode_prompts(model, rendered, layers, pooling="last", batch_size=batch_size)
    y = use[col].to_numpy(dtype=np.float64)
    return {layer: RidgeProbe(alphas=alphas).fit(feats[layer], y) for layer in layers}


def _steering_layer(
    probe_dir: _fs.Resolved, attribute: str, n_layers: int, storage_options: dict[str, Any] | None = None
) -> int:
    """Layer of peak input-scenario information for `attribute` (the middle layer if unknown)."""
    from aligned_probing.probing import peak_layers, summarize

    path = _fs.child(probe_dir, "probing.parquet")
    if _fs.exists(path, storage_options):
        peak = peak_layers(summarize(_fs.read_parquet(path, storage_options), metrics=["pearson"]))
        row = peak[(peak["scenario"] == "input") & (peak["attribute"] == attribute)]
        if len(row):
            return int(row["layer"].iloc[0])
    return n_layers // 2


def causal_blocks(layers: list[int], block: int | None) -> list[list[int]]:
    """The intervention `layers` in consecutive blocks of `block` layers (None: one block)."""
    size = len(layers) if block is None else block
    return [layers[i : i + size] for i in range(0, len(layers), max(size, 1))]


# ------------------------------------------------------------------------------------- the tasks
class _Task:
    """What every causal task needs: locations and settings only (picklable, no arrays)."""

    def __init__(self, task: dict[str, Any]) -> None:
        self.task = task
        self.so: dict[str, Any] = task["storage_options"]
        self.settings: CausalSettings = settings_of(task["settings"], CausalSettings)
        self.c: CausalConfig = self.settings.causal
        self.out: _fs.Resolved = task["out_dir"]
        self.progress: bool = bool(task.get("show_progress", False))

    def path(self, *parts: str) -> _fs.Resolved:
        return _fs.child(self.out, *parts)

    def done(self, *parts: str) -> bool:
        return _fs.exists(self.path(*parts), self.so)

    def write(self, table: pd.DataFrame, *parts: str) -> None:
        _fs.write_parquet_atomic(table, self.path(*parts), self.so)

    def model(self) -> LoadedModel:
        model: LoadedModel = self.task["load_model"](self.settings.model.name)
        return model

    def prompts(self) -> pd.DataFrame:
        return read_prompts(self.task["prompts_dir"], self.so)

    def subset(self, prompts: pd.DataFrame, n: int | None = None) -> pd.DataFrame:
        """The prompts layer skipping runs on (`n` of them, default `n_prompts`): a stratified sample."""
        from aligned_probing.data import PromptSet

        return (
            PromptSet.from_frame(prompts)
            .sample(n or self.c.n_prompts, stratify_by=f"prompt_{self.c.attribute}", seed=self.c.seed)
            .df
        )

    def steering_subset(self, prompts: pd.DataFrame) -> pd.DataFrame:
        """The prompts the steering sweep runs on (`steering_n_prompts`, default `n_prompts`)."""
        return self.subset(prompts, self.c.steering_n_prompts)

    def steering_baseline_file(self) -> str:
        """The file of the steering sweep's unmodified continuations.

        Skipping's baseline when both run on the same prompts; otherwise the steering prompts get
        their own, generated in one call over exactly them, so the sweep equals one library call
        (batch composition moves logits by ~1e-6, see `aligned_probing.generation`).
        """
        own = self.c.steering_n_prompts not in (None, self.c.n_prompts)
        return STEERING_BASELINE_FILE if own else BASELINE_FILE

    def generation(self) -> GenerationSettings:
        from aligned_probing.causal import GenerationSettings

        g = self.settings.generation
        return GenerationSettings(
            k=self.c.k,
            seed=self.c.seed,
            max_new_tokens=self.c.max_new_tokens,
            temperature=g.temperature,
            top_p=g.top_p,
            template=self.settings.template,
            batch_size=g.batch_size,
        )

    def stats(self) -> StatSettings:
        from aligned_probing.causal import StatSettings

        return StatSettings(
            attribute=self.c.attribute,
            threshold=self.settings.threshold,
            n_resamples=self.settings.n_bootstrap,
            confidence_level=self.settings.confidence,
            seed=self.c.seed,
        )

    def held_out(self, prompts: pd.DataFrame) -> frozenset[str]:
        """Prompts the interventions run on (subset and pairs): never used to fit a probe."""
        ids = set(self.subset(prompts)["prompt_id"].astype(str))
        if self.c.steering:
            ids |= set(self.steering_subset(prompts)["prompt_id"].astype(str))
        if self.c.patching:
            pairs = self.pairs()
            ids |= set(pairs["toxic_prompt_id"].astype(str)) | set(pairs["nontoxic_prompt_id"].astype(str))
        return frozenset(ids)

    def probes(self, prompts: pd.DataFrame, layers: list[int]) -> dict[int, Any]:
        """Mean-pooled input probes from the store (the steering direction), held-out prompts excluded."""
        return _fit_probes(
            self.task["store_dir"],
            prompts,
            self.c.attribute,
            sorted(set(layers)),
            self.settings.pooling,
            self.settings.alphas,
            self.so,
            exclude=self.held_out(prompts),
        )

    def readout_probes(self, model: Any, prompts: pd.DataFrame, layers: list[int]) -> dict[int, Any]:
        """Last-token probes for the last-position patching read-out, held-out prompts excluded."""
        return _fit_last_token_probes(
            model,
            prompts,
            self.c.attribute,
            sorted(set(layers)),
            self.settings.template,
            self.settings.alphas,
            exclude=self.held_out(prompts),
            batch_size=self.settings.generation.batch_size,
        )

    def pairs(self) -> pd.DataFrame:
        """The patching pairs matched by `setup_task`."""
        return _fs.read_parquet(self.path(PAIRS_FILE), self.so)

    def continuations(self, name: str) -> pd.DataFrame:
        """Shared scored continuations (baseline, pairs' clean runs) as `generate_and_score` gave them."""
        table = _fs.read_parquet(self.path(name), self.so)
        table["token_ids"] = table["token_ids"].map(lambda ids: [int(i) for i in ids])  # Parquet: arrays
        return table


def setup_task(task: dict[str, Any]) -> dict[str, Any]:
    """Generate the shared baseline and match the patching pairs (one executor task; skips what exists).

    The baseline is generated once and read by every block, so all of them compare against the
    same continuations an unsplit run would have generated in memory.
    """
    from aligned_probing.causal import clean_pair_continuations, generate_and_score, match_pairs

    t = _Task(task)
    steer_base = t.steering_baseline_file()
    shared = t.c.layer_skipping or (t.c.steering and steer_base == BASELINE_FILE)
    need_base = shared and not t.done(BASELINE_FILE)
    need_steer_base = t.c.steering and steer_base != BASELINE_FILE and not t.done(steer_base)
    need_pairs = t.c.patching and not t.done(PAIRS_FILE)
    need_clean = t.c.patching and not t.done(PAIRS_CLEAN_FILE)
    if need_base or need_steer_base or need_pairs or need_clean:
        model, prompts = t.model(), t.prompts()
        if need_base:
            scorer = build_scorer(t.settings.scoring)
            subset, gen = t.subset(prompts), t.generation()
            t.write(generate_and_score(model, subset, scorer, gen, show_progress=t.progress), BASELINE_FILE)
        if need_steer_base:
            scorer = build_scorer(t.settings.scoring)
            subset, gen = t.steering_subset(prompts), t.generation()
            t.write(generate_and_score(model, subset, scorer, gen, show_progress=t.progress), steer_base)
        if need_pairs:
            pairs = match_pairs(
                prompts,
                model.tokenizer,
                attribute=t.c.attribute,
                threshold=t.settings.threshold,
                template=t.settings.template,
                max_pairs=max(1, t.c.n_prompts // 2),
                seed=t.c.seed,
            )
            t.write(pairs, PAIRS_FILE)
        if need_clean:  # the pairs' unpatched continuations, shared by every patching block
            pairs = t.pairs()
            scorer = build_scorer(t.settings.scoring)
            clean = clean_pair_continuations(model, pairs, scorer, t.generation(), show_progress=t.progress)
            t.write(clean, PAIRS_CLEAN_FILE)
    return {"n_pairs": len(_fs.read_parquet(t.path(PAIRS_FILE), t.so))} if t.c.patching else {}


def _part_name(kind: str, layers: list[int]) -> str:
    return f"{kind}-layers-{layers[0]:03d}-{layers[-1]:03d}.parquet"


def block_parts(c: CausalConfig, layers: list[int]) -> list[str]:
    """File names (under `blocks/`) a block of intervention `layers` writes, given the causal settings."""
    parts = []
    if c.layer_skipping and any(x >= 1 for x in layers):  # residual layer 0 has no block to skip
        parts.append(_part_name("skipping", layers))
    if c.patching:
        parts.append(_part_name("patching", layers))
    return parts


def block_task(task: dict[str, Any]) -> list[str]:
    """Layer skipping and patching at one block of layers (one executor task; skips finished parts).

    Returns:
        The names of the parts it computed (empty when the block was already complete).
    """
    from aligned_probing.causal import activation_patching, layer_skipping

    t = _Task(task)
    layers: list[int] = task["layers"]
    todo = [p for p in block_parts(t.c, layers) if not t.done("blocks", p)]
    if not todo:
        return []
    model, prompts = t.model(), t.prompts()
    scorer, gen, stat = build_scorer(t.settings.scoring), t.generation(), t.stats()
    for part in todo:
        if part.startswith("skipping"):
            blocks = [x - 1 for x in layers if x >= 1]  # skipping block b changes residual layer b + 1
            skip = layer_skipping(
                model,
                t.subset(prompts),
                scorer,
                blocks=blocks,
                generation=gen,
                stats=stat,
                baseline=t.continuations(BASELINE_FILE),
                show_progress=t.progress,
            )
            skip.insert(skip.columns.get_loc("block") + 1, "layer", skip["block"] + 1)
            t.write(skip, "blocks", part)
        else:
            # Read-outs at every intervention layer >= the patched one, as in one unsplit call.
            readout = [x for x in task["all_layers"] if x >= layers[0]]
            probes = t.readout_probes(model, prompts, readout)
            patch = activation_patching(
                model,
                t.pairs(),
                layers=layers,
                probes={x: probes[x] for x in readout},
                pooling="last",
                scorer=scorer,
                positions="last",
                generation=gen,
                stats=stat,
                clean_continuations=t.continuations(PAIRS_CLEAN_FILE),
                show_progress=t.progress,
            )
            t.write(patch, "blocks", part)
    return todo


def steering_task(task: dict[str, Any]) -> bool:
    """The steering sweep at the peak layer (one executor task); False when it was already written."""
    from aligned_probing.causal import steering_sweep

    t = _Task(task)
    if t.done("blocks", "steering.parquet"):
        return False
    model, prompts = t.model(), t.prompts()
    layer = task["steering_layer"]
    steer = steering_sweep(
        model,
        t.steering_subset(prompts),
        build_scorer(t.settings.scoring),
        t.probes(prompts, [layer])[layer].direction(),
        layer=layer,
        alphas=t.c.steering_alphas,
        units="norm",
        random_control=True,
        control_seed=t.c.seed,
        generation=t.generation(),
        stats=t.stats(),
        baseline=t.continuations(t.steering_baseline_file()),
        show_progress=t.progress,
    )
    t.write(steer, "blocks", "steering.parquet")
    return True


# ------------------------------------------------------------------------------------- the stage
def _sort_patching(table: pd.DataFrame) -> pd.DataFrame:
    """Blocks' patching rows in the order of one `activation_patching` call over all their layers."""
    readout = table["measure"] == "readout"
    parts = [
        table[readout].sort_values(_READOUT_ORDER, kind="stable"),
        table[~readout].sort_values(_BEHAVIOUR_ORDER, kind="stable"),
    ]
    return pd.concat(parts, ignore_index=True)


def run_causal(ctx: StageContext) -> dict[str, Any]:
    """Run the enabled causal experiments and write `layer_skipping`, `patching`, `steering` Parquet files."""
    from aligned_probing.encoding.store import ActivationStore

    c, so = settings_of(ctx.settings, CausalSettings).causal, ctx.storage_options
    store_dir = _fs.child(input_dir(ctx, "encode"), "store")
    # The store was encoded from this model: its depth is the model's, without loading the model here.
    n_layers = ActivationStore.open(store_dir, storage_options=so).n_layers
    layers = sorted({min(int(x), n_layers) for x in (c.layers or range(n_layers + 1))})
    steer_layer = _steering_layer(input_dir(ctx, "probe"), c.attribute, n_layers, so)
    base = {
        "settings": ctx.settings,
        "out_dir": ctx.out_dir,
        "prompts_dir": input_dir(ctx, "prompts"),
        "store_dir": store_dir,
        "probe_dir": input_dir(ctx, "probe"),
        "load_model": ctx.load_model,
        "storage_options": so,
        "all_layers": layers,
        "show_progress": ctx.progress,
    }
    resources = ctx.runtime.get("causal_resources")
    summary: dict[str, Any] = {"layers": layers, "steering_layer": steer_layer}
    _fs.makedirs(_fs.child(ctx.out_dir, "blocks"), so)
    blocks = [b for b in causal_blocks(layers, ctx.runtime.get("causal_layer_block")) if block_parts(c, b)]
    tasks: list[tuple[Any, dict[str, Any]]] = [(block_task, {**base, "layers": b}) for b in blocks]
    if c.steering:
        tasks.append((steering_task, {**base, "steering_layer": steer_layer}))
    logger.info("causal: %d block task(s) of layers %s, steering %s", len(blocks), blocks, c.steering)
    with _task_bar(ctx, 1 + len(tasks)) as bar:  # the setup task, then the blocks and steering
        [setup] = _map_tasks(ctx, setup_task, [base], resources, bar)
        summary.update(setup)
        _map_tasks(ctx, _dispatch, tasks, resources, bar)
    parts: dict[str, list[pd.DataFrame]] = {kind: [] for kind in OUTPUT_FILES}
    for b in blocks:
        for name in block_parts(c, b):
            parts[name.split("-")[0]].append(read_table(_fs.child(ctx.out_dir, "blocks"), name, so))
    if c.steering:
        parts["steering"].append(read_table(_fs.child(ctx.out_dir, "blocks"), "steering.parquet", so))
    for kind, frames in parts.items():
        if not frames:
            continue
        table = pd.concat(frames, ignore_index=True)
        if kind == "patching":
            table = _sort_patching(table)
        write_table(table, ctx.out_dir, OUTPUT_FILES[kind], so)
    return summary


def _task_bar(ctx: StageContext, total: int) -> Any:
    """The stage's "causal" bar over its tasks (tqdm; disabled without `ctx.progress`)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="causal", unit="task", disable=not ctx.progress)


def _map_tasks(ctx: StageContext, fn: Any, tasks: list[Any], resources: Any, bar: Any) -> list[Any]:
    """`ctx.executor.map(fn, tasks)`, advancing `bar` per task.

    The local executor runs tasks one after another anyway, so handing it one task at a time
    changes nothing but the bar, which then moves as each task ends; another executor gets all
    tasks at once (its stages run without bars).
    """
    if not isinstance(ctx.executor, LocalExecutor):
        out = ctx.executor.map(fn, tasks, resources=resources)
        bar.update(len(tasks))
        return out
    out = []
    for task, need in zip(tasks, per_task(resources, len(tasks)), strict=True):
        out.extend(ctx.executor.map(fn, [task], resources=need))
        bar.update()
    return out


def _dispatch(item: tuple[Any, dict[str, Any]]) -> Any:
    """Run one (task function, task) pair: lets one executor map mix block and steering tasks."""
    func, task = item
    return func(task)
