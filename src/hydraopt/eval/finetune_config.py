"""Settings of one LoRA or VeRA fine-tune, kept free of heavy imports so the CLI can show its
defaults without loading transformers. Each kind declares its own fields
(:mod:`hydraopt.kinds.finetune_fields`); this module holds the settings every kind shares."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, cast

from hydraopt.kinds.finetune_fields import KindFinetune
from hydraopt.kinds.lora.finetune_fields import LORA_FINETUNE, LoraFinetuneFields
from hydraopt.kinds.vera.finetune_fields import VERA_FINETUNE, VeraFinetuneFields

AdapterKind = Literal["lora", "vera"]
# Each kind's part of the settings (its fields, learning-rate field, checks and CLI flags), by
# kind name. The first is the default: records written before other kinds existed are its.
FINETUNE_KINDS: dict[str, KindFinetune] = {k.kind: k for k in (LORA_FINETUNE, VERA_FINETUNE)}
ADAPTER_KINDS = cast(tuple[AdapterKind, ...], tuple(FINETUNE_KINDS))
DEFAULT_ADAPTER = ADAPTER_KINDS[0]
# Fields that only one adapter kind reads. A run's record (training.json) leaves out the other
# kinds' fields, so a LoRA record has exactly the keys it had before VeRA existed and a VeRA
# record never shows a LoRA learning rate it did not use.
KIND_FIELDS = {k.kind: tuple(f.name for f in fields(k.fields)) for k in FINETUNE_KINDS.values()}


@dataclass(frozen=True)
class FinetuneConfig(VeraFinetuneFields, LoraFinetuneFields):
    """Settings of one adapter fine-tune: the kind-independent ones below, and each kind's own.

    A kind's fields come from its fields dataclass, a base of this one:
    :class:`~hydraopt.kinds.lora.finetune_fields.LoraFinetuneFields` (``r``, ``alpha``,
    ``dropout``, ``lr``), :class:`~hydraopt.kinds.vera.finetune_fields.VeraFinetuneFields`
    (``vera_r``, ``vera_lr``, ``vera_dropout``, ``d_initial``, ``projection_prng_key``).

    Attributes:
        adapter: ``"lora"`` or ``"vera"``; which kind's fields apply.
        target_modules: Module name suffixes that get an adapter.
        warmup_steps: Linear warm-up length (steps); then linear decay towards 0 at ``steps``.
        steps: Optimizer steps.
        batch_size: Examples per step.
        max_len: Longest prompt + target + EOS, in tokens.
        seed: Seeds the LoRA init, the data order and dropout.
        weight_decay: AdamW decoupled weight decay (0, as the transformers Trainer default).
        max_grad_norm: Clip the global gradient norm to this (``None``: no clipping; 1.0 is the
            transformers Trainer default and guards the first steps of a fresh adapter).
        overlong: What to do with a training example longer than ``max_len``: ``"drop"`` it (the
            model only learns from complete answers that end in EOS), or ``"truncate"`` it on the
            right (kept only if a target token survives).
        threads: ``torch.set_num_threads`` during the run (``None``: leave as is).
    """

    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    warmup_steps: int = 10
    steps: int = 150
    batch_size: int = 4
    max_len: int = 320
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    overlong: Literal["drop", "truncate"] = "drop"
    threads: int | None = None
    adapter: AdapterKind = DEFAULT_ADAPTER

    def __post_init__(self) -> None:
        if self.adapter not in ADAPTER_KINDS:
            raise ValueError(f"adapter must be one of {ADAPTER_KINDS}, got {self.adapter!r}")
        # Every kind's fields are checked, whichever applies: a config holds no bad value.
        for kind in FINETUNE_KINDS.values():
            kind.check(self)
        for name, value in {"steps": self.steps, "batch_size": self.batch_size}.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")
        if not self.target_modules:
            raise ValueError("target_modules is empty")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.overlong not in ("drop", "truncate"):
            raise ValueError(f"overlong must be 'drop' or 'truncate', got {self.overlong!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    @property
    def learning_rate(self) -> float:
        """The peak learning rate of the chosen adapter kind (``lr``, ``vera_lr``)."""
        return float(getattr(self, FINETUNE_KINDS[self.adapter].learning_rate))

    def record(self) -> dict[str, Any]:
        """The settings that shaped this run, JSON-ready, for ``training.json``.

        The other adapter kinds' fields are left out, and so is ``adapter`` for the default
        kind (LoRA): a LoRA record keeps the exact keys (and order) of records written before
        VeRA was supported, whose readers take a missing ``adapter`` to mean LoRA. Another
        kind's fields follow ``adapter``; ``target_modules`` is last, as a list, where records
        have always had it.
        """
        values = asdict(self)
        every_kind = {name for names in KIND_FIELDS.values() for name in names}
        default = self.adapter == DEFAULT_ADAPTER
        common = [
            f.name
            for f in fields(self)
            if f.name not in every_kind | {"target_modules"}
            and not (default and f.name == "adapter")
        ]
        own = list(KIND_FIELDS[self.adapter])
        order = own + common if default else common + own
        return {**{k: values[k] for k in order}, "target_modules": list(self.target_modules)}
