"""Real run of the causal experiments on the embedded SmolLM2-135M-Instruct with the embedded prompts.

Writes Parquet tables to data/causal/ (baseline behaviour, probes, layer skipping,
steering, activation patching) plus run.json (settings, timings, machine). Every setting is a
command-line option, so the run can be sized to the machine; the defaults are what docs/causal.md
reports. Steps:

1. Score all embedded prompts with the embedded scorer (one scale), draw a probe set and a disjoint
   behaviour set stratified by prompt toxicity.
2. Fit one `RidgeProbe` per layer on the probe set (mean-pooled prompt encodings -> prompt
   toxicity, the "input" scenario); record 5-fold CV Pearson r per layer.
3. Baseline continuations of the behaviour set, then layer skipping and steering against them
   (paired: the same per-row seeds), then patching on exact-length toxic/non-toxic pairs.

Usage: .venv/bin/python scripts/causal_real_run.py [--n-prompts 200 --k 3 ...]
The reported run (the defaults) was split over two processes, one per core, that draw the same
probe and behaviour sets (same seed) and so write identical probes and baseline tables:
    scripts/causal_real_run.py --skip steering,patching --tag _skipping --out DIR_A
    scripts/causal_real_run.py --skip skipping --tag _steer_patch --out DIR_B
then DIR_A/skipping.parquet and both run*.json files were copied next to DIR_B's tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import machine_info  # noqa: E402

OUT = ROOT / "data" / "causal"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (every run setting)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-prompts", type=int, default=200, help="behaviour prompts (skipping, steering)")
    p.add_argument("--probe-prompts", type=int, default=300, help="prompts to fit the probes on")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--blocks", type=_ints, default=_ints("0,3,7,10,14,18,22,26,29"))
    p.add_argument(
        "--alphas",
        type=_floats,
        default=_floats("-1,-0.5,-0.25,0.25,0.5,1"),
        help="steering steps in units of the layer's median residual norm",
    )
    p.add_argument("--steer-layer", type=int, default=-1, help="-1: the layer with the best probe CV r")
    p.add_argument("--operator", default="add", help="steering operator: add, ablate, ablate_then_add")
    p.add_argument("--n-pairs", type=int, default=40)
    p.add_argument("--patch-layers", type=_ints, default=_ints("0,3,6,9,12,15,18,21,24,27,30"))
    p.add_argument("--generate-layers", type=_ints, default=_ints("3,12"))
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--n-resamples", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="steps to skip, e.g. baseline,skipping,steering,patching")
    p.add_argument("--out", type=Path, default=OUT, help="output directory")
    p.add_argument("--tag", default="", help="suffix of run{tag}.json (for runs split over processes)")
    return p.parse_args(argv)


def _log(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)


def _encode(model, texts: list[str], layers: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean- and last-pooled prompt encodings [n_layers, n, d] and the median residual norm per layer."""
    from aligned_probing.causal import record_residuals
    from aligned_probing.data.templates import render_prompt

    feats = np.zeros((len(layers), len(texts), model.d_model), dtype=np.float32)
    last = np.zeros_like(feats)
    norms: list[np.ndarray] = []
    for i, text in enumerate(texts):
        r = render_prompt(model.tokenizer, text, 0)
        res = record_residuals(model, torch.tensor([r.input_ids]), layers)
        for j, layer in enumerate(layers):
            span = res[layer][0, r.prompt_start : r.prompt_end]
            feats[j, i] = span.mean(0).numpy()
            last[j, i] = span[-1].numpy()
        norms.append(np.stack([res[layer][0].norm(dim=-1).numpy() for layer in layers]))
    return feats, last, np.median(np.concatenate(norms, axis=1), axis=1)


def _fit_probes(feats: np.ndarray, y: np.ndarray, layers: list[int], seed: int):
    from sklearn.model_selection import KFold

    from aligned_probing.probing.ridge import RidgeProbe

    probes, rows = {}, []
    folds = list(KFold(5, shuffle=True, random_state=seed).split(y))
    for j, layer in enumerate(layers):
        pred = np.zeros_like(y)
        for train, test in folds:
            pred[test] = RidgeProbe().fit(feats[j, train], y[train]).predict(feats[j, test])
        probe = RidgeProbe().fit(feats[j], y)
        probes[layer] = probe
        rows.append({"layer": layer, "cv_pearson": float(np.corrcoef(pred, y)[0, 1]), "alpha": probe.alpha_})
    return probes, pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    """Run every step and write the Parquet tables and run.json."""
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    from aligned_probing.behaviour import behaviour_metrics
    from aligned_probing.causal import (
        GenerationSettings,
        StatSettings,
        activation_patching,
        generate_and_score,
        layer_skipping,
        match_pairs,
        steering_sweep,
    )
    from aligned_probing.data import embedded_prompts
    from aligned_probing.models import load_model
    from aligned_probing.scoring import get_scorer

    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    timings: dict[str, float] = {}
    model = load_model("smollm2-135m-instruct")
    scorer = get_scorer("embedded")
    prompts = embedded_prompts().score(scorer, overwrite=True)
    _log(f"loaded model, scorer and {len(prompts)} prompts", t0)

    probe_set = prompts.sample(args.probe_prompts, seed=args.seed)
    rest = prompts.df[~prompts.df.prompt_id.isin(probe_set.df.prompt_id)].reset_index(drop=True)
    from aligned_probing.data import PromptSet

    rest_set = PromptSet(df=rest, dropped={})
    beh_set = rest_set.sample(args.n_prompts, seed=args.seed)
    gen = GenerationSettings(
        k=args.k, seed=args.seed, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
    )
    stat = StatSettings(n_resamples=args.n_resamples, seed=args.seed)

    t = time.time()
    layers = list(range(model.n_layers + 1))
    feats, last, norms = _encode(model, probe_set.df.text.tolist(), layers)
    y = probe_set.df.prompt_toxicity.to_numpy()
    probes, probe_table = _fit_probes(feats, y, layers, args.seed)
    last_probes, last_table = _fit_probes(last, y, layers, args.seed)
    probe_table["median_resid_norm"] = norms
    probe_table = pd.concat(
        [probe_table.assign(pooling="mean"), last_table.assign(pooling="last")], ignore_index=True
    )
    probe_table.to_parquet(out_dir / "probes.parquet")
    timings["probes"] = time.time() - t
    _log(
        f"probes: best CV r {probe_table.cv_pearson.max():.3f} at layer "
        f"{int(probe_table.loc[probe_table.cv_pearson.idxmax(), 'layer'])}",
        t0,
    )

    if "baseline" in skip:  # skipping and steering compare against the baseline
        skip |= {"skipping", "steering"}
    else:
        t = time.time()
        base = generate_and_score(model, beh_set.df, scorer, gen)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            behaviour = behaviour_metrics(
                base, beh_set.df, attributes=["toxicity"], n_resamples=args.n_resamples
            )
        behaviour.to_parquet(out_dir / "baseline_behaviour.parquet")
        base.drop(columns=["token_ids"]).to_parquet(out_dir / "baseline_continuations.parquet")
        timings["baseline"] = time.time() - t
        overall = behaviour[behaviour.subset == "all"][["metric", "value", "ci_low", "ci_high"]]
        _log("baseline behaviour\n" + overall.round(3).to_string(), t0)

    if "skipping" not in skip:
        t = time.time()
        skipping = layer_skipping(
            model, beh_set.df, scorer, blocks=args.blocks, generation=gen, stats=stat, baseline=base
        )
        skipping.to_parquet(out_dir / "skipping.parquet")
        timings["skipping"] = time.time() - t
        _log("skipping done\n" + skipping.query("metric == 'emt'").round(3).to_string(), t0)

    if "steering" not in skip:
        t = time.time()
        usable = probe_table[(probe_table.layer >= 1) & (probe_table.pooling == "mean")]
        layer = (
            args.steer_layer
            if args.steer_layer >= 0
            else int(usable.loc[usable.cv_pearson.idxmax(), "layer"])
        )
        # alphas in units of the layer's median residual norm over the behaviour prompts' tokens,
        # each also run along a seeded random direction (same norm): the probe_vs_random rows
        steer = steering_sweep(
            model,
            beh_set.df,
            scorer,
            probes[layer].direction(),
            layer=layer,
            alphas=args.alphas,
            units="norm",
            operator=args.operator,
            control_seed=args.seed,
            generation=gen,
            stats=stat,
            baseline=base,
        )
        steer.to_parquet(out_dir / "steering.parquet")
        timings["steering"] = time.time() - t
        scale = float(steer.residual_norm.iloc[0])
        _log(f"steering at layer {layer} (median norm {scale:.1f}) done\n" + steer.round(3).to_string(), t0)

    if "patching" not in skip:
        t = time.time()
        pool = PromptSet(df=rest[~rest.prompt_id.isin(beh_set.df.prompt_id)], dropped={})
        # Last-position patching between length-matched pairs, read out by last-token probes fitted
        # on the disjoint probe set: with template 0 there are no template tokens, so patching every
        # prompt position would replace the whole residual stream and make every read-out trivially
        # equal to the source's. Same-class controls and fluency come with every layer.
        pairs = match_pairs(pool.df, model.tokenizer, max_pairs=args.n_pairs, seed=args.seed)
        pairs.to_parquet(out_dir / "patching_pairs.parquet")
        patch = activation_patching(
            model,
            pairs,
            layers=args.patch_layers,
            probes={x: last_probes[x] for x in args.patch_layers},
            pooling="last",
            scorer=scorer,
            generate_layers=args.generate_layers,
            positions="last",
            generation=gen,
            stats=stat,
        )
        patch.to_parquet(out_dir / "patching.parquet")
        timings["patching"] = time.time() - t
        _log(
            "patching done\n"
            + patch[patch.readout_layer.isna() | (patch.readout_layer == 30)].round(3).to_string(),
            t0,
        )

    info = {
        "settings": vars(args),
        "timings_s": timings,
        "total_s": time.time() - t0,
        "model": model.describe(),
        "scorer": getattr(scorer, "id", None),
        "machine": machine_info(),
    }
    (out_dir / f"run{args.tag}.json").write_text(json.dumps(info, indent=2, default=str))
    _log("saved to " + str(out_dir), t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
