"""``--bits`` / ``--group-size`` (issue 19): stored bit widths, light to import (no torch)."""

from __future__ import annotations

import argparse


def add_bits_args(
    p: argparse.ArgumentParser, *, many: bool = False, auto: bool = False
) -> argparse._ArgumentGroup:
    """``--bits`` (one width, or with ``many`` a list) and ``--group-size`` (issue 19); returns
    their argument group."""
    g = p.add_argument_group("storage in bytes (docs/quantization.md)")
    widths = "16, 8 or 4" + (" (auto: chosen per module with --budget)" if auto else "")
    g.add_argument(
        "--bits",
        nargs="+" if many else None,
        default=["16"] if many else "16",
        metavar="BITS",
        help=(
            f"bit widths of the stored factors, each {widths}; one point per width"
            if many
            else f"bit width of the stored factors: {widths}"
        )
        + "; 16 = unquantized in --dtype (default 16)",
    )
    g.add_argument(
        "--group-size",
        type=int,
        default=64,
        metavar="G",
        help="values per float16 scale at 8/4 bits (even, >= 2; default 64)",
    )
    return g


def bits_values(args: argparse.Namespace, *, allow_auto: bool = False) -> list[int | str]:
    """``--bits`` checked (with ``--group-size``): 16/8/4 ints, or ``"auto"`` where allowed.

    Raises:
        HydraoptError: one line naming the bad value.
    """
    from hydraopt.errors import HydraoptError
    from hydraopt.quantize import check_quant_args  # imports torch: only once flags are read

    given = args.bits if isinstance(args.bits, list) else [args.bits]
    out: list[int | str] = []
    for value in given:
        if value == "auto" and allow_auto:
            out.append("auto")
        elif value in ("16", "8", "4"):
            out.append(int(value))
        else:
            choices = "16, 8, 4 or auto" if allow_auto else "16, 8 or 4"
            raise HydraoptError(f"--bits must be {choices}, got {value!r}")
    if len(set(out)) != len(out):
        raise HydraoptError(f"--bits lists a width twice: {' '.join(map(str, given))}")
    try:
        check_quant_args(8, args.group_size)
    except ValueError as e:
        raise HydraoptError(f"--group-size: {e}") from None
    return out
