"""Batched greedy decoding, with the base model, a PEFT adapter dir (LoRA or VeRA), or in-memory
LoRA factors or VeRA weights.

Decoding is greedy (``do_sample=False``, one beam), so an output depends only on the weights and
the prompt: left padding keeps each row's last prompt token at the last position and the
attention mask hides the pads, which makes a batched run agree with one-prompt-at-a-time runs
(tests/integration check this on the real model).

Adapters are applied by wrapping the base model in a ``peft.PeftModel`` in place; call
:func:`remove_adapters` (or use :func:`applied_adapter`) to get the bare base model back, so one
loaded base model can serve many adapters in turn.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, cast

import torch
from peft import PeftModel
from transformers import GenerationConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from hydraopt.kinds.lora.apply import LoraFactorMap, apply_lora_factors
from hydraopt.kinds.peft_inject import quiet_peft
from hydraopt.progress import Progress


class AppliedWeights(Protocol):
    """In-memory adapter weights that know how to wrap a base model (e.g. VeRA's
    :class:`~hydraopt.kinds.vera.apply.VeraWeights`)."""

    def apply(self, model: PreTrainedModel) -> PeftModel:
        """Wrap ``model`` (a bare base model) in a ``PeftModel`` carrying these weights."""
        ...


def stop_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end a generated answer: the tokenizer's EOS plus the model's own.

    For SmolLM2-Instruct both are ``<|im_end|>``, the end of the assistant turn.
    """
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        for token_id in [configured] if isinstance(configured, int) else configured:
            if int(token_id) not in ids:
                ids.append(int(token_id))
    if not ids:
        raise ValueError("neither the tokenizer nor the model defines an EOS token to stop at")
    return ids


def generate(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 8,
    *,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Greedy-decode a continuation for every prompt.

    Args:
        model: A causal LM (a transformers model or a ``PeftModel`` around one).
        tokenizer: Its tokenizer; must pad on the left and have a pad token (see
            ``hydraopt.eval.model.load_base_model``).
        prompts: Fully formatted prompts (e.g. from ``build_prompt``); tokenized without adding
            special tokens, since a chat template already holds them.
        max_new_tokens: Cap on generated tokens per prompt.
        batch_size: Prompts per forward batch.
        progress: Show a tqdm bar (counts prompts).
        desc: Label of the progress bar.

    Returns:
        One decoded continuation per prompt, in the order of ``prompts``, cut at the first stop
        token, without special tokens, stripped of surrounding whitespace.

    Raises:
        ValueError: For a non-positive cap or batch size, or a tokenizer that pads on the right.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer.padding_side != "left" or tokenizer.pad_token_id is None:
        raise ValueError(
            "generation needs a tokenizer with padding_side='left' and a pad token "
            "(hydraopt.eval.model.configure_tokenizer sets both)"
        )
    if not prompts:
        return []
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    # Longest first: rows of a batch have similar lengths (little padding), and the batch that
    # needs the most memory runs first, so an out-of-memory error shows at once.
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
    stops = stop_token_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
    )
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()  # LoRA dropout would make greedy decoding random
    try:
        with (
            torch.inference_mode(),
            Progress(len(prompts), desc, "prompt", enabled=progress) as bar,
        ):
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = tokenizer.pad(
                    {"input_ids": [encoded[i] for i in rows]}, padding=True, return_tensors="pt"
                )
                # nn.Module's __getattr__ typing hides generate() from mypy.
                sequences = model.generate(  # type: ignore[operator]
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    generation_config=config,
                )  # (B, T_prompt + T_new)
                new_tokens = sequences[:, batch["input_ids"].shape[1] :]  # (B, T_new)
                for row, tokens in zip(rows, new_tokens.tolist(), strict=True):
                    outputs[row] = _decode_until_stop(tokenizer, tokens, stops)
                bar.update(len(rows))
    finally:
        model.train(was_training)
    return outputs


def _decode_until_stop(
    tokenizer: PreTrainedTokenizerBase, tokens: list[int], stops: list[int]
) -> str:
    # Rows that finish early are filled with pad ids; cut at the first stop token rather than
    # relying on pad == EOS, which holds for SmolLM2 but not for every tokenizer.
    for position, token in enumerate(tokens):
        if token in stops:
            tokens = tokens[:position]
            break
    return cast(str, tokenizer.decode(tokens, skip_special_tokens=True)).strip()


def apply_peft_adapter(
    model: PreTrainedModel | PeftModel, adapter_dir: str | Path, *, adapter_name: str = "default"
) -> PeftModel:
    """Load a PEFT adapter dir onto the model, for inference, and make it the active adapter.

    Args:
        model: A base model (wrapped in place) or a ``PeftModel`` (the adapter is added).
        adapter_dir: Local folder with ``adapter_config.json`` and the adapter weights.
        adapter_name: Name of the adapter inside the ``PeftModel``.

    Returns:
        The ``PeftModel`` in eval mode.

    Raises:
        FileNotFoundError: If ``adapter_dir`` has no ``adapter_config.json`` (checked here
            because PEFT would otherwise take the path for a Hub repo id and go online).
    """
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter dir (no adapter_config.json)")
    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=False)
        model.set_adapter(adapter_name)
        return model.eval()
    with quiet_peft():
        peft_model = PeftModel.from_pretrained(
            model, str(adapter_dir), adapter_name=adapter_name, is_trainable=False
        )
    return peft_model.eval()


def remove_adapters(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    """Strip every adapter layer and return the bare base model (its weights untouched).

    Args:
        model: A ``PeftModel``, or a base model (returned as is).

    Returns:
        The base model, in eval mode.
    """
    base = cast(PreTrainedModel, model.unload()) if isinstance(model, PeftModel) else model
    return base.eval()


@contextmanager
def applied_adapter(
    model: PreTrainedModel, adapter: str | Path | LoraFactorMap | AppliedWeights | None
) -> Iterator[torch.nn.Module]:
    """Run a block with an adapter applied, then restore the bare base model.

    Args:
        model: A base model (not a ``PeftModel``).
        adapter: ``None`` (the base model itself), a PEFT adapter dir (LoRA or VeRA), in-memory
            LoRA factors (see :func:`apply_lora_factors`) or weights with an ``apply`` method
            (VeRA's, see :func:`hydraopt.kinds.vera.apply.apply_vera_weights`).

    Yields:
        The model to generate with.
    """
    if adapter is None:
        yield model
        return
    if isinstance(adapter, (str, Path)):
        adapted = apply_peft_adapter(model, adapter)
    elif isinstance(adapter, Mapping):
        adapted = apply_lora_factors(model, adapter)
    else:
        adapted = adapter.apply(model)
    try:
        yield adapted
    finally:
        remove_adapters(adapted)
