"""VeRA's frozen random projections, regenerated exactly as PEFT does.

PEFT (``VeraModel._init_vera_A_vera_B``) seeds one CPU ``torch.Generator`` with
``projection_prng_key`` and draws ``vera_A`` (r, max_in) *then* ``vera_B`` (max_out, r) from it,
each with kaiming-uniform of gain √2 on its own fan-in (its second dimension: max_in for A, r for
B). max_in / max_out are the largest input / output features over the targeted modules. Because
B is drawn after A from the same stream, B depends on max_in too: both shapes must be right.
"""

from __future__ import annotations

import math

import torch


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-bound, bound) with bound = √3 · √2 / √fan_in, fan_in = shape[1] (PEFT's ``_kaiming_init``)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def vera_projections(
    prng_key: int, r: int, max_in: int, max_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``vera_A`` (r, max_in) and ``vera_B`` (max_out, r) for a VeRA config, bit-exact with PEFT.

    Args:
        prng_key: ``projection_prng_key`` of the adapter config.
        r: VeRA rank.
        max_in: largest ``in_features`` over the targeted modules.
        max_out: largest ``out_features`` over the targeted modules.
    """
    # PEFT draws on a CPU generator whatever the model's device; so do we, for the same bits.
    generator = torch.Generator(device="cpu").manual_seed(prng_key)
    vera_a = kaiming_uniform((r, max_in), generator)  # (r, max_in)
    vera_b = kaiming_uniform((max_out, r), generator)  # (max_out, r)
    return vera_a, vera_b
