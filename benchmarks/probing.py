"""Benchmark the probing engine: full sweep wall time, and RidgeProbe against the paper's reference probe.

Activations shaped like the embedded SmolLM2's (31 residual layers x 2000 samples x 576), read from a real
`ActivationStore` with `--store DIR --targets FILE.parquet`, or synthetic with a planted signal (default).

1. Full sweep: all layers x 6 attributes x 4 scenarios x 4 folds x 5 seeds, with control tasks.
2. For one (layer, attribute, scenario=input), 4 prompt-grouped folds: the reference-style probe of the
   original paper (Dropout 0.2 + Linear, Huber loss, Adam lr 1e-3, batch 16, up to 20 epochs, early
   stopping on a dev split; implemented here only) against `RidgeProbe`: time and test Pearson.

3. `--backend torch` runs both with the torch backend (float64; batched over layers in the sweep; on a GPU
   when one is visible), to compare with the numpy default.

Speed ratios are measured in one run: after a warm-up, `--repeats` repetitions alternate the two probes
(order swapped every repetition); the headline is the median ratio with its min-max spread, and the
1-minute load average is recorded (the machine may be shared). `fit_breakdown` times the steps of one fit
(Gram, eigendecomposition, projection): their sum is the floor of the closed-form leave-one-out fit.

Usage: .venv/bin/python -m benchmarks.probing [--layers 31] [--seeds 5] [--threads N] [--backend torch]
       [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import numpy as np
import pandas as pd
import scipy.linalg
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
    repeats: int = 1,
) -> dict:
    """Time `RidgeProbe` and the reference probe on the same folds, alternating, `repeats` times.

    One warm-up pass (both probes, every fold) is run and discarded; then each repetition times all folds
    of ours and all folds of the reference, the order of the two contenders swapped every repetition, so
    that both see the same background load. `ours_s` / `reference_s` are the medians over repetitions
    of the summed fold times; `ratio_per_repeat` holds reference / ours per repetition.
    """
    X = store.layer(layer, "input").astype(np.float64)
    y = targets[f"prompt_{attribute}"].to_numpy()
    folds = prompt_folds(len(y), n_folds, seed)  # one row per prompt here
    splits = [(folds != fold, folds == fold) for fold in range(n_folds)]

    def ours() -> tuple[float, float, list[float]]:
        wall, cpu, r = 0.0, 0.0, []
        for tr, te in splits:
            cpu0 = time.process_time()
            with Timer() as t:
                pred = RidgeProbe(backend=backend).fit(X[tr], y[tr]).predict(X[te])
            wall, cpu = wall + t.seconds, cpu + time.process_time() - cpu0
            r.append(np.corrcoef(pred, y[te])[0, 1])
        return wall, cpu, r

    def reference() -> tuple[float, float, list[float], list[int]]:
        wall, cpu, r, ep = 0.0, 0.0, [], []
        for fold, (tr, te) in enumerate(splits):
            cpu0 = time.process_time()
            with Timer() as t:
                pred, epochs = reference_probe(X[tr], y[tr], X[te], seed=fold)
            wall, cpu = wall + t.seconds, cpu + time.process_time() - cpu0
            r.append(np.corrcoef(pred, y[te])[0, 1])
            ep.append(epochs)
        return wall, cpu, r, ep

    ours(), reference()  # warm-up, discarded
    runs: dict[str, list[float]] = {k: [] for k in ("ours_s", "ours_cpu_s", "reference_s", "reference_cpu_s")}
    for rep in range(repeats):
        if rep % 2 == 0:
            o, ref = ours(), reference()
        else:
            ref, o = reference(), ours()
        runs["ours_s"].append(o[0])
        runs["ours_cpu_s"].append(o[1])
        runs["reference_s"].append(ref[0])
        runs["reference_cpu_s"].append(ref[1])
    ratio = np.array(runs["reference_s"]) / np.array(runs["ours_s"])
    ratio_cpu = np.array(runs["reference_cpu_s"]) / np.array(runs["ours_cpu_s"])
    out = {
        **{k: float(np.median(v)) for k, v in runs.items()},
        "repeats": repeats,
        **{f"{k}_per_repeat": v for k, v in runs.items()},
        "ratio_per_repeat": ratio.tolist(),
        "ratio_median": float(np.median(ratio)),
        "ratio_min": float(ratio.min()),
        "ratio_max": float(ratio.max()),
        "ratio_cpu_median": float(np.median(ratio_cpu)),
        "ratio_cpu_min": float(ratio_cpu.min()),
        "ratio_cpu_max": float(ratio_cpu.max()),
        "ours_pearson": o[2],
        "reference_pearson": ref[2],
        "reference_epochs": ref[3],
    }
    if standardised_reference:  # the reference probe on features standardised on the training part
        for fold, (tr, te) in enumerate(splits):
            mu, sd = X[tr].mean(axis=0), X[tr].std(axis=0) + 1e-12
            pred, _ = reference_probe((X[tr] - mu) / sd, y[tr], (X[te] - mu) / sd, seed=fold)
            out.setdefault("reference_standardised_pearson", []).append(np.corrcoef(pred, y[te])[0, 1])
    return out


def fit_breakdown(X: np.ndarray, y: np.ndarray, repeats: int = 7) -> dict:
    """Median seconds of the steps of one numpy `RidgeProbe` fit on `X` (the training rows of one fold).

    The steps are the ones `_gcv._thin_svd` runs (Gram `syrk`, `dsyevd`, projection `X W`), timed
    separately; `rest_s` is the full fit minus them (validation, standardisation, LOO errors for all
    alphas, coefficients). Gram + eigh + projection is the floor of this algorithm: exact leave-one-out
    errors need every row's projection on every eigenvector (the hat-matrix diagonal for every alpha).
    """
    Xc = X - X.mean(axis=0)
    inv = 1.0 / X.std(axis=0)
    steps: dict[str, list[float]] = {k: [] for k in ("fit_s", "gram_s", "eigh_s", "projection_s")}
    RidgeProbe().fit(X, y)  # warm-up
    for _ in range(repeats):
        with Timer() as t:
            RidgeProbe().fit(X, y)
        steps["fit_s"].append(t.seconds)
        with Timer() as t:
            G = Xc.T @ Xc
        steps["gram_s"].append(t.seconds)
        G *= inv[:, None] * inv[None, :]
        with Timer() as t:
            evals, V = scipy.linalg.eigh(G, driver="evd", overwrite_a=True, check_finite=False)
        steps["eigh_s"].append(t.seconds)
        W = V * inv[:, None] / np.sqrt(np.clip(evals, 1e-300, None))
        with Timer() as t:
            Xc @ W
        steps["projection_s"].append(t.seconds)
    out = {k: float(np.median(v)) for k, v in steps.items()}
    out["floor_s"] = out["gram_s"] + out["eigh_s"] + out["projection_s"]
    out["rest_s"] = out["fit_s"] - out["floor_s"]
    out["shape"] = list(X.shape)
    out["repeats"] = repeats
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
    parser.add_argument(
        "--repeats",
        type=int,
        default=7,
        help="timed repetitions of the single-probe comparison (after one warm-up; ratio = median)",
    )
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
                repeats=args.repeats,
            )
        headline = {
            "layer": args.compare_only,
            **{k: float(np.mean(v)) for k, v in ref.items() if k.endswith("pearson")},
            "reference_cpu_s_per_probe": ref["reference_cpu_s"] / 4,
            "ours_cpu_s_per_probe": ref["ours_cpu_s"] / 4,
            "reference_wall_s_per_probe": ref["reference_s"] / 4,
            "ours_wall_s_per_probe": ref["ours_s"] / 4,
            "speed_ratio_single_probe_wall": ref["ratio_median"],
            "speed_ratio_single_probe_wall_min_max": [ref["ratio_min"], ref["ratio_max"]],
            "speed_ratio_single_probe_cpu": ref["ratio_cpu_median"],
            "speed_ratio_target": 50,
            "backend": args.backend,
        }
        name = "probing_reference" if args.backend == "numpy" else f"probing_reference_{args.backend}"
        detail = {"reference": ref, "threads": args.threads, "load_average_at_end": os.getloadavg()}
        save_results(name, headline, detail)
        return
    layers = list(range(store.n_layers + 1 if args.layers is None else args.layers))
    seeds = tuple(range(args.seeds))

    load_at_start = os.getloadavg()
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
        ref = compare_reference(
            store, targets, peak_layer, "toxicity", backend=args.backend, repeats=args.repeats
        )
        X = store.layer(peak_layer, "input").astype(np.float64)
        train = prompt_folds(len(X), 4, 0) != 0
        breakdown = fit_breakdown(X[train], targets["prompt_toxicity"].to_numpy()[train])
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
        "speed_ratio_single_probe": ref["ratio_median"],  # median over repetitions of reference / ours
        "speed_ratio_single_probe_min_max": [ref["ratio_min"], ref["ratio_max"]],
        "single_probe_repeats": ref["repeats"],
        "ours_s_per_probe": ours_per_probe,
        "speed_ratio_sweep_cpu": (ref["reference_cpu_s"] / 4) / (sweep_cpu / (2 * n_probes)),
        "speed_ratio_single_probe_cpu": ref["ratio_cpu_median"],
        "speed_ratio_target": 50,
        "fit_floor_s": breakdown["floor_s"],  # Gram + eigh + projection of one fit (see fit_breakdown)
        "speed_ratio_ceiling_at_floor": ref_per_probe / breakdown["floor_s"],
        "speed_ratio_ceiling_eigh_only": ref_per_probe / breakdown["eigh_s"],
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
        "fit_breakdown": breakdown,
        "threads": args.threads,
        "load_average_at_start": load_at_start,
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
