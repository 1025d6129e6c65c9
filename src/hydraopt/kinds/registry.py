"""The adapter kinds by name and by PEFT type: the one place that knows which kinds exist."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydraopt.errors import HydraoptError
from hydraopt.io.adapter_dir import peft_type_of
from hydraopt.kinds.base import AdapterKind
from hydraopt.kinds.lora.kind import LORA
from hydraopt.kinds.vera.kind import VERA

KINDS: dict[str, AdapterKind] = {kind.name: kind for kind in (LORA, VERA)}
DEFAULT_KIND = LORA  # a dir of no known kind is read as LoRA, whose checks name what is wrong


def get_kind(name: str) -> AdapterKind:
    """The kind called ``name`` (an adapter set's ``kind``, a bundle's ``adapter_kind``)."""
    try:
        return KINDS[name]
    except KeyError:
        raise HydraoptError(
            f"unknown adapter kind {name!r}; this hydraopt reads {sorted(KINDS)}"
        ) from None


def kind_of_peft_type(peft_type: str) -> AdapterKind | None:
    """The kind whose adapters have ``peft_type`` (upper case), or None."""
    return next((k for k in KINDS.values() if k.peft_type == peft_type), None)


def kind_of_dirs(dirs: Sequence[Path]) -> AdapterKind:
    """The one kind of K adapter dirs, from their configs' ``peft_type``; a mix is refused.

    Dirs whose type is unknown or unreadable go to the default (LoRA) loader, which names the
    problem; a dir of another known kind among them is a mix.
    """
    types = [peft_type_of(d) for d in dirs]
    for d, peft_type in zip(dirs, types, strict=True):
        kind = kind_of_peft_type(peft_type)
        if kind is None or kind is DEFAULT_KIND:
            continue
        other = next((o for o, t in zip(dirs, types, strict=True) if t != kind.peft_type), None)
        if other is not None:
            raise HydraoptError(
                f"{d} is a {kind.display_name} adapter but {other} is "
                f"{peft_type_of(other) or 'not'} one; {DEFAULT_KIND.display_name} and "
                f"{kind.display_name} adapters cannot be merged together"
            )
        return kind
    return DEFAULT_KIND
