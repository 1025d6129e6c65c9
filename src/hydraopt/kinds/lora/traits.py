"""LoRA's torch-free traits (see :class:`hydraopt.kinds.traits.KindTraits`)."""

from __future__ import annotations

from hydraopt.kinds.traits import KindTraits

LORA_TRAITS = KindTraits(name="lora", display_name="LoRA", peft_type="LORA", separate_factors=True)
