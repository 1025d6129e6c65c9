"""Synthetic PEFT LoRA adapters of real model shapes, calibrated on the five real adapters.

Benchmarks need K = 40, 100, 500 adapters on Llama-sized models; nobody trains those for a speed
test. These are written in PEFT's exact on-disk format (``adapter_config.json`` with
``peft_type: LORA`` + an fp16 ``adapter_model.safetensors``), with the structure that HydraOpt
exploits and that real adapters trained from one seed show (paper Fig. 2, our
``tests/integration/test_real_adapters.py``):

- A_i = A0 + drift_i: one shared PEFT init A0 (kaiming-uniform, a = sqrt(5)) plus a small
  task drift whose singular values decay like the measured ones, in the row directions task i's B
  uses most (LoRA's gradient on A is B^T times the output gradient, so A drifts where B is large);
- B_i = sqrt(c) S + sqrt(1 - c) T_i: mostly task specific (T_i), with a small shared part S
  giving the measured pairwise cosine c; both have the measured singular-value decay.

Every tensor comes from an explicit generator seeded by (seed, task, module) — (seed, "shared",
module) for A0 and S — so task i's adapter is the same whatever K is, and the cache grows
incrementally: ``cache/<shape>-.../task-0007`` is written once, with a ``.complete`` marker
holding the spec it was made from.

Usage:
    python benchmarks/synthetic.py --shape llama-3.2-1b --tasks 40 --cache DIR
    python benchmarks/synthetic.py --calibrate [ADAPTER_DIR...]   # re-measure the constants
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from hydraopt.io.atomic import atomic_dir
from hydraopt.io.keys import lora_key

REPO = Path(__file__).resolve().parents[1]
REAL_ADAPTERS = REPO.parent / "shared" / "adapters"
DEFAULT_CACHE = Path.home() / ".cache" / "hydraopt-bench" / "synthetic"
MARKER = ".complete"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class ModelShape:
    """The attention shapes of a decoder (what LoRA on q/k/v/o sees).

    Attributes:
        name: key in :data:`SHAPES`, also the cache folder prefix.
        hidden: model width (q/o: hidden x hidden; every A: r x hidden).
        kv: key/value width, heads_kv * head_dim (k/v B: kv x r).
        layers: decoder layers.
        base_model: ``base_model_name_or_path`` written into every config.
    """

    name: str
    hidden: int
    kv: int
    layers: int
    base_model: str

    def out_features(self, projection: str) -> int:
        """d of a projection: k/v map to the (grouped) key/value width, q/o to hidden."""
        return self.kv if projection in ("k_proj", "v_proj") else self.hidden


SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape("smollm2-135m", 576, 192, 30, "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ModelShape("llama-3.2-1b", 2048, 512, 16, "meta-llama/Llama-3.2-1B-Instruct"),
        ModelShape("llama-3.2-3b", 3072, 1024, 28, "meta-llama/Llama-3.2-3B-Instruct"),
    )
}


@dataclass(frozen=True)
class Calibration:
    """Structure of one projection's factors across tasks (see :func:`measure_calibration`).

    Attributes:
        a_drift: mean over tasks of ||A_i - mean A|| / ||mean A|| at K = ``CALIBRATION_K``.
        b_over_a: RMS(B) / RMS(A).
        b_cosine: mean pairwise cosine between tasks' B (flattened).
        decay: p in sigma_j / sigma_1 = j^-p, fitted on B's singular values (A's drift decays alike).
    """

    a_drift: float
    b_over_a: float
    b_cosine: float
    decay: float


# Measured once with `python benchmarks/synthetic.py --calibrate` on /work/shared/adapters/en-*
# (5 SmolLM2-135M adapters, r = 32, alpha = 128, 150 steps from one seed), mean over 30 layers.
# Spread over layers: a_drift 0.057-0.095, RMS(B) 0.0014-0.0021 next to RMS(A) 0.0242 (= the
# kaiming init's 1/sqrt(3k): training barely moves A's scale).
CALIBRATION_K = 5
REAL_CALIBRATION: dict[str, Calibration] = {
    "q_proj": Calibration(a_drift=0.068, b_over_a=0.065, b_cosine=0.060, decay=0.84),
    "k_proj": Calibration(a_drift=0.067, b_over_a=0.066, b_cosine=0.061, decay=0.76),
    "v_proj": Calibration(a_drift=0.070, b_over_a=0.070, b_cosine=0.152, decay=1.07),
    "o_proj": Calibration(a_drift=0.079, b_over_a=0.071, b_cosine=0.088, decay=0.77),
}


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines the adapters' bytes (and so the cache folder).

    Attributes:
        shape: model shape.
        rank, alpha: LoRA r and lora_alpha (the paper's 32 and 128).
        seed: root of every generator.
        layers: write only the first ``layers`` decoder layers (None: all; small runs and tests).
        drift_scale: multiplies every A drift (0: all tasks share A exactly).
        calibration: per projection; default the measured :data:`REAL_CALIBRATION`.
    """

    shape: ModelShape
    rank: int = 32
    alpha: int = 128
    seed: int = 0
    layers: int | None = None
    drift_scale: float = 1.0
    calibration: tuple[tuple[str, Calibration], ...] = tuple(REAL_CALIBRATION.items())

    @property
    def num_layers(self) -> int:
        return self.shape.layers if self.layers is None else min(self.layers, self.shape.layers)

    def modules(self) -> list[tuple[str, int, int]]:
        """(module name, d, k) in natural order."""
        return [
            (f"model.layers.{i}.self_attn.{p}", self.shape.out_features(p), self.shape.hidden)
            for i in range(self.num_layers)
            for p in PROJECTIONS
        ]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def folder_name(self) -> str:
        digest = hashlib.sha256(self.to_json().encode()).hexdigest()[:10]
        return f"{self.shape.name}-L{self.num_layers}-r{self.rank}-s{self.seed}-{digest}"

    def adapter_bytes(self) -> int:
        """fp16 payload of one adapter (what each task dir holds, headers aside)."""
        return 2 * sum(self.rank * (d + k) for _, d, k in self.modules())


def module_generator(seed: int, task: str, module: str) -> torch.Generator:
    """A generator that depends only on (seed, task, module): any K, any order, same tensors."""
    derived = zlib.crc32(f"{seed}/{task}/{module}".encode()) + seed * 1_000_003
    return torch.Generator().manual_seed(derived % (2**63))


def decay_profile(rank: int, decay: float) -> torch.Tensor:
    """sigma_j proportional to j^-decay, scaled so sum sigma^2 = r (a unit-RMS factor). (r,)"""
    s = torch.arange(1, rank + 1, dtype=torch.float64).pow(-decay)
    return (s * math.sqrt(rank) / s.norm()).float()


def random_orthogonal(r: int, gen: torch.Generator) -> torch.Tensor:
    """Haar-random r x r orthogonal matrix (QR of a Gaussian with the sign fix)."""
    q, upper = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(upper))).float()


def shaped_factor(
    rows: int, r: int, sigma: torch.Tensor, q: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """Unit-RMS (rows, r) matrix with singular values ~ sigma and right vectors q: G diag(s) q^T."""
    return torch.randn(rows, r, generator=gen) * sigma @ q.T


@functools.lru_cache(maxsize=256)  # one model's modules: drawn once, not once per task
def shared_factors(
    spec: SyntheticSpec, module: str, d: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A0 (r, k), kaiming-uniform like PEFT's init, and the shared part S (d, r) of B."""
    gen = module_generator(spec.seed, "shared", module)
    bound = 1.0 / math.sqrt(k)  # kaiming_uniform_(a=sqrt(5)) on fan_in k: sqrt(6 / (6 k))
    a0 = (torch.rand(spec.rank, k, generator=gen) * 2 - 1) * bound
    calib = dict(spec.calibration)[module.rsplit(".", 1)[1]]
    sigma = decay_profile(spec.rank, calib.decay)
    s = shaped_factor(d, spec.rank, sigma, random_orthogonal(spec.rank, gen), gen)
    return a0, s


def task_factors(
    spec: SyntheticSpec, task: str, module: str, d: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_i (r, k), B_i (d, r)) of one task and module, float32."""
    calib = dict(spec.calibration)[module.rsplit(".", 1)[1]]
    a0, shared_b = shared_factors(spec, module, d, k)
    gen = module_generator(spec.seed, task, module)
    r = spec.rank
    sigma = decay_profile(r, calib.decay)
    q = random_orthogonal(r, gen)  # task i's own directions in the rank space
    a_rms = a0.square().mean().sqrt()
    # The measured ratio is to the mean of K = 5 A's; independent drifts make it
    # sqrt((K-1)/K) of the per-task drift.
    rho = calib.a_drift / math.sqrt((CALIBRATION_K - 1) / CALIBRATION_K) * spec.drift_scale
    drift = q @ (sigma[:, None] * torch.randn(r, k, generator=gen))  # (r, k), unit RMS
    a = a0 + rho * a_rms * drift
    own = shaped_factor(d, r, sigma, q, gen)  # (d, r), unit RMS
    c = calib.b_cosine
    b = calib.b_over_a * a_rms * (math.sqrt(c) * shared_b + math.sqrt(1 - c) * own)
    return a, b


def adapter_config(spec: SyntheticSpec) -> dict:
    """A minimal PEFT LoRA config (what ``LoraConfig.save_pretrained`` needs to load it back)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": spec.shape.base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": list(PROJECTIONS),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "use_rslora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


def write_task(spec: SyntheticSpec, task: str, out: Path) -> None:
    """Write one adapter dir atomically; the marker goes in last, inside the renamed dir."""
    with atomic_dir(out, force=True) as tmp:
        tensors = {}
        for module, d, k in spec.modules():
            a, b = task_factors(spec, task, module, d, k)
            tensors[lora_key(module, "A")] = a.to(torch.float16).contiguous()  # (r, k)
            tensors[lora_key(module, "B")] = b.to(torch.float16).contiguous()  # (d, r)
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config(spec), indent=2))
        (tmp / MARKER).write_text(spec.to_json())


def task_name(index: int) -> str:
    return f"task-{index:04d}"


def ensure_adapters(spec: SyntheticSpec, num_tasks: int, cache: Path = DEFAULT_CACHE) -> list[Path]:
    """The first ``num_tasks`` synthetic adapters of ``spec``, written only where missing.

    Returns:
        Adapter dirs ``cache/<spec folder>/task-0000 ...`` in task order.
    """
    root = Path(cache) / spec.folder_name()
    want = spec.to_json()
    dirs = []
    for i in range(num_tasks):
        out = root / task_name(i)
        marker = out / MARKER
        if not (marker.is_file() and marker.read_text() == want):
            write_task(spec, task_name(i), out)
        dirs.append(out)
    return dirs


def measure_calibration(paths: Sequence[Path]) -> dict[str, Calibration]:
    """Re-measure :data:`REAL_CALIBRATION` on adapters (mean over layers, per projection)."""
    from hydraopt import load_adapter_set

    aset = load_adapter_set(list(paths))
    rows: dict[str, list[tuple[float, float, float, float]]] = {}
    for spec in aset.modules:
        stack = aset.load_stack([spec])
        A, B = stack.A[0].double(), stack.B[0].double()  # (K, r, k), (K, d, r)
        K, r = A.shape[0], A.shape[1]
        mean_a = A.mean(0)
        drift = ((A - mean_a).flatten(1).norm(dim=1) / mean_a.norm()).mean()
        flat = B.flatten(1)
        flat = flat / flat.norm(dim=1, keepdim=True)
        cos = (flat @ flat.T)[~torch.eye(K, dtype=torch.bool)].mean()
        sv = torch.linalg.svdvals(B)  # (K, r)
        log_j = torch.arange(1, r + 1, dtype=torch.float64).log()
        decay = -((sv / sv[:, :1]).log() * log_j).sum(1) / log_j.square().sum()
        ratio = B.square().mean().sqrt() / A.square().mean().sqrt()
        proj = spec.name.rsplit(".", 1)[1]
        rows.setdefault(proj, []).append(
            (float(drift), float(ratio), float(cos), float(decay.mean()))
        )
    return {
        p: Calibration(*(round(sum(col) / len(col), 3) for col in zip(*v, strict=True)))
        for p, v in rows.items()
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--layers", type=int, help="only the first N layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--calibrate", nargs="*", type=Path, help="measure adapters instead")
    args = p.parse_args(argv)
    if args.calibrate is not None:
        paths = args.calibrate or sorted(REAL_ADAPTERS.glob("*/adapter_config.json"))
        paths = [x.parent if x.name == "adapter_config.json" else x for x in paths]
        for proj, calib in sorted(measure_calibration(paths).items()):
            print(f"{proj}: {calib}")
        return
    spec = SyntheticSpec(SHAPES[args.shape], seed=args.seed, layers=args.layers)
    dirs = ensure_adapters(spec, args.tasks, args.cache)
    print(f"{len(dirs)} adapters under {dirs[0].parent}")


if __name__ == "__main__":
    main()
