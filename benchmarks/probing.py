"""Benchmark the probing engine: full sweep wall time, and RidgeProbe against the paper's reference probe.

Activations shaped like the embedded SmolLM2's (31 residual layers x 2000 samples x 576), read from a real
`ActivationStore` with `--store DIR --targets FILE.parquet`, or synthetic with a planted signal (default).

1. Full sweep: all layers x 6 attributes x 4 scenarios x 4 folds x 5 seeds, with control tasks.
2. For one (layer, attribute, scenario=input), 4 prompt-grouped folds: the reference-style probe of the
   original paper (Dropout 0.2 + Linear, Huber loss, Adam lr 1e-3, batch 16, up to 20 epochs, early
   stopping on a dev split; implemented here only) against `RidgeProbe`: time and test Pearson.

3. `--backend torch` runs both with the torch backend (float64; batched over layers in the sweep; on a GPU
   when one is visible), to compare with the numpy default.

Usage: .venv/bin/python -m benchmarks.probing [--layers 31] [--seeds 5] [--threads N] [--backend torch]
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import numpy as np
import pandas as pd
import torch
from scipy.special import expit
from threadpoolctl import threadpool_limits

from aligned_probing.probing import RidgeProbe, run_probing, summarize
from aligned_probing.probing.splits import prompt_folds
from benchmarks._common import Timer, save_results

ATTRIBUTES = ["toxicity", "severe_toxicity", "profanity", "insult", "threat", "identity_attack"]


class MemoryStore:
    """In-memory ActivationStore stand-in (same duck type as `run_probing` needs)."""

    def __init__(self, arrays: dict[tuple[str, str], np.ndarray], index: pd.DataFrame):
        self.arrays, self.index = arrays, index
        self.n_layers = next(iter(arrays.values())).shape[0] - 1
        self.model_name, self.template = "synthetic-smollm2-shape", 0
        self.positions, self.poolings = ("input", "output"), ("mean",)

    def layer(self, layer: int, position: str = "input", pooling: str = "mean") -> np.ndarray:
        return self.arrays[(position, pooling)][layer]


def synthetic(
    n_layers: int = 30, n: int = 2000, d: int = 576, seed: int = 0
) -> tuple[MemoryStore, pd.DataFrame]:
    """Planted signal: 6 correlated attribute latents, linearly encoded with a layer profile peaking near
    layer 5, in anisotropic residual-like noise (a few high-variance dimensions); one continuation per prompt.
    """
    rng = np.random.default_rng(seed)
    mix = np.eye(6) * 0.6 + 0.4  # correlated attributes, as in Perspective scores
    zp = rng.normal(size=(n, 6)) @ mix / 1.5  # prompt latents
    zc = 0.5 * zp + rng.normal(size=(n, 6)) @ mix / 1.5  # continuation latents
    scale = np.exp(rng.normal(size=d))  # anisotropic dimensions
    scale[rng.choice(d, 5, replace=False)] *= 30  # "massive activation" dimensions
    depth = np.arange(n_layers + 1)
    profile = 0.3 + 1.2 * np.exp(-0.5 * ((depth - 5) / 4.0) ** 2)
    arrays = {}
    for position, z in (("input", zp), ("output", zc)):
        a = np.empty((n_layers + 1, n, d), np.float32)
        for layer in range(n_layers + 1):
            W = rng.normal(size=(6, d)) / np.sqrt(6)
            a[layer] = (profile[layer] * z @ W + rng.normal(size=(n, d)) * 2.0) * scale
        arrays[(position, "mean")] = a
    index = pd.DataFrame({"prompt_id": [f"p{i:05d}" for i in range(n)], "continuation_idx": 0})
    targets = index.copy()
    for j, a in enumerate(ATTRIBUTES):
        targets[f"prompt_{a}"] = expit(zp[:, j] + 0.3 * rng.normal(size=n) - 1.0)
        targets[a] = expit(zc[:, j] + 0.3 * rng.normal(size=n) - 1.0)
    return MemoryStore(arrays, index), targets


def reference_probe(
    X_tr, y_tr, X_te, seed: int, epochs: int = 20, patience: int = 3
) -> tuple[np.ndarray, int]:
    """The paper's probe: Dropout(0.2) + Linear, Huber loss, Adam(lr 1e-3), batch 16, early stopping on a
    10% dev split of the training part (patience 3, best weights restored). Labels min-max scaled on the
    training part only (the reference scaled on all data, leaking the test labels)."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = y_tr.min(), y_tr.max()
    y = (y_tr - lo) / (hi - lo)
    perm = torch.randperm(len(y), generator=gen).numpy()
    n_dev = len(y) // 10
    dev, tr = perm[:n_dev], perm[n_dev:]
    Xt, yt = torch.tensor(X_tr, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    torch.manual_seed(seed)  # benchmark only: parameter init of the reference model
    model = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(X_tr.shape[1], 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.HuberLoss()
    best, best_state, bad, epoch = np.inf, None, 0, 0
    for epoch in range(1, epochs + 1):  # noqa: B007
        model.train()
        order = tr[torch.randperm(len(tr), generator=gen).numpy()]
        for start in range(0, len(order), 16):
            b = order[start : start + 16]
            opt.zero_grad()
            loss_fn(model(Xt[b]).squeeze(-1), yt[b]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            dev_loss = loss_fn(model(Xt[dev]).squeeze(-1), yt[dev]).item()
        if dev_loss < best - 1e-6:
            best, best_state, bad = dev_loss, copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
            if bad >= patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        pred = model(torch.tensor(X_te, dtype=torch.float32)).squeeze(-1).numpy()
    return pred * (hi - lo) + lo, epoch


def compare_reference(
    store,
    targets,
    layer: int,
    attribute: str,
    n_folds: int = 4,
    seed: int = 0,
    standardised_reference=False,
    backend: str = "numpy",
) -> dict:
    X = store.layer(layer, "input").astype(np.float64)
    y = targets[f"prompt_{attribute}"].to_numpy()
    folds = prompt_folds(len(y), n_folds, seed)  # one row per prompt here
    out = {
        "ours_s": 0.0,
        "reference_s": 0.0,
        "ours_cpu_s": 0.0,
        "reference_cpu_s": 0.0,
        "ours_pearson": [],
        "reference_pearson": [],
        "reference_epochs": [],
    }
    for fold in range(n_folds):
        tr, te = folds != fold, folds == fold
        cpu0 = time.process_time()
        with Timer() as t:
            pred = RidgeProbe(backend=backend).fit(X[tr], y[tr]).predict(X[te])
        out["ours_s"] += t.seconds
        out["ours_cpu_s"] += time.process_time() - cpu0
        out["ours_pearson"].append(np.corrcoef(pred, y[te])[0, 1])
        cpu0 = time.process_time()
        with Timer() as t:
            pred, epochs = reference_probe(X[tr], y[tr], X[te], seed=fold)
        out["reference_s"] += t.seconds
        out["reference_cpu_s"] += time.process_time() - cpu0
        out["reference_pearson"].append(np.corrcoef(pred, y[te])[0, 1])
        out["reference_epochs"].append(epochs)
        if standardised_reference:  # the reference probe on features standardised on the training part
            mu, sd = X[tr].mean(axis=0), X[tr].std(axis=0) + 1e-12
            pred, _ = reference_probe((X[tr] - mu) / sd, y[tr], (X[te] - mu) / sd, seed=fold)
            out.setdefault("reference_standardised_pearson", []).append(np.corrcoef(pred, y[te])[0, 1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", help="ActivationStore directory (real activations)")
    parser.add_argument("--targets", help="Parquet targets table for --store")
    parser.add_argument("--layers", type=int, default=None, help="probe only the first N layers (quick runs)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--compare-only",
        type=int,
        default=None,
        metavar="LAYER",
        help="skip the sweep; compare with the reference probe (raw and standardised inputs) at LAYER",
    )
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads (default: library default)")
    parser.add_argument("--backend", choices=("numpy", "torch"), default="numpy", help="RidgeProbe backend")
    parser.add_argument("--name", default=None, help="result file name (default: probing[_BACKEND])")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # the reference probe gets the same threads as our BLAS

    if args.store:
        from aligned_probing.encoding.store import ActivationStore

        store, targets, source = ActivationStore.open(args.store), pd.read_parquet(args.targets), "store"
    else:
        with Timer() as t:
            store, targets = synthetic()
        print(f"synthetic data: {t.seconds:.1f} s")
        source = "synthetic"
    attributes = [a for a in ATTRIBUTES if a in targets.columns]
    if args.compare_only is not None:
        with threadpool_limits(limits=args.threads):
            ref = compare_reference(
                store,
                targets,
                args.compare_only,
                "toxicity",
                standardised_reference=True,
                backend=args.backend,
            )
        headline = {
            "layer": args.compare_only,
            **{k: float(np.mean(v)) for k, v in ref.items() if k.endswith("pearson")},
            "reference_cpu_s_per_probe": ref["reference_cpu_s"] / 4,
            "ours_cpu_s_per_probe": ref["ours_cpu_s"] / 4,
            "reference_wall_s_per_probe": ref["reference_s"] / 4,
            "ours_wall_s_per_probe": ref["ours_s"] / 4,
            "speed_ratio_single_probe_wall": ref["reference_s"] / ref["ours_s"],
            "speed_ratio_single_probe_cpu": ref["reference_cpu_s"] / ref["ours_cpu_s"],
            "speed_ratio_target": 50,
            "backend": args.backend,
        }
        name = "probing_reference" if args.backend == "numpy" else f"probing_reference_{args.backend}"
        save_results(name, headline, {"reference": ref, "threads": args.threads})
        return
    layers = list(range(store.n_layers + 1 if args.layers is None else args.layers))
    seeds = tuple(range(args.seeds))

    cpu0 = time.process_time()
    with threadpool_limits(limits=args.threads), Timer() as sweep_t:
        df = run_probing(
            store,
            targets,
            attributes=attributes,
            seeds=seeds,
            layers=layers,
            control=True,
            backend=args.backend,
        )
    sweep_cpu = time.process_time() - cpu0  # CPU seconds: less sensitive than wall time to other users' load
    n_fits = len(layers) * 2 * len(seeds) * 4  # (layer, position, seed, fold)
    n_probes = len(df)  # real probes; each also has a control probe
    summary = summarize(df)
    peaks = summary[(summary.metric == "pearson") & summary.is_peak]
    print(f"sweep: {sweep_t.seconds:.1f} s for {n_probes} probes (+{n_probes} controls) in {n_fits} fits")

    peak_layer = int(peaks.query("scenario == 'input' and attribute == 'toxicity'").layer.iloc[0])
    with threadpool_limits(limits=args.threads):
        ref = compare_reference(store, targets, peak_layer, "toxicity", backend=args.backend)
    ref_per_probe = ref["reference_s"] / 4
    ours_per_probe = ref["ours_s"] / 4
    amortised = sweep_t.seconds / (2 * n_probes)  # real + control probes delivered by the sweep
    headline = {
        "source": source,
        "backend": args.backend,
        "shape": [store.n_layers + 1, len(store.index), int(store.layer(0, "input").shape[1])],
        "layers_probed": len(layers),
        "sweep_wall_s": round(sweep_t.seconds, 2),
        "sweep_cpu_s": round(sweep_cpu, 2),
        "sweep_probes": n_probes,
        "sweep_control_probes": n_probes,
        "sweep_fits": n_fits,
        "amortised_s_per_probe": amortised,
        "reference_s_per_probe": ref_per_probe,
        "speed_ratio_sweep": ref_per_probe / amortised,
        "speed_ratio_single_probe": ref_per_probe / ours_per_probe,
        "speed_ratio_sweep_cpu": (ref["reference_cpu_s"] / 4) / (sweep_cpu / (2 * n_probes)),
        "speed_ratio_single_probe_cpu": ref["reference_cpu_s"] / ref["ours_cpu_s"],
        "speed_ratio_target": 50,
        "reference_full_sweep_estimate_s": ref_per_probe * 2 * n_probes,
        "comparison_layer": peak_layer,
        "ours_test_pearson": float(np.mean(ref["ours_pearson"])),
        "reference_test_pearson": float(np.mean(ref["reference_pearson"])),
        "pearson_diff_ours_minus_reference": float(
            np.mean(ref["ours_pearson"]) - np.mean(ref["reference_pearson"])
        ),
    }
    detail = {
        "reference": {k: v for k, v in ref.items()},
        "threads": args.threads,
        "load_average_at_end": os.getloadavg(),  # the 2 cores are shared: high load inflates all timings
        "peak_layers_input": peaks.query("scenario == 'input'")[["attribute", "layer", "mean"]].to_dict(
            "records"
        ),
        "mean_pearson_by_scenario": df.groupby("scenario").pearson.mean().to_dict(),
        "mean_control_pearson": float(df.control_pearson.mean()),
    }
    name = args.name or ("probing" if args.backend == "numpy" else f"probing_{args.backend}")
    save_results(name, headline, detail)


if __name__ == "__main__":
    main()
