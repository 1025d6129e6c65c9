"""Decoding one batch whose rows may belong to different tasks and want different settings.

Same conventions as :mod:`hydraopt.eval.generate` (and transformers' ``generate``), so greedy
outputs agree token for token with PEFT: left padding, position ids from the attention mask's
cumulative sum, a KV cache, logits of the last position in float32, and stopping at the
tokenizer's and the model's EOS ids. Each row carries its own :class:`SamplingParams` (cap,
temperature, stop strings), which ``generate`` cannot do in one call: a server batch mixes them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch


class RuntimeModel(Protocol):
    """What decoding needs of :class:`hydraopt.runtime.model.RuntimeModel` (a protocol, so that
    this module and the model's module do not import each other)."""

    model: Any  # a transformers causal LM with the routed layers installed
    tokenizer: Any

    def routed(self, tasks: Sequence[str] | torch.Tensor) -> AbstractContextManager[None]: ...


FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How one row is decoded.

    Attributes:
        max_new_tokens: cap on generated tokens (>= 1).
        temperature: 0 for greedy decoding; > 0 samples from softmax(logits / temperature).
        stop: strings that end the answer (the text is cut before the first one).
        seed: seed of the row's own ``torch.Generator`` when sampling (None: seed 0), so a
            sampled answer does not depend on what else is in the batch.
        ignore_eos: keep going past EOS up to the cap (benchmarks: equal token counts).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


@dataclass(frozen=True)
class Generation:
    """One row's result.

    Attributes:
        token_ids: generated token ids, without the stop token.
        text: their decoded text (special tokens skipped), cut before a stop string.
        finish_reason: ``stop`` (EOS or a stop string) or ``length`` (the cap).
    """

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason


# Called with (row, text so far) after each step that changed a row's text; for streaming.
OnText = Callable[[int, str], None]


def stop_ids_of(runtime: RuntimeModel) -> set[int]:
    """EOS ids of the tokenizer and of the model's generation config (as eval/generate does)."""
    from hydraopt.eval.generate import stop_token_ids

    return set(stop_token_ids(runtime.model, runtime.tokenizer))


def generate_batch(
    runtime: RuntimeModel,
    prompt_ids: Sequence[Sequence[int]],
    tasks: Sequence[str],
    params: Sequence[SamplingParams],
    *,
    on_text: OnText | None = None,
) -> list[Generation]:
    """Decode every row of one batch, row ``b`` under ``tasks[b]`` with ``params[b]``.

    Args:
        runtime: the model with its bundle installed.
        prompt_ids: token ids of each prompt (non-empty).
        tasks: the task of each row.
        params: the decoding settings of each row.
        on_text: optional callback after each step (streaming).

    Returns:
        One :class:`Generation` per row.
    """
    if not (len(prompt_ids) == len(tasks) == len(params)):
        raise ValueError("prompt_ids, tasks and params must have one entry per row")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    tokenizer, model = runtime.tokenizer, runtime.model
    device = model.device
    B, L = len(prompt_ids), max(len(p) for p in prompt_ids)
    pad = int(tokenizer.pad_token_id)
    input_ids = torch.full((B, L), pad, dtype=torch.long)  # (B, L) left-padded
    mask = torch.zeros((B, L), dtype=torch.long)  # (B, L)
    for b, ids in enumerate(prompt_ids):
        input_ids[b, L - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        mask[b, L - len(ids) :] = 1
    # transformers' generate: position = number of real tokens before, pads get a dummy 0.
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (B, L)
    # transformers 5 names the KV cache argument `cache`, 4.x `past_key_values`.
    params_of_forward = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params_of_forward else "past_key_values"
    stops = stop_ids_of(runtime)
    generators = [
        torch.Generator(device=device).manual_seed(p.seed or 0) if p.temperature > 0 else None
        for p in params
    ]
    generated: list[list[int]] = [[] for _ in range(B)]
    texts = [""] * B
    finish: list[FinishReason | None] = [None] * B
    steps = max(p.max_new_tokens for p in params)
    cache = None
    step_ids, step_mask, step_pos = input_ids, mask, positions
    with runtime.routed(tasks), torch.inference_mode():
        for _ in range(steps):
            out = model(
                input_ids=step_ids.to(device),
                attention_mask=step_mask.to(device),
                position_ids=step_pos.to(device),
                use_cache=True,
                logits_to_keep=1,
                **{cache_arg: cache},
            )
            cache = out[cache_arg]
            logits = out.logits[:, -1, :].float()  # (B, V)
            next_ids = _choose(logits, params, generators)  # (B,)
            for b in range(B):
                if finish[b] is not None:
                    next_ids[b] = pad  # finished rows ride along; their output is not read
                    continue
                finish[b] = _advance(tokenizer, generated[b], int(next_ids[b]), stops, params[b])
                texts[b] = _text(tokenizer, generated[b], params[b].stop)
                if on_text is not None:
                    on_text(b, texts[b])
            if all(f is not None for f in finish):
                break
            step_mask = torch.cat([step_mask, torch.ones((B, 1), dtype=torch.long)], dim=1)
            step_pos = step_pos[:, -1:] + 1  # (B, 1)
            step_ids = next_ids[:, None].cpu()  # (B, 1)
    return [Generation(tuple(generated[b]), texts[b], finish[b] or "length") for b in range(B)]


def _choose(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """(B,) next token per row: argmax for greedy rows, a draw for sampling rows."""
    next_ids = logits.argmax(dim=-1)  # (B,)
    for b, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.temperature > 0:
            probs = torch.softmax(logits[b] / p.temperature, dim=-1)  # (V,)
            next_ids[b] = torch.multinomial(probs, 1, generator=gen)[0]
    return next_ids.cpu()


def _advance(
    tokenizer: object, generated: list[int], token: int, stops: set[int], p: SamplingParams
) -> FinishReason | None:
    """Append ``token`` to a row; return why the row finished, or None."""
    if token in stops and not p.ignore_eos:
        return "stop"
    generated.append(token)
    if p.stop and any(s in _decode(tokenizer, generated) for s in p.stop):
        return "stop"
    return "length" if len(generated) >= p.max_new_tokens else None


def _decode(tokenizer: object, ids: list[int]) -> str:
    return str(tokenizer.decode(ids, skip_special_tokens=True))  # type: ignore[attr-defined]


def _text(tokenizer: object, ids: list[int], stop: tuple[str, ...]) -> str:
    text = _decode(tokenizer, ids)
    cuts = [text.index(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text
