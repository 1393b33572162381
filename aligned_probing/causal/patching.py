"""Activation patching between matched toxic and non-toxic prompts.

Pairs are matched by prompt length in tokens within one template (`match_pairs`). For a pair and
a direction (source -> target), the residual stream at layer l of the source run is written into
the target run, either at the prompt span's last position (`positions="last"`, any lengths) or at
every prompt position (`positions="all"`, pairs of equal rendered length and span). We measure

(a) the probe read-out of the target at layers >= l (the probe of each layer applied to the
    target's pooled prompt encoding), patched vs clean, and
(b) the toxicity of continuations generated from the patched target (k samples, the same seeds
    as the clean target: paired), patched vs clean,

in both directions (`toxic_to_nontoxic`: source toxic, target non-toxic; and the reverse).

Trap: a patch at layer l changes the prompt's residual stream from l on, but the KV cache of
blocks below l still holds the *target* prompt, and generated tokens attend to it. So even
`positions="all"` makes continuations equal the source's only at l = 0. And with template 0
(no template tokens) `positions="all"` replaces the whole sequence from l on, so read-outs at
layers >= l equal the source's trivially; `positions="last"` is the informative read-out there.

Each effect is a mean over pairs of a paired difference with a bootstrap CI over pairs; `source`
gives the clean source's mean, so `fraction_of_gap` = delta / mean(source - baseline) is the share
of the gap that moved. Read-out rows have `k = 0`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment

from aligned_probing.behaviour import METRICS, per_prompt_metrics
from aligned_probing.causal._activations import Predictor, probe_readout, record_residuals
from aligned_probing.causal._runs import GenerationSettings, StatSettings, effect_row, generate_and_score
from aligned_probing.causal.interventions import ResidualPatch
from aligned_probing.data import SCORE_PREFIX
from aligned_probing.data.templates import RenderedPrompt, render_prompt

DIRECTIONS: tuple[str, ...] = ("toxic_to_nontoxic", "nontoxic_to_toxic")
PAIR_COLUMNS: tuple[str, ...] = (
    "pair_id",
    "toxic_prompt_id",
    "nontoxic_prompt_id",
    "toxic_text",
    "nontoxic_text",
    "toxic_score",
    "nontoxic_score",
    "toxic_length",
    "nontoxic_length",
)
PATCHING_COLUMNS: tuple[str, ...] = (
    "model",
    "template",
    "attribute",
    "positions",
    "direction",
    "measure",
    "layer",
    "readout_layer",
    "value",
    "baseline",
    "source",
    "delta",
    "ci_low",
    "ci_high",
    "excludes_zero",
    "fraction_of_gap",
    "n_pairs",
    "k",
)


def match_pairs(
    prompts: pd.DataFrame,
    tokenizer: Any,
    *,
    attribute: str = "toxicity",
    threshold: float = 0.5,
    template: int = 0,
    exact_length: bool = False,
    max_pairs: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Pair toxic with non-toxic prompts of (nearly) the same rendered length in `template`.

    Length is the number of tokens of the rendered prompt. With `exact_length`, only equal lengths
    pair (needed for `positions="all"`); prompts of each length are shuffled with `seed` and zipped.
    Otherwise pairs minimise the total |length difference| (`scipy.optimize.linear_sum_assignment`),
    and the `max_pairs` closest are kept.

    Args:
        prompts: `prompt_id`, `text` and `prompt_{attribute}` (toxic: >= threshold; NaN: unused).
        tokenizer: The model's tokenizer.
        attribute: Attribute that defines toxic / non-toxic.
        threshold: Toxic at or above.
        template: Template 0-4 the lengths are measured in.
        exact_length: Only pair equal lengths.
        max_pairs: Keep at most this many pairs (closest lengths first).
        seed: Seed for the order within equal-length groups.

    Returns:
        One row per pair with `PAIR_COLUMNS`.
    """
    col = f"{SCORE_PREFIX}{attribute}"
    missing = [c for c in ("prompt_id", "text", col) if c not in prompts.columns]
    if missing:
        raise ValueError(f"prompts lacks column(s) {missing}; score the prompts first (PromptSet.score).")
    df = prompts.dropna(subset=[col]).reset_index(drop=True)
    df = df.assign(length=[len(render_prompt(tokenizer, t, template).input_ids) for t in df["text"]])
    tox, non = df[df[col] >= threshold].reset_index(drop=True), df[df[col] < threshold].reset_index(drop=True)
    if tox.empty or non.empty:
        raise ValueError(f"Need toxic and non-toxic prompts on {attribute!r}; got {len(tox)} and {len(non)}.")
    if exact_length:
        rng = np.random.default_rng(seed)
        pairs = []
        for length, t in tox.groupby("length"):
            n = non[non["length"] == length]
            ti, ni = rng.permutation(t.index.to_numpy().copy()), rng.permutation(n.index.to_numpy().copy())
            pairs += list(zip(ti[: len(ni)], ni[: len(ti)], strict=True))
    else:
        cost = np.abs(tox["length"].to_numpy()[:, None] - non["length"].to_numpy()[None, :])
        rows, cols = linear_sum_assignment(cost)
        pairs = sorted(zip(rows, cols, strict=True), key=lambda rc: (cost[rc], rc))
    if max_pairs is not None:
        pairs = pairs[:max_pairs]
    t, n = (
        tox.loc[[p[0] for p in pairs]].reset_index(drop=True),
        non.loc[[p[1] for p in pairs]].reset_index(drop=True),
    )
    return pd.DataFrame(
        {
            "pair_id": np.arange(len(pairs)),
            "toxic_prompt_id": t["prompt_id"],
            "nontoxic_prompt_id": n["prompt_id"],
            "toxic_text": t["text"],
            "nontoxic_text": n["text"],
            "toxic_score": t[col],
            "nontoxic_score": n[col],
            "toxic_length": t["length"],
            "nontoxic_length": n["length"],
        },
        columns=list(PAIR_COLUMNS),
    )


def _patch_for(
    src: RenderedPrompt, tgt: RenderedPrompt, src_resid: torch.Tensor, layer: int, positions: str
) -> ResidualPatch:
    """The `ResidualPatch` writing the source's activations into the target (src_resid: [pos, d])."""
    if positions == "last":
        return ResidualPatch(layer, src_resid[src.prompt_end - 1 : src.prompt_end], [tgt.prompt_end - 1])
    if len(src.input_ids) != len(tgt.input_ids) or (src.prompt_start, src.prompt_end) != (
        tgt.prompt_start,
        tgt.prompt_end,
    ):
        raise ValueError(
            f"positions='all' needs pairs of equal rendered length and prompt span; got lengths "
            f"{len(src.input_ids)} and {len(tgt.input_ids)}. Build pairs with "
            "match_pairs(..., exact_length=True)."
        )
    span = list(range(tgt.prompt_start, tgt.prompt_end))
    return ResidualPatch(layer, src_resid[span], span)


def _check_args(
    model: Any, layers: Sequence[int], positions: str, probes: Mapping[int, Predictor] | None, scorer: Any
) -> list[int]:
    if positions not in ("last", "all"):
        raise ValueError(f"positions must be 'last' or 'all', got {positions!r}.")
    layers = [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x <= model.n_layers]
    if bad:
        raise ValueError(f"layers must be in 0..{model.n_layers}, got {bad}.")
    if probes is None and scorer is None:
        raise ValueError("Pass probes (read-out effect), a scorer (behaviour effect), or both; got neither.")
    return layers


def clean_pair_continuations(
    model: Any, pairs: pd.DataFrame, scorer: Any, generation: GenerationSettings | None = None
) -> pd.DataFrame:
    """Scored continuations of every pair's toxic and non-toxic prompt, unpatched, in one batch.

    Per-row seeds make each prompt's continuations independent of the batch, so these equal the
    clean runs one prompt at a time; pass them to several `activation_patching` calls to share them.
    """
    gen = generation or GenerationSettings()
    frame = pd.concat(
        [
            pairs[["toxic_prompt_id", "toxic_text"]].set_axis(["prompt_id", "text"], axis=1),
            pairs[["nontoxic_prompt_id", "nontoxic_text"]].set_axis(["prompt_id", "text"], axis=1),
        ],
        ignore_index=True,
    ).drop_duplicates("prompt_id")
    return generate_and_score(model, frame, scorer, gen)


def activation_patching(
    model: Any,
    pairs: pd.DataFrame,
    *,
    layers: Sequence[int],
    probes: Mapping[int, Predictor] | None = None,
    pooling: str = "mean",
    scorer: Any = None,
    generate_layers: Sequence[int] | None = None,
    positions: str = "last",
    generation: GenerationSettings | None = None,
    stats: StatSettings | None = None,
    clean_continuations: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Patch source -> target residuals per layer; measure probe read-out and continuation toxicity.

    Args:
        model: A `LoadedModel`.
        pairs: Matched pairs (`match_pairs`).
        layers: Residual layers 0..L to patch (one at a time).
        probes: `{layer: predictor}` fitted on pooled prompt encodings (`pooling`), single output;
            read-out rows are reported for every probed layer >= the patched layer.
        pooling: "mean" over the prompt span or "last", as the probes were trained.
        scorer: Scorer for continuation toxicity (None: no generation).
        generate_layers: Layers whose patched runs are also generated from (default: `layers`);
            generation dominates the cost.
        positions: "last" (prompt span's last position) or "all" (every prompt position; pairs of
            equal length).
        generation: Sampling settings (the same seeds for patched and clean targets).
        stats: Attribute, threshold and bootstrap settings (bootstrap over pairs).
        clean_continuations: Scored continuations of the unpatched pair prompts with the same
            `generation` settings (`clean_pair_continuations`), to share them between calls (e.g.
            one call per block of layers); generated here, all pairs in one batch, when None.

    Returns:
        Tidy rows with `PATCHING_COLUMNS`: `measure` = "readout" (with `readout_layer`) or a
        behaviour metric (`readout_layer` <NA>); per (direction, layer[, readout_layer]).

    Example:
        >>> pairs = match_pairs(prompts.df, model.tokenizer, max_pairs=50)  # doctest: +SKIP
        >>> activation_patching(model, pairs, layers=[4, 8], probes=probes, scorer=scorer)  # doctest: +SKIP
    """
    gen = generation or GenerationSettings()
    stat = stats or StatSettings()
    layers = _check_args(model, layers, positions, probes, scorer)
    gen_layers = (
        [int(x) for x in (layers if generate_layers is None else generate_layers)]
        if scorer is not None
        else []
    )
    probes = dict(probes or {})
    readout_records: list[dict] = []
    behaviour_frames: list[pd.DataFrame] = []
    clean_behaviour: dict[str, pd.DataFrame] = {}
    if gen_layers:
        if clean_continuations is None:
            clean_continuations = clean_pair_continuations(model, pairs, scorer, gen)
        clean_behaviour = dict(tuple(clean_continuations.groupby("prompt_id", sort=False)))
        wanted = set(pairs.toxic_prompt_id) | set(pairs.nontoxic_prompt_id)
        missing = sorted(wanted - set(clean_behaviour))
        if missing:
            raise ValueError(f"clean_continuations has no rows for the pair prompt(s) {missing[:5]}.")
    for pair in pairs.itertuples(index=False):
        texts = {"toxic": pair.toxic_text, "nontoxic": pair.nontoxic_text}
        ids = {"toxic": pair.toxic_prompt_id, "nontoxic": pair.nontoxic_prompt_id}
        rendered = {s: render_prompt(model.tokenizer, t, gen.template) for s, t in texts.items()}
        clean = {s: record_residuals(model, torch.tensor([r.input_ids])) for s, r in rendered.items()}
        span = {s: (r.prompt_start, r.prompt_end) for s, r in rendered.items()}
        clean_read = {s: probe_readout(clean[s], probes, span[s], pooling) for s in rendered}
        for direction in DIRECTIONS:
            src, tgt = ("toxic", "nontoxic") if direction == "toxic_to_nontoxic" else ("nontoxic", "toxic")
            tgt_ids = torch.tensor([rendered[tgt].input_ids])
            for layer in layers:
                patch = _patch_for(rendered[src], rendered[tgt], clean[src][layer][0], layer, positions)
                later = [x for x in probes if x >= layer]
                if later:
                    res = record_residuals(model, tgt_ids, later, intervention=patch)
                    read = probe_readout(res, {x: probes[x] for x in later}, span[tgt], pooling)
                    for x in later:
                        readout_records.append(
                            {
                                "pair_id": pair.pair_id,
                                "direction": direction,
                                "layer": layer,
                                "readout_layer": x,
                                "value": read[x][0],
                                "baseline": clean_read[tgt][x][0],
                                "source": clean_read[src][x][0],
                            }
                        )
                if layer in gen_layers:
                    frame = pd.DataFrame({"prompt_id": [ids[tgt]], "text": [texts[tgt]]})
                    patched = generate_and_score(model, frame, scorer, gen, intervention=patch)
                    behaviour_frames.append(
                        _pair_behaviour(
                            patched,
                            clean_behaviour[ids[tgt]],
                            clean_behaviour[ids[src]],
                            stat,
                            pair_id=pair.pair_id,
                            direction=direction,
                            layer=layer,
                        )
                    )
    out = pd.concat(
        [_summarise_readouts(readout_records, stat), _summarise_behaviour(behaviour_frames, stat)],
        ignore_index=True,
    )
    out.insert(0, "positions", positions)
    out.insert(0, "attribute", stat.attribute)
    out.insert(0, "template", gen.template)
    out.insert(0, "model", model.name)
    return out[list(PATCHING_COLUMNS)].astype({"readout_layer": "Int64"})


def _pair_behaviour(
    patched: pd.DataFrame, target: pd.DataFrame, source: pd.DataFrame, stat: StatSettings, **keys: Any
) -> pd.DataFrame:
    """Per-pair behaviour metrics of the patched target, the clean target and the clean source."""

    def metrics(df: pd.DataFrame) -> pd.Series:
        return per_prompt_metrics(df, stat.attribute, threshold=stat.threshold).iloc[0]

    p, t, s = metrics(patched), metrics(target), metrics(source)
    return pd.DataFrame(
        [
            {**keys, "metric": m, "value": p[m], "baseline": t[m], "source": s[m], "k": int(p["k"])}
            for m in METRICS
        ]
    )


def _summarise(per_pair: pd.DataFrame, keys: list[str], stat: StatSettings) -> pd.DataFrame:
    rows = []
    for key, grp in per_pair.groupby(keys, sort=True):
        value, base, source = (grp[c].to_numpy(dtype=np.float64) for c in ("value", "baseline", "source"))
        row = effect_row("", value, base, value - base, stat, k=int(grp["k"].min()) if "k" in grp else 0)
        gap = float(np.mean(source - base))
        row.update(
            dict(zip(keys, key, strict=True)),
            source=float(source.mean()),
            fraction_of_gap=row["delta"] / gap if abs(gap) > 1e-12 else np.nan,
            n_pairs=row.pop("n_prompts"),
        )
        rows.append(row)
    return pd.DataFrame(rows)


def _summarise_readouts(records: list[dict], stat: StatSettings) -> pd.DataFrame:
    if not records:
        return pd.DataFrame()
    out = _summarise(pd.DataFrame(records), ["direction", "layer", "readout_layer"], stat)
    return out.assign(measure="readout").drop(columns="metric")


def _summarise_behaviour(frames: list[pd.DataFrame], stat: StatSettings) -> pd.DataFrame:
    if not frames:
        return pd.DataFrame()
    per_pair = pd.concat(frames, ignore_index=True).rename(columns={"metric": "measure"})
    out = _summarise(per_pair, ["direction", "layer", "measure"], stat).drop(columns="metric")
    return out.assign(readout_layer=pd.NA)
