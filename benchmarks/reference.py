"""A faithful, independent re-implementation of the paper's HydraOpt code (appendix Figs. 7-9).

This is the yardstick of ``benchmarks/speed.py``: what merging costs when done the way the paper's
code does it, so "ours / reference" ratios compare against the published procedure rather than
against our own batched ``--solver paper``. It therefore keeps the paper's structure on purpose,
even where that is slow:

- parameters are ``nn.Linear`` weights, one A' per module (kaiming-uniform, a = sqrt(5)) and M
  B' per module (zeros), plus one coefficient vector C'_i per module and task (Gaussian);
- every epoch loops in Python over tasks i and modules j, recomputes the dense target
  ΔW_ij = B_ij @ A_ij and the prediction (for M < K the sum over l of
  softmax(C'_ij / T)_l * B'_l @ A', one dense product per head), and adds the l1 loss;
- the loss is divided by K * J (J = number of factor tensors, two per module), AdamW (lr 0.01,
  torch's default weight decay 0.01) takes one full-batch step per epoch;
- each task then takes head argmax_l C'_ij, per module.

Conventions shared with the library (docs/methods.md): T = 0.2 in softmax(C'/T) is the appendix
code's softmax(C' * 5). The appendix fits B'A' to the *unscaled* B A and deploys with the adapter's
own LoRA scale; we do the same and fold the scale into the returned heads (when tasks' scales
differ, each target is first rescaled to the first task's scale, the only consistent choice).
The appendix code initialises C' as softmax(randn(M) / 5), its text says "Gaussian";
``c_init`` picks either, default Gaussian (as the text and our ``--solver paper``).

Nothing here imports our solver code; only the error of the result is measured with the library's
:func:`hydraopt.merge.measure.hard_routed_error`.
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import nn

from hydraopt.io.peft import AdapterSet
from hydraopt.merge.measure import hard_routed_error

PAPER_LR = 0.01
PAPER_TEMPERATURE = 0.2  # softmax(C'/T); the appendix writes softmax(C' * 5)


@dataclass(frozen=True)
class ReferenceOptions:
    """Settings of the paper's code (defaults are the paper's).

    Attributes:
        lr: AdamW learning rate.
        temperature: T in softmax(C'/T).
        c_init: ``gaussian`` (text) or ``appendix`` (softmax(randn(M) * T), the code's init).
        seed: root of the parameter initialisation (an explicit generator, never the global RNG).
        device: where parameters and targets live (the appendix moves everything to one GPU).
    """

    lr: float = PAPER_LR
    temperature: float = PAPER_TEMPERATURE
    c_init: Literal["gaussian", "appendix"] = "gaussian"
    seed: int = 0
    device: str = "cpu"


def linear_weight(out_features: int, in_features: int, device: str) -> nn.Linear:
    """``nn.Linear`` without its constructor's init (which draws from the global RNG)."""
    return nn.utils.skip_init(nn.Linear, in_features, out_features, bias=False, device=device)


class ReferenceHydraOpt(nn.Module):
    """The paper's ``HydraOpt`` module (Fig. 7): A', B' and C' per module, keyed by module name."""

    def __init__(
        self,
        shapes: dict[str, tuple[int, int, int]],
        num_tasks: int,
        num_heads: int,
        options: ReferenceOptions,
    ) -> None:
        super().__init__()
        self.K, self.M, self.T = num_tasks, num_heads, options.temperature
        gen = torch.Generator(device=options.device).manual_seed(options.seed)
        self.A_prime = nn.ModuleDict()
        self.B_primes = nn.ModuleDict()
        self.C_primes = None if num_tasks == num_heads else nn.ParameterDict()
        for j, (d, k, r) in enumerate(shapes.values()):
            key = f"m{j}"  # '.' can't be used in a ModuleDict key; the order is the module order
            a_prime = linear_weight(r, k, options.device)
            nn.init.kaiming_uniform_(a_prime.weight, a=math.sqrt(5), generator=gen)
            self.A_prime[key] = a_prime
            for i in range(num_heads):
                b_prime = linear_weight(d, r, options.device)
                nn.init.zeros_(b_prime.weight)
                self.B_primes[f"{key}_{i}"] = b_prime
            if self.C_primes is not None:
                for i in range(num_tasks):
                    c = torch.randn(num_heads, generator=gen, device=options.device)
                    if options.c_init == "appendix":
                        c = torch.softmax(c * options.temperature, dim=-1)
                    self.C_primes[f"{key}_{i}"] = nn.Parameter(c)

    def a_weight(self, key: str) -> torch.Tensor:
        """A' of one module, (r, k)."""
        return cast(nn.Linear, self.A_prime[key]).weight

    def b_weight(self, key: str, head: int) -> torch.Tensor:
        """B'_head of one module, (d, r)."""
        return cast(nn.Linear, self.B_primes[f"{key}_{head}"]).weight

    def mixing(self, key: str, i: int) -> torch.Tensor:
        """softmax(C'_i / T) of one module and task, (M,)."""
        if self.C_primes is None:
            raise RuntimeError("M = K has no coefficients: task i uses head i")
        return torch.softmax(self.C_primes[f"{key}_{i}"] / self.T, dim=-1)


def load_lora_parameters(
    aset: AdapterSet, device: str
) -> tuple[list[list[tuple[torch.Tensor, torch.Tensor]]], list[float]]:
    """Per task, per module (A (r, k), B (d, r)) on ``device``, and each module's deploy scale.

    B is rescaled by s_i / s_0 (exactly 1.0 when tasks share a scale, as PEFT adapters of one
    config do) so that B A is the update to fit at the first task's scale s_0.
    """
    K = len(aset.tasks)
    params: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(K)]
    scales = []
    for spec in aset.modules:
        stack = aset.load_stack([spec])
        s = stack.scale[0]  # (K,)
        scales.append(float(s[0]))
        for i in range(K):
            a = stack.A[0, i].to(device)  # (r, k)
            b = (stack.B[0, i] * (s[i] / s[0])).to(device)  # (d, r)
            params[i].append((a, b))
    return params, scales


def hydra_loss(
    model: ReferenceHydraOpt, lora: list[list[tuple[torch.Tensor, torch.Tensor]]]
) -> torch.Tensor:
    """The paper's loss (Fig. 8): sum over tasks and modules of l1(ΔW, ΔW'), divided by K J."""
    K = len(lora)
    J = 2 * len(lora[0])
    total = torch.zeros((), device=lora[0][0][0].device)
    for i in range(K):
        for j, (a, b) in enumerate(lora[i]):
            key = f"m{j}"
            delta_w = b @ a  # the original update, recomputed every epoch as in the paper
            a_prime = model.a_weight(key)
            if model.C_primes is None:
                delta_w_prime = model.b_weight(key, i) @ a_prime
            else:
                w = model.mixing(key, i)
                delta_w_prime = torch.stack(
                    [w[m] * model.b_weight(key, m) @ a_prime for m in range(model.M)]
                ).sum(dim=0)
            total = total + nn.functional.l1_loss(delta_w, delta_w_prime)
    return total / (K * J)


def train_epochs(
    model: ReferenceHydraOpt,
    lora: list[list[tuple[torch.Tensor, torch.Tensor]]],
    optimizer: torch.optim.Optimizer,
    epochs: int,
) -> None:
    """The paper's training loop (Fig. 9): one full-batch AdamW step per epoch."""
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = hydra_loss(model, lora)
        loss.backward()
        optimizer.step()


def build(
    aset: AdapterSet, num_heads: int, options: ReferenceOptions
) -> tuple[ReferenceHydraOpt, list, list[float], torch.optim.Optimizer]:
    """Targets on the device, the parameters and the optimiser, as the paper's code sets them up."""
    seed = (options.seed * 1_000_003 + zlib.crc32(aset.modules[0].name.encode())) % (2**63)
    opts = dataclasses.replace(options, seed=seed)
    lora, scales = load_lora_parameters(aset, options.device)
    shapes = {m.name: (m.d, m.k, m.r) for m in aset.modules}
    model = ReferenceHydraOpt(shapes, len(aset.tasks), num_heads, opts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr)
    return model, lora, scales, optimizer


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reference_epoch_seconds(
    aset: AdapterSet,
    num_heads: int,
    epochs_timed: int,
    options: ReferenceOptions | None = None,
) -> float:
    """Seconds per epoch of the paper's loop on ``aset``'s modules (a slice, usually).

    One untimed warm-up epoch (allocator and kernel set-up), then ``epochs_timed`` timed ones;
    every epoch does the same work, so seconds/epoch x epochs extrapolates a full run.
    """
    options = options or ReferenceOptions()
    model, lora, _, optimizer = build(aset, num_heads, options)
    train_epochs(model, lora, optimizer, 1)
    synchronize(options.device)
    start = time.perf_counter()
    train_epochs(model, lora, optimizer, epochs_timed)
    synchronize(options.device)
    return (time.perf_counter() - start) / max(1, epochs_timed)


def reference_merge(
    aset: AdapterSet,
    num_heads: int,
    epochs: int,
    options: ReferenceOptions | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run the paper's code for ``epochs`` epochs.

    Returns:
        module -> (A' (r, k), heads (M, d, r) with the LoRA scale folded in, routing (K,) int64),
        on the CPU, the same layout as a bundle's ``merged``.
    """
    options = options or ReferenceOptions()
    model, lora, scales, optimizer = build(aset, num_heads, options)
    train_epochs(model, lora, optimizer, epochs)
    K, M = len(aset.tasks), num_heads
    out = {}
    with torch.no_grad():
        for j, spec in enumerate(aset.modules):
            key = f"m{j}"
            a = model.a_weight(key).detach().cpu()
            heads = torch.stack([model.b_weight(key, m).detach().cpu() for m in range(M)])
            if model.C_primes is None:
                routing = torch.arange(K)
            else:
                routing = torch.stack([model.mixing(key, i).argmax().cpu() for i in range(K)])
            out[spec.name] = (a, heads * scales[j], routing)
    return out


def merged_error(
    aset: AdapterSet,
    merged: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    distance: str = "mae",
) -> float:
    """Hard-routed error, mean over tasks and modules (as ``hydraopt.analysis.mean_error``)."""
    total = 0.0
    for spec in aset.modules:
        stack = aset.load_stack([spec])
        a, heads, routing = merged[spec.name]
        err = hard_routed_error(stack.delta(), a[None], heads[None], routing[None], distance)
        total += float(err.mean())
    return total / len(aset.modules)
