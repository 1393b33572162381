"""Coverage and error rates of the statistics the toolkit reports, by simulation (JSON result).

1. Interplay intervals: coverage of the Fisher-z interval (Pearson) and the Bonett-Wright Fisher-z
   interval (Spearman) at n = 3, 4, 5, 6, 8, 10, 20 models, for bivariate normal data at rho = 0, 0.5, 0.8,
   0.95
   and for a skewed case (log-normal information); and the old percentile bootstrap's false exclusions
   of 0 under the null.
2. Peak-picking: over 31 layers (AR(1) correlated, rho 0.7) of pure noise, the share of curves whose
   picked peak has p < 0.05 unadjusted (p_raw) and family-wise adjusted (p_fwer), at n = 3, 5, 8, 20;
   and the power of p_fwer for a planted r ~ -0.8 at one layer.
3. CV intervals: coverage of the population test r by the plain t and the Nadeau-Bengio corrected
   resampled t interval over 4 folds x 5 seeds (OLS on y = x.w + e, p = 5) at n = 80 and 200.
4. MDL: gain in bits per sample on pure noise with beta(0.5, 8) targets (vs the old uniform/online).

Usage: .venv/bin/python -m benchmarks.stats_coverage [--sims 2000] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from scipy import stats

from aligned_probing.interplay import correlation_ci, layer_family_tests, permutations
from aligned_probing.probing.mdl import online_codelength
from aligned_probing.probing.summary import summarize
from benchmarks._common import Timer, save_results


def _corr_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xc, yc = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
    return (xc * yc).sum(1) / np.sqrt((xc**2).sum(1) * (yc**2).sum(1))


def interval_coverage(rng: np.random.Generator, sims: int) -> list[dict]:
    """Coverage of `correlation_ci` (and the old bootstrap under the null) per n, rho, distribution."""
    out = []
    for dist in ("normal", "lognormal_x"):
        for rho in (0.0, 0.5, 0.8, 0.95):
            for n in (3, 4, 5, 6, 8, 10, 20):
                z = rng.normal(size=(sims, n, 2))
                x = z[..., 0]
                y = rho * x + np.sqrt(1 - rho**2) * z[..., 1]
                rho_s = 6 / np.pi * np.arcsin(rho / 2)  # population Spearman of the normal pair
                if dist == "lognormal_x":  # monotone transform: Spearman's truth unchanged, Pearson's not
                    x = np.exp(x)
                    big = rng.normal(size=(200_000, 2))
                    bx = np.exp(big[:, 0])
                    by = rho * big[:, 0] + np.sqrt(1 - rho**2) * big[:, 1]
                    rho_p = float(np.corrcoef(bx, by)[0, 1])
                else:
                    rho_p = rho
                r = _corr_rows(x, y)
                rs = _corr_rows(stats.rankdata(x, axis=1), stats.rankdata(y, axis=1))
                row = {"distribution": dist, "rho": rho, "n": n}
                for name, vals, truth in (("pearson", r, rho_p), ("spearman", rs, rho_s)):
                    cis = [correlation_ci(float(v), n, name) for v in vals]
                    low = np.array([c["ci_low"] for c in cis], dtype=float)
                    high = np.array([c["ci_high"] for c in cis], dtype=float)
                    row[f"{name}_coverage"] = (
                        float(np.mean((low <= truth) & (truth <= high))) if np.isfinite(low).all() else None
                    )
                    row[f"{name}_note"] = cis[0]["ci_note"]
                # the Spearman interval's formula without the n >= 10 threshold: why it is withheld below
                se = np.sqrt((1 + rs**2 / 2) / max(n - 3, 1e-9))
                zs = np.arctanh(np.clip(rs, -1 + 1e-12, 1 - 1e-12))
                q = stats.norm.ppf(0.975)
                inside = (np.tanh(zs - q * se) <= rho_s) & (rho_s <= np.tanh(zs + q * se))
                row["spearman_formula_coverage_any_n"] = float(np.mean(inside)) if n > 3 else None
                if rho == 0.0 and dist == "normal":
                    row["old_bootstrap_excludes_0"] = _old_bootstrap_exclusion(rng, x[:400], y[:400])
                out.append(row)
    return out


def _old_bootstrap_exclusion(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> float:
    """Share of null data sets whose percentile-bootstrap 95% CI (over models) excludes 0 (old method)."""
    excl = 0
    n = x.shape[1]
    for xi, yi in zip(x, y, strict=True):
        idx = rng.integers(0, n, size=(1000, n))
        with np.errstate(invalid="ignore", divide="ignore"):
            boot = _corr_rows(xi[idx], yi[idx])
        boot = boot[np.isfinite(boot)]
        lo, hi = np.percentile(boot, [2.5, 97.5])
        excl += not (lo <= 0 <= hi)
    return excl / len(x)


def _ar_layers(rng: np.random.Generator, n: int, n_layers: int = 31, rho: float = 0.7) -> np.ndarray:
    X = np.empty((n, n_layers))
    X[:, 0] = rng.normal(size=n)
    for j in range(1, n_layers):
        X[:, j] = rho * X[:, j - 1] + np.sqrt(1 - rho**2) * rng.normal(size=n)
    return X


def peak_error_rates(rng: np.random.Generator, sims: int) -> list[dict]:
    """False-positive rate of the picked peak (null) and power of p_fwer (planted), per n."""
    out = []
    for n in (3, 5, 8, 20):
        for alternative in ("two-sided", "less"):
            raw = fwer = 0
            for sim in range(sims):
                perms = permutations(n, 999, sim)[0]  # random pairings (n > 8) drawn afresh per data set
                fam = layer_family_tests(_ar_layers(rng, n), rng.normal(size=n), perms, alternative)
                raw += fam["p_raw"][fam["peak"]] < 0.05
                fwer += fam["p_fwer"][fam["peak"]] < 0.05
            power = 0
            for sim in range(sims // 2):
                perms = permutations(n, 999, sims + sim)[0]
                y = rng.normal(size=n)
                X = _ar_layers(rng, n)
                X[:, 10] = -0.8 * y + 0.6 * rng.normal(size=n)
                fam = layer_family_tests(X, y, perms, alternative)
                power += fam["p_fwer"][10] < 0.05
            out.append(
                {
                    "n": n,
                    "alternative": alternative,
                    "null_peak_p_raw_below_0.05": raw / sims,
                    "null_peak_p_fwer_below_0.05": fwer / sims,
                    "power_p_fwer_r_-0.8": power / (sims // 2),
                    "p_method": "exact" if n <= 8 else "permutation (999)",
                }
            )
    return out


def _population_r(rng, n_train, p, noise, draws=4000) -> float:
    w = np.ones(p) / np.sqrt(p)
    X = rng.normal(size=(draws, n_train, p))
    y = X @ w + noise * rng.normal(size=(draws, n_train))
    Xc, yc = X - X.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
    b = np.linalg.solve(Xc.transpose(0, 2, 1) @ Xc, Xc.transpose(0, 2, 1) @ yc[..., None])[..., 0]
    return float(np.mean(b @ w / np.linalg.norm(b, axis=1) / np.sqrt(1 + noise**2)))


def cv_interval_coverage(rng: np.random.Generator, sims: int) -> list[dict]:
    """Coverage of the expected test r by `summarize`'s intervals over 4 folds x 5 seeds."""
    out = []
    p, noise, n_folds, n_seeds = 5, 1.5, 4, 5
    w = np.ones(p) / np.sqrt(p)
    for n in (80, 200):
        truth = _population_r(rng, n * (n_folds - 1) // n_folds, p, noise)
        hits = {"nadeau_bengio": 0, "t": 0}
        width = {"nadeau_bengio": [], "t": []}
        for _ in range(sims):
            X = rng.normal(size=(n, p))
            y = X @ w + noise * rng.normal(size=n)
            rows = []
            for seed in range(n_seeds):
                fold_of = np.random.default_rng(seed).permutation(np.arange(n) % n_folds)
                for fold in range(n_folds):
                    tr, te = fold_of != fold, fold_of == fold
                    A = np.column_stack([np.ones(tr.sum()), X[tr]])
                    b = np.linalg.lstsq(A, y[tr], rcond=None)[0]
                    pred = b[0] + X[te] @ b[1:]
                    rows.append((np.corrcoef(pred, y[te])[0, 1], tr.sum(), te.sum()))
            df = pd.DataFrame(rows, columns=["pearson", "n_train", "n_test"]).assign(
                model="m", template=0, scenario="input", attribute="a", layer=0
            )
            for method in hits:
                s = summarize(df, metrics=["pearson"], ci_method=method).iloc[0]
                hits[method] += s["ci_low"] <= truth <= s["ci_high"]
                width[method].append(s["ci_high"] - s["ci_low"])
        out.append(
            {
                "n": n,
                "population_test_r": truth,
                **{f"coverage_{m}": hits[m] / sims for m in hits},
                **{f"mean_width_{m}": float(np.mean(width[m])) for m in width},
            }
        )
    return out


def mdl_noise(rng: np.random.Generator, reps: int) -> dict:
    """Gains (bits/sample) and the old uniform/online on random features with beta(0.5, 8) targets."""
    gb, gc, comp = [], [], []
    for _ in range(reps):
        X = rng.normal(size=(1000, 20))
        y = rng.beta(0.5, 8, size=1000)
        code = online_codelength(X, y, control=y[rng.permutation(1000)], precision=1e-3)
        gb.append(code.gain_vs_baseline[0])
        gc.append(code.gain_vs_control[0])
        comp.append(code.compression[0])
    return {
        "reps": reps,
        "gain_vs_baseline_mean": float(np.mean(gb)),
        "gain_vs_baseline_sd": float(np.std(gb, ddof=1)),
        "gain_vs_control_mean": float(np.mean(gc)),
        "gain_vs_control_sd": float(np.std(gc, ddof=1)),
        "old_uniform_over_online_mean": float(np.mean(comp)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sims", type=int, default=2000, help="simulations per interval cell")
    parser.add_argument("--peak-sims", type=int, default=1000, help="simulations per peak-picking cell")
    parser.add_argument("--cv-sims", type=int, default=400, help="data sets per CV-interval cell")
    parser.add_argument("--mdl-reps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    timings = {}
    with Timer() as t:
        intervals = interval_coverage(rng, args.sims)
    timings["intervals_s"] = t.seconds
    with Timer() as t:
        peaks = peak_error_rates(rng, args.peak_sims)
    timings["peaks_s"] = t.seconds
    with Timer() as t:
        cv = cv_interval_coverage(rng, args.cv_sims)
    timings["cv_s"] = t.seconds
    with Timer() as t:
        mdl = mdl_noise(rng, args.mdl_reps)
    timings["mdl_s"] = t.seconds
    normal = [r for r in intervals if r["distribution"] == "normal"]
    headline = {
        "pearson_fisher_z_coverage_normal": {
            f"n={r['n']},rho={r['rho']}": r["pearson_coverage"] for r in normal if r["n"] in (3, 5, 8, 20)
        },
        "spearman_coverage_normal": {
            f"n={r['n']},rho={r['rho']}": r["spearman_coverage"] for r in normal if r["n"] in (5, 8, 10, 20)
        },
        "old_bootstrap_null_excludes_0": {
            f"n={r['n']}": r["old_bootstrap_excludes_0"] for r in normal if r["rho"] == 0.0
        },
        "null_peak_rates_two_sided": {
            f"n={r['n']}": [r["null_peak_p_raw_below_0.05"], r["null_peak_p_fwer_below_0.05"]]
            for r in peaks
            if r["alternative"] == "two-sided"
        },
        "power_p_fwer_less": {
            f"n={r['n']}": r["power_p_fwer_r_-0.8"] for r in peaks if r["alternative"] == "less"
        },
        "cv_interval_coverage": {f"n={r['n']}": [r["coverage_t"], r["coverage_nadeau_bengio"]] for r in cv},
        "mdl_noise_beta": mdl,
    }
    detail = {"intervals": intervals, "peaks": peaks, "cv": cv, "args": vars(args), "timings": timings}
    save_results("stats_coverage", headline, detail)


if __name__ == "__main__":
    main()
