"""Quantized tensors in the bundle container (format version 3), for every kind and method alike.

A kind hands the container its float tensors by name, as for a 16-bit bundle, plus the
:class:`~hydraopt.quantize.QuantizedTensor` of each name it wants stored quantized. The
container stores such a tensor ``<name>`` as two safetensors entries, ``<name>#codes`` (uint8)
and ``<name>#scales`` (float16), and one ``bundle.json`` entry ``quantization.<name>`` =
``{bits, group_size, shape, dtype}`` (plus ``slices`` when a tensor's groups restart per task,
:func:`hydraopt.quantize.quantize`; absent = 1, so earlier version-3 bundles read unchanged); readers validate the pieces and dequantize, so every kind
(and every method's factors) reads back float tensors under the names it wrote. ``#`` appears in
no PEFT module name, so the suffixes cannot collide with a kind's own tensor names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hydraopt.errors import HydraoptError
from hydraopt.io.dtypes import DTYPES
from hydraopt.quantize import (
    QuantizedTensor,
    check_quant_args,
    check_slices,
    dequantize,
    quantized_nbytes,
)

QUANTIZED_FORMAT_VERSION = 3  # bundles holding quantized tensors; 16-bit bundles stay at 1 / 2
CODES_SUFFIX = "#codes"
SCALES_SUFFIX = "#scales"


def encode_quantized(
    tensors: Mapping[str, torch.Tensor], quantized: Mapping[str, QuantizedTensor], dtype: str
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The tensors to store, each quantized one replaced by its codes and scales, and the
    ``quantization`` entry of ``bundle.json``.

    Args:
        tensors: the kind's tensors by name, as a 16-bit bundle would store them.
        quantized: name -> its codes and scales (every name must be in ``tensors``).
        dtype: the bundle's dtype, recorded per tensor: what export writes it back as.
    """
    out = {name: t for name, t in tensors.items() if name not in quantized}
    entry: dict[str, dict[str, Any]] = {}
    for name, q in quantized.items():
        if name not in tensors:
            raise ValueError(f"quantized tensor {name!r} is not one of the bundle's tensors")
        out[name + CODES_SUFFIX] = q.codes.contiguous()
        out[name + SCALES_SUFFIX] = q.scales.to(torch.float16).contiguous()
        entry[name] = {
            "bits": q.bits,
            "group_size": q.group_size,
            "shape": list(q.shape),
            "dtype": dtype,
        }
        if q.slices != 1:
            entry[name]["slices"] = q.slices
    return out, entry


def decode_quantized(
    stored: Mapping[str, torch.Tensor], meta: dict[str, Any], where: str | Path
) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedTensor]]:
    """The bundle's tensors with every quantized one validated and dequantized (float32).

    Raises:
        HydraoptError: in one line: a version-3 bundle without a ``quantization`` table, a
            1/2 bundle with one, a malformed entry, codes or scales of the wrong dtype or length,
            scales negative or not finite, a missing piece or a piece no entry claims.
    """
    version = meta.get("format_version")
    table = meta.get("quantization")
    if version is not None and version < QUANTIZED_FORMAT_VERSION:
        stray = next((n for n in stored if n.endswith((CODES_SUFFIX, SCALES_SUFFIX))), None)
        if table is not None or stray is not None:
            raise HydraoptError(
                f"{where}: format_version {version} bundles hold no quantized tensors "
                f"(found {'a quantization table' if table is not None else repr(stray)})"
            )
        return dict(stored), {}
    if not isinstance(table, dict) or not table:
        raise HydraoptError(
            f"{where}: a format_version {version} bundle needs a non-empty 'quantization' object"
        )
    out = {n: t for n, t in stored.items() if not n.endswith((CODES_SUFFIX, SCALES_SUFFIX))}
    quantized: dict[str, QuantizedTensor] = {}
    for name, entry in table.items():
        if name in out:
            raise HydraoptError(f"{where}: tensor {name!r} is stored both plain and quantized")
        q = _read_entry(stored, name, entry, where)
        quantized[name] = q
        out[name] = dequantize(q)
    claimed = {n + s for n in quantized for s in (CODES_SUFFIX, SCALES_SUFFIX)}
    unclaimed = sorted(
        n for n in stored if n.endswith((CODES_SUFFIX, SCALES_SUFFIX)) and n not in claimed
    )
    if unclaimed:
        raise HydraoptError(f"{where}: tensor {unclaimed[0]!r} belongs to no quantization entry")
    return out, quantized


def _read_entry(
    stored: Mapping[str, torch.Tensor], name: str, entry: Any, where: str | Path
) -> QuantizedTensor:
    """One ``quantization`` entry and its two tensors, checked against each other."""
    what = f"{where}: quantized tensor {name!r}"
    if not isinstance(entry, dict):
        raise HydraoptError(f"{what}: its quantization entry must be an object")
    bits, group_size, shape = entry.get("bits"), entry.get("group_size"), entry.get("shape")
    try:
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise ValueError(f"bits must be 8 or 4, got {bits!r}")
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise ValueError(f"group size must be an integer >= 2, got {group_size!r}")
        check_quant_args(bits, group_size)
    except ValueError as e:
        raise HydraoptError(f"{what}: {e}") from None
    if not isinstance(shape, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape
    ):
        raise HydraoptError(f"{what}: shape must be a list of integers >= 1, got {shape!r}")
    if entry.get("dtype") not in DTYPES:
        raise HydraoptError(
            f"{what}: dtype must be one of {sorted(DTYPES)}, got {entry.get('dtype')!r}"
        )
    numel, slices = math.prod(shape), entry.get("slices", 1)
    try:
        check_slices(numel, slices)
    except ValueError as e:
        raise HydraoptError(f"{what}: {e}") from None
    groups = slices * math.ceil(numel // slices / group_size)
    codes, scales = stored.get(name + CODES_SUFFIX), stored.get(name + SCALES_SUFFIX)
    if codes is None or scales is None:
        missing = CODES_SUFFIX if codes is None else SCALES_SUFFIX
        raise HydraoptError(f"{what}: tensors.safetensors has no {name + missing!r}")
    n_codes = quantized_nbytes(numel, bits, group_size, slices) - 2 * groups
    if codes.dtype != torch.uint8 or codes.dim() != 1 or codes.numel() != n_codes:
        raise HydraoptError(
            f"{what}: codes must be {n_codes} uint8 values for shape {shape} at {bits} bits, "
            f"group size {group_size}; found {codes.dtype} {tuple(codes.shape)}"
        )
    if scales.dtype != torch.float16 or scales.dim() != 1 or scales.numel() != groups:
        raise HydraoptError(
            f"{what}: scales must be {groups} float16 values (one per group of {group_size}); "
            f"found {scales.dtype} {tuple(scales.shape)}"
        )
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        raise HydraoptError(f"{what}: scales must be finite and >= 0")
    # Any byte is a valid code (8 bits: one code + 128; 4 bits: two nibbles + 8): no range check.
    return QuantizedTensor(codes, scales, tuple(shape), bits, group_size, slices)


def stored_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors' data as safetensors stores them (headers aside)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
