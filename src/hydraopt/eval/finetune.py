"""Fine-tune one adapter per task on the base model, as the paper's adapters are made.

This module runs one fine-tune end to end: the data (:mod:`~hydraopt.eval.finetune_data`), the
loop (:mod:`~hydraopt.eval.finetune_loop`) and the saving are shared by every adapter kind; what
differs (how an adapter starts, what every task must share, which weights are saved) is the
kind's :meth:`~hydraopt.kinds.base.AdapterKind.finetune_recipe` (LoRA:
:mod:`hydraopt.kinds.lora.finetune`, VeRA: :mod:`hydraopt.kinds.vera.finetune`). Everything
random is seeded (from ``FinetuneConfig.seed`` unless said otherwise): the kind's start, the data
order, and adapter dropout (see :mod:`~hydraopt.eval.finetune_loop`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from hydraopt.eval.finetune_config import FinetuneConfig
from hydraopt.eval.finetune_data import encode_example
from hydraopt.eval.finetune_loop import train
from hydraopt.eval.model import base_model_name, load_base_model
from hydraopt.eval.tasks import load_split, load_task
from hydraopt.io.atomic import atomic_dir, check_output_dir
from hydraopt.kinds.registry import get_kind


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
        recipe = get_kind(config.adapter).finetune_recipe()
        peft_model = recipe.init(model, config)
        try:
            init_fingerprint = recipe.fingerprint(peft_model)
            record = train(peft_model, tokenizer, kept, config, progress, desc=spec.id)
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
