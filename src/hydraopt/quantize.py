"""Group-wise symmetric integer quantization of factor tensors (8 and 4 bits), pure tensors.

A tensor is flattened in memory order and cut into groups of ``group_size`` consecutive values
(the tail group padded with zeros); with ``slices`` = n > 1 it is first cut into n equal leading
blocks (one per task: a shared_basis bundle's cores), each padded to whole groups, so that no
group spans two tasks -- one task's large values would otherwise set the step of another's small
ones and round them to zero. Each group keeps one float16 scale and one integer code per
value:

    scale_g = ceil16(max_{x in g} |x| / ((q_max - q_min) / 2)),   code = clamp(round(x / scale_g))

with [q_min, q_max] = [-128, 127] (8 bits) or [-8, 7] (4 bits). That is torchao's SYMMETRIC
mapping (``choose_qparams_affine`` / ``quantize_affine`` with zero point 0; the tests check the
codes against it), with the scale rounded *up* to the next float16 so that
|x| / scale <= (q_max - q_min) / 2 still holds after the cast: no value is clipped, and every
element is restored within half a step, |x - code * scale| <= scale / 2.

Why our own few lines and not a quantization library (docs/quantization.md): torchao and
optimum-quanto quantize *linear layers* for their own kernels and serialise through their tensor
subclasses; we need plain (codes, scales) pairs in safetensors for factors of any shape, exact
byte counts, and no multi-second import in the CLI. Codes of 4 bits are packed two per byte
(low nibble first), stored as uint8 with an offset of 8.

Bytes: ``quantized_nbytes(n, bits, group_size, slices)`` = codes + 2 bytes per group, exactly what
safetensors stores for the two tensors (headers aside).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Bits = Literal[4, 8]
BITS: tuple[int, ...] = (8, 4)
_RANGE = {8: (-128, 127), 4: (-8, 7)}


@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor as integer codes plus one float16 scale per group.

    Attributes:
        codes: (n_bytes,) uint8: 8 bits: code + 128; 4 bits: two codes + 8 per byte, low nibble
            first.
        scales: (n_groups,) float16, > 0.
        shape: the original shape.
        bits: 8 or 4.
        group_size: values per scale (groups run over the flattened tensor in memory order).
        slices: equal leading blocks whose groups start afresh (1: the whole tensor is one).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, ...]
    bits: int
    group_size: int
    slices: int = 1

    @property
    def nbytes(self) -> int:
        """Bytes of the two stored tensors."""
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * 2


def check_quant_args(bits: int, group_size: int) -> None:
    """Refuse bit widths and group sizes we do not store.

    Raises:
        ValueError: bits not 8 or 4, or a group size that is not a positive even integer.
    """
    if bits not in _RANGE:
        raise ValueError(f"bits must be 8 or 4 (16 means unquantized), got {bits}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group size must be an integer >= 2, got {group_size!r}")
    if group_size % 2:
        raise ValueError(
            f"group size must be even (4-bit codes pack two per byte), got {group_size}"
        )


def check_slices(numel: int, slices: int) -> None:
    """Refuse a slice count that does not cut ``numel`` values into equal non-empty blocks."""
    if isinstance(slices, bool) or not isinstance(slices, int) or slices < 1:
        raise ValueError(f"slices must be an integer >= 1, got {slices!r}")
    if numel % slices:
        raise ValueError(f"{numel} values do not cut into {slices} equal slices")


def quantized_nbytes(numel: int, bits: int, group_size: int, slices: int = 1) -> int:
    """Exact stored bytes of a ``numel``-element tensor: packed codes + float16 scales."""
    check_quant_args(bits, group_size)
    check_slices(numel, slices)
    groups = slices * math.ceil(numel // slices / group_size)
    padded = groups * group_size
    return padded * bits // 8 + 2 * groups


def quantize(
    t: torch.Tensor, bits: int, group_size: int = 64, *, slices: int = 1
) -> QuantizedTensor:
    """Quantize ``t`` group-wise (see the module docstring for the mapping).

    Args:
        t: a floating tensor, finite.
        bits: 8 or 4.
        group_size: consecutive values (memory order) sharing one scale; even.
        slices: cut ``t`` into this many equal leading blocks first (e.g. ``t.shape[0]``), no
            group spanning two.

    Raises:
        ValueError: for bad arguments, a non-floating or non-finite tensor, or values too large
            for a float16 scale.
    """
    check_quant_args(bits, group_size)
    check_slices(t.numel(), slices)
    if not t.is_floating_point():
        raise ValueError(f"only floating tensors are quantized, got {t.dtype}")
    q_min, q_max = _RANGE[bits]
    x = _grouped(t.detach().to(torch.float32), group_size, slices)  # (n_groups, group_size)
    if not torch.isfinite(x).all():
        raise ValueError("cannot quantize a tensor with NaN or Inf values")
    step = x.abs().amax(dim=1) / ((q_max - q_min) / 2)  # (n_groups,)
    scales = _ceil_to_float16(step)
    if not torch.isfinite(scales).all():
        raise ValueError("values too large for a float16 quantization scale (|x| > 4.9e5)")
    # An all-zero group gets scale 1: its codes are 0 whatever the scale, and 0 is no valid scale.
    scales = torch.where(step > 0, scales, torch.ones_like(scales))
    codes = torch.clamp(torch.round(x / scales.float()[:, None]), q_min, q_max).to(torch.int16)
    stored = (codes - q_min).to(torch.uint8).reshape(-1)  # (padded,) in [0, 2^bits)
    if bits == 4:
        stored = stored[0::2] | (stored[1::2] << 4)  # (padded / 2,) low nibble first
    return QuantizedTensor(stored.contiguous(), scales, tuple(t.shape), bits, group_size, slices)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor ``q`` stands for, in ``dtype`` (computed in float32)."""
    q_min, _ = _RANGE[q.bits]
    stored = q.codes
    if q.bits == 4:
        stored = torch.stack([stored & 0xF, stored >> 4], dim=1).reshape(-1)  # (padded,)
    codes = stored.to(torch.float32) + q_min
    values = codes.reshape(-1, q.group_size) * q.scales.float()[:, None]  # (n_groups, group_size)
    return _ungrouped(values, q).to(dtype)


def error_bound(q: QuantizedTensor) -> torch.Tensor:
    """Per-element bound on |x - dequantize(q)|: half the group's step, in ``q.shape``."""
    half = (q.scales.float() / 2).repeat_interleave(q.group_size)
    return _ungrouped(half, q)


def _grouped(x: torch.Tensor, group_size: int, slices: int = 1) -> torch.Tensor:
    """``x`` cut into ``slices`` flat blocks, each zero-padded to whole groups:
    (n_groups, group_size)."""
    blocks = x.reshape(slices, -1)  # (slices, numel / slices)
    pad = -blocks.shape[1] % group_size
    if pad:
        blocks = torch.cat([blocks, blocks.new_zeros(slices, pad)], dim=1)
    return blocks.reshape(-1, group_size)


def _ungrouped(values: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """Grouped values (any shape holding the padded blocks in order) back in ``q.shape``."""
    per_slice = math.prod(q.shape) // q.slices
    return values.reshape(q.slices, -1)[:, :per_slice].reshape(q.shape)


def _ceil_to_float16(x: torch.Tensor) -> torch.Tensor:
    """The smallest float16 >= x (float32 in), so that dividing by it never overshoots the range."""
    half = x.to(torch.float16)
    low = half.float() < x
    return torch.where(low, torch.nextafter(half, torch.full_like(half, math.inf)), half)
