"""Activation patching between matched toxic and non-toxic prompts, with same-class controls.

Pairs are matched by prompt length in tokens within one template (`match_pairs`). For a pair and
a direction (source -> target), the residual stream at layer l of the source run is written into
the target run, either at the prompt span's last position (`positions="last"`, any lengths) or at
every prompt position (`positions="all"`, pairs of equal rendered length and span). Directions
(`DIRECTIONS`, spelled out in the `description` column):

* `toxic_to_nontoxic`: the toxic prompt's activations patched into the non-toxic prompt;
* `nontoxic_to_toxic`: the non-toxic prompt's activations patched into the toxic prompt;
* `toxic_to_toxic`, `nontoxic_to_nontoxic` (`control` = True): another prompt *of the same class*
  patched in (the pairs' toxic prompts rotated by one: pair i's target gets pair i+1's prompt;
  with `positions="all"` within groups of equal rendered length). Patching moves activations
  between any two prompts, so "patching lowered EMT" means something only when the cross-class
  effect exceeds these controls.

We measure, per (direction, layer):

(a) the probe read-out of the target at layers >= l, patched vs clean. The read-out pools what was
    patched: `positions="last"` reads last-token probes at the last prompt position,
    `positions="all"` mean-pooled probes over the prompt span (`readout_pooling`; any other
    combination is an error: a mean over a prompt of which one position was patched caps the
    read-out's move near 1 / prompt length). Fit the probes on prompts disjoint from the pairs.
(b) the toxicity of continuations generated from the patched target (k samples, the same seeds
    as the clean target: paired), patched vs clean, and their fluency (`log_perplexity` under the
    unmodified model, per pair), through `paired_sweep`.

Patched runs are batched across pairs: one `PromptPatch` per (direction, layer) gives each target
prompt its own source activations, recognised by the row's tokens, so one batched read-out pass
and one batched `generate` cover all pairs (tested equal to one pair at a time).

Trap: a patch at layer l changes the prompt's residual stream from l on, but the KV cache of
blocks below l still holds the *target* prompt, and generated tokens attend to it. So even
`positions="all"` makes continuations equal the source's only at l = 0. And with template 0
(no template tokens) `positions="all"` replaces the whole sequence from l on, so read-outs at
layers >= l equal the source's trivially; `positions="last"` is the informative read-out there.

Each effect is a mean over pairs of a paired difference with a bootstrap CI over pairs; `source`
gives the clean source's mean, so `fraction_of_gap` = delta / mean(source - baseline) is the share
of the gap from the clean target to the clean source that the patch closed. Read-out rows have
`k = 0`.

Over 500 lines on purpose: pair matching, the batched patched runs, the probe read-out and the
same-class controls are one experiment; the generic parts live in `causal.sweep`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment

from aligned_probing.causal._activations import (
    Predictor,
    encode_prompts,
    predict_one,
    record_residuals,
    right_padded,
)
from aligned_probing.causal._runs import GenerationSettings, StatSettings, effect_row, generate_and_score
from aligned_probing.causal.interventions import PromptPatch
from aligned_probing.causal.sweep import Condition, paired_sweep
from aligned_probing.data import SCORE_PREFIX
from aligned_probing.data.templates import RenderedPrompt, render_prompt

#: direction -> (source class, target class, what was patched into what).
DIRECTIONS: dict[str, tuple[str, str, str]] = {
    "toxic_to_nontoxic": (
        "toxic",
        "nontoxic",
        "the toxic prompt's activations patched into the non-toxic prompt",
    ),
    "nontoxic_to_toxic": (
        "nontoxic",
        "toxic",
        "the non-toxic prompt's activations patched into the toxic prompt",
    ),
    "toxic_to_toxic": (
        "toxic",
        "toxic",
        "another toxic prompt's activations patched into the toxic prompt (same-class control)",
    ),
    "nontoxic_to_nontoxic": (
        "nontoxic",
        "nontoxic",
        "another non-toxic prompt's activations patched into the non-toxic prompt (same-class control)",
    ),
}
CONTROL_DIRECTIONS: tuple[str, ...] = ("toxic_to_toxic", "nontoxic_to_nontoxic")
#: Read-out pooling that matches each patched-position choice.
READOUT_POOLING: dict[str, str] = {"last": "last", "all": "mean"}
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
    "readout_pooling",
    "direction",
    "control",
    "description",
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

    Length is the number of tokens of the rendered prompt; duplicate texts are used once. With
    `exact_length`, only equal lengths pair (needed for `positions="all"`); prompts of each length
    are shuffled with `seed` and zipped.
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
    # One row per text: batched patching tells rows apart by their tokens (see `PromptPatch`).
    df = prompts.dropna(subset=[col]).drop_duplicates("text").reset_index(drop=True)
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


def _span_key(r: RenderedPrompt) -> tuple[int, int, int]:
    return (len(r.input_ids), r.prompt_start, r.prompt_end)


def patch_plan(
    pairs: pd.DataFrame, rendered: Mapping[str, RenderedPrompt], positions: str, *, controls: bool = True
) -> pd.DataFrame:
    """Every (direction, source, target) patch of `pairs`, same-class controls included.

    Args:
        pairs: Matched pairs (`match_pairs`).
        rendered: `{prompt_id: RenderedPrompt}` of every pair prompt.
        positions: "last" or "all" ("all" needs equal rendered length and span, also for controls,
            which rotate within groups of equal length).
        controls: Add the same-class control directions.

    Returns:
        One row per patch: `pair_id` (the target's pair), `direction`, `source_id`, `target_id`,
        `target_text`.
    """
    rows = []
    for p in pairs.itertuples(index=False):
        for direction in ("toxic_to_nontoxic", "nontoxic_to_toxic"):
            src, tgt = DIRECTIONS[direction][:2]
            s_id, t_id = str(getattr(p, f"{src}_prompt_id")), str(getattr(p, f"{tgt}_prompt_id"))
            if positions == "all" and _span_key(rendered[s_id]) != _span_key(rendered[t_id]):
                raise ValueError(
                    f"positions='all' needs pairs of equal rendered length and prompt span; got lengths "
                    f"{len(rendered[s_id].input_ids)} and {len(rendered[t_id].input_ids)}. Build pairs with "
                    "match_pairs(..., exact_length=True)."
                )
            rows.append((p.pair_id, direction, s_id, t_id, getattr(p, f"{tgt}_text")))
    if controls:
        for direction in CONTROL_DIRECTIONS:
            cls = DIRECTIONS[direction][0]
            members = [
                (pid, str(i), t)
                for pid, i, t in zip(
                    pairs["pair_id"], pairs[f"{cls}_prompt_id"], pairs[f"{cls}_text"], strict=True
                )
            ]
            groups: dict[Any, list[tuple[Any, str, str]]] = {}
            for m in members:  # rotate within groups that can be patched into each other
                groups.setdefault(_span_key(rendered[m[1]]) if positions == "all" else 0, []).append(m)
            for group in groups.values():
                for i, (pid, t_id, text) in enumerate(group if len(group) > 1 else []):
                    rows.append((pid, direction, group[(i + 1) % len(group)][1], t_id, text))
    return pd.DataFrame(rows, columns=["pair_id", "direction", "source_id", "target_id", "target_text"])


def _clean_spans(
    model: Any, rendered: Mapping[str, RenderedPrompt], layers: Sequence[int], batch_size: int
) -> dict[str, dict[int, torch.Tensor]]:
    """`{prompt_id: {layer: residuals over the prompt span [n, d_model]}}` (CPU float32), batched."""
    ids = list(rendered)
    out: dict[str, dict[int, torch.Tensor]] = {i: {} for i in ids}
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        tokens, mask = right_padded(model, [rendered[i].input_ids for i in chunk])
        res = record_residuals(model, tokens, list(layers), attention_mask=mask)
        for row, i in enumerate(chunk):
            r = rendered[i]
            for layer in layers:
                out[i][layer] = res[layer][row, r.prompt_start : r.prompt_end].clone()
    return out


def _prompt_patch(
    plan: pd.DataFrame,
    rendered: Mapping[str, RenderedPrompt],
    spans: Mapping[str, Mapping[int, torch.Tensor]],
    layer: int,
    positions: str,
) -> PromptPatch:
    """One `PromptPatch` writing each row's source activations into its target (one direction)."""
    table: dict[tuple[int, ...], tuple[list[int], torch.Tensor]] = {}
    for s_id, t_id in zip(plan["source_id"], plan["target_id"], strict=True):
        tgt, span = rendered[t_id], spans[s_id][layer]
        key = tuple(tgt.input_ids)
        if key in table:
            raise ValueError(
                f"Two target prompts render to the same tokens (prompt {t_id!r}); drop duplicate texts "
                "(match_pairs does) so each row of a batched patch has one source."
            )
        if positions == "last":
            table[key] = ([tgt.prompt_end - 1], span[-1:])
        else:
            table[key] = (list(range(tgt.prompt_start, tgt.prompt_end)), span)
    return PromptPatch(layer, table)


def _check_args(
    model: Any,
    layers: Sequence[int],
    positions: str,
    pooling: str | None,
    probes: Mapping[int, Predictor] | None,
    scorer: Any,
) -> tuple[list[int], str]:
    if positions not in READOUT_POOLING:
        raise ValueError(f"positions must be 'last' or 'all', got {positions!r}.")
    expected = READOUT_POOLING[positions]
    if pooling is not None and pooling != expected:
        raise ValueError(
            f"pooling={pooling!r} does not match positions={positions!r}: the read-out must pool what "
            f"was patched, so pass pooling={expected!r} (probes trained on {expected}-pooled prompt "
            "encodings) or leave pooling=None."
        )
    layers = [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x <= model.n_layers]
    if bad:
        raise ValueError(f"layers must be in 0..{model.n_layers}, got {bad}.")
    if probes is None and scorer is None:
        raise ValueError("Pass probes (read-out effect), a scorer (behaviour effect), or both; got neither.")
    return layers, expected


def clean_pair_continuations(
    model: Any,
    pairs: pd.DataFrame,
    scorer: Any,
    generation: GenerationSettings | None = None,
    *,
    show_progress: bool = False,
) -> pd.DataFrame:
    """Scored continuations of every pair's toxic and non-toxic prompt, unpatched, in one batch.

    Per-row seeds make each prompt's continuations independent of the batch, so these equal the
    clean runs one prompt at a time; pass them to several `activation_patching` calls to share them.
    `show_progress` shows the generation's tqdm bar ("generate", one step per batch).
    """
    gen = generation or GenerationSettings()
    return generate_and_score(model, _pair_prompts(pairs), scorer, gen, show_progress=show_progress)


def _pair_prompts(pairs: pd.DataFrame) -> pd.DataFrame:
    return (
        pd.concat(
            [
                pairs[["toxic_prompt_id", "toxic_text"]].set_axis(["prompt_id", "text"], axis=1),
                pairs[["nontoxic_prompt_id", "nontoxic_text"]].set_axis(["prompt_id", "text"], axis=1),
            ],
            ignore_index=True,
        )
        .drop_duplicates("prompt_id")
        .astype({"prompt_id": str})
    )


def activation_patching(
    model: Any,
    pairs: pd.DataFrame,
    *,
    layers: Sequence[int],
    probes: Mapping[int, Predictor] | None = None,
    pooling: str | None = None,
    scorer: Any = None,
    generate_layers: Sequence[int] | None = None,
    positions: str = "last",
    controls: bool = True,
    fluency: bool = True,
    generation: GenerationSettings | None = None,
    stats: StatSettings | None = None,
    clean_continuations: pd.DataFrame | None = None,
    batch_size: int = 16,
    show_progress: bool = False,
) -> pd.DataFrame:
    """Patch source -> target residuals per layer; measure probe read-out and continuation toxicity.

    Args:
        model: A `LoadedModel`.
        pairs: Matched pairs (`match_pairs`).
        layers: Residual layers 0..L to patch (one at a time).
        probes: `{layer: predictor}` fitted on `READOUT_POOLING[positions]`-pooled prompt encodings
            of prompts *not* in `pairs` (in-sample read-outs overstate the gap), single output;
            read-out rows are reported for every probed layer >= the patched layer.
        pooling: The probes' pooling; None means the one matching `positions` ("last" for
            "last", "mean" for "all"); anything else is an error.
        scorer: Scorer for continuation toxicity (None: no generation).
        generate_layers: Layers whose patched runs are also generated from (default: `layers`);
            generation dominates the cost.
        positions: "last" (prompt span's last position) or "all" (every prompt position; pairs of
            equal length).
        controls: Also run the same-class controls (`toxic_to_toxic`, `nontoxic_to_nontoxic`).
        fluency: Report `log_perplexity` of the patched continuations under the unmodified model.
        generation: Sampling settings (the same seeds for patched and clean targets); its
            `batch_size` batches the patched generations across pairs.
        stats: Attribute, threshold and bootstrap settings (bootstrap over pairs).
        clean_continuations: Scored continuations of the unpatched pair prompts with the same
            `generation` settings (`clean_pair_continuations`), to share them between calls (e.g.
            one call per block of layers); generated here, all pairs in one batch, when None.
        batch_size: Prompts per read-out forward pass.
        show_progress: Show a tqdm bar ("causal patching") over the patched generations: one step
            per (direction, generated layer).

    Returns:
        Tidy rows with `PATCHING_COLUMNS`: `measure` = "readout" (with `readout_layer`) or a
        behaviour metric / `log_perplexity` (`readout_layer` <NA>); per (direction, layer[,
        readout_layer]). `description` spells the direction out; `control` marks same-class rows.

    Example:
        >>> pairs = match_pairs(prompts.df, model.tokenizer, max_pairs=50)  # doctest: +SKIP
        >>> activation_patching(model, pairs, layers=[4, 8], probes=last_token_probes,
        ...                     scorer=scorer)  # doctest: +SKIP
    """
    gen = generation or GenerationSettings()
    stat = stats or StatSettings()
    layers, readout_pooling = _check_args(model, layers, positions, pooling, probes, scorer)
    gen_layers = (
        [int(x) for x in (layers if generate_layers is None else generate_layers)]
        if scorer is not None
        else []
    )
    probes = dict(probes or {})
    frame = _pair_prompts(pairs)
    texts = zip(frame.prompt_id, frame.text, strict=True)
    rendered = {i: render_prompt(model.tokenizer, t, gen.template) for i, t in texts}
    plan = patch_plan(pairs, rendered, positions, controls=controls)
    spans = _clean_spans(model, rendered, sorted(set(layers) | set(gen_layers)), batch_size)
    parts = []
    if probes:
        parts.append(
            _readouts(
                model, plan, rendered, spans, layers, probes, positions, readout_pooling, stat, batch_size
            )
        )
    if gen_layers:
        parts.append(
            _behaviour(
                model,
                frame,
                plan,
                rendered,
                spans,
                gen_layers,
                positions,
                scorer,
                gen,
                stat,
                clean_continuations,
                fluency,
                show_progress,
            )
        )
    out = pd.concat([p for p in parts if len(p)], ignore_index=True)
    out["control"] = out["direction"].isin(CONTROL_DIRECTIONS)
    out["description"] = out["direction"].map(lambda d: DIRECTIONS[d][2])
    out = out.assign(
        model=model.name,
        template=gen.template,
        attribute=stat.attribute,
        positions=positions,
        readout_pooling=readout_pooling,
    )
    return out[list(PATCHING_COLUMNS)].astype({"readout_layer": "Int64"})


def _readouts(
    model: Any,
    plan: pd.DataFrame,
    rendered: Mapping[str, RenderedPrompt],
    spans: Mapping[str, Mapping[int, torch.Tensor]],
    layers: list[int],
    probes: dict[int, Predictor],
    positions: str,
    pooling: str,
    stat: StatSettings,
    batch_size: int,
) -> pd.DataFrame:
    """Read-out rows: per (direction, layer, readout layer), patched vs clean target, batched over pairs."""
    ids = list(rendered)
    clean_feats = encode_prompts(
        model, [rendered[i] for i in ids], list(probes), pooling=pooling, batch_size=batch_size
    )
    clean = {x: dict(zip(ids, predict_one(p, clean_feats[x], x), strict=True)) for x, p in probes.items()}
    records = []
    for layer, (direction, grp) in ((x, dg) for x in layers for dg in plan.groupby("direction")):
        later = [x for x in probes if x >= layer]
        if not later:
            continue
        patch = _prompt_patch(grp, rendered, spans, layer, positions)
        targets = [rendered[t] for t in grp["target_id"]]
        feats = encode_prompts(
            model, targets, later, pooling=pooling, batch_size=batch_size, intervention=patch
        )
        for x in later:
            pred = predict_one(probes[x], feats[x], x)
            for pair_id, s_id, t_id, v in zip(
                grp["pair_id"], grp["source_id"], grp["target_id"], pred, strict=True
            ):
                records.append(
                    {
                        "pair_id": pair_id,
                        "direction": direction,
                        "layer": layer,
                        "readout_layer": x,
                        "value": v,
                        "baseline": clean[x][t_id],
                        "source": clean[x][s_id],
                    }
                )
    if not records:
        return pd.DataFrame()
    return _summarise(pd.DataFrame(records), ["direction", "layer", "readout_layer"], stat).assign(
        measure="readout", k=0
    )


def _summarise(per_pair: pd.DataFrame, keys: list[str], stat: StatSettings) -> pd.DataFrame:
    rows = []
    for key, grp in per_pair.groupby(keys, sort=True):
        value, base, source = (grp[c].to_numpy(dtype=np.float64) for c in ("value", "baseline", "source"))
        row = effect_row("", value, base, value - base, stat, k=0)
        gap = float(np.mean(source - base))
        row.update(
            dict(zip(keys, key, strict=True)),
            source=float(source.mean()),
            fraction_of_gap=row["delta"] / gap if abs(gap) > 1e-12 else np.nan,
            n_pairs=row.pop("n_prompts"),
        )
        rows.append(row)
    return pd.DataFrame(rows).drop(columns="metric")


def _behaviour(
    model: Any,
    frame: pd.DataFrame,
    plan: pd.DataFrame,
    rendered: Mapping[str, RenderedPrompt],
    spans: Mapping[str, Mapping[int, torch.Tensor]],
    gen_layers: list[int],
    positions: str,
    scorer: Any,
    gen: GenerationSettings,
    stat: StatSettings,
    clean: pd.DataFrame | None,
    fluency: bool,
    show_progress: bool = False,
) -> pd.DataFrame:
    """Behaviour rows through `paired_sweep`: one condition per (direction, layer), all pairs batched."""
    if clean is None:
        clean = generate_and_score(model, frame, scorer, gen)
    missing = sorted(set(frame["prompt_id"]) - set(clean["prompt_id"].astype(str)))
    if missing:
        raise ValueError(f"clean_continuations has no rows for the pair prompt(s) {missing[:5]}.")
    conditions = []
    for direction, grp in plan.groupby("direction", sort=True):
        targets = pd.DataFrame({"prompt_id": grp["target_id"], "text": grp["target_text"]})
        sources = dict(zip(grp["target_id"], grp["source_id"], strict=True))
        for layer in gen_layers:
            patch = _prompt_patch(grp, rendered, spans, layer, positions)
            conditions.append(Condition({"direction": direction, "layer": layer}, patch, targets, sources))
    out = paired_sweep(
        model,
        frame,
        scorer,
        conditions,
        generation=gen,
        stats=stat,
        baseline=clean,
        fluency=fluency,
        show_progress=show_progress,
        progress_desc="causal patching",
    )
    out = out.rename(columns={"metric": "measure", "n_prompts": "n_pairs"})
    return out.sort_values(["direction", "layer", "measure"], kind="stable").assign(readout_layer=pd.NA)
