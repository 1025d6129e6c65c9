"""Fused elementwise passes of the MAE refinement on the CPU (numba), with torch fallbacks.

A MAE step is three rank-r products and an elementwise pass over every task's dense d x k error:
E_i = X_{route(i)} - T_i, sign(E_i) summed per head, and now and then sum |E_i|. In torch that
pass is four to six full sweeps over K d k elements (subtract, sign, sum, cast, abs, sum), and on
a 2-core CPU it cost ~80 % of a step (bfloat16 reductions are particularly slow there). Here it is
one sweep that reads X and T once and writes the M d k sums: 3x less time per step at M = 1
(benchmarks/RESULTS.md). The per-element median of the median start is a second such pass.

bfloat16, which numpy cannot hold, is compared through its bit patterns, mapped to integers of
the same order (negative values: minus the magnitude bits, so -0 and +0 are one key); the
targets' keys are computed once per refinement (:func:`order_keys`), so a step only maps X and
compares 16-bit integers (32 per AVX-512 instruction). float32 values are compared as they are:
float compares already order them (-0 == +0), and mapping X and T to 32-bit keys cost a pass
per step and one per refinement for nothing (the float32 path, issue 22). Every function here is pure and
returns what torch's plain formulas return (tests compare both on random inputs); the sums of
absolute errors run in float64, per block, in a fixed order, so results do not depend on threads.

Used only for CPU tensors and when numba imports; everything else takes the torch path.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from hydraopt.merge.kernel_blocks import BLOCK

_BITS = {torch.bfloat16: (torch.int16, 16, 0x7FFF), torch.float32: (torch.int32, 0, 0x7FFFFFFF)}


@functools.cache
def _numba() -> ModuleType | None:
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency; exotic platforms may lack it
        return None
    return numba


def fused_available(device: torch.device | str, *dtypes: torch.dtype) -> bool:
    """Whether the fused CPU kernels apply: numba is installed, ``device`` is the CPU, and the
    given dtypes are one dtype the kernels take (float32 or bfloat16).

    Looks numba up without importing it: its runtime costs ~250 MB of resident memory, paid
    only by the merges that run a kernel.
    """
    one_dtype = len(set(dtypes)) <= 1 and set(dtypes) <= set(_BITS)
    return one_dtype and torch.device(device).type == "cpu" and _numba_installed()


@functools.cache
def _numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


def _as_bits(x: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view of a contiguous bfloat16/float32 tensor's bit patterns."""
    return x.contiguous().view(_BITS[x.dtype][0]).numpy()


@dataclass(frozen=True)
class OrderKeys:
    """Targets T kept as order-preserving keys (see the module doc).

    A refinement compares every step's X with the same T: mapping T once saves that work in
    every step. Same size as T: int16 keys of bfloat16 targets; float32 targets are their own
    keys (float compares order them).

    Attributes:
        keys: (G, K, d, k) int16, or the float32 targets themselves.
        dtype: the targets' float dtype.
    """

    keys: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.keys.shape


def order_keys(targets: torch.Tensor) -> OrderKeys:
    """The keys of a contiguous bfloat16/float32 tensor (-0 and +0 get the same key, 0).

    float32: the tensor itself, no copy (its values compare like keys, -0 == +0).
    """
    if targets.dtype == torch.float32:
        return OrderKeys(targets.contiguous(), torch.float32)
    int_dtype, _, mask = _BITS[targets.dtype]
    bits = _as_bits(targets).reshape(-1)
    keys = torch.empty(targets.shape, dtype=int_dtype)
    _set_threads()
    # torch's integer where/and run at a tenth of this kernel's speed here.
    _jit().keys_kernel(bits, bits.dtype.type(mask), keys.view(-1).numpy())
    return OrderKeys(keys, targets.dtype)


def _set_threads() -> None:
    numba = _numba()
    assert numba is not None
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def head_sign_sums(
    approx: torch.Tensor,
    targets: torch.Tensor | OrderKeys,
    routing: torch.Tensor,
    *,
    with_signs: bool = True,
    with_loss: bool = True,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """S_c = sum_{i -> c} sign(X_c - T_i) and mean_jk |X_{route(i)} - T_i| in one pass.

    Args:
        approx: (G, M, d, k) X_c = H_c A', bfloat16 or float32.
        targets: (G, K, d, k) T_i, same dtype, or their :func:`order_keys` (a loop's choice).
        routing: (G, K) head of each task.
        with_signs, with_loss: which of the two outputs to compute.
        out: where to write the signs (like ``approx``; a loop reuses it: a fresh 10-100 MB
            buffer per call costs its page faults, measured at up to half of the pass).

    Returns:
        signs (G, M, d, k) in approx's dtype (small integers, exact) or None;
        mean absolute error per task (G, K) float64 or None.
    """
    G, M, d, k = approx.shape
    K = targets.shape[1]
    if targets.shape != (G, K, d, k) or targets.dtype != approx.dtype:
        raise ValueError("approx and targets must share G, d, k and dtype")
    if approx.dtype == torch.bfloat16 and K > 2**15 - 1:
        raise ValueError("at most 32767 tasks per call (16-bit sums)")
    _, shift, mask = _BITS[approx.dtype]
    route = routing.to(torch.int64).contiguous().numpy()
    floats = approx.dtype == torch.float32  # compared as floats: neither side needs keys
    x = (approx.contiguous().numpy() if floats else _as_bits(approx)).reshape(G, M, d * k)
    # Raw bfloat16 targets (a one-off call) are mapped to keys block by block inside the kernel.
    raw = not isinstance(targets, OrderKeys)
    t_tensor = targets if raw else targets.keys  # type: ignore[union-attr]
    if floats:
        t = t_tensor.contiguous().numpy()  # type: ignore[union-attr]
    else:
        t = _as_bits(t_tensor) if raw else t_tensor.contiguous().numpy()  # type: ignore[arg-type,union-attr]
    t = t.reshape(G, K, d * k)
    if not with_signs:
        signs = approx.new_empty(G, M, 0, 0)
    elif out is None:
        signs = torch.empty_like(approx)
    elif out.shape != approx.shape or out.dtype != approx.dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor like approx")
    else:
        signs = out
    blocks = -(-(d * k) // BLOCK)
    partial = np.zeros((G, blocks, K if with_loss else 0))
    _set_threads()
    if floats:
        sums = signs.numpy().reshape(G, M, -1)
        _jit().float_sign_sum_kernel(x, t, route, sums, partial, with_signs)
    else:
        bits = _as_bits(signs).reshape(G, M, -1)
        _jit().sign_sum_kernel(
            x, t, raw, route, np.int32(shift), x.dtype.type(mask), bits, partial, with_signs
        )
    loss = torch.from_numpy(partial.sum(1) / (d * k)) if with_loss else None
    return (signs if with_signs else None), loss


def medians(delta: torch.Tensor, routing: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per-element median over the tasks routed to each head (mean of the middle two if even).

    Same contract as :func:`hydraopt.merge.median_start.median_targets` (float32 in and out; a
    head with no task gets zeros), one pass instead of a sort per head.
    """
    G, K, d, k = delta.shape
    values = delta.contiguous().reshape(G, K, d * k).numpy()
    out = np.zeros((G, num_heads, d * k), np.float32)
    _set_threads()
    _jit().median_kernel(values, routing.to(torch.int64).contiguous().numpy(), out)
    return torch.from_numpy(out).reshape(G, num_heads, d, k)


@functools.cache
def _jit() -> ModuleType:
    """The compiled kernels' module (importing it imports numba: only when a kernel runs)."""
    from hydraopt.merge import _kernels_jit

    return _kernels_jit


def tile_sums(
    tile: torch.Tensor, xs: torch.Tensor, sel: torch.Tensor, square: bool
) -> torch.Tensor:
    """Per task i of a tile and point p, sum |T_i - X_sel[i, p]| (sum of squares if ``square``),
    and sum |T_i| (sum T_i^2) last: (n, P + 1) float64, one read of each row, nothing written.

    Args:
        tile: (n, rows, k) float32: n tasks' rows of ΔW.
        xs: (rows, Q, k) float32: the same rows of Q matrices (heads' H_c A').
        sel: (n, P) integers in [0, Q): the matrix each task is compared with, per point (P may
            be 0: the zero yardstick alone, i.e. the sum of |tile|).
    """
    n, rows, k = tile.shape
    if xs.shape[0] != rows or xs.shape[2] != k or {tile.dtype, xs.dtype} != {torch.float32}:
        raise ValueError("tile (n, rows, k) and xs (rows, Q, k) must share rows, k and float32")
    if sel.shape[0] != n:
        raise ValueError("sel must have one row per task of the tile")
    out = np.zeros((n, sel.shape[1] + 1))
    _set_threads()
    _jit().tile_sums_kernel(
        tile.contiguous().numpy(),
        xs.contiguous().numpy(),
        sel.to(torch.int64).contiguous().numpy(),
        square,
        out,
    )
    return torch.from_numpy(out)
