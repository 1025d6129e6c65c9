"""The adapter kinds' traits by name, free of torch (the CLI parser reads it).

:mod:`hydraopt.kinds.registry` holds the kind objects themselves (they import torch); both list
the same kinds in the same order (tests/unit/kinds/test_kind_checks.py checks it).
"""

from __future__ import annotations

from hydraopt.kinds.lora.traits import LORA_TRAITS
from hydraopt.kinds.traits import KindTraits
from hydraopt.kinds.vera.traits import VERA_TRAITS

KIND_TRAITS: dict[str, KindTraits] = {t.name: t for t in (LORA_TRAITS, VERA_TRAITS)}
# Format-version-1 bundles predate ``adapter_kind``: they are LoRA's.
LEGACY_BUNDLE_KIND = LORA_TRAITS.name
