"""Seeded, batched sampling of k continuations per prompt, resumable on disk.

Generation runs through the Hugging Face model's own `generate` (KV cache, left padding, EOS
stopping), so TransformerLens hooks registered on the bridge (`model.bridge.hooks(...)`: layer
skipping, patching, steering) fire during generation.

Why a custom sampler: Hugging Face's sampler draws the whole batch from one global RNG, so a
continuation would depend on which other prompts share its batch and on the batch size. We give
every (prompt_id, continuation_idx) its own `torch.Generator`, seeded from (seed, prompt_id,
continuation_idx), and sample inside a `LogitsProcessor` (temperature, the top-p rule of
transformers' `TopPLogitsWarper`, then one inverse-CDF draw per row); the processor returns
scores that force the drawn token, and `generate` runs greedy selection on them. Continuation j
of a prompt is therefore the same whatever the batch size, the order of prompts, or k (raising k
later only adds rows).

The one residual dependence: left padding changes the length of attention reductions, which
moves logits by ~1e-6 in float32. That can flip a draw only when the uniform variate lands
within ~1e-6 of a cumulative-probability boundary, or a token sits exactly at the top-p cut-off;
see docs/data_and_generation.md for the measured rate. With the same batch size (and the same
prompts), results are bit-identical: the batch plan, and so the padding, is the same.

Resume: with `output_dir`, every batch is written as its own Parquet part file (atomically: a
temporary file renamed into place locally, one PUT on object storage: `output_dir` may be an fsspec
URL with `storage_options`), and a rerun skips the (prompt_id, continuation_idx) pairs
already on disk. Because the batch plan is a deterministic function of the prompts, k and
batch_size, a resumed run regenerates exactly the batches that were missing, with the same
padding, so it reproduces the uninterrupted run row for row.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from aligned_probing.data import PromptDataWarning, PromptSet
from aligned_probing.data.templates import RenderedPrompt, TemplateTruncationWarning, render_prompt
from aligned_probing.models import LoadedModel
from aligned_probing.pipeline import fs as _fs

CONTINUATION_COLUMNS: tuple[str, ...] = (
    "model",
    "prompt_id",
    "continuation_idx",
    "template",
    "prompt_text",
    "text",
    "token_ids",
    "n_tokens",
    "stopped_at_eos",
    "seed",
    "token_logprobs",
)
MANIFEST = "manifest.json"
_PART_GLOB = "part-*.parquet"


def row_seed(seed: int, prompt_id: str, continuation_idx: int) -> int:
    """Seed of one continuation's generator: 63 bits of sha256(seed, prompt_id, index)."""
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}\x00{continuation_idx}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def nucleus(
    logits: torch.Tensor, top_p: float, candidates: int = 256, widen: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-p nucleus of each row: (token ids, probabilities), best first, zero outside.

    Same rule as transformers' `TopPLogitsWarper` (keep the most probable tokens until their mass
    reaches `top_p`; the token that crosses it is kept; at least one token). Hand-written because
    that warper sorts the whole vocabulary at every step, which took about half of SmolLM2's step
    time at batch 32 on CPU. Here a `topk` over `candidates` tokens holds the nucleus of most rows;
    only the rows whose candidates carry less than `top_p` are widened, first to a `topk` over
    `widen` x `candidates`, then (rows still short) to a full sort. Per row, not per batch: with a
    small model at temperature 1 some row of a 32-row batch is nearly always flat, and a batch-wide
    sort then cost 17 % of generation (measured, SmolLM2-135M on CPU, 2 threads).

    Args:
        logits: (batch, vocab) float logits (already divided by the temperature).
        top_p: Nucleus mass in (0, 1].
        candidates: Size of the first candidate set.
        widen: Factor of the second candidate set, for the rows the first does not cover.

    Returns:
        `ids` (batch, m) and `probs` (batch, m), m <= vocab: each row's candidates sorted by
        probability with the probabilities of tokens outside the nucleus (and of the padding after
        a row's candidates, id 0) set to 0; rows are not renormalised. With `top_p >= 1` every
        token is returned, in vocabulary order.
    """
    probs = torch.softmax(logits.float(), dim=-1)  # (batch, vocab)
    vocab = probs.shape[-1]
    if top_p >= 1.0:  # no nucleus: every token, unsorted
        return torch.arange(vocab, device=probs.device).expand_as(probs), probs
    top, ids = probs.topk(min(candidates, vocab), dim=-1)  # (batch, m), descending
    for size in (min(candidates * widen, vocab), vocab):
        short = torch.nonzero(top.sum(-1) < top_p).flatten()  # rows whose candidates miss the nucleus
        if top.shape[-1] >= vocab or len(short) == 0:
            break
        wide_top, wide_ids = probs[short].topk(size, dim=-1)
        top = torch.cat([top, top.new_zeros(len(top), size - top.shape[-1])], dim=-1)
        ids = torch.cat([ids, ids.new_zeros(len(ids), size - ids.shape[-1])], dim=-1)
        top[short], ids[short] = wide_top, wide_ids
    before = top.cumsum(-1) - top  # mass strictly more probable than each token
    keep = before < top_p
    keep[:, 0] = True
    return ids, top * keep


class NonFiniteLogitsError(FloatingPointError):
    """A model produced NaN (or +inf, or all -inf) logits while sampling; the message names model and batch."""


class _PerRowSampler(LogitsProcessor):
    """Samples each row with its own generator and returns scores that force that draw.

    Runs last in the processor list, after any processors the model's generation config adds;
    `generate` is in greedy mode, so the argmax of the returned scores is the drawn token.
    It also records the model's log-probability of every drawn token (temperature 1, no top-p:
    the unmodified distribution), which the generation self-check compares against an uncached
    teacher-forced forward (`aligned_probing.generation_checks`).
    """

    def __init__(
        self, generators: list[torch.Generator], temperature: float, top_p: float, where: str = "a batch"
    ) -> None:
        self.generators = generators
        self.temperature = temperature
        self.top_p = top_p
        self.where = where  # named in the error for non-finite logits: model and batch
        self.logprobs: list[torch.Tensor] = []  # one (batch,) float32 tensor per decoding step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # scores: (batch, vocab), float32
        self._check_finite(scores)
        if self.temperature == 0:
            choice = scores.argmax(dim=-1)
        else:
            ids, probs = nucleus(scores / self.temperature, self.top_p)  # (batch, m) each
            choice = torch.stack([self._draw(ids[i], probs[i], g) for i, g in enumerate(self.generators)])
        logp = torch.log_softmax(scores.float(), dim=-1).gather(1, choice.view(-1, 1))  # (batch, 1)
        self.logprobs.append(logp[:, 0].cpu())
        forced = torch.full_like(scores, float("-inf"))
        forced.scatter_(1, choice.view(-1, 1), 0.0)
        return forced

    def _check_finite(self, scores: torch.Tensor) -> None:
        """Raise `NonFiniteLogitsError` for rows with NaN, +inf or only -inf (-inf alone is a masked token)."""
        bad = torch.isnan(scores).any(-1) | torch.isposinf(scores).any(-1) | torch.isneginf(scores).all(-1)
        if bool(bad.any()):
            rows = torch.nonzero(bad).flatten().tolist()
            raise NonFiniteLogitsError(
                f"{self.where}: the model produced non-finite logits at decoding step {len(self.logprobs)} for "
                f"batch row(s) {rows[:8]}. Its weights are damaged or overflow in this dtype: try dtype = "
                '"float32", and check the converted-model cache with `aligned-probing models --verify`.'
            )

    def _draw(self, ids: torch.Tensor, probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One inverse-CDF draw from a row's nucleus with one uniform from its own generator.

        Hand-written instead of `torch.multinomial` because multinomial's use of the generator
        depends on the length of the vector it samples from, and that length (top-k candidates or
        the full sort) depends on the other rows of the batch. Here each step consumes exactly
        one uniform per row, and the draw depends only on the row's kept probabilities.
        """
        n = probs.shape[-1] if self.top_p >= 1.0 else int((probs > 0).sum())  # the nucleus is a prefix
        cum = probs[:n].cumsum(0)
        u = torch.rand((), generator=generator, device=probs.device)
        j = torch.searchsorted(cum, u * cum[-1], right=True).clamp(max=n - 1)
        return ids[j]


def _prompt_frame(prompts: PromptSet | pd.DataFrame) -> pd.DataFrame:
    """`prompt_id` and `text` of the prompts, validated (empty rejected, duplicates dropped)."""
    if isinstance(prompts, PromptSet):
        df = prompts.df
    elif isinstance(prompts, pd.DataFrame):
        df = prompts
    else:
        raise TypeError(f"prompts must be a PromptSet or a DataFrame, got {type(prompts).__name__}.")
    missing = [c for c in ("prompt_id", "text") if c not in df.columns]
    if missing:
        raise ValueError(
            f"prompts is missing columns {missing} (has {list(df.columns)}); build it with "
            "PromptSet.from_frame(df, source=...) to add prompt ids."
        )
    df = df[["prompt_id", "text"]].reset_index(drop=True)
    empty = df["text"].isna() | (df["text"].astype(str).str.strip() == "")
    if empty.any():
        raise ValueError(
            f"{int(empty.sum())} of {len(df)} prompts are empty (e.g. prompt_id "
            f"{df.loc[empty, 'prompt_id'].iloc[0]!r}); drop them, e.g. with PromptSet.from_frame(df)."
        )
    dup = df["prompt_id"].duplicated()
    if dup.any():
        warnings.warn(
            f"Removed {int(dup.sum())} duplicate prompt(s) (same prompt_id); each is generated once.",
            PromptDataWarning,
            stacklevel=3,
        )
        df = df[~dup].reset_index(drop=True)
    if len(df) == 0:
        raise ValueError("prompts is empty: nothing to generate.")
    return df


def _render_all(
    model: LoadedModel, texts: Sequence[str], template: int, use_chat_template: bool | None, max_tokens: int
) -> list[RenderedPrompt]:
    """Render every prompt; left truncation is reported once, with a count."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TemplateTruncationWarning)
        rendered = [
            render_prompt(
                model.tokenizer, t, template, use_chat_template=use_chat_template, max_tokens=max_tokens
            )
            for t in texts
        ]
    for w in caught:
        if not issubclass(w.category, TemplateTruncationWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    truncated = [r.truncated for r in rendered if r.truncated]
    if truncated:
        warnings.warn(
            f"{len(truncated)} prompt(s) were left-truncated (up to {max(truncated)} tokens dropped) to fit "
            f"context_length - max_new_tokens = {max_tokens} tokens.",
            TemplateTruncationWarning,
            stacklevel=3,
        )
    return rendered


def _manifest(model: LoadedModel, **settings: Any) -> dict[str, Any]:
    """Everything a continuation depends on, except k and batch size (see the module docstring)."""
    return {
        "model": model.name,
        "revision": model.revision,
        "tokenizer_hash": model.tokenizer_hash,
        "dtype": model.dtype,
        "quantization": model.quantization,
        **settings,
    }


def _open_output(
    output_dir: _fs.Resolved, manifest: dict[str, Any], storage_options: Mapping[str, Any] | None
) -> pd.DataFrame:
    """Create or check the output directory; return the rows already written."""
    _fs.makedirs(output_dir, storage_options)
    if isinstance(output_dir, Path):  # object storage has no temporaries: a PUT is whole or absent
        for stale in output_dir.glob(".*.tmp"):  # a run killed mid-write leaves only a temporary file
            stale.unlink()
    path = _fs.child(output_dir, MANIFEST)
    if _fs.exists(path, storage_options):
        old = json.loads(_fs.read_text(path, storage_options))
        diff = {k: (old.get(k), v) for k, v in manifest.items() if old.get(k) != v}
        if diff:
            detail = "; ".join(f"{k}: on disk {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"{output_dir} holds continuations generated with other settings ({detail}). "
                "Use another output_dir or the same settings."
            )
    else:
        _fs.write_text_atomic(path, json.dumps(manifest, indent=2), storage_options)
    return read_continuations(output_dir, storage_options)


def read_continuations(
    output_dir: str | Path, storage_options: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """Read every part file written by `generate_continuations` (empty table when none).

    Args:
        output_dir: The directory (or fsspec URL) given to `generate_continuations`.
        storage_options: fsspec options of a URL `output_dir`.

    `token_ids` come back as Python lists of ints (Parquet returns numpy arrays).
    """
    parts = _fs.glob(output_dir, _PART_GLOB, storage_options)  # sorted: batch order
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in CONTINUATION_COLUMNS})
    df = pd.concat([_fs.read_parquet(p, storage_options) for p in parts], ignore_index=True)
    df["token_ids"] = df["token_ids"].map(lambda ids: [int(i) for i in ids])
    if "token_logprobs" not in df.columns:
        raise ValueError(
            f"{output_dir} holds continuations written before log-probabilities were recorded "
            "(no 'token_logprobs' column); delete the directory and generate again."
        )
    df["token_logprobs"] = df["token_logprobs"].map(lambda lps: [float(x) for x in lps])
    if df.duplicated(["prompt_id", "continuation_idx"]).any():
        raise ValueError(
            f"{output_dir} holds duplicate (prompt_id, continuation_idx) rows; delete the directory."
        )
    return df[list(CONTINUATION_COLUMNS)]


def _write_part(
    output_dir: _fs.Resolved, batch_no: int, rows: pd.DataFrame, storage_options: Mapping[str, Any] | None
) -> _fs.Resolved:
    """Write one batch atomically; the name carries a digest of its keys so plans never collide."""
    keys = "\n".join(f"{p}\x00{i}" for p, i in zip(rows["prompt_id"], rows["continuation_idx"], strict=True))
    name = f"part-{batch_no:06d}-{hashlib.sha256(keys.encode()).hexdigest()[:8]}.parquet"
    path = _fs.child(output_dir, name)
    _fs.write_parquet_atomic(rows, path, storage_options)
    return path


def _generate_batch(
    model: LoadedModel,
    items: list[tuple[int, int]],
    rendered: list[RenderedPrompt],
    prompt_ids: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
) -> list[tuple[list[int], bool, list[float]]]:
    """Generate one batch of (prompt index, continuation index) items.

    Returns:
        Per item: the generated token ids (EOS and padding excluded), whether it stopped at EOS, and
        the model's log-probability of each of those tokens as recorded while sampling (KV cache on).
    """
    device = torch.device(model.device)
    pad = model.pad_token_id
    eos = set(model.eos_token_ids)
    seqs = [rendered[p].input_ids for p, _ in items]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)  # (batch, width), left-padded
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        input_ids[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        attention_mask[row, width - len(s) :] = 1
    generators = []
    for p, c in items:
        g = torch.Generator(device=device)
        g.manual_seed(row_seed(seed, prompt_ids[p], c))
        generators.append(g)
    config = GenerationConfig(
        do_sample=False,  # selection is greedy on the scores our sampler forces
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted(eos),
        pad_token_id=pad,
        use_cache=True,
        repetition_penalty=1.0,
    )
    first = items[0] if items else (0, 0)
    where = (
        f"model {model.name!r}, generation batch of {len(items)} starting at prompt {prompt_ids[first[0]]!r} "
        f"continuation {first[1]}"
    )
    sampler = _PerRowSampler(generators, temperature, top_p, where)
    # no_grad, not inference_mode: optimum-quanto's 4-bit weights raise "Cannot set version_counter for
    # inference tensor" under inference mode (measured: every 4-bit generation failed).
    with torch.no_grad(), warnings.catch_warnings():
        # The model's own sampling keys (temperature, top_p) are unused in greedy mode: not news.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"transformers\.generation")
        out = model.hf_model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            logits_processor=LogitsProcessorList([sampler]),
        )
    new = out[:, width:].tolist()  # (batch, <= max_new_tokens); EOS then pad after a row stops
    logprobs = torch.stack(sampler.logprobs, dim=1).tolist()  # (batch, steps)
    results = []
    for ids, lps in zip(new, logprobs, strict=True):
        stop = next((i for i, t in enumerate(ids) if t in eos), None)
        n = len(ids) if stop is None else stop
        results.append((ids[:n], stop is not None, [float(x) for x in lps[:n]]))
    return results


def generate_continuations(
    model: LoadedModel,
    prompts: PromptSet | pd.DataFrame,
    *,
    k: int,
    seed: int,
    max_new_tokens: int = 20,
    temperature: float = 1.0,
    top_p: float = 0.9,
    template: int = 0,
    batch_size: int = 16,
    use_chat_template: bool | None = None,
    output_dir: str | Path | None = None,
    show_progress: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Sample `k` continuations per prompt with a KV cache, left padding and EOS stopping.

    Args:
        model: The loaded model (generation runs on `model.hf_model.generate`, so bridge hooks fire).
        prompts: A `PromptSet` or a table with `prompt_id` and `text`. Empty prompts raise;
            duplicate prompt ids are generated once (with a warning).
        k: Continuations per prompt (>= 1).
        seed: Base seed; each continuation's generator is seeded from (seed, prompt_id, index).
        max_new_tokens: Maximum generated tokens per continuation.
        temperature: Softmax temperature (> 0), or 0 for greedy decoding.
        top_p: Nucleus sampling mass in (0, 1]; 1 disables it. No top-k.
        template: Prompt template 0-4 (see `aligned_probing.data.templates`).
        batch_size: Sequences per `generate` call.
        use_chat_template: Passed to `render_prompt` (None: chat template for templates 1-4 when
            the tokenizer has one).
        output_dir: Write Parquet part files here and resume from them (rows already present are
            not generated again). A local path or an fsspec URL (`s3://bucket/run/continuations`).
            A directory holding other settings is an error.
        show_progress: Show a tqdm progress bar over batches.
        storage_options: fsspec options of a URL `output_dir` (`endpoint_url`, ...).

    Returns:
        One row per (prompt_id, continuation_idx), in prompt order then index, with the columns
        of `CONTINUATION_COLUMNS` (docs/architecture.md). `token_ids` are exactly the generated
        ids, EOS and padding excluded.

    Example:
        >>> model = load_model("smollm2-135m-instruct")  # doctest: +SKIP
        >>> prompts = embedded_prompts().sample(50, stratify_by=None)  # doctest: +SKIP
        >>> conts = generate_continuations(model, prompts, k=5, seed=0,
        ...                                output_dir="runs/smollm2/continuations")  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    _check_settings(k=k, seed=seed, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    batch_size=batch_size, context_length=model.context_length)
    frame = _prompt_frame(prompts)
    prompt_ids, texts = frame["prompt_id"].astype(str).tolist(), frame["text"].astype(str).tolist()
    rendered = _render_all(model, texts, template, use_chat_template, model.context_length - max_new_tokens)
    chat = bool(rendered[0].chat)
    # Longest prompts first and a prompt's continuations together, so batches need little padding.
    order = sorted(range(len(texts)), key=lambda p: (-len(rendered[p].input_ids), p))
    items = [(p, c) for p in order for c in range(k)]
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]

    out_dir = _fs.resolve(output_dir) if output_dir is not None else None
    done = pd.DataFrame({c: pd.Series(dtype=object) for c in CONTINUATION_COLUMNS})
    if out_dir is not None:
        manifest = _manifest(model, template=template, chat=chat, seed=seed, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p)
        done = _open_output(out_dir, manifest, storage_options)
    done_keys = set(zip(done["prompt_id"], done["continuation_idx"].astype(int), strict=True))

    new_frames = []
    for batch_no, batch in enumerate(tqdm(batches, disable=not show_progress, desc="generate", unit="batch")):
        todo = [(p, c) for p, c in batch if (prompt_ids[p], c) not in done_keys]
        if not todo:
            continue
        results = _generate_batch(model, todo, rendered, prompt_ids, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, seed=seed)
        rows = pd.DataFrame(
            {
                "model": model.name,
                "prompt_id": [prompt_ids[p] for p, _ in todo],
                "continuation_idx": [c for _, c in todo],
                "template": template,
                "prompt_text": [texts[p] for p, _ in todo],
                "text": [model.tokenizer.decode(ids, skip_special_tokens=True) for ids, _, _ in results],
                "token_ids": [ids for ids, _, _ in results],
                "n_tokens": [len(ids) for ids, _, _ in results],
                "stopped_at_eos": [stopped for _, stopped, _ in results],
                "seed": seed,
                "token_logprobs": [lps for _, _, lps in results],
            }
        )
        if out_dir is not None:
            _write_part(out_dir, batch_no, rows, storage_options)
        new_frames.append(rows)

    frames = [f for f in (done, *new_frames) if len(f)]
    table = pd.concat(frames, ignore_index=True) if frames else done
    rank = {pid: i for i, pid in enumerate(prompt_ids)}
    table = table[table["prompt_id"].isin(rank) & (table["continuation_idx"].astype(int) < k)]
    table = table.assign(_rank=table["prompt_id"].map(rank)).sort_values(["_rank", "continuation_idx"])
    table = table.drop(columns="_rank").reset_index(drop=True)
    return table.astype({"continuation_idx": "int64", "template": "int64", "n_tokens": "int64",
                         "stopped_at_eos": bool, "seed": "int64"})[list(CONTINUATION_COLUMNS)]


def _check_settings(
    *,
    k: int,
    seed: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    context_length: int,
) -> None:
    """Validate generation settings, naming the parameter, the allowed range and the value."""
    for name, value in (("k", k), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}.")
    if not temperature >= 0:
        raise ValueError(f"temperature must be > 0, or 0 for greedy decoding; got {temperature!r}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 disables nucleus sampling), got {top_p!r}.")
    if max_new_tokens >= context_length:
        raise ValueError(
            f"max_new_tokens must be < the model's context length {context_length}, got {max_new_tokens}."
        )
