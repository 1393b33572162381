"""Scoped, reversible interventions on the residual stream: layer skipping, patching, steering.

Every intervention is a small object that builds TransformerLens hook functions for a
`LoadedModel` and registers them through `model.bridge.hooks(...)`. Use it as

    with LayerSkip(3).apply(model):
        model.hf_model.generate(...)

(hooks are removed in `finally`, even when the body raises), or, in a notebook,

    handle = Steering(5, direction, alpha=4.0).attach(model)
    ...
    handle.remove()

The hooks fire inside `model.hf_model(...)` and `model.hf_model.generate(...)`. With the KV cache,
`generate` runs one *prefill* call over the whole prompt and then one call per new token that sees
only the newest position (tensors of shape [batch, 1, d_model]). Each hook is correct in both:

* `LayerSkip` captures block b's input and returns it as its output in the same call, so it works
  for any number of positions.
* `ResidualPatch` writes *absolute* positions (indices into the full, padded input tensor). Each
  call learns where it starts from a read-only PyTorch pre-hook on the Hugging Face model that reads
  the KV cache length (`_CallOffset`); a call patches only the positions it actually contains.
  Patched prompt positions therefore change the prefill and, through the cache, every later step.
* `PromptPatch` patches rows by their *content*: each row of the call is identified by its
  unpadded token ids (read by the same pre-hook, with the attention mask), so one batched
  `generate` over many target prompts can give every row its own source activations, whatever
  the batch composition and padding. It patches fresh passes and prefills only (offset 0).
* `Steering` applies its operator (add, ablate, ablate-then-add) at *every* position the hook
  sees: all prompt positions in the prefill and each generated position once in its cached step
  (the usual ActAdd/CAA choice; steering only generated tokens would leave the prompt's cached
  keys and values unsteered).

Stored vectors live on the CPU in float32; every hook moves them to the activation's device and
dtype, so an intervention built once works on a CUDA bf16 model. Steering operators compute in
float32 and cast back.

When several interventions are combined (`Compose`), their hooks fire in the order listed.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from aligned_probing.models.kv_compat import call_cache

HookFn = Callable[[Tensor, Any], Tensor | None]
"""TransformerLens hook signature: `fn(activation, hook) -> activation | None`."""


class _CallOffset:
    """Absolute start position of the current forward call (0 for a fresh pass), and its inputs.

    Read from the KV cache that the call receives (keyword `cache` or `past_key_values`, see
    `aligned_probing.models.kv_compat`): its `get_seq_length()` is the number
    of positions already processed. Hand-written because TransformerLens hook functions receive
    only the activation, not the call's cache position. The call's `input_ids` and
    `attention_mask` are kept too (read-only), so `PromptPatch` can tell which prompt each row holds.
    """

    def __init__(self) -> None:
        self.offset = 0
        self.input_ids: Tensor | None = None
        self.attention_mask: Tensor | None = None

    def pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        past = call_cache(kwargs)  # `cache` from transformers 5.24 on, `past_key_values` before
        self.offset = int(past.get_seq_length()) if past is not None else 0
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.input_ids = ids if isinstance(ids, Tensor) else None
        mask = kwargs.get("attention_mask")
        self.attention_mask = mask if isinstance(mask, Tensor) else None


class InterventionHandle:
    """Live hooks of an attached intervention; `remove()` takes them off (idempotent).

    Also a context manager, so `with intervention.attach(model): ...` works as well.
    """

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self._stack = stack
        self.removed = False

    def remove(self) -> None:
        """Remove every hook this handle registered."""
        if not self.removed:
            self.removed = True
            self._stack.close()

    def __enter__(self) -> InterventionHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class Intervention(ABC):
    """Base class: subclasses build fresh hook closures per attachment (no shared state)."""

    @abstractmethod
    def hooks(self, model: Any, offset: _CallOffset) -> list[tuple[str, HookFn]]:
        """Return `(hook_name, fn)` pairs for `model`; validate layers against it first."""

    def attach(self, model: Any) -> InterventionHandle:
        """Register the hooks on `model` and return a handle whose `remove()` undoes it.

        Args:
            model: A `LoadedModel`.

        Returns:
            The handle. Prefer `apply` in scripts: it cannot leak hooks.
        """
        stack = contextlib.ExitStack()
        try:
            offset = _CallOffset()
            pre = model.hf_model.register_forward_pre_hook(offset.pre_hook, with_kwargs=True)
            stack.callback(pre.remove)
            stack.enter_context(model.bridge.hooks(fwd_hooks=self.hooks(model, offset)))
        except BaseException:
            stack.close()
            raise
        return InterventionHandle(stack)

    @contextlib.contextmanager
    def apply(self, model: Any) -> Iterator[Any]:
        """Context manager: hooks are active inside the block and removed in `finally`.

        Example:
            >>> with LayerSkip(2).apply(model):  # doctest: +SKIP
            ...     logits = model.hf_model(ids).logits
        """
        handle = self.attach(model)
        try:
            yield model
        finally:
            handle.remove()


def _check_layer(name: str, value: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if not 0 <= int(value) <= high:
        raise ValueError(f"{name} must be in 0..{high} for this model, got {value}.")
    return int(value)


# ---------------------------------------------------------------- hook factories (private)


def _create_capture_hook(store: dict[str, Tensor], key: str) -> HookFn:
    """Remember the activation of this call under `key` (returns None: no change)."""

    def hook(resid: Tensor, hook: Any) -> None:
        store[key] = resid

    return hook


def _create_replace_hook(store: dict[str, Tensor], key: str) -> HookFn:
    """Return the activation captured earlier in the same call (block bypass)."""

    def hook(resid: Tensor, hook: Any) -> Tensor:
        captured = store.pop(key, None)
        if captured is None or captured.shape != resid.shape:
            raise RuntimeError(f"Layer skip at {hook.name}: no matching block input was captured.")
        return captured

    return hook


def _create_patch_hook(values: Tensor, positions: Tensor, offset: _CallOffset) -> HookFn:
    """Overwrite `resid[:, p]` with `values[:, i]` for the absolute positions p inside this call.

    `values`: [batch or 1, n_pos, d_model]; `positions`: [n_pos] absolute indices.
    """

    def hook(resid: Tensor, hook: Any) -> Tensor:  # resid: [batch, pos, d_model]
        start, length = offset.offset, resid.shape[1]
        local = positions.to(resid.device) - start
        inside = (local >= 0) & (local < length)
        if not bool(inside.any()):
            return resid
        src = values.to(device=resid.device, dtype=resid.dtype)
        if src.shape[0] not in (1, resid.shape[0]):
            raise ValueError(
                f"ResidualPatch values have batch size {src.shape[0]}, the run has {resid.shape[0]}; "
                "pass values for one sequence (broadcast) or for every row."
            )
        out = resid.clone()
        out[:, local[inside]] = src[:, inside].expand(resid.shape[0], -1, -1)
        return out

    return hook


def _row_keys(offset: _CallOffset, batch: int, length: int) -> list[tuple[list[int], list[int]]]:
    """Per row of the call: (its real token ids, their positions in the call), padding excluded."""
    if offset.input_ids is None:
        raise RuntimeError("PromptPatch needs the call's input_ids (pass token ids, not embeddings).")
    ids = offset.input_ids.detach().to("cpu")
    mask = offset.attention_mask
    mask = torch.ones_like(ids) if mask is None else mask.detach().to("cpu")[:, -length:]
    out = []
    for row in range(batch):
        pos = torch.nonzero(mask[row], as_tuple=False).flatten()
        out.append((ids[row, pos].tolist(), pos.tolist()))
    return out


def _create_prompt_patch_hook(
    table: dict[tuple[int, ...], tuple[list[int], Tensor]], offset: _CallOffset
) -> HookFn:
    """Patch each row by the entry of its prompt (matched on the longest key its tokens start with).

    `table[key] = (positions relative to the first real token, values [n_pos, d_model])`.
    """
    lengths = sorted({len(k) for k in table}, reverse=True)

    def hook(resid: Tensor, hook: Any) -> Tensor:  # resid: [batch, pos, d_model]
        if offset.offset != 0:  # a cached decoding step: the prompt was patched in the prefill
            return resid
        out = resid.clone()
        for row, (tokens, where) in enumerate(_row_keys(offset, resid.shape[0], resid.shape[1])):
            entry = next((table[k] for n in lengths if (k := tuple(tokens[:n])) in table), None)
            if entry is None:
                raise RuntimeError(
                    f"PromptPatch at {hook.name}: row {row} holds a prompt without a patch entry "
                    f"(first tokens {tokens[:8]}); give every prompt of the batch an entry."
                )
            rel, values = entry
            out[row, [where[p] for p in rel]] = values.to(device=resid.device, dtype=resid.dtype)
        return out

    return hook


# ---------------------------------------------------------------- steering operators

SteeringOperator = Callable[[Tensor, Tensor, float], Tensor]
"""`op(resid [..., d_model] float32, unit [d_model] float32, alpha) -> new resid`."""


def addition_operator() -> SteeringOperator:
    """Resid + alpha u (ActAdd/CAA); alpha = 0 is the identity."""

    def op(resid: Tensor, unit: Tensor, alpha: float) -> Tensor:
        return resid + alpha * unit

    return op


def ablation_operator() -> SteeringOperator:
    """Resid - (resid . u) u: project the direction out (alpha is ignored)."""

    def op(resid: Tensor, unit: Tensor, alpha: float) -> Tensor:
        return resid - (resid @ unit).unsqueeze(-1) * unit

    return op


def ablation_then_addition_operator() -> SteeringOperator:
    """Resid - (resid . u) u + alpha u: every position's coordinate along u is set to alpha."""
    ablate = ablation_operator()

    def op(resid: Tensor, unit: Tensor, alpha: float) -> Tensor:
        return ablate(resid, unit, alpha) + alpha * unit

    return op


#: Steering operators by name (as steering-vectors' `addition_operator` and friends).
OPERATORS: dict[str, Callable[[], SteeringOperator]] = {
    "add": addition_operator,
    "ablate": ablation_operator,
    "ablate_then_add": ablation_then_addition_operator,
}


def steering_operator(name: str) -> SteeringOperator:
    """The steering operator called `name` (one of `OPERATORS`)."""
    if name not in OPERATORS:
        raise ValueError(f"operator must be one of {sorted(OPERATORS)}, got {name!r}.")
    return OPERATORS[name]()


def _create_steering_hook(op: SteeringOperator, unit: Tensor, alpha: float) -> HookFn:
    """Apply `op` at every position of this call, in float32, cast back to the activation dtype."""

    def hook(resid: Tensor, hook: Any) -> Tensor:
        u = unit.to(device=resid.device, dtype=torch.float32)
        return op(resid.to(torch.float32), u, alpha).to(resid.dtype)

    return hook


# ---------------------------------------------------------------- interventions


class LayerSkip(Intervention):
    """Bypass transformer blocks: block b's residual output := its residual input.

    The block still runs (and fills its KV cache), but its contribution is discarded, which equals
    deleting the block from the model.

    Args:
        blocks: Block index b in 0..L-1, or several.
    """

    def __init__(self, blocks: int | Sequence[int]) -> None:
        self.blocks = [blocks] if isinstance(blocks, int | np.integer) else list(blocks)

    def hooks(self, model: Any, offset: _CallOffset) -> list[tuple[str, HookFn]]:
        """Capture `blocks.{b}.hook_resid_pre` and return it at `blocks.{b}.hook_resid_post`."""
        store: dict[str, Tensor] = {}
        out: list[tuple[str, HookFn]] = []
        for b in self.blocks:
            b = _check_layer("blocks", b, model.n_layers - 1)
            key = f"block{b}"
            out.append((f"blocks.{b}.hook_resid_pre", _create_capture_hook(store, key)))
            out.append((f"blocks.{b}.hook_resid_post", _create_replace_hook(store, key)))
        return out

    def __repr__(self) -> str:
        return f"LayerSkip(blocks={self.blocks})"


class ResidualPatch(Intervention):
    """Overwrite the residual stream at layer l and given positions with stored activations.

    Args:
        layer: Residual layer l in 0..L (`model.hook_names[l]`).
        values: Activations to write, [n_pos, d_model] (the same for every row) or
            [batch, n_pos, d_model]; `values[..., i, :]` goes to `positions[i]`.
        positions: Absolute positions in the target's input tensor (after any left padding).
            Positions beyond a call's span are simply not patched, so in KV-cached generation the
            prefill is patched and the cached steps see the result through the cache.
    """

    def __init__(self, layer: int, values: Tensor | np.ndarray, positions: Sequence[int]) -> None:
        self.layer = layer
        self.values = torch.as_tensor(values)
        self.positions = [int(p) for p in positions]
        if self.values.dim() == 2:
            self.values = self.values.unsqueeze(0)
        if self.values.dim() != 3 or self.values.shape[1] != len(self.positions):
            raise ValueError(
                f"values must have shape [n_pos, d_model] or [batch, n_pos, d_model] with n_pos = "
                f"len(positions) = {len(self.positions)}; got {tuple(torch.as_tensor(values).shape)}."
            )
        if any(p < 0 for p in self.positions) or len(set(self.positions)) != len(self.positions):
            raise ValueError(f"positions must be distinct and >= 0, got {self.positions}.")

    def hooks(self, model: Any, offset: _CallOffset) -> list[tuple[str, HookFn]]:
        """One patch hook at `model.hook_names[layer]`."""
        layer = _check_layer("layer", self.layer, model.n_layers)
        if self.values.shape[-1] != model.d_model:
            raise ValueError(
                f"values have width {self.values.shape[-1]}, the model's d_model is {model.d_model}."
            )
        positions = torch.tensor(self.positions, dtype=torch.long)
        return [(model.hook_names[layer], _create_patch_hook(self.values, positions, offset))]

    def __repr__(self) -> str:
        return f"ResidualPatch(layer={self.layer}, positions={self.positions})"


class Steering(Intervention):
    """Steer the residual stream at layer l along a unit direction u, at every position.

    Args:
        layer: Residual layer l in 0..L (`model.hook_names[l]`).
        direction: Direction [d_model] (e.g. a probe's weight vector); normalised to unit length.
        alpha: Step in residual-stream units (signed). With "add" the residual moves by exactly
            `alpha` along u; with "ablate_then_add" its coordinate along u becomes `alpha`.
        operator: "add" (resid + alpha u), "ablate" (project u out; alpha ignored),
            "ablate_then_add" (project out, then add alpha u), or a `SteeringOperator` callable.
    """

    def __init__(
        self,
        layer: int,
        direction: Tensor | np.ndarray,
        alpha: float,
        operator: str | SteeringOperator = "add",
    ) -> None:
        self.layer = layer
        vec = torch.as_tensor(np.asarray(direction, dtype=np.float64)).flatten()
        norm = float(vec.norm())
        if not np.isfinite(norm) or norm == 0.0:
            raise ValueError(f"direction must be finite and non-zero, got norm {norm}.")
        self.unit = (vec / norm).to(torch.float32)
        self.alpha = float(alpha)
        self.operator_name = (
            operator if isinstance(operator, str) else getattr(operator, "__name__", "custom")
        )
        self.operator = steering_operator(operator) if isinstance(operator, str) else operator

    def hooks(self, model: Any, offset: _CallOffset) -> list[tuple[str, HookFn]]:
        """One additive hook at `model.hook_names[layer]`."""
        layer = _check_layer("layer", self.layer, model.n_layers)
        if self.unit.numel() != model.d_model:
            raise ValueError(
                f"direction has {self.unit.numel()} entries, the model's d_model is {model.d_model}."
            )
        return [(model.hook_names[layer], _create_steering_hook(self.operator, self.unit, self.alpha))]

    def __repr__(self) -> str:
        return f"Steering(layer={self.layer}, alpha={self.alpha}, operator={self.operator_name!r})"


class PromptPatch(Intervention):
    """Patch the residual stream at layer l per prompt, identified by the row's token ids.

    For batched patching across pairs: each target prompt (its rendered token ids) gets its own
    source activations, and each row of any batch is matched to its entry by its unpadded tokens
    (the longest entry its tokens start with, so uncached generation, whose rows grow, works too).
    Only fresh passes and prefills are patched; cached steps see the result through the KV cache.
    A row without an entry is an error (a silent miss would bias the effect).

    Args:
        layer: Residual layer l in 0..L.
        patches: `{token ids of a prompt: (positions, values [n_pos, d_model])}`; positions count
            from the prompt's first real token (0-based), padding excluded.
    """

    def __init__(
        self, layer: int, patches: Mapping[tuple[int, ...], tuple[Sequence[int], Tensor | np.ndarray]]
    ) -> None:
        self.layer = layer
        self.table: dict[tuple[int, ...], tuple[list[int], Tensor]] = {}
        for key, (positions, values) in patches.items():
            pos = [int(p) for p in positions]
            vals = torch.as_tensor(values).detach().to("cpu", torch.float32)
            if vals.dim() != 2 or vals.shape[0] != len(pos):
                raise ValueError(
                    f"values must have shape [n_pos, d_model] with n_pos = len(positions) = {len(pos)}; "
                    f"got {tuple(vals.shape)}."
                )
            if any(not 0 <= p < len(key) for p in pos):
                raise ValueError(f"positions must lie in 0..{len(key) - 1} (the prompt's tokens), got {pos}.")
            self.table[tuple(int(t) for t in key)] = (pos, vals)
        if not self.table:
            raise ValueError("patches must hold at least one prompt, got an empty mapping.")

    def hooks(self, model: Any, offset: _CallOffset) -> list[tuple[str, HookFn]]:
        """One content-keyed patch hook at `model.hook_names[layer]`."""
        layer = _check_layer("layer", self.layer, model.n_layers)
        width = {v.shape[-1] for _, v in self.table.values()}
        if width != {model.d_model}:
            raise ValueError(f"values have width {sorted(width)}, the model's d_model is {model.d_model}.")
        return [(model.hook_names[layer], _create_prompt_patch_hook(self.table, offset))]

    def __repr__(self) -> str:
        return f"PromptPatch(layer={self.layer}, prompts={len(self.table)})"


class Compose(Intervention):
    """Several interventions at once; their hooks fire in the order given."""

    def __init__(self, *interventions: Intervention) -> None:
        self.interventions = list(interventions)

    def hooks(self, model: Any, offset: _CallOffset) -> list[tuple[str, HookFn]]:
        """Concatenate the members' hooks, sharing one call-offset tracker."""
        return [h for item in self.interventions for h in item.hooks(model, offset)]

    def __repr__(self) -> str:
        return f"Compose({', '.join(map(repr, self.interventions))})"
