"""Settings of one LoRA fine-tune, kept free of heavy imports so the CLI can show its defaults
without loading transformers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of one LoRA fine-tune (defaults: the paper's, as in ``shared/adapters``).

    Attributes:
        r: LoRA rank.
        alpha: ``lora_alpha``; the update is scaled by ``alpha / r``.
        dropout: LoRA dropout on the adapter input.
        target_modules: Module name suffixes that get an adapter.
        lr: Peak learning rate of AdamW.
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

    def __post_init__(self) -> None:
        positive = {"r": self.r, "steps": self.steps, "batch_size": self.batch_size}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.alpha <= 0 or self.lr <= 0:
            raise ValueError(f"alpha and lr must be > 0, got alpha={self.alpha}, lr={self.lr}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
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
