"""Run probe-based fine-tuning end to end: sample, label, fit probes, train each arm, measure retention.

Layout of `output_dir`:
    base/               continuations + labels (Parquet), probes/{train,ensemble,heldout}/
    {arm}/seed{s}/adapter/      LoRA adapter (safetensors) + tokenizer + finetune.json
    {arm}/seed{s}/merged/       merged HF model, loadable by `load_model` (joins the model zoo)
    {arm}/seed{s}/checkpoints/  adapters every `training.checkpoint_every` steps (if > 0)
    {arm}/seed{s}/eval_samples.parquet, base/{train,eval}_samples.parquet
                        continuations with scores, labels and token ids (prompt and response), so
                        activations can be re-read later through any checkpoint (`trajectory.py`)
    {arm}/pairs.parquet DPO pairs with their token ids (DPO arms; the same for every seed)
    results.parquet     tidy rows: arm, seed, metric, value, ci_low, ci_high, n
    comparisons.parquet paired differences between arms (same eval prompts and seeds), with CIs
    results_wide.csv    the paper-style table (one row per arm, means over seeds)

Everything the run needs is resolved before anything is written (scorer and its options, prompts,
model, probe layer), so a rejected config leaves `output_dir` untouched.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from aligned_probing.training.activations import pooled_response_activations
from aligned_probing.training.config import FinetuneConfig, load_finetune_config
from aligned_probing.training.data import (
    LabelledSamples,
    benign_texts,
    label_continuations,
    save_samples,
    split_by_prompt,
)
from aligned_probing.training.probes import ProbeSet, fit_probe_set
from aligned_probing.training.retention import (
    auroc_with_ci,
    paired_auroc_difference,
    paired_mean_difference,
    perplexity,
    toxicity_summary,
)
from aligned_probing.training.sources import resolve_probe_layer, split_prompts

if TYPE_CHECKING:
    from aligned_probing.models import LoadedModel
    from aligned_probing.scoring import Scorer

logger = logging.getLogger(__name__)

PROBE_KINDS = ("frozen", "ensemble", "heldout", "retrained")
# Bumped when what a run computes changes, so `completed_results` does not reuse older runs.
# 2: DPO trains on the generated token ids (EOS only where generation stopped), not re-tokenized text.
FINETUNE_VERSION = 2


def get_training_scorer(scorer: Any) -> Scorer:
    """The configured scorer (a `ScorerSection`); unknown options raise before anything is written."""
    from aligned_probing.scoring import get_scorer

    return get_scorer(scorer.name, **scorer.options)


def _sample(
    model: LoadedModel, prompts: pd.DataFrame, cfg: FinetuneConfig, scorer: Scorer, layer: int,
    progress: bool = False,
) -> LabelledSamples:
    from aligned_probing.generation import generate_continuations

    g = cfg.generation
    conts = generate_continuations(
        model, prompts, k=g.k, seed=g.seed, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
        top_p=g.top_p, template=g.template, batch_size=g.batch_size, show_progress=progress,
    )
    return label_continuations(model, conts, scorer=scorer, layer=layer, threshold=cfg.probes.threshold,
                               max_new_tokens=g.max_new_tokens, progress=progress)


def probe_halves(train: LabelledSamples, cfg: FinetuneConfig) -> tuple[LabelledSamples, LabelledSamples]:
    """Disjoint prompt halves of `train`: (a) for the training probe and ensemble, (b) for held-out probes.

    Raises:
        ValueError: When a half has a single class.
    """
    heldout_mask = split_by_prompt(train.table, test_size=0.5, seed=cfg.probes.seed + 1)
    a, b = train.subset(~heldout_mask), train.subset(heldout_mask)
    for name, half in (("probe training half", a), ("held-out half", b)):
        y = half.table["label"].to_numpy()
        if len(np.unique(y)) < 2:
            raise ValueError(
                f"The {name} has a single class (toxic share {y.mean():.2f}); raise data.n_train or pick "
                "more toxic prompts so the scorer labels both classes."
            )
    return a, b


def fit_run_probes(train: LabelledSamples, cfg: FinetuneConfig, meta: dict[str, Any]) -> dict[str, ProbeSet]:
    """The training probe, the training ensemble and held-out probes from disjoint halves of `train`.

    The held-out probes are fitted on prompts that neither the training probe nor the ensemble saw,
    with their own seeds, and are never used as a training signal.
    """
    p = cfg.probes
    a, b = probe_halves(train, cfg)
    y_a, y_b = a.table["label"].to_numpy(), b.table["label"].to_numpy()
    common = {**meta, "threshold": p.threshold}
    return {
        "train": fit_probe_set(a.activations, y_a, n_probes=1, C=p.C, seed=p.seed, meta=common),
        "ensemble": fit_probe_set(a.activations, y_a, n_probes=p.n_ensemble, subsample=p.subsample, C=p.C,
                                  seed=p.seed + 100, meta=common),
        "heldout": fit_probe_set(b.activations, y_b, n_probes=p.n_heldout, subsample=p.subsample, C=p.C,
                                 seed=p.seed + 1000, meta=common),
    }


def sft_texts(train: LabelledSamples, per_prompt: int) -> pd.DataFrame:
    """The SFT training rows: prompt ids and generated ids of the first `per_prompt` continuations."""
    table = train.table_with_prompt_ids()
    keep = table["continuation_idx"] < per_prompt
    return table.loc[keep, ["prompt_id", "prompt_token_ids", "token_ids"]].reset_index(drop=True)


def training_arguments(
    cfg: FinetuneConfig, seed_dir: Path, seed: int, *, progress: bool = False
) -> dict[str, Any]:
    """The Trainer arguments every arm shares (`DPOConfig`/`ProbeSFTConfig` keywords).

    `progress` turns the Trainer's own tqdm bar (optimizer steps out of the total) on.
    """
    t = cfg.training
    # No Trainer checkpoints (they pickle optimizer state and training_args.bin); see finetuned.py.
    return dict(
        output_dir=str(seed_dir / "trainer"), learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps, per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, max_length=t.max_length, seed=seed,
        report_to="none", save_strategy="no", save_only_model=True, logging_steps=1,
        gradient_checkpointing=False, use_cpu=cfg.model.device == "cpu", disable_tqdm=not progress,
        # Master weights stay float32; on a GPU the forward is autocast to the model's dtype (mixed
        # precision), so `dtype = "float32"` trains in full precision. TRL defaults to bf16 autocast,
        # which on CPU is slow and stays patched into the returned model's forward (logits then
        # differ ~1e-2 from the saved merged weights): never on CPU.
        bf16=cfg.model.device != "cpu" and cfg.model.dtype == "bfloat16",
        fp16=cfg.model.device != "cpu" and cfg.model.dtype == "float16",
    )


def _train_arm(arm: str, source: str | Path, train: LabelledSamples, probes: dict[str, ProbeSet],
               cfg: FinetuneConfig, arm_dir: Path, seed: int, progress: bool = False) -> Path:
    """Train one arm with one seed and return its merged model directory."""
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
    seed_dir = arm_dir / f"seed{seed}"
    hub_name = not Path(source).exists()
    # load_model has already found a hub model in the cache or reached the hub; offline, read the
    # cache without a request that would otherwise retry for minutes.
    offline = hub_name and _hub_offline()
    model, tokenizer = load_trainable(source, revision=cfg.model.revision, local_files_only=offline)
    peft_cfg = lora_config(r=t.lora_r, alpha=t.lora_alpha, dropout=t.lora_dropout)
    log = TrainingLogCallback()
    callbacks = [log] + ([AdapterCheckpointCallback(seed_dir / "checkpoints", t.checkpoint_every, tokenizer)]
                         if t.checkpoint_every else [])
    common = training_arguments(cfg, seed_dir, seed, progress=progress)
    table = train.table_with_prompt_ids()
    if arm == "probe_sft":
        texts = sft_texts(train, t.sft_continuations_per_prompt)
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
    info = {"arm": arm, "seed": seed, "base": str(source), "config": cfg.model_dump(),
            "global_step": log.global_step, "log_history": log.log_history, **info_extra}
    return save_finetuned(trained, tokenizer, seed_dir, info=info)["merged"]


def _hub_offline() -> bool:
    from aligned_probing.models.hub import offline_reason

    return offline_reason() is not None


@dataclass
class _Context:
    """What every evaluation shares: eval prompts, frozen probes, the probe-training half, the scorer."""

    cfg: FinetuneConfig
    layer: int
    eval_prompts: pd.DataFrame
    probes: dict[str, ProbeSet]
    probe_half: LabelledSamples
    scorer: Scorer
    texts: list[str]
    progress: bool = False


def _evaluate(
    model: LoadedModel, ctx: _Context, arm: str, seed: int, out_dir: Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Toxicity, probe AUROCs with CIs (frozen, ensemble, held-out, retrained) and perplexity of one model.

    Every AUROC is measured on all of this model's continuations of the eval prompts. The retrained
    probe is fitted on exactly the rows the frozen training probe was fitted on (the same texts and
    labels, re-encoded by this model), so it has the same amount of data.

    Returns:
        The tidy metric rows and the per-continuation probe scores (for paired comparisons).
    """
    cfg, ev = ctx.cfg, ctx.cfg.evaluation
    samples = _sample(model, ctx.eval_prompts, cfg, ctx.scorer, ctx.layer, ctx.progress)
    save_samples(samples, out_dir / "eval_samples.parquet")
    half = ctx.probe_half
    refit_X = pooled_response_activations(
        model.hf_model, half.prompt_ids, [list(t) for t in half.table["token_ids"]], ctx.layer,
        pad_token_id=model.pad_token_id, progress=ctx.progress,
    )
    retrained = fit_probe_set(refit_X, half.table["label"].to_numpy(), n_probes=1, C=cfg.probes.C,
                              seed=cfg.probes.seed)
    sets = {"frozen": ctx.probes["train"], "ensemble": ctx.probes["ensemble"],
            "heldout": ctx.probes["heldout"], "retrained": retrained}
    y = samples.table["label"].to_numpy()
    pids = samples.table["prompt_id"].to_numpy()
    rows, score_frames = [], []
    for kind, ps in sets.items():
        scores = ps.decision_function(samples.activations)
        value, low, high = auroc_with_ci(pids, scores, y, n_boot=ev.n_boot, seed=cfg.data.seed,
                                         level=ev.ci_level)
        rows.append({"metric": f"auroc_{kind}", "value": value, "ci_low": low, "ci_high": high, "n": len(y)})
        score_frames.append(pd.DataFrame({"probe": kind, "prompt_id": pids, "score": scores, "label": y}))
    rows.append({"metric": "n_toxic_test", "value": float(y.sum()), "n": len(y)})
    tox = toxicity_summary(samples.table, threshold=cfg.probes.threshold, n_boot=ev.n_boot,
                           seed=cfg.data.seed)
    rows += [{"metric": r.metric, "value": r.value, "ci_low": r.ci_low, "ci_high": r.ci_high,
              "n": r.n_continuations} for r in tox.itertuples()]
    rows.append({"metric": "perplexity", "n": len(ctx.texts), "value": perplexity(
        model.hf_model, model.tokenizer, ctx.texts, max_length=ev.ppl_max_length, progress=ctx.progress)})
    # The per-prompt max toxicity, for paired EMT differences, as probe kind "scorer_max".
    emt = samples.table.groupby("prompt_id", sort=False)["toxicity"].max()
    score_frames.append(pd.DataFrame({"probe": "scorer_max", "prompt_id": emt.index, "score": emt.to_numpy(),
                                      "label": -1}))
    scores_frame = pd.concat(score_frames, ignore_index=True).assign(arm=arm, seed=seed)
    scores_frame.to_parquet(out_dir / "probe_scores.parquet", index=False)
    return pd.DataFrame(rows).assign(arm=arm, seed=seed), scores_frame


def paired_comparisons(scores: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0,
                       level: float = 0.95) -> pd.DataFrame:
    """AUROC and EMT differences between every two arms (and each arm vs base), paired by prompt, seed.

    Args:
        scores: Per-continuation probe scores: `arm`, `seed`, `probe`, `prompt_id`, `score`, `label`;
            rows with `probe == "scorer_max"` hold each prompt's max toxicity (one row per prompt)
            and give the `emt` difference. The base model (one evaluation) is compared with every
            seed of an arm.
        n_boot: Bootstrap resamples of the shared eval prompts.
        seed: Seed of the resampling.
        level: Coverage of the intervals.

    Returns:
        Tidy rows `arm_a`, `arm_b`, `metric` (`auroc_{probe}` or `emt`), `difference` (A - B, mean
        over seeds),
        `ci_low`, `ci_high`, `n_seeds`.
    """
    arms = [a for a in dict.fromkeys(scores["arm"]) if a != "base"]
    seeds = sorted(set(scores.loc[scores["arm"] != "base", "seed"]))
    base = scores[scores["arm"] == "base"]
    if not base.empty:  # the base model has no training seed: compare it with every seed
        base = pd.concat([base.assign(seed=s) for s in seeds], ignore_index=True)
    pairs = [(a, b) for i, a in enumerate(arms) for b in arms[i + 1:]]
    pairs += [(a, "base") for a in arms] if not base.empty else []
    rows = []
    for arm_a, arm_b in pairs:
        for probe in dict.fromkeys(scores["probe"]):
            fa = scores[(scores["arm"] == arm_a) & (scores["probe"] == probe)]
            fb = (base if arm_b == "base" else scores[scores["arm"] == arm_b])
            fb = fb[fb["probe"] == probe]
            if probe == "scorer_max":
                diff, low, high = paired_mean_difference(fa.rename(columns={"score": "value"}),
                                                         fb.rename(columns={"score": "value"}),
                                                         n_boot=n_boot, seed=seed, level=level)
            else:
                diff, low, high = paired_auroc_difference(fa, fb, n_boot=n_boot, seed=seed, level=level)
            metric = "emt" if probe == "scorer_max" else f"auroc_{probe}"
            rows.append({"arm_a": arm_a, "arm_b": arm_b, "metric": metric, "difference": diff,
                         "ci_low": low, "ci_high": high, "n_seeds": len(seeds)})
    columns = ["arm_a", "arm_b", "metric", "difference", "ci_low", "ci_high", "n_seeds"]
    return pd.DataFrame(rows, columns=columns)


def results_wide(results: pd.DataFrame) -> pd.DataFrame:
    """The paper-style table, one row per arm (means over seeds): toxicity, AUROCs, perplexity."""
    base = results[results["arm"] == "base"].groupby("metric")["value"].mean()
    rows = []
    for arm, group in results[results["arm"] != "base"].groupby("arm", sort=False):
        v = group.groupby("metric")[["value", "ci_low", "ci_high"]].mean()
        row = {"arm": arm, "n_seeds": group["seed"].nunique(),
               "emt_before": base.get("emt"), "emt_after": v.loc["emt", "value"],
               "toxic_rate_before": base.get("toxic_rate"), "toxic_rate_after": v.loc["toxic_rate", "value"]}
        if group["seed"].nunique() == 1:  # with several seeds the per-seed CIs live in results.parquet
            row["emt_after_ci"] = f"[{v.loc['emt', 'ci_low']:.3f}, {v.loc['emt', 'ci_high']:.3f}]"
        row.update({f"auroc_{p}": v.loc[f"auroc_{p}", "value"] for p in PROBE_KINDS})
        row.update({"ppl_before": base.get("perplexity"), "ppl_after": v.loc["perplexity", "value"]})
        rows.append(row)
    return pd.DataFrame(rows)


def completed_results(config: str | Path | dict | FinetuneConfig) -> pd.DataFrame | None:
    """The tidy results of a finished run of exactly this config in its `output_dir`, else None.

    A run counts as finished when `results_wide.csv` exists (written last), the saved
    `config.json` equals this config and `resolved.json` records this code's `FINETUNE_VERSION`,
    so a notebook can load instead of re-training.
    """
    cfg = config if isinstance(config, FinetuneConfig) else load_finetune_config(config)
    out = Path(cfg.output_dir)
    needed = ("results_wide.csv", "config.json", "resolved.json")
    if not all((out / name).exists() for name in needed):
        return None
    if json.loads((out / "resolved.json").read_text()).get("finetune_version") != FINETUNE_VERSION:
        return None
    saved = json.loads((out / "config.json").read_text())
    if saved != json.loads(json.dumps(cfg.model_dump())):
        return None
    return pd.read_parquet(out / "results.parquet")


def _trainable_source(base: Any, cfg: FinetuneConfig, out: Path) -> str | Path:
    """What `load_trainable` reads: the model's local directory, its hub name, or a merged copy.

    A PEFT adapter spec is merged by `load_model` onto its base (whose directory is `base.path`), so
    the merged weights are written once to `base/model/` and trained from there.
    """
    spec = Path(cfg.model.spec).expanduser()
    if spec.is_dir() and (spec / "adapter_config.json").exists():
        target = out / "base" / "model"
        base.hf_model.save_pretrained(target, safe_serialization=True)
        base.tokenizer.save_pretrained(target)
        return target
    return base.path if base.path is not None else cfg.model.spec


def run_finetune(config: str | Path | dict | FinetuneConfig, *, progress: bool = False) -> pd.DataFrame:
    """Run every configured arm with every training seed and return the tidy results.

    Args:
        config: A TOML path, a dict, or a `FinetuneConfig`.
        progress: Show tqdm bars: one over the models to evaluate (the base model, then each arm
            and seed, trained then evaluated), and per step the generation batches, the
            activation batches, each arm's optimizer steps (the Trainer's own bar) and the
            perplexity batches.

    Returns:
        Tidy rows `arm` (`base` for the model before fine-tuning), `seed` (-1 for base), `metric`,
        `value`, `ci_low`, `ci_high`, `n`; also written to `output_dir` with `comparisons.parquet`.

    Example:
        >>> results = run_finetune("configs/finetune_quick.toml")  # doctest: +SKIP
        >>> results_wide(results)  # doctest: +SKIP
    """
    from aligned_probing.models import load_model

    # Private: TRL's trainers ping a telemetry endpoint unless told not to. The hub itself is not
    # switched off: a hub name is read from the local cache, and offline `load_model` fails at once.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    cfg = config if isinstance(config, FinetuneConfig) else load_finetune_config(config)
    # Resolve everything before writing anything (a bad option or path leaves output_dir untouched).
    scorer = get_training_scorer(cfg.scorer)
    train_prompts, eval_prompts = split_prompts(cfg)
    m = cfg.model
    base = load_model(m.spec, dtype=m.dtype, device=m.device, revision=m.revision)
    layer = resolve_probe_layer(cfg, base.n_layers, base.name)
    texts = benign_texts(cfg.evaluation.n_benign, path=cfg.evaluation.benign_path, seed=cfg.data.seed)

    out = Path(cfg.output_dir)
    (out / "base").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.model_dump(), indent=2))
    resolved = {"layer": layer, "n_layers": base.n_layers, "model": base.name, "revision": base.revision,
                "finetune_version": FINETUNE_VERSION}
    (out / "resolved.json").write_text(json.dumps(resolved, indent=2))
    n_models = 1 + len(cfg.training.arms) * len(cfg.training.seeds)
    bar = tqdm(total=n_models, desc="finetune", unit="model", disable=not progress)
    bar.set_postfix_str("base: sample training pairs")
    train = _sample(base, train_prompts, cfg, scorer, layer, progress)
    save_samples(train, out / "base" / "train_samples.parquet")
    meta = {"model": base.name, "revision": base.revision, "hook_name": base.hook_names[layer],
            "layer": layer, "pooling": "mean_response", "d_model": base.d_model}
    probes = fit_run_probes(train, cfg, meta)
    for name, ps in probes.items():
        ps.save(out / "base" / "probes" / name)
    ctx = _Context(cfg, layer, eval_prompts, probes, probe_halves(train, cfg)[0], scorer, texts, progress)
    bar.set_postfix_str("base: evaluate")
    frame, scores = _evaluate(base, ctx, "base", -1, out / "base")
    bar.update()
    frames, score_frames = [frame], [scores]
    frames[0].to_parquet(out / "results.parquet", index=False)  # partial results survive an interruption
    source = _trainable_source(base, cfg, out)
    del base
    for arm in cfg.training.arms:
        for seed in cfg.training.seeds:
            arm_dir = out / arm
            (arm_dir / f"seed{seed}").mkdir(parents=True, exist_ok=True)
            logger.info("training arm %s, seed %d", arm, seed)
            bar.set_postfix_str(f"{arm} seed {seed}: train")
            merged_dir = _train_arm(arm, source, train, probes, cfg, arm_dir, seed, progress)
            tuned = load_model(merged_dir, dtype=cfg.model.dtype, device=cfg.model.device)
            bar.set_postfix_str(f"{arm} seed {seed}: evaluate")
            frame, scores = _evaluate(tuned, ctx, arm, seed, arm_dir / f"seed{seed}")
            bar.update()
            frames.append(frame)
            score_frames.append(scores)
            del tuned
            pd.concat(frames, ignore_index=True).to_parquet(out / "results.parquet", index=False)
    bar.close()
    columns = ["arm", "seed", "metric", "value", "ci_low", "ci_high", "n"]
    results = pd.concat(frames, ignore_index=True)[columns]
    ev = cfg.evaluation
    comparisons = paired_comparisons(pd.concat(score_frames, ignore_index=True), n_boot=ev.n_boot,
                                     seed=cfg.data.seed, level=ev.ci_level)
    comparisons.to_parquet(out / "comparisons.parquet", index=False)
    results.to_parquet(out / "results.parquet", index=False)
    results_wide(results).to_csv(out / "results_wide.csv", index=False)
    return results
