"""HydraOpt's typed config (torch-free; the method is :mod:`~hydraopt.merge.hydraopt`).

Kept apart from the tensor code so that the registry can declare the method, and the CLI build its
flags, without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hydraopt.devices import Precision
from hydraopt.errors import HydraoptError
from hydraopt.merge.base import check_heads
from hydraopt.merge.choices import DISTANCES, Distance

# Default refinement schedules (see HydraOptConfig.refine_schedule).
SHARED_HEAD_STEPS, SHARED_HEAD_LR = 100, 1.0  # M < K
OWN_HEAD_STEPS, OWN_HEAD_LR = 20, 0.05  # M = K
# The float32 path (CPUs without fast bfloat16) pays about twice per step: fewer steps there,
# where every step sees every task (benchmarks/RESULTS.md, "(issue 22) float32 path"). M = 1 is
# the tight case (the paper's loop is within 0.05 %); from M = 2 on hard routing wins by 20-75 %.
FLOAT32_ONE_HEAD_STEPS, FLOAT32_SHARED_HEAD_STEPS, FLOAT32_OWN_HEAD_STEPS = 45, 40, 10
# ... and at M = 1 with less momentum in Adam (beta1): 45 steps then end below what 60 reached
# with torch's 0.9 (benchmarks/RESULTS.md, "(issue 22) float32 path, session 9").
DEFAULT_MOMENTUM, FLOAT32_ONE_HEAD_MOMENTUM = 0.9, 0.7
# The fast solver's default head magnitude at M = 1 < K, chosen on the five English tasks' val
# split (benchmarks/ABLATIONS.md, section 5): 1.5 scored 35.4 there against 33.5 unscaled and
# TIES's 34.2; 2 and 2.5 fell off again (34.7, 31.7).
ONE_HEAD_SCALE = 1.5


@dataclass(frozen=True)
class HydraOptConfig:
    """Options of HydraOpt.

    Attributes:
        heads: M, number of B' heads per module (1 <= M <= K).
        distance: f, the distance minimised: ``mae`` (paper default), ``mse``, ``fro`` or ``cos``.
        solver: ``fast`` (closed form + hard routing + refinement) or ``paper``.
        epochs: paper solver: AdamW steps (paper: 1000).
        lr: paper solver: learning rate (paper: 0.01).
        weight_decay: paper solver: AdamW weight decay (torch's default, as the paper's code).
        temperature: paper solver: T in softmax(C'/T); 0.2 here = the appendix code's T = 5.
        restarts: fast solver: k-means++ starts for the routing (M < K).
        refine_steps: fast solver: AdamW steps on the hard-routed distance, 0 = closed form only
            (default 100 for M < K, 20 for M = K, see :meth:`refine_schedule`; VeRA: 100).
        refine_lr: fast solver: learning rate relative to the factors' RMS (default 1.0 for
            M < K, 0.05 for M = K; VeRA: 0.05).
        refine_precision: fast solver: dtype of the refinement's dense products; ``auto`` =
            bfloat16 where it is fast (AVX-512 BF16 / AMX CPUs, CUDA), else float32.
        refine_tasks: fast solver: tasks per refinement step; with more adapters than this each
            step samples them, so a step's cost does not grow with K.
        start: fast solver, MAE only: ``auto`` starts the refinement from the better of the
            closed form and the low-rank fit of per-head medians (:mod:`median_start`) when
            K <= refine_tasks; ``closed_form`` always starts from the closed form.
        head_scale: both solvers: every head B' times this after the solve (head-magnitude
            calibration; 1.0 = the paper's objective). Unset (default): 1.5 with the fast solver
            at M = 1 < K, else 1.0. At M = 1 the solved head
            points closer to each task's update than TIES's merge but is about half as long;
            on the five English tasks' val split 1.5 scored 35.4 against 33.5 at 1.0 and TIES's
            34.2, and on test 34.6 against 32.8 and 34.2 (benchmarks/ABLATIONS.md, section 5).
            It trades reconstruction error for task quality: the reported errors are measured
            after it, so an M = 1 bundle's error is higher than the paper objective's.
    """

    heads: int
    distance: Distance = "mae"
    solver: Literal["fast", "paper"] = "fast"
    epochs: int = 1000
    lr: float = 0.01
    weight_decay: float = 0.01
    temperature: float = 0.2
    restarts: int = 8
    refine_steps: int | None = None
    refine_lr: float | None = None
    refine_precision: Literal["auto", "float32", "bfloat16"] = "auto"
    refine_tasks: int = 8
    start: Literal["auto", "closed_form"] = "auto"
    head_scale: float | None = None

    def __post_init__(self) -> None:
        check_heads(self.heads)
        if self.distance not in DISTANCES:
            raise HydraoptError(f"distance must be one of {DISTANCES}, got {self.distance!r}")
        if self.solver not in ("fast", "paper"):
            raise HydraoptError(f"solver must be 'fast' or 'paper', got {self.solver!r}")
        if self.temperature <= 0:
            raise HydraoptError("temperature must be > 0")
        if self.epochs < 0 or (self.refine_steps or 0) < 0 or self.restarts < 1:
            raise HydraoptError("epochs and refine_steps must be >= 0 and restarts >= 1")
        if self.refine_lr is not None and not self.refine_lr > 0:
            raise HydraoptError(f"refine_lr must be > 0, got {self.refine_lr}")
        if self.refine_precision not in ("auto", "float32", "bfloat16"):
            raise HydraoptError("refine_precision must be auto, float32 or bfloat16")
        if self.refine_tasks < 1:
            raise HydraoptError("refine_tasks must be >= 1")
        if self.head_scale is not None and not self.head_scale > 0:
            raise HydraoptError(f"head_scale must be > 0, got {self.head_scale}")
        if self.start not in ("auto", "closed_form"):
            raise HydraoptError("start must be 'auto' or 'closed_form'")

    def resolved_head_scale(self, num_tasks: int) -> float:
        """The head scale applied for K = ``num_tasks``: the set field, else
        :data:`ONE_HEAD_SCALE` where one head serves several tasks with the fast solver (the
        setting it was chosen in), else 1.0 (the paper's objective; the paper solver
        reproduces the paper unless told otherwise)."""
        if self.head_scale is not None:
            return self.head_scale
        one_shared_head = self.heads == 1 < num_tasks and self.solver == "fast"
        return ONE_HEAD_SCALE if one_shared_head else 1.0

    def refine_schedule(
        self, num_tasks: int, precision: Precision = "bfloat16"
    ) -> tuple[int, float]:
        """(steps, lr) of the refinement for K = ``num_tasks``: the set fields, else the defaults.

        M < K: heads are compromises between the tasks routed to them and the closed form is
        the squared-error optimum, so 100 steps at lr 1.0 are worth their cost (1-2 % MAE).
        M = K: every task keeps its own head and the start is within ~3 % of the refined MAE;
        large steps only throw that start away (real adapters: no gain in 20 steps at
        lr >= 0.2), while 20 steps at 0.05 keep 75-90 % of 100 steps' gain at a fifth of the
        cost (benchmarks/RESULTS.md, section 2).
        With float32 MAE products (``precision``, the resolved path) and every task in every
        step (K <= refine_tasks), a step costs about twice as much: 45 steps (M = 1, with
        :meth:`refine_momentum`'s 0.7), 40 (1 < M < K) and 10 (M = K) keep the merge >= 100x
        faster than the paper's loop with its error still below the loop's
        (benchmarks/RESULTS.md, "(issue 22) float32 path" and "... session 9").
        Sampled steps (more adapters) keep 100 / 20, unless they would draw fewer tasks than
        there are (steps x refine_tasks < K): then none. Such a loop cannot improve every task's
        error, and on K = 200-1,000 synthetic 1B-shape adapters its last iterate never beat the
        closed-form start (the merge kept the start in every module, M = 1, 2 and K) while it and
        the closing comparison cost a third of the merge (benchmarks/RESULTS.md section 22).
        """
        own_heads = self.heads >= num_tasks
        steps = self.refine_steps
        fewer = self._float32_steps(num_tasks, precision)
        if steps is None and fewer:
            steps = FLOAT32_OWN_HEAD_STEPS if own_heads else FLOAT32_SHARED_HEAD_STEPS
            steps = FLOAT32_ONE_HEAD_STEPS if self.heads == 1 and not own_heads else steps
        if steps is None:
            steps = OWN_HEAD_STEPS if own_heads else SHARED_HEAD_STEPS
            sampled = num_tasks > self.refine_tasks
            steps = 0 if sampled and steps * self.refine_tasks < num_tasks else steps
        lr = self.refine_lr
        if lr is None:
            lr = OWN_HEAD_LR if own_heads else SHARED_HEAD_LR
        return steps, lr

    def refine_momentum(self, num_tasks: int, precision: Precision = "bfloat16") -> float:
        """Adam's beta1 in the refinement: 0.7 with the float32 path's default M = 1 schedule
        (see :meth:`refine_schedule`), where 45 steps then end below what 60 reached at 0.9
        (real adapters, whole model); torch's 0.9 everywhere else (a set ``refine_steps``
        keeps it too)."""
        one_head = self.heads == 1 and num_tasks > 1
        if one_head and self.refine_steps is None and self._float32_steps(num_tasks, precision):
            return FLOAT32_ONE_HEAD_MOMENTUM
        return DEFAULT_MOMENTUM

    def _float32_steps(self, num_tasks: int, precision: Precision) -> bool:
        """Whether the float32 path's shorter defaults apply: float32 MAE products, with every
        task in every step. Only the MAE steps run in the chosen precision; the other
        distances' cost is the same."""
        return precision == "float32" and self.distance == "mae" and num_tasks <= self.refine_tasks
