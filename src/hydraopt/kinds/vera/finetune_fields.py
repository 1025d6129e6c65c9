"""VeRA's fine-tune settings (torch-free; see :mod:`hydraopt.kinds.finetune_fields`)."""

from __future__ import annotations

from dataclasses import dataclass

from hydraopt.kinds.finetune_fields import FinetuneFlag, KindFinetune


@dataclass(frozen=True)
class VeraFinetuneFields:
    """VeRA (Kopiczko et al., ICLR 2024) freezes two random projections ``A (r, k_max)``,
    ``B (d_max, r)`` shared by every module and learns two vectors per module:
    ``ΔW = diag(λb) · B[:d] · diag(λd) · A[:, :k]``.

    Attributes:
        vera_r: VeRA's r, the inner dimension of the shared projections. PEFT's default, 256:
            VeRA trains only ``d + r`` numbers per module, so it needs a larger r than LoRA.
        vera_lr: Peak learning rate of AdamW for VeRA. The trained vectors scale fixed random
            matrices, and λb starts at 0, so they need far larger steps than LoRA's factors.
            2e-2 beat 1e-2 and 4e-3 on the en-ta val split after the full 150 steps, and matched
            LoRA there (calibration in examples/adapters-vera/README.md).
        vera_dropout: Dropout on the VeRA adapter input (PEFT's default, 0).
        d_initial: Initial value of every λd (PEFT's default 0.1; the VeRA paper's Table 6c
            recommends values <= 0.1). λb starts at 0, so training starts from ΔW = 0.
        projection_prng_key: Seed of the shared random projections (PEFT's
            ``projection_prng_key``). It must be equal for adapters that are to be merged:
            VeRA merging only merges the vectors and assumes every task saw the same A and B.
    """

    vera_r: int = 256
    vera_lr: float = 2e-2
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    projection_prng_key: int = 0

    def check_vera_fields(self) -> None:
        """Refuse values VeRA cannot train with (``ValueError``)."""
        if self.vera_r < 1:
            raise ValueError(f"vera_r must be >= 1, got {self.vera_r}")
        if self.vera_lr <= 0 or self.d_initial <= 0:
            raise ValueError(
                f"vera_lr and d_initial must be > 0, got vera_lr={self.vera_lr}, "
                f"d_initial={self.d_initial}"
            )
        if not 0.0 <= self.vera_dropout < 1.0:
            raise ValueError(f"vera_dropout must be in [0, 1), got {self.vera_dropout}")
        if self.projection_prng_key < 0:
            raise ValueError(f"projection_prng_key must be >= 0, got {self.projection_prng_key}")


VERA_FINETUNE = KindFinetune(
    kind="vera",
    display_name="VeRA",
    fields=VeraFinetuneFields,
    learning_rate="vera_lr",
    check=VeraFinetuneFields.check_vera_fields,
    flags={
        "lr": FinetuneFlag("vera_lr", "peak learning rate"),
        "rank": FinetuneFlag("vera_r", "VeRA's projection dimension r"),
        "projection_prng_key": FinetuneFlag(
            "projection_prng_key",
            "seed of VeRA's shared projections",
            note="; keep it equal for adapters to be merged",
        ),
    },
)
