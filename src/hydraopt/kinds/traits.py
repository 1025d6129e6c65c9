"""What a reader needs to know about an adapter kind before (or without) loading it.

Free of torch, so the CLI's parser, ``bundle.json`` header checks and the choice of evaluation
systems can ask a kind about itself without importing the kind's tensor code. Each kind package
declares its traits (``lora/traits.py``, ``vera/traits.py``); :mod:`hydraopt.kinds.names` lists
them; the kind objects of :mod:`hydraopt.kinds.registry` carry the same values.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KindTraits:
    """An adapter kind's identity and torch-free capabilities.

    Attributes:
        name: the adapter set's ``kind``, a bundle's ``adapter_kind``, ``--system NAME=ROOT``.
        display_name: as users write it: ``"LoRA"``, ``"VeRA"``.
        peft_type: ``adapter_config.json``'s ``peft_type``.
        separate_factors: whether the K separate adapters are factor pairs (A, B) that are
            stored, quantized and counted in bytes as such: the yardstick of byte budgets and of
            the separate-quantized baselines (``--system lora@BITS``, ``--budget``).
    """

    name: str
    display_name: str
    peft_type: str
    separate_factors: bool
