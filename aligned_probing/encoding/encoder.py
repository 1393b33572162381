"""Encode prompts and continuations into pooled residual vectors, streamed into an activation store.

For each (prompt, continuation) the encoder runs one teacher-forced forward pass over the
rendered prompt followed by the continuation's generated token ids (never re-tokenised text).
Because attention is causal, that one pass gives both encodings of the paper:

* input encoding: the pool over the prompt's own tokens (template and special tokens excluded);
* output encoding: the pool over the continuation's real tokens (EOS and padding were never
  part of `token_ids`, and batch padding is masked out).

Layers are 0 (the embedding output, `blocks.0.hook_resid_pre`) to L (the last block's
`hook_resid_post`, *before* the final norm). Each layer's activations are pooled inside its
TransformerLens hook with one batched matmul against a `[batch, span, pos]` weight matrix and
written into a preallocated buffer; nothing else is kept. The hook at layer L stops the forward,
so neither the final norm nor the unembedding (262k columns for Gemma-3) is ever computed.

Rows are sorted by length and batched to limit padding; the store's index records which row
went where, and buffers are flushed to disk every `flush_rows` rows, so memory stays bounded as
the number of prompts grows and a killed run resumes where its last flush committed.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor

from aligned_probing.data.templates import render_prompt
from aligned_probing.encoding.pooling import Aggregator, LinearAggregator, get_aggregator
from aligned_probing.encoding.store import ActivationStore
from aligned_probing.models import LoadedModel

if TYPE_CHECKING:
    from aligned_probing.data import PromptSet

logger = logging.getLogger(__name__)

PADDING_SIDES: tuple[str, ...] = ("right", "left")
_INPUT_ONLY = -1  # continuation_idx of input-only rows, as in the store contract


class EmptyContinuationWarning(UserWarning):
    """Continuations with no tokens were skipped: they have no output span to pool."""


@dataclass(frozen=True)
class _Row:
    """One forward sequence: rendered prompt ids + continuation ids, and the two spans."""

    prompt_id: str
    continuation_idx: int
    ids: list[int]
    prompt_span: tuple[int, int]
    output_span: tuple[int, int]


class _StopForward(Exception):
    """Raised by the last residual hook so that the final norm and unembedding never run."""


def encode(
    model: LoadedModel,
    prompts: PromptSet | pd.DataFrame,
    continuations: pd.DataFrame | None = None,
    *,
    template: int = 0,
    poolings: Sequence[str] = ("mean",),
    batch_size: int = 8,
    store: ActivationStore | str | Path,
    dtype: str = "float32",
    use_chat_template: bool | None = None,
    padding_side: str = "right",
    flush_rows: int | None = None,
    chunk_rows: int = 256,
    progress: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    max_new_tokens: int | None = None,
) -> ActivationStore:
    """Encode prompts (and their continuations) into `store`, resuming what it already holds.

    Args:
        model: The loaded model.
        prompts: A `PromptSet` (its `.df` is used) or a DataFrame with `prompt_id`, `text`.
        continuations: The continuations table (`prompt_id`, `continuation_idx`, `token_ids`,
            optionally `template`), or None for an input-only run (`continuation_idx` = -1).
            Continuations with no tokens are skipped with an `EmptyContinuationWarning`, so
            every stored output vector pools at least one real token.
        template: Prompt template 0-4; must match the continuations' `template` column.
        poolings: Pooling names ("mean", "last", "max"), each stored as its own array.
        batch_size: Sequences per forward pass.
        store: An `ActivationStore`, a directory or an fsspec URL (`s3://bucket/run/store`; opened,
            or created when empty). An existing store must have been written for this model,
            revision, tokenizer and template.
        dtype: On-disk dtype of a new store, "float32" or "float16".
        use_chat_template: Passed to `render_prompt` (None: chat template for templates 1-4
            when the tokenizer has one).
        padding_side: "right" (default: with causal attention, real tokens never see right
            padding) or "left" (masked, with position ids counted from the first real token).
        flush_rows: Rows buffered before each write to disk; default: the store's chunk rows.
            Bounds memory at about (flush_rows + batch_size) x (L + 1) x d_model x 4 bytes per array.
        chunk_rows: Rows per zarr chunk of a new store (an existing store keeps its own).
        progress: Show a tqdm progress bar.
        storage_options: fsspec options of a URL `store` (`endpoint_url`, ...). For an
            `ActivationStore`, None keeps the options it was opened with.
        max_new_tokens: The generation setting the continuations were sampled with. Given, prompts
            are truncated exactly as generation truncated them (to `context_length - max_new_tokens`
            tokens), so the teacher-forced prompt is the one that was continued. None: room is left
            for each prompt's longest continuation (only right when no prompt needed truncating).

    Returns:
        The store, holding every requested row.

    Example:
        >>> model = load_model("smollm2-135m-instruct")  # doctest: +SKIP
        >>> store = encode(model, prompts, conts, template=0, store="runs/smollm2/t0")  # doctest: +SKIP
        >>> store.layer(5, position="output").shape  # doctest: +SKIP
        (2500, 576)
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}.")
    aggregators = {name: get_aggregator(name) for name in _unique(poolings, "poolings")}
    prompt_df = _prompt_frame(prompts)
    positions = ("input",) if continuations is None else ("input", "output")
    chat = (
        bool(use_chat_template)
        if use_chat_template is not None
        else (model.has_chat_template and template != 0)
    )
    store = _open_store(
        model,
        store,
        template=template,
        chat=chat,
        positions=positions,
        poolings=tuple(aggregators),
        dtype=dtype,
        chunk_rows=chunk_rows,
        storage_options=storage_options,
    )

    rows = _build_rows(
        model,
        prompt_df,
        continuations,
        template=template,
        use_chat_template=use_chat_template,
        done=store.committed(),
        max_new_tokens=max_new_tokens,
    )
    # Longest first: similar lengths share a batch (little padding) and memory peaks early.
    rows.sort(key=lambda r: -len(r.ids))
    flush_rows = flush_rows or int(store.manifest["chunk_rows"])
    if not isinstance(flush_rows, int) or flush_rows < 1:
        raise ValueError(f"flush_rows must be a positive int, got {flush_rows!r}.")
    keys = [(p, q) for p in positions for q in aggregators]
    device = next(model.hf_model.parameters()).device
    writer = _BufferedWriter(store, keys, capacity=flush_rows + batch_size, device=device)
    batches = list(_batched(rows, batch_size))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"encode {model.name}", unit="batch")
    for batch in batches:
        _encode_batch(model, batch, aggregators, positions, writer, padding_side=padding_side)
        # Flush only between batches, so a commit always ends on a batch boundary and a resumed
        # run re-forms exactly the batches an uninterrupted run would have (bitwise equal store).
        if writer.n_rows >= flush_rows:
            writer.flush()
    writer.flush()
    return store


def _unique(values: Sequence[str], name: str) -> tuple[str, ...]:
    if isinstance(values, str):
        values = (values,)
    values = tuple(values)
    if not values or len(set(values)) != len(values):
        raise ValueError(f"{name} must be a non-empty sequence of distinct names, got {values!r}.")
    return values


def _prompt_frame(prompts: PromptSet | pd.DataFrame) -> pd.DataFrame:
    df = getattr(prompts, "df", prompts)
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"prompts must be a PromptSet or a DataFrame, got {type(prompts).__name__}.")
    missing = [c for c in ("prompt_id", "text") if c not in df.columns]
    if missing:
        raise ValueError(f"prompts is missing columns {missing}; it needs 'prompt_id' and 'text'.")
    dupes = df["prompt_id"][df["prompt_id"].duplicated()]
    if len(dupes):
        raise ValueError(f"prompts repeats prompt_id values, e.g. {list(dupes[:3])}; ids must be unique.")
    return df[["prompt_id", "text"]].astype({"prompt_id": str})


def _open_store(
    model: LoadedModel,
    store: ActivationStore | str | Path,
    *,
    template: int,
    chat: bool,
    positions: tuple[str, ...],
    poolings: tuple[str, ...],
    dtype: str,
    chunk_rows: int,
    storage_options: Mapping[str, Any] | None = None,
) -> ActivationStore:
    """Open or create the store, refusing one written for another model, template or layout.

    `storage_options` reach the store on object storage; an `ActivationStore` passed in is
    re-opened with its own options unless others are given (a store on S3 with a custom endpoint
    would otherwise be looked up on AWS).
    """
    expect: dict[str, Any] = {
        "model": model.name,
        "revision": model.revision,
        "tokenizer_hash": model.tokenizer_hash,
        "template": int(template),
        "chat": chat,
        "n_layers": model.n_layers,
        "d_model": model.d_model,
        "positions": list(positions),
        "poolings": list(poolings),
    }
    if isinstance(store, ActivationStore):
        # Re-open: checks the manifest and rolls back anything uncommitted.
        options = store.storage_options if storage_options is None else storage_options
        return ActivationStore.open(store.path, expect=expect, storage_options=options)
    return ActivationStore.open_or_create(
        store,
        expect=expect,
        storage_options=storage_options,
        model=model.name,
        template=int(template),
        n_layers=model.n_layers,
        d_model=model.d_model,
        positions=positions,
        poolings=poolings,
        dtype=dtype,
        chunk_rows=chunk_rows,
        layer_names=list(model.hook_names),
        extra={
            "spec": model.spec,
            "revision": model.revision,
            "tokenizer_hash": model.tokenizer_hash,
            "chat": chat,
            "model_dtype": model.dtype,
            "quantization": model.quantization,
        },
    )


def _build_rows(
    model: LoadedModel,
    prompt_df: pd.DataFrame,
    continuations: pd.DataFrame | None,
    *,
    template: int,
    use_chat_template: bool | None,
    done: set[tuple[str, int]],
    max_new_tokens: int | None = None,
) -> list[_Row]:
    """Render each prompt once and lay out the forward sequences still to encode."""
    texts = dict(zip(prompt_df["prompt_id"], prompt_df["text"], strict=True))
    if continuations is None:
        wanted = [(pid, _INPUT_ONLY, []) for pid in texts]
    else:
        wanted = _continuation_items(continuations, texts, template)
    # Over all rows, done or not, so that a resumed run renders (and truncates) prompts identically.
    longest: dict[str, int] = {}
    for pid, _, ids in wanted:
        longest[pid] = max(longest.get(pid, 0), len(ids))
    wanted = [item for item in wanted if (item[0], item[1]) not in done]
    n_empty = sum(1 for _, idx, ids in wanted if idx != _INPUT_ONLY and not ids)
    if n_empty:
        warnings.warn(
            f"Skipped {n_empty} continuations with 0 tokens (they have no output span); they get no "
            "store row, so probing simply never sees them.",
            EmptyContinuationWarning,
            stacklevel=3,
        )
    todo = {pid for pid, _, _ in wanted}
    rendered = {
        pid: render_prompt(
            model.tokenizer,
            texts[pid],
            template,
            use_chat_template=use_chat_template,
            # The same budget generation used (render_prompt truncates from the left); without it,
            # room for the longest continuation.
            max_tokens=model.context_length - (max_new_tokens if max_new_tokens is not None else n),
        )
        for pid, n in longest.items()
        if pid in todo
    }
    rows: list[_Row] = []
    for pid, idx, ids in wanted:
        if idx != _INPUT_ONLY and not ids:
            continue
        r = rendered[pid]
        n_in = len(r.input_ids)
        rows.append(
            _Row(pid, idx, r.input_ids + ids, (r.prompt_start, r.prompt_end), (n_in, n_in + len(ids)))
        )
    return rows


def _continuation_items(
    continuations: pd.DataFrame, texts: dict[str, str], template: int
) -> list[tuple[str, int, list[int]]]:
    if not isinstance(continuations, pd.DataFrame):
        raise TypeError(f"continuations must be a DataFrame or None, got {type(continuations).__name__}.")
    missing = [c for c in ("prompt_id", "continuation_idx", "token_ids") if c not in continuations.columns]
    if missing:
        raise ValueError(
            f"continuations is missing columns {missing}; it needs prompt_id, continuation_idx, token_ids."
        )
    if "template" in continuations.columns:
        other = sorted(set(continuations["template"].astype(int)) - {int(template)})
        if other:
            raise ValueError(
                f"continuations were generated with template {other}, but template={template} was "
                "requested; teacher forcing needs the prompt rendered as at generation time."
            )
    unknown = sorted(set(continuations["prompt_id"].astype(str)) - set(texts))
    if unknown:
        raise ValueError(
            f"{len(unknown)} continuations name prompt_ids absent from prompts, e.g. {unknown[:3]}."
        )
    items = [
        (str(pid), int(idx), [int(t) for t in ids])
        for pid, idx, ids in zip(
            continuations["prompt_id"],
            continuations["continuation_idx"],
            continuations["token_ids"],
            strict=True,
        )
    ]
    keys = [(pid, idx) for pid, idx, _ in items]
    if len(set(keys)) != len(keys):
        raise ValueError("continuations repeats (prompt_id, continuation_idx) pairs; each must be unique.")
    return items


def _batched(rows: list[_Row], size: int) -> Iterator[list[_Row]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


class _BufferedWriter:
    """Preallocated float32 buffers [L + 1, capacity, d_model] per (position, pooling), flushed to the store.

    The buffers live on the model's device, so hooks never synchronise with the host; a flush
    copies them to the CPU once per `flush_rows` rows.
    """

    def __init__(
        self, store: ActivationStore, keys: list[tuple[str, str]], capacity: int, device: torch.device
    ) -> None:
        self.store = store
        shape = (store.n_layers + 1, capacity, store.d_model)
        self.buffers = {key: torch.empty(shape, dtype=torch.float32, device=device) for key in keys}
        self.device = device
        self.index: list[tuple[str, int]] = []

    @property
    def n_rows(self) -> int:
        return len(self.index)

    def rows(self, batch: list[_Row]) -> slice:
        """Reserve buffer rows for `batch` and return their slice."""
        start = len(self.index)
        self.index.extend((r.prompt_id, r.continuation_idx) for r in batch)
        return slice(start, start + len(batch))

    def flush(self) -> None:
        n = len(self.index)
        if n == 0:
            return
        index = pd.DataFrame(self.index, columns=["prompt_id", "continuation_idx"])
        self.store.append(index, {key: buf[:, :n].cpu().numpy() for key, buf in self.buffers.items()})
        self.index = []


def _encode_batch(
    model: LoadedModel,
    batch: list[_Row],
    aggregators: dict[str, Aggregator],
    positions: tuple[str, ...],
    writer: _BufferedWriter,
    *,
    padding_side: str,
) -> None:
    """One forward pass over `batch`, pooling every layer into the writer's buffers."""
    ids, attention_mask, spans = _pad_batch(batch, model.pad_token_id, padding_side)
    ids, attention_mask = ids.to(writer.device), attention_mask.to(writer.device)
    # Positions count real tokens only, so a left-padded row sees the positions it would alone.
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    masks = {position: spans[position].to(writer.device) for position in positions}
    linear_keys = [
        (p, q) for p in positions for q, agg in aggregators.items() if isinstance(agg, LinearAggregator)
    ]
    # [batch, n_linear, pos]: every linear pooling of every span, applied by one bmm per layer.
    weights = (
        torch.stack([aggregators[q].weights(masks[p]) for p, q in linear_keys], dim=1)
        if linear_keys
        else None
    )
    other = [
        ((p, q), aggregators[q], masks[p])
        for p in positions
        for q in aggregators
        if (p, q) not in linear_keys
    ]
    rows = writer.rows(batch)
    hooks = [
        (
            name,
            _create_pooling_hook(
                layer,
                weights,
                linear_keys,
                other,
                writer.buffers,
                rows,
                stop=layer == model.n_layers,
            ),
        )
        for layer, name in enumerate(model.hook_names)
    ]
    with torch.no_grad():
        try:
            # The bridge's stop_at_layer=n_layers would still run the final norm and the
            # unembedding (no block n_layers exists to stop at), so the last hook raises instead.
            model.bridge.run_with_hooks(
                ids,
                fwd_hooks=hooks,
                return_type=None,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            )
        except _StopForward:
            pass


def _create_pooling_hook(
    layer: int,
    weights: Tensor | None,
    linear_keys: list[tuple[str, str]],
    other: list[tuple[tuple[str, str], Aggregator, Tensor]],
    buffers: dict[tuple[str, str], Tensor],
    rows: slice,
    *,
    stop: bool,
) -> Callable[..., None]:
    """A forward hook that pools `acts` [batch, pos, d_model] into `buffers[key][layer, rows]`."""

    def hook(acts: Tensor, hook: Any) -> None:
        # Pool in float32 whatever the model's dtype, so half-precision models lose no more.
        x = acts if acts.dtype == torch.float32 else acts.float()
        if weights is not None:
            pooled = torch.bmm(weights, x)  # [batch, n_linear, d_model]
            for k, key in enumerate(linear_keys):
                buffers[key][layer, rows] = pooled[:, k]
        for key, aggregate, mask in other:
            buffers[key][layer, rows] = aggregate(x, mask)
        if stop:
            raise _StopForward
        return None

    return hook


def _pad_batch(batch: list[_Row], pad_id: int, padding_side: str) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Padded ids [batch, pos], attention mask [batch, pos] and boolean span masks per position."""
    width = max(len(r.ids) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    spans = {p: torch.zeros((len(batch), width), dtype=torch.bool) for p in ("input", "output")}
    for i, row in enumerate(batch):
        offset = width - len(row.ids) if padding_side == "left" else 0
        ids[i, offset : offset + len(row.ids)] = torch.tensor(row.ids, dtype=torch.long)
        attention[i, offset : offset + len(row.ids)] = 1
        spans["input"][i, offset + row.prompt_span[0] : offset + row.prompt_span[1]] = True
        spans["output"][i, offset + row.output_span[0] : offset + row.output_span[1]] = True
    return ids, attention, spans
