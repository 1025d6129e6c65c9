"""Row surgery on a transformers KV cache: keep some rows, left-pad, join two caches by row.

Continuous batching (:class:`hydraopt.runtime.generation.Decoder`) changes the rows of a batch
between decode steps: finished rows leave, new requests join with their own prefilled cache.
transformers' ``DynamicCache`` keeps, per layer, keys and values of shape (B, H, T, D); a row of
the batch is index b of every one of them, and a left-padded position is a column that the
attention mask hides. So every operation here is a tensor operation on dims 0 (rows) and 2
(positions) of every layer's keys and values, the same for all layers. A cache whose layers
drop old positions (sliding windows) cannot be re-aligned by padding, and is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F

Tensor = torch.Tensor


def _layers(cache: Any) -> list[Any]:
    """The cache's per-layer objects with ``keys`` / ``values`` (transformers >= 4.56)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(
            f"continuous batching needs transformers >= 4.56 (a cache with .layers); "
            f"got {type(cache).__name__}"
        )
    for layer in layers:
        if getattr(layer, "is_sliding", False):
            raise TypeError("continuous batching cannot re-align a sliding-window KV cache")
    return list(layers)


def map_rows(cache: Any, fn: Callable[[Tensor], Tensor]) -> None:
    """Replace every layer's keys and values (B, H, T, D) by ``fn`` of them, in place."""
    for layer in _layers(cache):
        layer.keys, layer.values = fn(layer.keys), fn(layer.values)


def select_rows(cache: Any, rows: Tensor) -> None:
    """Keep rows ``rows`` (R,) of the cache, in that order."""
    map_rows(cache, lambda t: t.index_select(0, rows.to(t.device)))


def drop_columns(cache: Any, start: int) -> None:
    """Drop the first ``start`` positions of every row (columns every row's mask hides)."""
    if start > 0:
        map_rows(cache, lambda t: t[:, :, start:])


def left_pad(cache: Any, columns: int) -> None:
    """Prepend ``columns`` zero positions to every row (hidden by the caller's mask)."""
    if columns > 0:
        map_rows(cache, lambda t: F.pad(t, (0, 0, columns, 0)))


def join_rows(cache: Any, other: Any) -> None:
    """Append ``other``'s rows to ``cache`` (both already of the same length), in place."""
    mine, theirs = _layers(cache), _layers(other)
    if len(mine) != len(theirs):
        raise ValueError(f"caches of {len(mine)} and {len(theirs)} layers")
    for a, b in zip(mine, theirs, strict=True):
        a.keys = torch.cat([a.keys, b.keys], dim=0)  # (B + B', H, T, D)
        a.values = torch.cat([a.values, b.values], dim=0)


def length(cache: Any) -> int:
    """Positions held per row (T)."""
    return int(_layers(cache)[0].keys.shape[2])
