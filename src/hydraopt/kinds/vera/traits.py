"""VeRA's torch-free traits (see :class:`hydraopt.kinds.traits.KindTraits`)."""

from __future__ import annotations

from hydraopt.kinds.traits import KindTraits

# Its trainable part is the λ vectors, not factor pairs: another byte yardstick.
VERA_TRAITS = KindTraits(name="vera", display_name="VeRA", peft_type="VERA", separate_factors=False)
