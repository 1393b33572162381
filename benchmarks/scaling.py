"""Scaling: the probing sweep on 1 vs 2 Ray workers, and a cost model for the original study's scale.

1. Probing sweep wall time through `RayExecutor` with 1 and with 2 workers (`ray.init(num_cpus=N)`),
   one task per block of layers; each task opens the on-disk `ActivationStore` itself and reads one
   layer at a time, so only the small result tables travel back. The tables must equal a local
   `run_probing` over all layers (same seeds, same numbers).
2. Measured unit costs on this machine: seconds per token of a transformer forward (and the achieved
   FLOP/s, to check the 2 x params FLOPs-per-token model) and seconds per ridge probe fit as a function
   of (n_train, d_model) (fitted to c * (n d^2 + d^3)).
3. An estimate of time and storage for the original study: 20 models x 7B (32 layers, d_model 4096),
   10k prompts x 25 continuations, on `--gpus` GPUs (and `--cpus-per-gpu` CPU cores for probing).

Usage: .venv/bin/python -m benchmarks.scaling [--layers 8] [--prompts 600] [--d-model 256] [--gpus 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from aligned_probing.pipeline.executors import LocalExecutor, RayExecutor, Resources
from aligned_probing.probing import RidgeProbe, run_probing
from benchmarks._common import Timer, save_results
from benchmarks.probing import synthetic

PROBE_SETTINGS: dict[str, Any] = {
    "scenarios": ("input", "forward", "output", "backward"),
    "n_folds": 4,
    "seeds": (0, 1),
    "control": True,
    "alphas": (1.0, 100.0, 10000.0),
}


# ------------------------------------------------------------------------------------ 1. probing sweep
def build_store(root: Path, n_layers: int, n_prompts: int, d_model: int) -> tuple[Path, Path]:
    """A real on-disk `ActivationStore` (input + output, mean) with a planted signal, and its targets."""
    from aligned_probing.encoding.store import ActivationStore

    memory, targets = synthetic(n_layers=n_layers, n=n_prompts, d=d_model, seed=0)
    store = ActivationStore.create(
        root / "store",
        model="synthetic",
        template=0,
        n_layers=n_layers,
        d_model=d_model,
        positions=("input", "output"),
    )
    store.append(memory.index, {(p, "mean"): memory.arrays[(p, "mean")] for p in ("input", "output")})
    targets.to_parquet(root / "targets.parquet", index=False)
    return root / "store", root / "targets.parquet"


def probe_block(task: dict[str, Any]) -> pd.DataFrame:
    """One Ray task: probe a block of layers, reading the store from its location (never shipped)."""
    from aligned_probing.encoding.store import ActivationStore

    with threadpool_limits(limits=1):  # one BLAS thread per worker: workers, not threads, scale out
        store = ActivationStore.open(task["store"])
        targets = pd.read_parquet(task["targets"])
        return run_probing(store, targets, layers=task["layers"], **task["settings"])


def layer_blocks(n_layers: int, n_blocks: int) -> list[list[int]]:
    """Layers 0..n_layers split into `n_blocks` contiguous, nearly equal blocks."""
    return [b.tolist() for b in np.array_split(np.arange(n_layers + 1), n_blocks) if len(b)]


def _warm(_: int) -> int:
    """Start a worker and import what `probe_block` needs, so the timed sweep measures probing only."""
    import aligned_probing.encoding.store  # noqa: F401
    import aligned_probing.probing  # noqa: F401

    return os.getpid()


def ray_sweep(n_workers: int, tasks: list[dict[str, Any]]) -> tuple[float, pd.DataFrame]:
    """Wall time of the sweep on a fresh local Ray cluster with `n_workers` CPUs (startup excluded)."""
    import cloudpickle
    import ray

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import `benchmarks`
    ray.init(num_cpus=n_workers, include_dashboard=False, log_to_driver=False)
    try:
        executor = RayExecutor()
        executor.map(_warm, list(range(n_workers)), resources=Resources(num_cpus=1))
        with Timer() as t:
            parts = executor.map(probe_block, tasks, resources=Resources(num_cpus=1))
    finally:
        ray.shutdown()
    return t.seconds, pd.concat(parts, ignore_index=True)


# ------------------------------------------------------------------------------------ 2. unit costs
def token_cost(hidden: int = 256, n_layers: int = 4, seq: int = 64, batch: int = 8) -> dict[str, float]:
    """Seconds per token of a random Llama forward on this CPU, and achieved vs modelled FLOPs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=seq,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.model.layers.parameters())  # the blocks: what encoding runs
    ids = torch.randint(0, 1024, (batch, seq))
    with torch.no_grad():
        model.model(ids)  # warm-up
        t0 = time.perf_counter()
        repeats = 3
        for _ in range(repeats):
            model.model(ids)  # residual stream only, no unembedding (as encoding does)
        seconds = (time.perf_counter() - t0) / repeats
    tokens = batch * seq
    flops_per_token = 2 * params + 4 * n_layers * seq * hidden  # matmuls + attention scores/values
    return {
        "params": float(params),
        "s_per_token": seconds / tokens,
        "flops_per_token_model": float(flops_per_token),
        "achieved_gflops": flops_per_token * tokens / seconds / 1e9,
    }


def probe_cost(
    sizes: tuple[tuple[int, int], ...] = ((1000, 128), (2000, 256), (2000, 512)),
) -> dict[str, Any]:
    """Seconds per `RidgeProbe` fit (1 thread, 12 target columns, 3 alphas) at several (n, d); fit c."""
    rng = np.random.default_rng(0)
    rows = []
    with threadpool_limits(limits=1):
        for n, d in sizes:
            X, Y = rng.standard_normal((n, d)), rng.standard_normal((n, 12))
            RidgeProbe(alphas=PROBE_SETTINGS["alphas"]).fit(X[:200], Y[:200])  # warm-up
            with Timer() as t:
                RidgeProbe(alphas=PROBE_SETTINGS["alphas"]).fit(X, Y)
            rows.append({"n": n, "d": d, "seconds": t.seconds, "work": n * d * d + d**3})
    work = np.array([r["work"] for r in rows], dtype=float)
    secs = np.array([r["seconds"] for r in rows])
    c = float((work @ secs) / (work @ work))  # least squares through the origin
    return {"fits": rows, "s_per_unit_work": c}


# ------------------------------------------------------------------------------------ 3. the estimate
def estimate(
    probe_c: float,
    *,
    gpus: int,
    cpus_per_gpu: int,
    models: int = 20,
    params: float = 7e9,
    n_layers: int = 32,
    d_model: int = 4096,
    prompts: int = 10_000,
    k: int = 25,
    prompt_tokens: int = 30,
    new_tokens: int = 20,
    seeds: int = 5,
    folds: int = 4,
    prefill_tflops: float = 300.0,
    decode_tflops: float = 60.0,
    bytes_per_value: int = 2,
) -> dict[str, Any]:
    """Time and storage of the study at this scale (see docs/scaling.md for the assumptions).

    FLOPs per token = 2 x params (the measured CPU run checks this model). Generation is decode-bound
    (`decode_tflops` effective per GPU), encoding and scoring are prefill (`prefill_tflops`). Probing: one
    fit per (layer, position, seed, fold), each at cost `probe_c * (n d^2 + d^3)` on one CPU core.
    """
    flops_per_token = 2 * params
    gen_tokens = models * prompts * k * new_tokens
    enc_tokens = models * prompts * k * (prompt_tokens + new_tokens)
    gen_s = gen_tokens * flops_per_token / (decode_tflops * 1e12) / gpus
    enc_s = enc_tokens * flops_per_token / (prefill_tflops * 1e12) / gpus
    n_train = prompts * (folds - 1) // folds
    fits = models * (n_layers + 1) * 2 * seeds * folds  # 2 positions: input (input, backward), output
    fit_s = probe_c * (n_train * d_model**2 + d_model**3)
    probe_s = fits * fit_s / (gpus * cpus_per_gpu)
    rows = prompts * k
    store_bytes = models * (n_layers + 1) * rows * d_model * bytes_per_value * 2  # input + output
    return {
        "gpus": gpus,
        "cpu_cores_for_probing": gpus * cpus_per_gpu,
        "generation_tokens": gen_tokens,
        "encoding_tokens": enc_tokens,
        "generation_hours": gen_s / 3600,
        "encoding_hours": enc_s / 3600,
        "probe_fits": fits,
        "seconds_per_probe_fit": fit_s,
        "probing_hours": probe_s / 3600,
        "total_hours": (gen_s + enc_s + probe_s) / 3600,
        "store_tb": store_bytes / 1e12,
        "store_gb_per_model_template": store_bytes / models / 1e9,
        "store_gb_per_layer_read": store_bytes / models / (n_layers + 1) / 2 / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--layers", type=int, default=8, help="blocks L of the synthetic store (L + 1 layers)"
    )
    parser.add_argument("--prompts", type=int, default=600)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=4, help="layer blocks = Ray tasks")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--cpus-per-gpu", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the Ray workers

    with tempfile.TemporaryDirectory() as tmp:
        store_path, targets_path = build_store(Path(tmp), args.layers, args.prompts, args.d_model)
        blocks = layer_blocks(args.layers, args.blocks)
        tasks = [
            {"store": str(store_path), "targets": str(targets_path), "layers": b, "settings": PROBE_SETTINGS}
            for b in blocks
        ]
        with Timer() as local_t:
            local = pd.concat(LocalExecutor().map(probe_block, tasks), ignore_index=True)
        one_s, one = ray_sweep(1, tasks)
        two_s, two = ray_sweep(2, tasks)
        with threadpool_limits(limits=1):
            from aligned_probing.encoding.store import ActivationStore

            whole = run_probing(
                ActivationStore.open(store_path), pd.read_parquet(targets_path), **PROBE_SETTINGS
            )
    for name, table in (("local blocks", local), ("ray 1 worker", one), ("ray 2 workers", two)):
        pd.testing.assert_frame_equal(table, whole, check_exact=True, obj=name)

    tok = token_cost()
    probe = probe_cost()
    paper = estimate(probe["s_per_unit_work"], gpus=args.gpus, cpus_per_gpu=args.cpus_per_gpu)
    headline = {
        "store_shape": [args.layers + 1, args.prompts, args.d_model],
        "layer_blocks": len(blocks),
        "local_s": local_t.seconds,
        "ray_1_worker_s": one_s,
        "ray_2_workers_s": two_s,
        "speedup_2_vs_1": one_s / two_s,
        "tables_identical": True,
        "load_average_1min": os.getloadavg()[0],
        "s_per_token_cpu": tok["s_per_token"],
        "achieved_gflops_cpu": tok["achieved_gflops"],
        "s_per_unit_probe_work": probe["s_per_unit_work"],
        **{f"paper_{k}": v for k, v in paper.items()},
    }
    save_results(
        "scaling",
        headline,
        {
            "token_cost": tok,
            "probe_cost": probe,
            "blocks": blocks,
            "probe_settings": PROBE_SETTINGS,
            "paper_estimate": paper,
        },
    )


if __name__ == "__main__":
    main()
