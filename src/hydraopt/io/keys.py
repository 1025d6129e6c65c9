"""PEFT state-dict key names <-> module names.

PEFT saves LoRA weights as ``base_model.model.<module>.lora_A.weight`` (adapter name removed). The
module name (``model.layers.0.self_attn.q_proj``) is what ``rank_pattern``/``alpha_pattern`` keys
are matched against, so it is the name we use everywhere else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>A|B)\.weight$")


def parse_lora_key(key: str) -> tuple[str, str] | None:
    """Split a PEFT LoRA key into (module name, "A" | "B"); None for any other key."""
    body = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
    m = _LORA_KEY.match(body)
    if m is None:
        return None
    return m.group("module"), m.group("factor")


def lora_key(module: str, factor: str) -> str:
    """The PEFT key of one factor ("A" or "B") of ``module``."""
    return f"{PEFT_PREFIX}{module}.lora_{factor}.weight"


def match_pattern_key(pattern_keys: Iterable[str], module: str) -> str | None:
    """Which ``rank_pattern``/``alpha_pattern`` key applies to ``module`` (PEFT's rule).

    PEFT matches ``(.*\\.)?(<pattern>)$`` against the module name and takes the first hit.
    """
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def module_sort_key(name: str) -> tuple:
    """Natural order: layers.2 before layers.10, so bundles and tables read top to bottom."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))
