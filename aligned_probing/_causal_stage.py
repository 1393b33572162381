"""The pipeline's causal stage: layer skipping, activation patching and steering on one model.

Probes for the patching read-out and the steering direction are ridge probes on the stored input
encodings (prompt score targets, one row per prompt), refitted here on every prompt: the probing
stage's probes are cross-validated fold models, and we want one probe per layer. Steering acts at
the layer where input information peaks in the probing stage's results.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aligned_probing._runner import StageContext
from aligned_probing._stages import _scorer, input_dir, read_prompts

logger = logging.getLogger("aligned_probing.pipeline")


def _fit_probes(
    store_dir: Path,
    prompts: pd.DataFrame,
    attribute: str,
    layers: list[int],
    pooling: str,
    alphas: list[float],
) -> dict[int, Any]:
    """One `RidgeProbe` per layer on the input encodings (first row of each prompt) -> prompt score."""
    from aligned_probing.probing import RidgeProbe
    from aligned_probing.store import ActivationStore

    store = ActivationStore.open(store_dir)
    index = store.index.reset_index(drop=True)
    first = ~index["prompt_id"].duplicated()
    target = index.loc[first, "prompt_id"].map(prompts.set_index("prompt_id")[f"prompt_{attribute}"])
    keep = first.to_numpy().copy()
    keep[first.to_numpy()] = target.notna().to_numpy()
    y = target.dropna().to_numpy(dtype=np.float64)
    return {
        layer: RidgeProbe(alphas=alphas).fit(store.layer(layer, "input", pooling)[keep], y)
        for layer in layers
    }


def _steering_layer(probe_dir: Path, attribute: str, n_layers: int) -> int:
    """Layer of peak input-scenario information for `attribute` (the middle layer if unknown)."""
    from aligned_probing.probing import peak_layers, summarize

    path = probe_dir / "probing.parquet"
    if path.is_file():
        peak = peak_layers(summarize(pd.read_parquet(path), metrics=["pearson"]))
        row = peak[(peak["scenario"] == "input") & (peak["attribute"] == attribute)]
        if len(row):
            return int(row["layer"].iloc[0])
    return n_layers // 2


def run_causal(ctx: StageContext) -> dict[str, Any]:
    """Run the enabled causal experiments and write `layer_skipping`, `patching`, `steering` Parquet files."""
    from aligned_probing.causal import (
        GenerationSettings,
        StatSettings,
        activation_patching,
        generate_and_score,
        layer_skipping,
        match_pairs,
        steering_sweep,
    )
    from aligned_probing.data import PromptSet

    c, g, t = ctx.settings["causal"], ctx.settings["generation"], ctx.settings["template"]
    model = ctx.load_model(ctx.settings["model"]["name"])
    prompts = read_prompts(input_dir(ctx, "prompts"))
    scorer = _scorer(ctx.settings["scoring"])
    sub = (
        PromptSet.from_frame(prompts)
        .sample(c["n_prompts"], stratify_by=f"prompt_{c['attribute']}", seed=c["seed"])
        .df
    )
    gen = GenerationSettings(
        k=c["k"],
        seed=c["seed"],
        max_new_tokens=c["max_new_tokens"],
        temperature=g["temperature"],
        top_p=g["top_p"],
        template=t,
        batch_size=g["batch_size"],
    )
    stat = StatSettings(
        attribute=c["attribute"],
        threshold=ctx.settings["threshold"],
        n_resamples=ctx.settings["n_bootstrap"],
        seed=c["seed"],
    )
    layers = sorted({min(int(x), model.n_layers) for x in (c["layers"] or range(model.n_layers + 1))})
    steer_layer = _steering_layer(input_dir(ctx, "probe"), c["attribute"], model.n_layers)
    probes = _fit_probes(
        input_dir(ctx, "encode") / "store",
        prompts,
        c["attribute"],
        sorted(set(layers) | {steer_layer}),
        ctx.settings["pooling"],
        ctx.settings["alphas"],
    )
    baseline = generate_and_score(model, sub, scorer, gen)
    summary: dict[str, Any] = {"layers": layers, "steering_layer": steer_layer}
    if c["layer_skipping"]:
        blocks = [x - 1 for x in layers if x >= 1]  # skipping block b changes residual layer b + 1
        skip = layer_skipping(
            model, sub, scorer, blocks=blocks, generation=gen, stats=stat, baseline=baseline
        )
        skip.insert(skip.columns.get_loc("block") + 1, "layer", skip["block"] + 1)
        skip.to_parquet(ctx.out_dir / "layer_skipping.parquet", index=False)
    if c["patching"]:
        pairs = match_pairs(
            prompts,
            model.tokenizer,
            attribute=c["attribute"],
            threshold=stat.threshold,
            template=t,
            max_pairs=max(1, c["n_prompts"] // 2),
            seed=c["seed"],
        )
        patch = activation_patching(
            model,
            pairs,
            layers=layers,
            probes={x: probes[x] for x in layers},
            pooling=ctx.settings["pooling"],
            scorer=scorer,
            positions="last",
            generation=gen,
            stats=stat,
        )
        patch.to_parquet(ctx.out_dir / "patching.parquet", index=False)
        summary["n_pairs"] = len(pairs)
    if c["steering"]:
        steer = steering_sweep(
            model,
            sub,
            scorer,
            probes[steer_layer].direction(),
            layer=steer_layer,
            alphas=c["steering_alphas"],
            generation=gen,
            stats=stat,
            baseline=baseline,
        )
        steer.to_parquet(ctx.out_dir / "steering.parquet", index=False)
    return summary
