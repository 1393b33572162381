"""Draw the causal real run's curves (docs/causal.md) from the Parquet tables of scripts/causal_real_run.py.

Usage: .venv/bin/python scripts/causal_figures.py [--results data/causal] [--out docs/figures]
Writes causal_skipping.png, causal_steering.png and causal_patching.png (and .svg).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from aligned_probing.report import plots  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    """Draw the three figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=ROOT / "data" / "causal")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    args = p.parse_args(argv)

    skip = pd.read_parquet(args.results / "skipping.parquet")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    emt = skip[skip.metric == "emt"].assign(layer=lambda d: d.block + 1)
    plots.layer_skipping_curve(emt, x="layer", ax=axes[0]).set_ylabel("change in EMT")
    lp = skip[skip.metric == "log_perplexity"].assign(layer=lambda d: d.block + 1)
    plots.layer_skipping_curve(lp, x="layer", ax=axes[1]).set_ylabel("change in log perplexity (nats)")
    fig.suptitle(f"Layer skipping, SmolLM2-135M-Instruct ({int(emt.n_prompts.iloc[0])} prompts, k = 3)")
    plots.save_figure(fig, args.out / "causal_skipping")

    steer = pd.read_parquet(args.results / "steering.parquet")
    if "alpha_norm_units" not in steer:  # tables written before the norm-unit API
        steer = steer.assign(alpha_norm_units=steer["alpha_in_norms"], direction="probe")
    steer = steer.assign(alpha=steer["alpha_norm_units"])
    steer = steer[steer.direction != "probe_vs_random"]  # probe and random, each vs the baseline
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    plots.steering_curve(steer[steer.metric == "emt"], hue="direction", ax=axes[0]).set_ylabel(
        "change in EMT"
    )
    plots.steering_curve(steer[steer.metric == "log_perplexity"], hue="direction", ax=axes[1]).set_ylabel(
        "change in log perplexity (nats)"
    )
    for ax in axes:
        ax.set_xlabel("alpha (units of the layer's median residual norm)")
    fig.suptitle(f"Steering along the layer-{int(steer.layer.iloc[0])} probe direction")
    plots.save_figure(fig, args.out / "causal_steering")

    patch = pd.read_parquet(args.results / "patching.parquet")
    last = int(patch["readout_layer"].max())
    readout = patch[(patch.measure == "readout") & (patch.readout_layer == last)]
    hue = "description" if "description" in readout else "direction"  # spelled out when available
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    plots.patching_curve(readout, hue=hue, ax=ax).set_ylabel(f"change in layer-{last} probe read-out")
    ax.set_title(f"Last-position patching, {int(readout.n_pairs.iloc[0])} length-matched pairs")
    plots.save_figure(fig, args.out / "causal_patching")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
