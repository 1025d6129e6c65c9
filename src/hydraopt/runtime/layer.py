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
    layer called then refuses (a silent base-model output would hide a bug). Every assignment of
    ``ids`` bumps ``version``, which layers key their per-row head selection on: a decode loop
    that keeps its rows computes the selection once, not once per step.
    """

    def __init__(self) -> None:
        self._ids: torch.Tensor | None = None  # (B,) int64 task index per row
        self.version = 0

    @property
    def ids(self) -> torch.Tensor | None:
        return self._ids

    @ids.setter
    def ids(self, value: torch.Tensor | None) -> None:
        if value is not None and value is not self._ids:
            self.version += 1
        self._ids = value


class RoutedLinear(nn.Module):
    """``base(x) + heads[routing[task(row)]] @ (A' @ x)`` for every row of the batch.

    x·A'ᵀ is computed once for the whole batch (A' is shared by every task); only the (d, r) head
    differs per row. With a single head (classic merges) it is one plain matmul added into the
    base output. With a few heads, each row's z = x·A'ᵀ is spread into the slot of its head in an
    (M·r)-wide vector (zeros elsewhere) and one matmul with the heads laid side by side, (d, M·r),
    gives every row its own update, added into the base output by the same GEMM (``addmm_``): four
    kernels per layer, whatever the mix of tasks. With many heads, one batched matmul over the
    rows' gathered heads. No Python loop over tasks, heads or tokens. With a shared left
    ``basis`` U (d, R) (``shared_basis`` bundles), the heads are (R, r) cores: the routed product
    lands in an R-wide vector per row and one GEMM with U adds it into the base output, so U is
    held once instead of inside K (d, R) heads.

    Args:
        base: the original linear layer (kept, not copied).
        factors: the module's A' (r, k), heads (M, d, r) (or (M, R, r) with a basis), routing
            (K,) and optional basis (d, R).
        rows: the model's shared :class:`TaskRows`.
    """

    A: torch.Tensor  # (r, k)
    heads: torch.Tensor  # (M, d', r), a view of heads_side_by_side; d' = R with a basis, else d
    heads_side_by_side: torch.Tensor  # (d', M*r)
    routing: torch.Tensor  # (K,)
    basis: torch.Tensor | None  # (d, R) or None

    def __init__(self, base: nn.Linear, factors: ModuleFactors, rows: TaskRows) -> None:
        super().__init__()
        d, k, r = factors.shape
        if (base.out_features, base.in_features) != (d, k):
            raise ValueError(
                f"factors of shape d={d}, k={k} do not fit a linear layer "
                f"{base.in_features} -> {base.out_features}"
            )
        self.base = base
        dtype = base.weight.dtype
        device = base.weight.device
        M, inner = int(factors.heads.shape[0]), int(factors.heads.shape[1])  # inner = d or R
        side = factors.heads.to(device, dtype).permute(1, 0, 2).reshape(inner, M * r)
        # Buffers, not parameters: the runtime never trains, and state_dict() shows them. The
        # heads are held once, side by side; `heads` is a view of the same storage.
        self.register_buffer("A", factors.A.to(device, dtype).contiguous(), persistent=False)
        self.register_buffer("heads_side_by_side", side.contiguous(), persistent=False)
        self.register_buffer(
            "heads", self.heads_side_by_side.view(inner, M, r).permute(1, 0, 2), persistent=False
        )
        self.register_buffer("routing", factors.routing.to(device), persistent=False)  # (K,)
        basis = None if factors.basis is None else factors.basis.to(device, dtype).contiguous()
        self.register_buffer("basis", basis, persistent=False)  # (d, R) or None
        self.rows = rows
        self._selection: tuple[int, torch.Tensor] | None = None  # (rows.version, selection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.rows.ids
        if ids is None:
            raise RuntimeError("no task per row set: call the runtime model, not its layers")
        out = self.base(x)  # (B, ..., d)
        z = F.linear(x, self.A)  # (B, ..., r)
        if self.basis is None:
            return self._add_routed(z, ids, out)
        # The cores' products in the basis' R coordinates, then one GEMM with U into the output.
        inner = self._add_routed(z, ids, z.new_zeros(*z.shape[:-1], self.basis.shape[1]))
        out.view(-1, out.shape[-1]).addmm_(inner.reshape(-1, inner.shape[-1]), self.basis.T)
        return out

    def _add_routed(self, z: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (B, ..., d') plus every row's head applied to its z (B, ..., r)."""
        flat_out = out.view(-1, out.shape[-1])  # (B*T, d'), the same storage
        num_heads, rows = self.heads.shape[0], z.shape[0]
        if num_heads == 1:
            flat_out.addmm_(z.reshape(-1, z.shape[-1]), self.heads_side_by_side.T)
            return out
        flat = z.reshape(rows, -1, 1, z.shape[-1])  # (B, T, 1, r)
        if num_heads <= min(rows, ALL_HEADS_UP_TO):
            # Few heads: (B, T, M, r) with z in the row's head slot, then (B*T, M*r) @ (M*r, d):
            # each head is read once; the zero slots cost M-1 small GEMM columns, not a copy of a
            # (d, r) head per row (cheaper whenever M < B).
            spread = (flat * self._one_hot(ids, num_heads)).reshape(-1, num_heads * flat.shape[-1])
            flat_out.addmm_(spread, self.heads_side_by_side.T)
            return out
        per_row = self.heads[self.routing[ids]]  # (B, d, r)
        delta = torch.bmm(flat.squeeze(2), per_row.transpose(1, 2))  # (B, T, d)
        return out + delta.reshape(out.shape)

    def _one_hot(self, ids: torch.Tensor, num_heads: int) -> torch.Tensor:
        """(B, 1, M, 1) 1.0 at each row's head; computed once per assignment of the rows' tasks."""
        if self._selection is None or self._selection[0] != self.rows.version:
            head_of_row = self.routing[ids]  # (B,)
            hot = F.one_hot(head_of_row, num_heads).to(self.A.dtype)  # (B, M)
            self._selection = (self.rows.version, hot[:, None, :, None])
        return self._selection[1]

    def extra_repr(self) -> str:
        r, M = self.heads.shape[2], self.heads.shape[0]
        if self.basis is None:
            return f"k={self.A.shape[1]}, d={self.heads.shape[1]}, r={r}, heads={M}"
        d, R = self.basis.shape
        return f"k={self.A.shape[1]}, d={d}, r={r}, basis R={R}, heads={M}"
