"""A merged bundle stored at 8 or 4 bits: its factors quantized, its errors and bytes re-measured.

Works on any bundle kind through the kind's tensors by name (what ``tensors.safetensors`` holds
for a 16-bit bundle): every floating tensor but the kind's frozen ones (VeRA's shared
projections) is quantized group-wise (:mod:`hydraopt.quantize`), so a method that stores other
factors gets them quantized with no code of its own. The returned bundle holds the *dequantized*
values, which is what every reader (``lora_view``, export, the runtime) sees after loading it,
plus the codes and scales that :func:`hydraopt.save_bundle` writes (format version 3).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from hydraopt.engine_chunks import DEFAULT_CHUNK_ELEMENTS, plan_chunks
from hydraopt.kinds.registry import get_kind
from hydraopt.merge.distances import get_distance
from hydraopt.merge.measure import hard_routed_error
from hydraopt.progress import ProgressArg, as_callback
from hydraopt.quantize import QuantizedTensor, check_quant_args, dequantize, quantize
from hydraopt.storage import quantized_storage_report

BIT_WIDTHS = (16, 8, 4)  # 16 = unquantized: the bundle dtype as given by --dtype
DEFAULT_GROUP_SIZE = 64


def check_bits(bits: int, group_size: int) -> None:
    """Refuse a bit width other than 16, 8, 4 and, for 8/4, a bad group size (ValueError)."""
    if isinstance(bits, bool) or bits not in BIT_WIDTHS:
        raise ValueError(f"bits must be one of {BIT_WIDTHS}, got {bits!r}")
    check_quant_args(8, group_size)


def module_of(tensor_name: str, modules: Mapping[str, Any]) -> str | None:
    """The module a kind's tensor belongs to (``<module>.<part>``), or None for shared ones."""
    name = tensor_name.rpartition(".")[0]
    return name if name in modules else None


def quantize_bundle(
    bundle: Any,
    bits: int | Mapping[str, int],
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    dtype: str = "float16",
) -> Any:
    """``bundle`` as it reads back from a bundle dir written at ``bits``.

    Args:
        bundle: an in-memory bundle of any kind (16-bit: ``quantized`` empty).
        bits: 16, 8 or 4 for every module, or module name -> bit width (budget mode).
        group_size: values per float16 scale.
        dtype: the bundle dtype (what 16-bit tensors are stored and exported as).

    Returns:
        The same bundle, unchanged if every module is at 16 bits; else with quantized tensors
        dequantized (float32), 16-bit ones rounded to ``dtype``, ``quantized`` filled and the
        storage report in exact stored bytes. Errors are *not* re-measured here: that needs the
        adapters (:func:`measure_errors`).

    Raises:
        ValueError: bad bits or group size, a bundle already quantized.
    """
    per_module = {m.name: bits for m in bundle.modules} if isinstance(bits, int) else dict(bits)
    for b in per_module.values():
        check_bits(b, group_size)
    if bundle.quantized:
        raise ValueError("the bundle is already quantized; quantize the 16-bit merge")
    if all(b == 16 for b in per_module.values()):
        return bundle
    kind = get_kind(bundle.kind)
    tensors = kind.bundle_tensors(bundle, dtype)
    quantized: dict[str, QuantizedTensor] = {}
    values: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        module = module_of(name, per_module)
        b = per_module[module] if module is not None else 16
        if name in kind.frozen_tensors or b == 16 or not t.is_floating_point():
            values[name] = t.float()
            continue
        per_task = name.rpartition(".")[2] in kind.task_stacked and t.dim() > 1
        slices = t.shape[0] if per_task and (t.numel() // t.shape[0]) % group_size else 1
        quantized[name] = quantize(t, b, group_size, slices=slices)
        values[name] = dequantize(quantized[name])
    out = kind.with_tensors(bundle, values, quantized)
    stored = sum(module_nbytes(out, dtype).values())
    return dataclasses.replace(out, storage=quantized_storage_report(bundle.storage, stored))


def module_nbytes(bundle: Any, dtype: str = "float16") -> dict[str, int]:
    """Exact stored bytes per module (codes + scales, or ``dtype`` values), the kind's frozen
    tensors not counted; tensors of no module (none today) under ``""``."""
    kind = get_kind(bundle.kind)
    modules = {m.name: m for m in bundle.modules}
    out = {name: 0 for name in modules}
    for name, t in kind.bundle_tensors(bundle, dtype).items():
        if name in kind.frozen_tensors:
            continue
        q = bundle.quantized.get(name)
        key = module_of(name, modules) or ""
        out[key] = out.get(key, 0) + (q.nbytes if q is not None else t.numel() * t.element_size())
    return out


def measure_errors(
    bundle: Any,
    aset: Any,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    progress: ProgressArg = None,
) -> dict[str, list[float]]:
    """Per module and task the hard-routed error f(ΔW_i, heads[route(i)] @ A') of the bundle's
    factors as they are (e.g. dequantized) against the adapters ``aset``, in the bundle's
    distance. Modules go same-shaped chunk by chunk, memory bounded as in the engine.
    """
    distance = bundle.provenance.error_distance
    view = bundle.lora_view()
    tick = as_callback(progress, len(bundle.modules), "measure", "module")
    errors: dict[str, list[float]] = {}
    for chunk in plan_chunks(aset.modules, len(aset.tasks), chunk_elements):
        names = [m.name for m in chunk]
        # Same shape within a chunk, but M (HydraOpt's budget mode) or the rank R (shared_basis's
        # budget gives each module its R) may differ per module: one at a time then.
        if len({view[n].heads.shape[:1] + view[n].A.shape[:1] for n in names}) > 1:
            groups = [[n] for n in names]
        else:
            groups = [names]
        for group in groups:
            specs = [m for m in chunk if m.name in group]
            with torch.no_grad():
                delta = aset.load_stack(specs).delta()  # (G, K, d, k)
                a = torch.stack([view[n].A for n in group])  # (G, r, k)
                heads = torch.stack([view[n].heads for n in group])  # (G, M, d, r)
                routing = torch.stack([view[n].routing for n in group])  # (G, K)
                err = hard_routed_error(delta, a, heads, routing, distance)  # (G, K)
            for g, n in enumerate(group):
                errors[n] = [float(e) for e in err[g]]
        if tick is not None:
            tick(len(chunk))
    return {m.name: errors[m.name] for m in bundle.modules}


def quantize_merged(
    bundle: Any,
    aset: Any,
    bits: int | Mapping[str, int],
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    dtype: str = "float16",
    progress: ProgressArg = None,
) -> Any:
    """:func:`quantize_bundle`, then the bundle's errors re-measured after quantization against
    the adapters it was merged from (``aset``): the numbers a quantized bundle reports are those
    of what it stores."""
    out = quantize_bundle(bundle, bits, group_size, dtype=dtype)
    if out is bundle:
        return bundle
    errors = measure_errors(out, aset, progress=progress)
    provenance = dataclasses.replace(out.provenance, errors=errors)
    return dataclasses.replace(out, provenance=provenance)


@dataclass(frozen=True)
class SeparatePoint:
    """The K separate LoRA adapters, each factor quantized on its own (the fair baseline).

    Attributes:
        bits: 16, 8 or 4.
        nbytes: exact bytes of the K adapters' A and B at ``bits`` (16: 2 per value).
        errors: module -> per task f(s_i B_i A_i, s_i deq(B_i) deq(A_i)).
        zero_errors: module -> per task f(ΔW_i, 0).
    """

    bits: int
    nbytes: int
    errors: dict[str, list[float]]
    zero_errors: dict[str, list[float]]


def separate_point(
    aset: Any,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    distance: str = "mae",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> SeparatePoint:
    """Bytes and errors of keeping the K LoRA adapters, each A_i and B_i quantized at ``bits``.

    Raises:
        ValueError: bad bits or group size; adapters that are not LoRA (VeRA's separate vectors
            are not quantized here).
    """
    check_bits(bits, group_size)
    if not get_kind(aset.kind).separate_factors:
        raise ValueError(f"separate quantized points are for LoRA adapters, not {aset.kind}")
    errors: dict[str, list[float]] = {}
    zero: dict[str, list[float]] = {}
    nbytes = 0
    for chunk in plan_chunks(aset.modules, len(aset.tasks), chunk_elements):
        with torch.no_grad():
            stack = aset.load_stack(chunk)
            stored_a, stored_b = stack.A.clone(), stack.B.clone()  # (G, K, r, k), (G, K, d, r)
            for g, k in itertools.product(range(stack.A.shape[0]), range(stack.A.shape[1])):
                for full, part in ((stored_a, stack.A[g, k]), (stored_b, stack.B[g, k])):
                    if bits == 16:
                        full[g, k] = part.to(torch.float16).float()
                        nbytes += 2 * part.numel()
                    else:
                        q = quantize(part, bits, group_size)
                        full[g, k] = dequantize(q)
                        nbytes += q.nbytes
            target = stack.delta()  # (G, K, d, k)
            approx = stack.scale[..., None, None] * (stored_b @ stored_a)  # (G, K, d, k)
            err = get_distance(distance)(target, approx)  # (G, K)
            none = get_distance(distance)(target, torch.zeros_like(target))
        for g, spec in enumerate(chunk):
            errors[spec.name] = [float(e) for e in err[g]]
            zero[spec.name] = [float(z) for z in none[g]]
    order = [m.name for m in aset.modules]
    return SeparatePoint(bits, nbytes, {n: errors[n] for n in order}, {n: zero[n] for n in order})
