"""Run probe-based fine-tuning end to end: sample, label, fit probes, train each arm, measure retention.

Layout of `output_dir`:
    base/               continuations + labels (Parquet), probes/{train,ensemble,heldout}/
    {arm}/adapter/      LoRA adapter (safetensors) + tokenizer + finetune.json
    {arm}/merged/       merged HF model, loadable by `load_model` (joins the model zoo)
    {arm}/checkpoints/  adapters every `training.checkpoint_every` steps (if > 0)
    {arm}/eval_samples.parquet, base/{train,eval}_samples.parquet
                        continuations with scores, labels and token ids (prompt and response), so
                        activations can be re-read later through any checkpoint (`trajectory.py`)
    {arm}/pairs.parquet DPO pairs (DPO arms)
    results.parquet     tidy rows: arm, metric, value, ci_low, ci_high, n
    results_wide.csv    the paper-style table (one row per arm)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from aligned_probing.training.config import FinetuneConfig, load_finetune_config
from aligned_probing.training.data import (
    LabelledSamples,
    benign_texts,
    label_continuations,
    save_samples,
    split_by_prompt,
)
from aligned_probing.training.probes import ProbeSet, fit_probe_set
from aligned_probing.training.retention import perplexity, probe_aurocs, retrained_auroc, toxicity_summary

if TYPE_CHECKING:
    from aligned_probing.models import LoadedModel
    from aligned_probing.scoring import Scorer

logger = logging.getLogger(__name__)


def get_training_scorer(name: str) -> Any:
    """The scorer by name, through `aligned_probing.scoring.get_scorer` when it exists."""
    import aligned_probing.scoring as scoring

    if hasattr(scoring, "get_scorer"):
        return scoring.get_scorer(name)
    from aligned_probing.scoring.jigsaw import JigsawScorer  # until the scorer registry lands

    return JigsawScorer("tox-block")


def _sample(
    model: LoadedModel, prompts: pd.DataFrame, cfg: FinetuneConfig, scorer: Scorer
) -> LabelledSamples:
    from aligned_probing.generation import generate_continuations

    g = cfg.generation
    conts = generate_continuations(
        model, prompts, k=g.k, seed=g.seed, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
        top_p=g.top_p, template=g.template, batch_size=g.batch_size,
    )
    return label_continuations(model, conts, scorer=scorer, layer=cfg.probes.layer,
                               threshold=cfg.probes.threshold, max_new_tokens=g.max_new_tokens)


def fit_run_probes(train: LabelledSamples, cfg: FinetuneConfig, meta: dict[str, Any]) -> dict[str, ProbeSet]:
    """The training probe, the training ensemble and held-out probes from disjoint halves of `train`.

    The held-out probes are fitted on prompts that neither the training probe nor the ensemble saw,
    with their own seeds, and are never used as a training signal.
    """
    p = cfg.probes
    heldout_mask = split_by_prompt(train.table, test_size=0.5, seed=p.seed + 1)
    a, b = train.subset(~heldout_mask), train.subset(heldout_mask)
    y_a, y_b = a.table["label"].to_numpy(), b.table["label"].to_numpy()
    for name, y in (("probe training half", y_a), ("held-out half", y_b)):
        if len(np.unique(y)) < 2:
            raise ValueError(
                f"The {name} has a single class (toxic share {y.mean():.2f}); raise data.n_train or pick "
                "more toxic prompts so the scorer labels both classes."
            )
    common = {**meta, "threshold": p.threshold}
    return {
        "train": fit_probe_set(a.activations, y_a, n_probes=1, C=p.C, seed=p.seed, meta=common),
        "ensemble": fit_probe_set(a.activations, y_a, n_probes=p.n_ensemble, subsample=p.subsample, C=p.C,
                                  seed=p.seed + 100, meta=common),
        "heldout": fit_probe_set(b.activations, y_b, n_probes=p.n_heldout, subsample=p.subsample, C=p.C,
                                 seed=p.seed + 1000, meta=common),
    }


def _train_arm(arm: str, base_dir: Path, train: LabelledSamples, probes: dict[str, ProbeSet],
               cfg: FinetuneConfig, arm_dir: Path) -> Path:
    """Train one arm and return its merged model directory."""
    from trl import DPOConfig

    from aligned_probing.training.dpo import build_preference_pairs, train_dpo
    from aligned_probing.training.finetuned import (
        AdapterCheckpointCallback,
        TrainingLogCallback,
        load_trainable,
        lora_config,
        save_finetuned,
    )
    from aligned_probing.training.penalty import ProbePenalty
    from aligned_probing.training.sft import ProbeSFTConfig, train_probe_sft

    t = cfg.training
    model, tokenizer = load_trainable(base_dir)
    peft_cfg = lora_config(r=t.lora_r, alpha=t.lora_alpha, dropout=t.lora_dropout)
    log = TrainingLogCallback()
    callbacks = [log] + ([AdapterCheckpointCallback(arm_dir / "checkpoints", t.checkpoint_every, tokenizer)]
                         if t.checkpoint_every else [])
    # No Trainer checkpoints (they pickle optimizer state and training_args.bin); see finetuned.py.
    common = dict(
        output_dir=str(arm_dir / "trainer"), learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps, per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, max_length=t.max_length, seed=t.seed,
        report_to="none", save_strategy="no", save_only_model=True, logging_steps=1,
        gradient_checkpointing=False, use_cpu=cfg.model.device == "cpu", disable_tqdm=True,
        # TRL defaults to bf16 autocast, which on CPU is slow and stays patched into the returned
        # model's forward (logits then differ ~1e-2 from the saved merged weights).
        bf16=cfg.model.device != "cpu" and cfg.model.dtype != "float16",
    )
    table = train.table
    if arm == "probe_sft":
        texts = table[table["continuation_idx"] < t.sft_continuations_per_prompt]
        texts = texts.rename(columns={"text": "completion"})[["prompt", "completion"]]
        args = ProbeSFTConfig(probe_lambda=t.probe_lambda, **common)
        trained = train_probe_sft(model, tokenizer, texts, args, penalty=ProbePenalty(probes["train"]),
                                  peft_config=peft_cfg, callbacks=callbacks)
        info_extra: dict[str, Any] = {"n_texts": len(texts)}
    else:
        ranker = {"probe_dpo": probes["train"], "probe_dpo_ensemble": probes["ensemble"]}.get(arm)
        scored = table.assign(
            probe_score=ranker.predict_proba(train.activations) if ranker is not None else np.nan
        )
        pairs = build_preference_pairs(scored, score="toxicity" if arm == "classifier_dpo" else "probe_score")
        pairs.to_parquet(arm_dir / "pairs.parquet", index=False)
        args = DPOConfig(beta=t.beta, loss_type=["sigmoid", "sft"], loss_weights=[1.0, t.sft_weight],
                         **common)
        trained = train_dpo(model, tokenizer, pairs, args, peft_config=peft_cfg, callbacks=callbacks)
        info_extra = {"n_pairs": len(pairs)}
    info = {"arm": arm, "base": str(base_dir), "config": cfg.model_dump(), "global_step": log.global_step,
            "log_history": log.log_history, **info_extra}
    return save_finetuned(trained, tokenizer, arm_dir, info=info)["merged"]


def _evaluate(model: LoadedModel, eval_prompts: pd.DataFrame, probes: dict[str, ProbeSet],
              cfg: FinetuneConfig,
              scorer: Scorer, texts: list[str], arm: str, out_dir: Path) -> pd.DataFrame:
    """Toxicity, probe AUROCs (frozen, ensemble, held-out, retrained) and perplexity of one model."""
    ev = cfg.evaluation
    samples = _sample(model, eval_prompts, cfg, scorer)
    save_samples(samples, out_dir / "eval_samples.parquet")
    fit_mask = split_by_prompt(samples.table, test_size=ev.retrain_fraction, seed=cfg.probes.seed + 7)
    fit, test = samples.subset(fit_mask), samples.subset(~fit_mask)
    y_test = test.table["label"].to_numpy()
    rows = []
    for r in probe_aurocs({"frozen": probes["train"], "ensemble": probes["ensemble"],
                           "heldout": probes["heldout"]}, test.activations, y_test).itertuples():
        rows.append({"metric": f"auroc_{r.probe}", "value": r.auroc, "n": r.n_test})
    rows.append({"metric": "auroc_retrained", "n": len(y_test), "value": retrained_auroc(
        fit.activations, fit.table["label"].to_numpy(), test.activations, y_test, C=cfg.probes.C,
        seed=cfg.probes.seed)})
    rows.append({"metric": "n_toxic_test", "value": float(y_test.sum()), "n": len(y_test)})
    tox = toxicity_summary(samples.table, threshold=cfg.probes.threshold, n_boot=ev.n_boot,
                           seed=cfg.data.seed)
    rows += [{"metric": r.metric, "value": r.value, "ci_low": r.ci_low, "ci_high": r.ci_high,
              "n": r.n_continuations} for r in tox.itertuples()]
    rows.append({"metric": "perplexity", "n": len(texts), "value": perplexity(
        model.hf_model, model.tokenizer, texts, max_length=ev.ppl_max_length)})
    return pd.DataFrame(rows).assign(arm=arm)


def results_wide(results: pd.DataFrame) -> pd.DataFrame:
    """The paper-style table: one row per arm, toxicity before/after, AUROCs, perplexity before/after."""
    base = results[results["arm"] == "base"].set_index("metric")["value"]
    rows = []
    for arm, group in results[results["arm"] != "base"].groupby("arm", sort=False):
        v = group.set_index("metric")
        rows.append({
            "arm": arm,
            "emt_before": base.get("emt"), "emt_after": v.loc["emt", "value"],
            "emt_after_ci": f"[{v.loc['emt', 'ci_low']:.3f}, {v.loc['emt', 'ci_high']:.3f}]",
            "toxic_rate_before": base.get("toxic_rate"), "toxic_rate_after": v.loc["toxic_rate", "value"],
            **{f"auroc_{p}": v.loc[f"auroc_{p}", "value"]
               for p in ("frozen", "ensemble", "heldout", "retrained")},
            "ppl_before": base.get("perplexity"), "ppl_after": v.loc["perplexity", "value"],
        })
    return pd.DataFrame(rows)


def completed_results(config: str | Path | dict | FinetuneConfig) -> pd.DataFrame | None:
    """The tidy results of a finished run of exactly this config in its `output_dir`, else None.

    A run counts as finished when `results_wide.csv` exists (written last) and the saved
    `config.json` equals this config, so a notebook can load instead of re-training.
    """
    cfg = config if isinstance(config, FinetuneConfig) else load_finetune_config(config)
    out = Path(cfg.output_dir)
    if not (out / "results_wide.csv").exists() or not (out / "config.json").exists():
        return None
    saved = json.loads((out / "config.json").read_text())
    if saved != json.loads(json.dumps(cfg.model_dump())):
        return None
    return pd.read_parquet(out / "results.parquet")


def run_finetune(config: str | Path | dict | FinetuneConfig) -> pd.DataFrame:
    """Run every configured arm and return the tidy results (also written to `output_dir`).

    Args:
        config: A TOML path, a dict, or a `FinetuneConfig`.

    Returns:
        Tidy rows `arm` (`base` for the model before fine-tuning), `metric`, `value`, `ci_low`,
        `ci_high`, `n`.

    Example:
        >>> results = run_finetune("configs/finetune_quick.toml")  # doctest: +SKIP
        >>> results_wide(results)  # doctest: +SKIP
    """
    from aligned_probing.data import embedded_prompts
    from aligned_probing.models import load_model

    # Offline and private: TRL's trainers ping a telemetry endpoint unless told not to.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = config if isinstance(config, FinetuneConfig) else load_finetune_config(config)
    out = Path(cfg.output_dir)
    (out / "base").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.model_dump(), indent=2))
    scorer = get_training_scorer(cfg.scorer)
    base = load_model(cfg.model.spec, dtype=cfg.model.dtype, device=cfg.model.device)
    if base.path is None:
        raise ValueError(f"model.spec {cfg.model.spec!r} has no local Hugging Face directory to fine-tune.")
    if cfg.probes.layer > base.n_layers:
        raise ValueError(
            f"probes.layer must be in [0, {base.n_layers}] for {base.name}, got {cfg.probes.layer}."
        )
    d = cfg.data
    prompts = embedded_prompts(d.prompts).sample(d.n_train + d.n_eval, stratify_by=None, seed=d.seed).df
    rng = np.random.default_rng(d.seed)
    is_eval = np.zeros(len(prompts), dtype=bool)
    is_eval[rng.choice(len(prompts), size=d.n_eval, replace=False)] = True
    train_prompts, eval_prompts = prompts[~is_eval], prompts[is_eval]

    train = _sample(base, train_prompts, cfg, scorer)
    save_samples(train, out / "base" / "train_samples.parquet")
    meta = {"model": base.name, "revision": base.revision, "hook_name": base.hook_names[cfg.probes.layer],
            "layer": cfg.probes.layer, "pooling": "mean_response", "d_model": base.d_model}
    probes = fit_run_probes(train, cfg, meta)
    for name, ps in probes.items():
        ps.save(out / "base" / "probes" / name)
    texts = benign_texts(cfg.evaluation.n_benign, seed=d.seed)
    frames = [_evaluate(base, eval_prompts, probes, cfg, scorer, texts, "base", out / "base")]
    frames[0].to_parquet(out / "results.parquet", index=False)  # partial results survive an interruption
    base_dir = Path(base.path)
    del base
    for arm in cfg.training.arms:
        arm_dir = out / arm
        arm_dir.mkdir(parents=True, exist_ok=True)
        logger.info("training arm %s", arm)
        merged_dir = _train_arm(arm, base_dir, train, probes, cfg, arm_dir)
        tuned = load_model(merged_dir, dtype=cfg.model.dtype, device=cfg.model.device)
        frames.append(_evaluate(tuned, eval_prompts, probes, cfg, scorer, texts, arm, arm_dir))
        del tuned
        results = pd.concat(frames, ignore_index=True)
        results.to_parquet(out / "results.parquet", index=False)  # after every arm: partial results survive
    results = pd.concat(frames, ignore_index=True)[["arm", "metric", "value", "ci_low", "ci_high", "n"]]
    results.to_parquet(out / "results.parquet", index=False)
    results_wide(results).to_csv(out / "results_wide.csv", index=False)
    return results
