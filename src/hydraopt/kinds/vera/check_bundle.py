"""VeRA's own checks of a bundle read from disk (:mod:`hydraopt.io.check_bundle` runs the
kind-independent ones first): the shared projections and each module's λ rows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from hydraopt.errors import HydraoptError
from hydraopt.io.check_bundle import check_tensor


def check_vera_bundle(
    meta: dict[str, Any],
    tensors: Mapping[str, torch.Tensor],
    tasks: list[str],
    modules: list[dict[str, Any]],
    where: Any,
) -> None:
    """Projections (r, max_in) / (max_out, r) covering every module; λ rows as ``modules`` says."""
    ranks = {m["r"] for m in modules}
    if len(ranks) != 1:
        raise HydraoptError(f"{where}: VeRA modules share one rank, found {sorted(ranks)}")
    r = ranks.pop()
    for key, dim in (("vera_A", 0), ("vera_B", 1)):
        t = tensors.get(key)
        if t is None or t.dim() != 2 or t.shape[dim] != r:
            found = "missing" if t is None else f"shape {tuple(t.shape)}"
            raise HydraoptError(
                f"{where}: projection {key!r} must be a matrix of rank {r} ({found})"
            )
    max_in, max_out = int(tensors["vera_A"].shape[1]), int(tensors["vera_B"].shape[0])
    check_tensor(tensors, "vera_A", (r, max_in), where)
    check_tensor(tensors, "vera_B", (max_out, r), where)
    for m in modules:
        if m["k"] > max_in or m["d"] > max_out:
            raise HydraoptError(
                f"{where}: module {m['name']!r} ({m['d']} x {m['k']}) is larger than the "
                f"projections cover ({max_out} x {max_in})"
            )
        rows = {}
        for vec, length in (("b", m["d"]), ("d", r)):
            stored = tensors.get(f"{m['name']}.lambda_{vec}")
            rows[vec] = int(stored.shape[0]) if stored is not None and stored.dim() == 2 else 0
            declared = m.get(f"lambda_{vec}_rows", rows[vec])
            if rows[vec] < 1 or declared != rows[vec]:
                raise HydraoptError(
                    f"{where}: module {m['name']!r}: lambda_{vec} must have "
                    f"{declared!r} row(s) of length {length} (found {rows[vec]})"
                )
            check_tensor(tensors, f"{m['name']}.lambda_{vec}", (rows[vec], length), where)
        if min(rows.values()) != 1 or max(rows.values()) != m["heads"]:
            raise HydraoptError(
                f"{where}: module {m['name']!r}: one of lambda_b/lambda_d must have one row and "
                f"the other heads = {m['heads']} rows, found {rows['b']} and {rows['d']}"
            )
