"""Pooling strategies: reduce a span of residual-stream positions to one vector.

An `Aggregator` takes activations `[batch, pos, d_model]` and a boolean span mask `[batch, pos]`
and returns `[batch, d_model]`, as in steering-vectors' `aggregators.py`. The encoder calls them
*inside* the forward hooks, so no activation cache is ever kept.

Mean and last-token pooling are weighted sums over positions. They are `LinearAggregator`s and
expose their `[batch, pos]` weight matrix, so the encoder can stack the weights of every
(position, pooling) pair and reduce a hook's activations with a single batched matmul.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Aggregator = Callable[[Tensor, Tensor], Tensor]
"""(activations [batch, pos, d_model], span mask [batch, pos] bool) -> pooled [batch, d_model]."""


class LinearAggregator:
    """A pooling that is a weighted sum over positions: pooled[b] = sum_p w[b, p] * acts[b, p].

    Args:
        weights_fn: Maps a boolean span mask `[batch, pos]` to float weights `[batch, pos]`
            that are zero outside the span.
        name: Pooling name, used in error messages.
    """

    def __init__(self, weights_fn: Callable[[Tensor], Tensor], name: str) -> None:
        self.weights_fn = weights_fn
        self.name = name

    def weights(self, mask: Tensor) -> Tensor:
        """Float32 weights `[batch, pos]` for the span `mask`; all zero for an empty span."""
        return self.weights_fn(mask)

    def __call__(self, acts: Tensor, mask: Tensor) -> Tensor:
        """Pool `acts` [batch, pos, d_model] over `mask` [batch, pos] -> [batch, d_model]."""
        weights = self.weights(mask).to(acts.dtype)
        return torch.einsum("bp,bpd->bd", weights, acts)

    def __repr__(self) -> str:
        return f"LinearAggregator({self.name!r})"


def _mean_weights(mask: Tensor) -> Tensor:
    mask = mask.to(torch.float32)
    # clamp keeps an empty span at weight 0 (a zero vector) instead of 0/0; the encoder never
    # passes empty spans (it skips 0-token continuations), so this only guards direct callers.
    return mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0)


def _last_weights(mask: Tensor) -> Tensor:
    mask = mask.to(torch.bool)
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, pos, -1).amax(dim=1, keepdim=True)  # [batch, 1]; -1 for an empty span
    return (pos == last).to(torch.float32)


def mean_aggregator() -> LinearAggregator:
    """Mean over the span's positions (the paper's input and output encodings)."""
    return LinearAggregator(_mean_weights, "mean")


def last_aggregator() -> LinearAggregator:
    """The span's last position (for a prompt, the state that predicts the first new token)."""
    return LinearAggregator(_last_weights, "last")


def max_aggregator() -> Aggregator:
    """Element-wise maximum over the span's positions (not linear, so it costs its own pass)."""

    def _max(acts: Tensor, mask: Tensor) -> Tensor:
        filled = acts.masked_fill(~mask.to(torch.bool)[:, :, None], float("-inf"))
        return filled.amax(dim=1)

    return _max


POOLINGS: dict[str, Callable[[], Aggregator]] = {
    "mean": mean_aggregator,
    "last": last_aggregator,
    "max": max_aggregator,
}


def get_aggregator(pooling: str) -> Aggregator:
    """Return the aggregator registered under `pooling` ("mean", "last" or "max")."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {sorted(POOLINGS)}, got {pooling!r}.")
    return POOLINGS[pooling]()
