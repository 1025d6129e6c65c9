"""Settings of one LoRA or VeRA fine-tune, kept free of heavy imports so the CLI can show its
defaults without loading transformers."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

AdapterKind = Literal["lora", "vera"]
ADAPTER_KINDS: tuple[AdapterKind, ...] = ("lora", "vera")

# Fields that only one adapter kind reads. A run's record (training.json) leaves out the other
# kind's fields, so a LoRA record has exactly the keys it had before VeRA existed and a VeRA
# record never shows a LoRA learning rate it did not use.
LORA_ONLY_FIELDS = ("r", "alpha", "dropout", "lr")
VERA_ONLY_FIELDS = ("vera_r", "vera_lr", "vera_dropout", "d_initial", "projection_prng_key")


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of one adapter fine-tune (LoRA defaults: the paper's, as in ``shared/adapters``).

    LoRA (Hu et al., 2022) learns ``ΔW = (alpha / r) · B A`` per module. VeRA (Kopiczko et al.,
    ICLR 2024) freezes two random projections ``A (r, k_max)``, ``B (d_max, r)`` shared by every
    module and learns two vectors per module: ``ΔW = diag(λb) · B[:d] · diag(λd) · A[:, :k]``.

    Attributes:
        adapter: ``"lora"`` or ``"vera"``; which of the ``*_only`` fields below apply.
        r: LoRA rank.
        alpha: ``lora_alpha``; the update is scaled by ``alpha / r``.
        dropout: LoRA dropout on the adapter input.
        lr: Peak learning rate of AdamW for LoRA.
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

    r: int = 32
    alpha: int = 128
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lr: float = 2e-4
    warmup_steps: int = 10
    steps: int = 150
    batch_size: int = 4
    max_len: int = 320
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    overlong: Literal["drop", "truncate"] = "drop"
    threads: int | None = None
    adapter: AdapterKind = "lora"
    vera_r: int = 256
    vera_lr: float = 2e-2
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    projection_prng_key: int = 0

    def __post_init__(self) -> None:
        if self.adapter not in ADAPTER_KINDS:
            raise ValueError(f"adapter must be one of {ADAPTER_KINDS}, got {self.adapter!r}")
        positive = {
            "r": self.r,
            "vera_r": self.vera_r,
            "steps": self.steps,
            "batch_size": self.batch_size,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.alpha <= 0 or self.lr <= 0:
            raise ValueError(f"alpha and lr must be > 0, got alpha={self.alpha}, lr={self.lr}")
        if self.vera_lr <= 0 or self.d_initial <= 0:
            raise ValueError(
                f"vera_lr and d_initial must be > 0, got vera_lr={self.vera_lr}, "
                f"d_initial={self.d_initial}"
            )
        for name in ("dropout", "vera_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.projection_prng_key < 0:
            raise ValueError(f"projection_prng_key must be >= 0, got {self.projection_prng_key}")
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
        """The peak learning rate of the chosen adapter kind (``lr`` or ``vera_lr``)."""
        return self.vera_lr if self.adapter == "vera" else self.lr

    def record(self) -> dict[str, Any]:
        """The settings that shaped this run, JSON-ready, for ``training.json``.

        The other adapter kind's fields are left out, and so is ``adapter`` for LoRA: a LoRA
        record keeps the exact keys (and order) of records written before VeRA was supported,
        whose readers take a missing ``adapter`` to mean LoRA.
        """
        unused = VERA_ONLY_FIELDS + ("adapter",) if self.adapter == "lora" else LORA_ONLY_FIELDS
        settings = {k: v for k, v in asdict(self).items() if k not in unused}
        # target_modules last and as a list, where records have always had it.
        modules = list(settings.pop("target_modules"))
        return {**settings, "target_modules": modules}
