"""What an adapter kind adds to the fine-tune settings, declared torch-free.

:class:`~hydraopt.eval.finetune_config.FinetuneConfig` is built from each kind's fields dataclass
(:mod:`hydraopt.kinds.lora.finetune_fields`, :mod:`hydraopt.kinds.vera.finetune_fields`), and
``hydraopt finetune`` builds its kind-specific flags from :attr:`KindFinetune.flags`; neither
names a kind's field itself. Torch-free so that the CLI can show defaults without loading torch;
the kinds never import the config (it imports them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FinetuneFlag:
    """One ``hydraopt finetune`` flag as one kind reads it.

    Attributes:
        field: the fine-tune setting the flag sets for this kind.
        help: what the flag means for this kind ("LoRA rank r").
        note: appended after "<kind> only" when no other kind takes the flag.
    """

    field: str
    help: str
    note: str = ""


@dataclass(frozen=True)
class KindFinetune:
    """An adapter kind's part of the fine-tune settings.

    Attributes:
        kind: the kind's name (``FinetuneConfig.adapter``).
        display_name: as users write it ("LoRA").
        fields: the dataclass of the kind's own settings, a base of ``FinetuneConfig``; a run's
            record leaves out every other kind's.
        learning_rate: the field holding the kind's peak learning rate.
        check: refuses bad values of the kind's fields (``ValueError``), given the config.
        flags: CLI flag dest -> how this kind reads it; a flag no kind in effect reads is
            refused for that kind.
    """

    kind: str
    display_name: str
    fields: type
    learning_rate: str
    check: Callable[[Any], None]
    flags: dict[str, FinetuneFlag] = field(default_factory=dict)
