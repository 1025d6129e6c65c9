"""Fine-tune one LoRA or VeRA adapter per task on the base model, as the paper's adapters are made.

Loss is on the target tokens only (prompt tokens are labelled -100; the target is followed by the
EOS token that ends the assistant turn). Both adapter kinds share the data pipeline, loss,
optimizer, schedule and saving; only the adapter's initialisation differs. Everything random is
seeded (from ``FinetuneConfig.seed`` unless said otherwise):

- the LoRA A matrices are drawn per module from a ``torch.Generator`` seeded by (seed, module
  name), independent of the task and of the global RNG, so every task's adapter starts from the
  SAME A for the same seed. HydraOpt relies on this: adapters that share their initial A keep
  similar A's after training, which is what makes one shared A' a good fit.
- the data order comes from its own ``torch.Generator`` (a fresh permutation each epoch).
- VeRA's frozen projections A and B come from PEFT's own generator seeded by
  ``FinetuneConfig.projection_prng_key`` (not by ``seed``): every task shares them, as merging
  VeRA adapters requires; its trained vectors start at constants (λb = 0, λd = ``d_initial``).
- adapter dropout can only draw from torch's global RNG (``nn.Dropout`` takes no generator); the
  training loop therefore runs inside ``torch.random.fork_rng`` with a seeded global RNG, which
  leaves the caller's global RNG stream as it was.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, VeraConfig, get_peft_model
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from hydraopt.eval.finetune_config import AdapterKind, FinetuneConfig
from hydraopt.eval.generate import lora_layers, lora_weights
from hydraopt.eval.model import base_model_name, load_base_model
from hydraopt.eval.tasks import Example, TaskSpec, build_prompt, load_split, load_task
from hydraopt.eval.vera_adapter import vera_projections
from hydraopt.io.atomic import atomic_dir, check_output_dir
from hydraopt.progress import Progress

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt and padding)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int) -> float:
    """Factor on the peak learning rate for optimizer step ``step`` (0-based).

    Linear warm-up reaching 1 at step ``warmup_steps - 1``, then linear decay that would reach 0
    at ``total_steps``. Unlike transformers' ``get_linear_schedule_with_warmup`` the first step
    already has a non-zero rate, so no step is wasted.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    spec: TaskSpec,
    example: Example,
    max_len: int,
    overlong: Literal["drop", "truncate"] = "drop",
) -> tuple[list[int], list[int]] | None:
    """Token ids and labels of one training example.

    Returns:
        ``(input_ids, labels)`` of equal length, prompt positions labelled ``IGNORE_INDEX``;
        ``None`` if the example does not fit ``max_len`` under the ``overlong`` policy.
    """
    prompt = build_prompt(tokenizer, spec, example.input)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(example.target, add_special_tokens=False)["input_ids"]
    target_ids = [*target_ids, tokenizer.eos_token_id]
    input_ids = prompt_ids + target_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + target_ids
    if len(input_ids) > max_len:
        if overlong == "drop" or len(prompt_ids) >= max_len:
            return None
        input_ids, labels = input_ids[:max_len], labels[:max_len]
    return input_ids, labels


def init_lora_model(model: PreTrainedModel, config: FinetuneConfig) -> PeftModel:
    """Wrap ``model`` in a trainable LoRA adapter whose A matrices depend only on the seed.

    Each module's A is drawn like PEFT's default (``kaiming_uniform_(a=sqrt(5))``, i.e.
    U(-1/sqrt(k), 1/sqrt(k))) but from a generator seeded by ``(config.seed, module name)``;
    B starts at zero, so the adapter starts as the identity update.

    Args:
        model: The base model (wrapped in place).
        config: Rank, alpha, dropout, target modules and seed.

    Returns:
        The ``PeftModel``, LoRA parameters trainable, base parameters frozen.
    """
    lora_config = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    # PEFT's own init draws from the global RNG; it is replaced below, and fork_rng keeps the
    # caller's global stream untouched.
    with torch.random.fork_rng(devices=[]):
        peft_model = get_peft_model(model, lora_config)
    with torch.no_grad():
        for name, layer in lora_layers(peft_model).items():
            generator = torch.Generator().manual_seed(module_seed(config.seed, name))
            lora_a, lora_b = lora_weights(layer)  # (r, k), (d, r)
            torch.nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generator)
            lora_b.zero_()
    return peft_model


def module_seed(seed: int, module_name: str) -> int:
    """A 63-bit seed from (seed, module name), stable across processes and platforms."""
    digest = hashlib.sha256(f"{seed}:{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def lora_A_fingerprint(peft_model: PeftModel, adapter_name: str = "default") -> str:
    """sha256 over every module's A (float32, sorted by module name).

    Recorded before training in ``training.json`` as ``init_A_sha256``: adapters with equal
    fingerprints started from the same A.
    """
    digest = hashlib.sha256()
    for name, layer in lora_layers(peft_model).items():
        weight = lora_weights(layer, adapter_name)[0].detach().to(torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(weight.numpy().tobytes())
    return digest.hexdigest()


def init_vera_model(model: PreTrainedModel, config: FinetuneConfig) -> PeftModel:
    """Wrap ``model`` in a trainable VeRA adapter whose projections depend only on the PRNG key.

    PEFT draws the shared projections A (vera_r, k_max) and B (d_max, vera_r) from a
    ``torch.Generator`` seeded by ``projection_prng_key`` (Kaiming uniform) and saves them with
    the adapter (``save_projection=True``), so a saved adapter does not depend on PEFT
    regenerating them identically elsewhere. The trained vectors start at constants, so the
    adapter starts as the identity update whatever the seed.

    Args:
        model: The base model (wrapped in place).
        config: ``vera_r``, ``vera_dropout``, ``d_initial``, ``projection_prng_key`` and the
            target modules.

    Returns:
        The ``PeftModel``, λb and λd of every module trainable, everything else frozen.
    """
    vera_config = VeraConfig(
        r=config.vera_r,
        target_modules=list(config.target_modules),
        projection_prng_key=config.projection_prng_key,
        save_projection=True,
        vera_dropout=config.vera_dropout,
        d_initial=config.d_initial,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # PEFT draws a throw-away λd from the global RNG before filling it with d_initial; fork_rng
    # keeps the caller's global stream untouched.
    with torch.random.fork_rng(devices=[]):
        return get_peft_model(model, vera_config)


def vera_projection_fingerprint(peft_model: PeftModel, adapter_name: str = "default") -> str:
    """sha256 over VeRA's shared projections A and B (float32).

    Recorded in ``training.json`` as ``projection_sha256``: VeRA adapters with equal
    fingerprints share their frozen projections and can be merged vector by vector.
    """
    digest = hashlib.sha256()
    for name, weight in zip("AB", vera_projections(peft_model, adapter_name), strict=True):
        digest.update(name.encode())
        digest.update(weight.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class _AdapterRecipe:
    """What differs between adapter kinds: how to start one and which weights it saves.

    Attributes:
        init: Wraps the base model in a fresh trainable adapter.
        fingerprint_key: ``training.json`` key of ``fingerprint``'s digest.
        fingerprint: Digest of what every task must share (LoRA's initial A, VeRA's
            projections).
        saves: Whether a ``state_dict`` key is one of the adapter's saved tensors.
    """

    init: Callable[[PreTrainedModel, FinetuneConfig], PeftModel]
    fingerprint_key: str
    fingerprint: Callable[[PeftModel], str]
    saves: Callable[[str], bool]


_RECIPES: dict[AdapterKind, _AdapterRecipe] = {
    "lora": _AdapterRecipe(
        init_lora_model, "init_A_sha256", lora_A_fingerprint, lambda key: "lora_" in key
    ),
    # λb/λd of every module, and the shared projections once (PEFT saves them from
    # base_model.vera_A / vera_B; the per-layer references to them are not separate tensors).
    "vera": _AdapterRecipe(
        init_vera_model,
        "projection_sha256",
        vera_projection_fingerprint,
        lambda key: (
            "vera_lambda_" in key or key.startswith(("base_model.vera_A.", "base_model.vera_B."))
        ),
    ),
}


def finetune(
    task_dir: str | Path,
    out_dir: str | Path,
    config: FinetuneConfig = FinetuneConfig(),  # noqa: B008  (frozen, so sharing it is safe)
    *,
    model_path: str | Path | None = None,
    base: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Train one LoRA or VeRA adapter on a task's train split and save it as a PEFT adapter dir.

    Args:
        task_dir: The task folder (``task.json`` + ``train.jsonl``).
        out_dir: Where the adapter dir goes; written atomically (temp dir beside it, renamed).
        config: Training settings.
        model_path: Base model to load (see ``load_base_model``); with ``base`` given, only
            names it in the adapter config.
        base: An already loaded ``(model, tokenizer)``; it is wrapped during training and
            restored (adapter removed, eval mode, original ``requires_grad`` flags) afterwards.
        overwrite: Replace an existing ``out_dir`` (only once the new one is complete).
        progress: Show a tqdm bar with loss and tokens/s.

    Returns:
        ``out_dir``, holding ``adapter_config.json``, ``adapter_model.safetensors`` (float16;
        for VeRA the shared projections too) and ``training.json`` (settings, step count, wall
        time, losses, and the fingerprint of what every task shares: ``init_A_sha256`` for
        LoRA, ``projection_sha256`` for VeRA).

    Raises:
        ValueError: If ``out_dir`` exists and ``overwrite`` is false, or no training example
            fits ``max_len``.
    """
    out = Path(out_dir)
    check_output_dir(out, force=overwrite)  # fail before minutes of training, not after
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        # ``model_path`` names the base also when the caller hands the loaded model in ``base``.
        base_name = base_model_name(model_path)
        if base is None:
            model, tokenizer = load_base_model(model_path)
        else:
            model, tokenizer = base
        spec = load_task(task_dir)
        examples = load_split(task_dir, "train")
        encoded = [
            encode_example(tokenizer, spec, e, config.max_len, config.overlong) for e in examples
        ]
        kept = [pair for pair in encoded if pair is not None]
        if not kept:
            raise ValueError(
                f"no training example of {spec.id} fits max_len={config.max_len}; raise max_len"
            )
        requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        recipe = _RECIPES[config.adapter]
        peft_model = recipe.init(model, config)
        try:
            init_fingerprint = recipe.fingerprint(peft_model)
            record = _train(peft_model, tokenizer, kept, config, progress, desc=spec.id)
            with atomic_dir(out, force=overwrite) as tmp:
                _save_adapter(peft_model, tmp, base_name, recipe.saves)
                summary = {
                    "task": spec.id,
                    "instruction": spec.instruction,
                    **config.record(),
                    "examples_seen": config.steps * config.batch_size,
                    "train_examples": len(examples),
                    "train_examples_used": len(kept),
                    "train_examples_skipped_overlong": len(examples) - len(kept),
                    "optimizer": "AdamW (betas 0.9/0.999, eps 1e-8)",
                    "schedule": "linear warm-up then linear decay (hydraopt lr_multiplier)",
                    "loss": "mean cross-entropy over target tokens + EOS; prompt masked",
                    recipe.fingerprint_key: init_fingerprint,
                    "base_model": base_name,
                    "dtype": str(next(model.parameters()).dtype),
                    "versions": _versions(),
                    **record,
                }
                (tmp / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
        finally:
            restored = peft_model.unload()
            for name, parameter in restored.named_parameters():
                parameter.requires_grad_(requires_grad.get(name, parameter.requires_grad))
            restored.eval()
    finally:
        torch.set_num_threads(previous_threads)
    return out


def _train(
    peft_model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    data: list[tuple[list[int], list[int]]],
    config: FinetuneConfig,
    progress: bool,
    desc: str,
) -> dict[str, object]:
    """The optimisation loop; returns what training.json records about the run."""
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    order = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    tokens_total = 0
    peft_model.train()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # only adapter dropout draws from it; see module docstring
        bar = Progress(config.steps, f"finetune {desc}", "step", enabled=progress)
        batches = _batch_indices(len(data), config.batch_size, order)
        for step in bar.track(range(config.steps)):
            input_ids, attention_mask, labels = _collate(
                [data[i] for i in next(batches)], tokenizer.pad_token_id
            )
            step_start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * lr_multiplier(
                    step, config.warmup_steps, config.steps
                )
            loss = target_loss(peft_model, input_ids, attention_mask, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            tokens = int(attention_mask.sum())
            tokens_total += tokens
            losses.append(loss.item())
            rate = tokens / max(time.perf_counter() - step_start, 1e-9)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:.0f}")
    wall = time.perf_counter() - start
    peft_model.eval()
    tail = losses[-10:]
    return {
        "steps_done": len(losses),
        "wall_time_s": round(wall, 2),
        "tokens": tokens_total,
        "tokens_per_s": round(tokens_total / wall, 1),
        "final_loss": losses[-1],
        "final_loss_mean_last_10": sum(tail) / len(tail),
        "loss_history": losses,
    }


def target_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (target) tokens.

    Only positions that predict a labelled token go through the LM head (``logits_to_keep``):
    with a 49k vocabulary the head over every prompt position cost about as much as the rest of
    a training step on CPU, and those logits carry no loss anyway. The result equals the loss
    over full logits.

    Args:
        model: A transformers causal LM (or a ``PeftModel`` around one).
        input_ids: (B, T) token ids.
        attention_mask: (B, T) 1 for real tokens, 0 for padding.
        labels: (B, T) token ids where there is loss, ``IGNORE_INDEX`` elsewhere.

    Returns:
        The scalar loss.
    """
    targets = labels[:, 1:]  # (B, T - 1): position t predicts token t + 1
    positions = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # (P,)
    if positions.numel() == 0:
        raise ValueError("batch has no labelled token")
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=positions
    ).logits  # (B, P, V)
    return F.cross_entropy(
        logits.flatten(0, 1).float(),  # (B * P, V)
        targets[:, positions].flatten(),  # (B * P,)
        ignore_index=IGNORE_INDEX,
    )


def _batch_indices(n: int, batch_size: int, generator: torch.Generator):
    """Endless batches of example indices; a new permutation each epoch, batches span epochs."""
    pending: list[int] = []
    while True:
        while len(pending) < batch_size:
            pending.extend(torch.randperm(n, generator=generator).tolist())
        yield pending[:batch_size]
        pending = pending[batch_size:]


def _collate(
    rows: list[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch (training needs no left padding: nothing is generated after the row)."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, (ids, row_labels) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.tensor(row_labels)
    return input_ids, attention_mask, labels


def _save_adapter(
    peft_model: PeftModel, directory: Path, base_name: str, saves: Callable[[str], bool]
) -> None:
    """save_pretrained with the adapter's weights (``saves`` picks their keys) in float16, like
    the reference adapters.

    The config records ``base_name`` (a portable model name, not where this machine keeps the
    file) and PEFT's generated model card, which only repeats local paths, is dropped.
    """
    state = {
        key: value.detach().to(torch.float16)
        for key, value in peft_model.state_dict().items()
        if saves(key)
    }
    # No embedding layers are trained; "auto" would look for a config.json (a GGUF has none).
    peft_model.save_pretrained(
        str(directory), safe_serialization=True, save_embedding_layers=False, state_dict=state
    )
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_name
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    (directory / "README.md").unlink(missing_ok=True)


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("hydraopt", "torch", "transformers", "peft"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions
