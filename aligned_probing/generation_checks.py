"""Generation checks itself: cached sampling must agree with an uncached teacher-forced forward.

A broken KV cache (an incompatible transformers / TransformerLens pair, a hook that drops the cache
keyword) produces fluent-looking *numbers* from token salad: every later stage still runs. Two
model-agnostic checks catch it where the text is made, so they hold for tiny random test models
as well as for real ones:

1. **Sampled log-probabilities.** While sampling (KV cache on) the sampler records
   `log p(token | prefix)` of every drawn token under the unmodified distribution. On a seeded
   sample of rows, one uncached teacher-forced forward over prompt + continuation recomputes them.
   With a working cache the two differ only by floating-point reordering (measured: about 1e-6
   nats in float32); with a broken one every decoding step sees a different context and they
   differ by nats.
2. **Greedy decoding**, cached and uncached, on a few prompts must give the same tokens; a
   divergence is accepted only at a numerical tie (the top-2 logit gap of the uncached forward at
   the diverging step below `tie_tolerance`).

Also reported: the continuations' log-perplexity (mean negative log-likelihood per token under the
model, from the recorded log-probabilities that check 1 verifies). It is a fluency figure, not a
pass/fail criterion, because its scale depends on the model (fluent SmolLM2 samples: about 3 nats).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from transformers import GenerationConfig

from aligned_probing.data.templates import render_prompt
from aligned_probing.models import LoadedModel

SelfCheckPolicy = Literal["error", "warn"]

#: Largest accepted |cached - uncached| log-probability of one sampled token, in nats, by dtype.
#: float32: measured <= 1e-5 on SmolLM2 and Gemma-3 (batch padding reorders reductions), so 1e-2
#: leaves three orders of magnitude of headroom and still sits far below a broken cache (> 1 nat).
#: 16-bit activations round to ~3 significant digits, which moves log-probabilities by ~0.1.
LOGPROB_TOLERANCE: dict[str, float] = {"float32": 1e-2, "float16": 0.5, "bfloat16": 0.5}
#: Top-2 logit gap under which a greedy divergence counts as a numerical tie, by dtype.
TIE_TOLERANCE: dict[str, float] = {"float32": 1e-3, "float16": 0.1, "bfloat16": 0.1}


class GenerationCheckError(RuntimeError):
    """Generated text failed the self-check: the numbers computed from it would be meaningless."""


@dataclass
class GenerationCheck:
    """Outcome of `check_generation`; `passed` is False when either check failed.

    Attributes:
        model: Model name.
        dtype: The model's dtype (selects the tolerances).
        n_rows_checked: Sampled continuations recomputed without the KV cache.
        n_tokens_checked: Tokens in those rows.
        max_abs_logprob_diff: Largest |cached - uncached| log-probability over those tokens (nats).
        mean_abs_logprob_diff: Mean of the same (nats).
        logprob_tolerance: Accepted maximum (nats).
        n_greedy_prompts: Prompts decoded greedily with and without the cache.
        greedy_new_tokens: New tokens per greedy decode.
        greedy_mismatches: Prompts whose greedy tokens differ beyond a numerical tie.
        greedy_ties: Divergences accepted as numerical ties.
        log_perplexity: Mean negative log-likelihood per sampled token over all rows (nats).
        n_tokens_total: Tokens behind `log_perplexity`.
        passed: Both checks passed.
        message: What was measured and what it means, in words.
    """

    model: str
    dtype: str
    n_rows_checked: int
    n_tokens_checked: int
    max_abs_logprob_diff: float
    mean_abs_logprob_diff: float
    logprob_tolerance: float
    n_greedy_prompts: int
    greedy_new_tokens: int
    greedy_mismatches: int
    greedy_ties: int
    log_perplexity: float
    n_tokens_total: int
    passed: bool
    message: str
    details: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (NaN as None)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def _tolerance(table: dict[str, float], dtype: str) -> float:
    return table.get(dtype, table["float32"])


def _uncached_logprobs(model: LoadedModel, prompt_ids: Sequence[int], token_ids: Sequence[int]) -> np.ndarray:
    """Log p(token_i | prompt, token_<i) of every continuation token from one uncached forward."""
    ids = torch.tensor([list(prompt_ids) + list(token_ids)], dtype=torch.long, device=model.device)
    with torch.no_grad():
        logits = model.hf_model(ids, use_cache=False).logits[0].float()  # (pos, vocab)
    n = len(prompt_ids)
    logp = torch.log_softmax(logits[n - 1 : -1], dim=-1)  # predictions for positions n .. end
    target = ids[0, n:].view(-1, 1)
    return logp.gather(1, target)[:, 0].cpu().numpy()


def greedy_decode(
    model: LoadedModel, prompt_ids: Sequence[int], max_new_tokens: int, *, use_cache: bool
) -> list[int]:
    """Greedy continuation of one unpadded prompt through `hf_model.generate` (EOS stops it)."""
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=model.eos_token_ids or None,
        pad_token_id=model.pad_token_id,
        use_cache=use_cache,
        repetition_penalty=1.0,
    )
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=model.device)
    with torch.no_grad():
        out = model.hf_model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
        )
    return [int(t) for t in out[0, len(prompt_ids) :].tolist()]


def _top2_gap(model: LoadedModel, ids: Sequence[int]) -> float:
    """Gap between the two largest next-token logits after `ids`, from an uncached forward."""
    x = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    with torch.no_grad():
        top = model.hf_model(x, use_cache=False).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1])


def check_greedy(
    model: LoadedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int = 20
) -> tuple[int, int, list[dict[str, Any]]]:
    """Decode each prompt greedily with and without the KV cache; return (mismatches, ties, details)."""
    tie_tol = _tolerance(TIE_TOLERANCE, model.dtype)
    mismatches, ties, details = 0, 0, []
    for prompt in prompts:
        cached = greedy_decode(model, prompt, max_new_tokens, use_cache=True)
        uncached = greedy_decode(model, prompt, max_new_tokens, use_cache=False)
        if cached == uncached:
            continue
        step = next(
            (i for i, (a, b) in enumerate(zip(cached, uncached, strict=False)) if a != b),
            min(len(cached), len(uncached)),
        )
        gap = _top2_gap(model, list(prompt) + uncached[:step])
        tie = gap <= tie_tol
        ties += int(tie)
        mismatches += int(not tie)
        details.append(
            {
                "check": "greedy",
                "step": step,
                "top2_gap": gap,
                "tie": tie,
                "cached": cached,
                "uncached": uncached,
            }
        )
    return mismatches, ties, details


def check_generation(
    model: LoadedModel,
    continuations: pd.DataFrame,
    *,
    max_new_tokens: int,
    use_chat_template: bool | None = None,
    n_rows: int = 8,
    n_greedy_prompts: int = 3,
    greedy_new_tokens: int = 20,
    seed: int = 0,
) -> GenerationCheck:
    """Run both self-checks on continuations made by `generate_continuations` with `model`.

    Args:
        model: The model that generated them (unmodified: no intervention attached).
        continuations: Its table, with `prompt_text`, `template`, `token_ids` and `token_logprobs`.
        max_new_tokens: The generation setting (fixes how prompts were truncated when rendered).
        use_chat_template: The generation setting.
        n_rows: Rows recomputed without the cache (seeded choice among rows with tokens).
        n_greedy_prompts: Prompts (the first distinct ones) decoded greedily with and without cache.
        greedy_new_tokens: New tokens per greedy decode.
        seed: Seed of the row choice.

    Returns:
        The measurements; `passed` is False when a check failed (this function never raises for
        that: `enforce` turns a failure into an error or a warning).
    """
    if "token_logprobs" not in continuations.columns:
        raise ValueError("continuations has no 'token_logprobs' column; generate them with this version.")
    max_tokens = model.context_length - max_new_tokens
    rendered: dict[tuple[str, int], list[int]] = {}

    def prompt_ids(text: str, template: int) -> list[int]:
        key = (text, int(template))
        if key not in rendered:
            rendered[key] = render_prompt(
                model.tokenizer,
                text,
                int(template),
                use_chat_template=use_chat_template,
                max_tokens=max_tokens,
            ).input_ids
        return rendered[key]

    with_tokens = continuations[continuations["token_ids"].map(len) > 0]
    chosen = (
        with_tokens.sample(min(n_rows, len(with_tokens)), random_state=seed)
        if len(with_tokens)
        else with_tokens
    )
    diffs: list[np.ndarray] = []
    for row in chosen.itertuples(index=False):
        recorded = np.asarray(row.token_logprobs, dtype=np.float64)
        fresh = _uncached_logprobs(model, prompt_ids(row.prompt_text, row.template), row.token_ids)
        diffs.append(np.abs(recorded - fresh))
    all_diffs = np.concatenate(diffs) if diffs else np.zeros(0)
    tol = _tolerance(LOGPROB_TOLERANCE, model.dtype)
    max_diff = float(all_diffs.max()) if len(all_diffs) else float("nan")
    mean_diff = float(all_diffs.mean()) if len(all_diffs) else float("nan")

    firsts = continuations.drop_duplicates("prompt_text").head(n_greedy_prompts)
    greedy_prompts = [
        prompt_ids(t, tpl) for t, tpl in zip(firsts["prompt_text"], firsts["template"], strict=True)
    ]
    mismatches, ties, details = check_greedy(model, greedy_prompts, greedy_new_tokens)

    lps = np.concatenate(
        [np.asarray(x, dtype=np.float64) for x in continuations["token_logprobs"]] or [np.zeros(0)]
    )
    log_ppl = float(-lps.mean()) if len(lps) else float("nan")
    logprob_ok = not (max_diff > tol)  # NaN (no tokens to check) passes: nothing was generated
    passed = logprob_ok and mismatches == 0
    parts = [
        f"sampled-token log-probabilities recorded with the KV cache vs an uncached teacher-forced forward: "
        f"max |diff| {max_diff:.2g} nats, mean {mean_diff:.2g} over {len(all_diffs)} tokens of {len(chosen)} rows "
        f"(tolerance {tol:g} for {model.dtype})",
        f"greedy decoding with vs without the cache: {mismatches} of {len(greedy_prompts)} prompts differ "
        f"beyond a numerical tie ({ties} ties)",
        f"log-perplexity of the samples {log_ppl:.2f} nats/token",
    ]
    message = "; ".join(parts) + "."
    if not passed:
        message = (
            f"Generation self-check FAILED for model {model.name!r}: {message} Cached generation does not "
            "compute what the model computes, so the continuations (and every number made from them) would be "
            "wrong. The usual cause is an incompatible transformers / TransformerLens pair or a hook that drops "
            "the KV cache: reinstall the locked set (`make install`), see docs/models.md."
        )
    return GenerationCheck(
        model=model.name,
        dtype=model.dtype,
        n_rows_checked=len(chosen),
        n_tokens_checked=len(all_diffs),
        max_abs_logprob_diff=max_diff,
        mean_abs_logprob_diff=mean_diff,
        logprob_tolerance=tol,
        n_greedy_prompts=len(greedy_prompts),
        greedy_new_tokens=greedy_new_tokens,
        greedy_mismatches=mismatches,
        greedy_ties=ties,
        log_perplexity=log_ppl,
        n_tokens_total=len(lps),
        passed=passed,
        message=message,
        details=details,
    )


def enforce(check: GenerationCheck, policy: SelfCheckPolicy = "error") -> None:
    """Raise `GenerationCheckError` for a failed check (policy "error"), or warn loudly ("warn")."""
    if check.passed:
        return
    if policy == "error":
        raise GenerationCheckError(check.message)
    import warnings

    warnings.warn(check.message, GenerationCheckWarning, stacklevel=2)


class GenerationCheckWarning(UserWarning):
    """A failed generation self-check that the config downgraded to a warning."""
