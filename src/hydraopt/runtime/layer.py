"""A linear layer that adds a routed low-rank update per batch row.

Each adapted ``nn.Linear`` of the base model is replaced by :class:`RoutedLinear`, which holds the
original layer, the module's shared A' once, its M heads and its routing row. Which task each
batch row belongs to is not stored in the layer: every layer of one model reads the same
:class:`TaskRows` object, which the runtime sets around each forward pass (so two runtime models
never share state, and there is no global).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from hydraopt.runtime.factors import ModuleFactors

# Up to this many heads a layer applies every head and selects per row (see forward).
ALL_HEADS_UP_TO = 8


class TaskRows:
    """The task index of every batch row of the forward pass in flight.

    Owned by one runtime model and referenced by its layers; ``ids`` is None between passes, and a
    layer called then refuses (a silent base-model output would hide a bug).
    """

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None  # (B,) int64 task index per row


class RoutedLinear(nn.Module):
    """``base(x) + heads[routing[task(row)]] @ (A' @ x)`` for every row of the batch.

    x·A'ᵀ is computed once for the whole batch (A' is shared by every task); only the (d, r) head
    differs per row. With a single head (classic merges) it is one plain matmul; with a few heads
    one matmul applies all of them and each row keeps its own; with many, one batched matmul over
    the rows' gathered heads. No Python loop over tasks, heads or tokens.

    Args:
        base: the original linear layer (kept, not copied).
        factors: the module's A' (r, k), heads (M, d, r) and routing (K,).
        rows: the model's shared :class:`TaskRows`.
    """

    A: torch.Tensor  # (r, k)
    heads: torch.Tensor  # (M, d, r)
    routing: torch.Tensor  # (K,)

    def __init__(self, base: nn.Linear, factors: ModuleFactors, rows: TaskRows) -> None:
        super().__init__()
        d, k, _ = factors.shape
        if (base.out_features, base.in_features) != (d, k):
            raise ValueError(
                f"factors of shape d={d}, k={k} do not fit a linear layer "
                f"{base.in_features} -> {base.out_features}"
            )
        self.base = base
        dtype = base.weight.dtype
        device = base.weight.device
        # Buffers, not parameters: the runtime never trains, and state_dict() shows them.
        self.register_buffer("A", factors.A.to(device, dtype), persistent=False)  # (r, k)
        self.register_buffer(
            "heads", factors.heads.to(device, dtype), persistent=False
        )  # (M, d, r)
        self.register_buffer("routing", factors.routing.to(device), persistent=False)  # (K,)
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.rows.ids
        if ids is None:
            raise RuntimeError("no task per row set: call the runtime model, not its layers")
        out = self.base(x)  # (B, ..., d)
        z = F.linear(x, self.A)  # (B, ..., r)
        heads = self.heads
        num_heads = heads.shape[0]
        if num_heads == 1:
            return out + F.linear(z, heads[0])
        head_of_row = self.routing[ids]  # (B,)
        rows = z.shape[0]
        flat = z.reshape(rows, -1, z.shape[-1])  # (B, T, r)
        if num_heads <= min(rows, ALL_HEADS_UP_TO):
            # Few heads: apply all M in one matmul and keep each row's own; reads each head once
            # instead of copying a (d, r) head per row (cheaper whenever M < B).
            every = F.linear(flat, heads.reshape(-1, heads.shape[-1]))  # (B, T, M*d)
            every = every.view(rows, flat.shape[1], num_heads, -1)  # (B, T, M, d)
            delta = every[torch.arange(rows, device=z.device), :, head_of_row]  # (B, T, d)
        else:
            per_row = heads[head_of_row]  # (B, d, r)
            delta = torch.bmm(flat, per_row.transpose(1, 2))  # (B, T, d)
        return out + delta.reshape(out.shape)

    def extra_repr(self) -> str:
        d, r = self.heads.shape[1], self.heads.shape[2]
        return f"k={self.A.shape[1]}, d={d}, r={r}, heads={self.heads.shape[0]}"
