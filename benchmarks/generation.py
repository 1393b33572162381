"""Generation throughput: our `generate_continuations` vs a plain Hugging Face `generate`.

Same model (the embedded SmolLM2-135M-Instruct), same left-padded batch, same settings
(sampling, temperature 1.0, top-p 0.9, no top-k, 20 new tokens, KV cache). Our side is timed end
to end (template rendering, per-row seeded sampling, table building); the baseline gets the
token ids ready-made. The two are interleaved rep by rep so that machine load hits both alike,
and the headline ratios pool all reps (total tokens / total time). Both are reported as new
tokens/s (real generated tokens, EOS and padding excluded) and as forward steps/s (batch x steps;
steadier, as it does not depend on how early rows hit EOS), each on wall-clock time and on the
process's CPU time (`time.process_time`, 1 torch thread): on a shared, overloaded CPU the wall
clock mostly measures the neighbours, the CPU time measures our work.

A third arm runs our generation with the previous top-p rule (`_batchwide_nucleus`: one full sort
of the vocabulary for the whole batch as soon as any row's top-256 candidates miss the nucleus)
instead of today's per-row widening, interleaved with the others: `ratio_vs_batchwide_*` is the
speed-up of that change (median and min-max of the per-rep ratios), and `batchwide_identical`
says whether both rules drew the same tokens in every rep.

Also measured: how often continuations differ between batch size 1 (no padding) and a padded
batch with the same seed (see the padding note in aligned_probing/generation.py).

Run: `.venv/bin/python -m benchmarks.generation [--reps 5] [--prompts 8] [--k 4]`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

from aligned_probing import generation as gen
from aligned_probing.data import embedded_prompts
from aligned_probing.data.templates import render_prompt
from aligned_probing.generation import generate_continuations
from aligned_probing.models import load_model
from benchmarks._common import save_results

SETTINGS = {"max_new_tokens": 20, "temperature": 1.0, "top_p": 0.9}


def _batchwide_nucleus(
    logits: torch.Tensor, top_p: float, candidates: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-p rule before per-row widening: any short row sends the whole batch to a full sort."""
    probs = torch.softmax(logits.float(), dim=-1)
    if top_p >= 1.0:
        return torch.arange(probs.shape[-1]).expand_as(probs), probs
    top, ids = probs.topk(min(candidates, probs.shape[-1]), dim=-1)
    if not bool((top.sum(-1) >= top_p).all()):
        top, ids = probs.sort(dim=-1, descending=True)
    keep = (top.cumsum(-1) - top) < top_p
    keep[:, 0] = True
    return ids, top * keep


def _hf_batch(model, texts: list[str], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The left-padded batch our code builds: each prompt repeated k times, longest first."""
    seqs = [render_prompt(model.tokenizer, t, 0).input_ids for t in texts]
    seqs = sorted(seqs, key=len, reverse=True)
    rows = [s for s in seqs for _ in range(k)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), model.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(rows):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids, mask


def _hf_generate(model, ids: torch.Tensor, mask: torch.Tensor, seed: int) -> tuple[int, int, float, float]:
    """Plain HF sampling; returns (real new tokens, forward steps x batch, wall s, CPU s)."""
    torch.manual_seed(seed)
    eos = set(model.eos_token_ids)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.hf_model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            top_k=0,
            num_beams=1,
            eos_token_id=sorted(eos),
            pad_token_id=model.pad_token_id,
            **SETTINGS,
        )
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    new = out[:, ids.shape[1] :].tolist()
    real = sum(next((i for i, t in enumerate(row) if t in eos), len(row)) for row in new)
    return real, len(new) * len(new[0]), seconds, cpu


def _ours(model, prompts, k: int, seed: int, batch_size: int):
    t0, c0 = time.perf_counter(), time.process_time()
    df = generate_continuations(model, prompts, k=k, seed=seed, batch_size=batch_size, **SETTINGS)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    # steps: every batch runs until its longest row stops (EOS counts as a step)
    steps = max(int(n) + int(e) for n, e in zip(df["n_tokens"], df["stopped_at_eos"], strict=True))
    return df, int(df["n_tokens"].sum()), len(df) * min(steps, SETTINGS["max_new_tokens"]), seconds, cpu


def _divergence(a, b) -> tuple[int, int]:
    """(rows whose tokens differ, sampled tokens compared up to and including the first difference)."""
    differ, compared = 0, 0
    for x, y in zip(a["token_ids"], b["token_ids"], strict=True):
        first = next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), None)
        if first is None and len(x) != len(y):
            first = min(len(x), len(y))
        differ += first is not None
        compared += len(x) if first is None else first + 1
    return differ, compared


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = load_model(args.model)
    prompts = embedded_prompts("rtp-challenging").sample(args.prompts, stratify_by=None, seed=0)
    batch = args.prompts * args.k
    ids, mask = _hf_batch(model, prompts.texts, args.k)

    # warm-up both paths once
    _hf_generate(model, ids, mask, seed=0)
    _ours(model, prompts, args.k, seed=0, batch_size=batch)

    reps = []
    for rep in range(args.reps):
        hf_tokens, hf_steps, hf_s, hf_cpu = _hf_generate(model, ids, mask, seed=rep)
        df, our_tokens, our_steps, our_s, our_cpu = _ours(model, prompts, args.k, seed=rep, batch_size=batch)
        with mock.patch.object(gen, "nucleus", _batchwide_nucleus):
            old_df, _, _, old_s, old_cpu = _ours(model, prompts, args.k, seed=rep, batch_size=batch)
        reps.append(
            {
                "hf_new_tokens": hf_tokens,
                "hf_steps": hf_steps,
                "hf_seconds": hf_s,
                "hf_cpu_seconds": hf_cpu,
                "ours_new_tokens": our_tokens,
                "ours_steps": our_steps,
                "ours_seconds": our_s,
                "ours_cpu_seconds": our_cpu,
                "ratio_tokens_per_s": (our_tokens / our_s) / (hf_tokens / hf_s),
                "batchwide_seconds": old_s,
                "batchwide_cpu_seconds": old_cpu,
                "ratio_vs_batchwide_wall": old_s / our_s,
                "ratio_vs_batchwide_cpu": old_cpu / our_cpu,
                "batchwide_identical": [list(t) for t in df["token_ids"]]
                == [list(t) for t in old_df["token_ids"]],
            }
        )
        print(reps[-1], flush=True)

    def total_ratio(count: str, clock: str) -> float:
        """(sum of our count / sum of our time) / (the same for HF): pooled over reps."""
        ours = sum(r[f"ours_{count}"] for r in reps) / sum(r[f"ours_{clock}"] for r in reps)
        hf = sum(r[f"hf_{count}"] for r in reps) / sum(r[f"hf_{clock}"] for r in reps)
        return round(ours / hf, 3)

    # Padding sensitivity: same seed, batch size 1 (no padding) vs the whole padded batch.
    padded = _ours(model, prompts, args.k, seed=123, batch_size=batch)[0]
    single = _ours(model, prompts, args.k, seed=123, batch_size=1)[0]
    rows_differ, tokens_compared = _divergence(single, padded)

    headline = {
        "model": model.name,
        "batch": batch,
        "target_ratio": 0.95,
        "ratio_tokens_per_s_wall": total_ratio("new_tokens", "seconds"),
        "ratio_tokens_per_s_cpu": total_ratio("new_tokens", "cpu_seconds"),
        "ratio_steps_per_s_wall": total_ratio("steps", "seconds"),
        "ratio_steps_per_s_cpu": total_ratio("steps", "cpu_seconds"),
        "ratio_tokens_per_s_wall_median_of_reps": round(
            statistics.median(r["ratio_tokens_per_s"] for r in reps), 3
        ),
        "ours_tokens_per_s": round(
            sum(r["ours_new_tokens"] for r in reps) / sum(r["ours_seconds"] for r in reps), 1
        ),
        "hf_tokens_per_s": round(
            sum(r["hf_new_tokens"] for r in reps) / sum(r["hf_seconds"] for r in reps), 1
        ),
        **{
            f"ratio_vs_batchwide_{clock}_{stat}": round(fn(r[f"ratio_vs_batchwide_{clock}"] for r in reps), 3)
            for clock in ("wall", "cpu")
            for stat, fn in (("median", statistics.median), ("min", min), ("max", max))
        },
        "batchwide_identical": all(r["batchwide_identical"] for r in reps),
        "padding_rows_differ_bs1_vs_padded": rows_differ,
        "padding_rows_compared": len(single),
        "padding_sampled_tokens_compared": tokens_compared,
    }
    detail = {
        "settings": SETTINGS,
        "prompts": args.prompts,
        "k": args.k,
        "reps": reps,
        "prompt_lengths": [len(render_prompt(model.tokenizer, t, 0).input_ids) for t in prompts.texts],
    }
    save_results("generation", headline, detail)


if __name__ == "__main__":
    main()
