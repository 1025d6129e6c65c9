"""LoRA's fine-tune settings (torch-free; see :mod:`hydraopt.kinds.finetune_fields`)."""

from __future__ import annotations

from dataclasses import dataclass

from hydraopt.kinds.finetune_fields import FinetuneFlag, KindFinetune


@dataclass(frozen=True)
class LoraFinetuneFields:
    """LoRA (Hu et al., 2022) learns ``ΔW = (alpha / r) · B A`` per module (defaults: the
    paper's, as in ``shared/adapters``).

    Attributes:
        r: LoRA rank.
        alpha: ``lora_alpha``; the update is scaled by ``alpha / r``.
        dropout: LoRA dropout on the adapter input.
        lr: Peak learning rate of AdamW for LoRA.
    """

    r: int = 32
    alpha: int = 128
    dropout: float = 0.05
    lr: float = 2e-4

    def check_lora_fields(self) -> None:
        """Refuse values LoRA cannot train with (``ValueError``)."""
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if self.alpha <= 0 or self.lr <= 0:
            raise ValueError(f"alpha and lr must be > 0, got alpha={self.alpha}, lr={self.lr}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


LORA_FINETUNE = KindFinetune(
    kind="lora",
    display_name="LoRA",
    fields=LoraFinetuneFields,
    learning_rate="lr",
    check=LoraFinetuneFields.check_lora_fields,
    flags={
        "lr": FinetuneFlag("lr", "peak learning rate"),
        "rank": FinetuneFlag("r", "LoRA rank r"),
        "alpha": FinetuneFlag("alpha", "lora_alpha"),
    },
)
