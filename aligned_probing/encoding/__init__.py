"""Encoding: pooled residual-stream activations over exact token spans, and the zarr activation store.

Modules: `encoder` (`encode`: one teacher-forced pass per batch, pooling inside the hooks), `pooling`
(aggregator factories), `store` (`ActivationStore`, crash-safe and appendable).
"""

from aligned_probing.encoding.encoder import PADDING_SIDES, EmptyContinuationWarning, encode
from aligned_probing.encoding.pooling import (
    Aggregator,
    get_aggregator,
    last_aggregator,
    max_aggregator,
    mean_aggregator,
)
from aligned_probing.encoding.store import ActivationStore

__all__ = [
    "PADDING_SIDES",
    "ActivationStore",
    "Aggregator",
    "EmptyContinuationWarning",
    "encode",
    "get_aggregator",
    "last_aggregator",
    "max_aggregator",
    "mean_aggregator",
]
