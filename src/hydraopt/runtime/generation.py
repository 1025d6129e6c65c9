"""Decoding rows that may belong to different tasks and want different settings, with rows
joining and leaving the batch between steps (continuous batching).

Same conventions as :mod:`hydraopt.eval.generate` (and transformers' ``generate``), so greedy
outputs agree token for token with PEFT: left padding, position ids from the attention mask's
cumulative sum, a KV cache, logits of the last position in float32, and stopping at the
tokenizer's and the model's EOS ids. Each row carries its own :class:`SamplingParams` (cap,
temperature, stop strings), which ``generate`` cannot do in one call: a server batch mixes them.
:class:`Decoder` is the batch the server keeps running; :func:`decode` runs a list of requests
through one; :func:`generate_batch` is one batch of them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch.nn import functional as F

from hydraopt.runtime import kv_cache


class RuntimeModel(Protocol):
    """What decoding needs of :class:`hydraopt.runtime.model.RuntimeModel` (a protocol, so that
    this module and the model's module do not import each other)."""

    model: Any  # a transformers causal LM with the routed layers installed
    tokenizer: Any

    def routed(self, tasks: Sequence[str] | torch.Tensor) -> AbstractContextManager[None]: ...

    def task_ids(self, tasks: Sequence[str]) -> torch.Tensor: ...


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


# Called with (row key, text so far) after each step that changed a row's text; for streaming.
OnText = Callable[[Hashable, str], None]


@dataclass(frozen=True)
class RowRequest:
    """One prompt to decode.

    Attributes:
        key: the caller's name for the row (results and ``on_text`` calls carry it).
        prompt_ids: the prompt's token ids (non-empty).
        task: the task name.
        params: its decoding settings.
    """

    key: Hashable
    prompt_ids: Sequence[int]
    task: str
    params: SamplingParams


@dataclass
class _Row:
    """A row being decoded: its request, what it generated, the token chosen but not yet fed."""

    request: RowRequest
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    text: str = ""
    pending: int = -1


def stop_ids_of(runtime: RuntimeModel) -> set[int]:
    """EOS ids of the tokenizer and of the model's generation config (as eval/generate does)."""
    from hydraopt.eval.generate import stop_token_ids

    return set(stop_token_ids(runtime.model, runtime.tokenizer))


class Decoder:
    """A batch of rows decoding together, which rows may join and leave between steps.

    :meth:`add` prefills new rows in a forward pass of their own (left-padded among themselves)
    and appends them to the running batch: the caches are aligned by left-padding the shorter
    one (columns the attention mask hides), so a row joins at the next decode step without
    waiting for the others. :meth:`step` feeds every row its last chosen token, one forward pass
    for the whole batch, each row routed to its task. A row that finishes (EOS, a stop string,
    its ``max_new_tokens``) leaves at once: its cache row is dropped, and so are leading columns
    that no remaining row uses. Each row keeps its own positions, settings and sampling
    generator, so its tokens do not depend on what else is in the batch.

    Args:
        runtime: the model with its bundle installed.
        on_text: optional callback after each step that produced a token (streaming).
    """

    def __init__(self, runtime: RuntimeModel, *, on_text: OnText | None = None) -> None:
        self.runtime = runtime
        self.on_text = on_text
        self._empty()
        self._pad = int(runtime.tokenizer.pad_token_id)
        self._stops = stop_ids_of(runtime)
        # transformers 5 names the KV cache argument `cache`, 4.x `past_key_values`.
        forward_params = inspect.signature(runtime.model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_params else "past_key_values"

    def _empty(self) -> None:
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask = torch.zeros((0, 0), dtype=torch.long)  # (B, T) 1 = a real position
        self.positions = torch.zeros(0, dtype=torch.long)  # (B,) position of the pending token
        self.task_ids = torch.zeros(0, dtype=torch.long)  # (B,) task index per row

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, requests: Sequence[RowRequest]) -> list[tuple[Hashable, Generation]]:
        """Prefill ``requests`` and let them join the batch.

        Returns:
            (key, result) of the new rows that finished at their first token.
        """
        if not requests:
            return []
        if any(len(r.prompt_ids) == 0 for r in requests):
            raise ValueError("every prompt needs at least one token")
        task_ids = self.runtime.task_ids([r.task for r in requests])  # (B',) KeyError if unknown
        B, L = len(requests), max(len(r.prompt_ids) for r in requests)
        input_ids = torch.full((B, L), self._pad, dtype=torch.long)  # (B', L) left-padded
        mask = torch.zeros((B, L), dtype=torch.long)  # (B', L)
        for b, r in enumerate(requests):
            input_ids[b, L - len(r.prompt_ids) :] = torch.tensor(list(r.prompt_ids))
            mask[b, L - len(r.prompt_ids) :] = 1
        # transformers' generate: position = number of real tokens before, pads get a dummy 0.
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (B', L)
        logits, cache = self._forward(input_ids, mask, positions, task_ids, None)
        rows = [_Row(r, _generator(r.params, self.runtime.model.device)) for r in requests]
        finished, keep = self._advance(rows, logits)
        if not keep:
            return finished
        kept = torch.tensor(keep, dtype=torch.long)
        if len(keep) < B:
            kv_cache.select_rows(cache, kept)
        self._join(
            [rows[i] for i in keep], cache, mask[kept], positions[kept, -1] + 1, task_ids[kept]
        )
        return finished

    def step(self) -> list[tuple[Hashable, Generation]]:
        """One decode step of every row; returns (key, result) of the rows that finished."""
        if not self.rows:
            return []
        B = len(self.rows)
        ids = torch.tensor([row.pending for row in self.rows])[:, None]  # (B, 1)
        mask = torch.cat([self.mask, torch.ones((B, 1), dtype=torch.long)], dim=1)  # (B, T+1)
        logits, self.cache = self._forward(
            ids, mask, self.positions[:, None], self.task_ids, self.cache
        )
        self.mask, self.positions = mask, self.positions + 1
        finished, keep = self._advance(self.rows, logits)
        if len(keep) < B:
            self._keep(keep)
        return finished

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        task_ids: torch.Tensor,
        cache: Any,
    ) -> tuple[torch.Tensor, Any]:
        """(B, V) float32 logits of the last position, and the cache after the pass."""
        device = self.runtime.model.device
        with self.runtime.routed(task_ids), torch.inference_mode():
            out = self.runtime.model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_arg: cache},
            )
        return out.logits[:, -1, :].float(), out[self._cache_arg]

    def _advance(
        self, rows: list[_Row], logits: torch.Tensor
    ) -> tuple[list[tuple[Hashable, Generation]], list[int]]:
        """Choose each row's next token; the finished rows' results and the others' indices."""
        next_ids = _choose(logits, [r.request.params for r in rows], [r.generator for r in rows])
        tokenizer = self.runtime.tokenizer
        finished: list[tuple[Hashable, Generation]] = []
        keep: list[int] = []
        for b, row in enumerate(rows):
            token, params = int(next_ids[b]), row.request.params
            finish = _advance(tokenizer, row.generated, token, self._stops, params)
            # Decoding the text so far costs a detokenisation of every token each step (quadratic
            # in the answer's length): done only for a streaming callback and when the row ends.
            if self.on_text is not None or finish is not None:
                row.text = _text(tokenizer, row.generated, params.stop)
            if self.on_text is not None:
                self.on_text(row.request.key, row.text)
            if finish is None:
                row.pending = token
                keep.append(b)
            else:
                result = Generation(tuple(row.generated), row.text, finish)
                finished.append((row.request.key, result))
        return finished, keep

    def _join(
        self,
        rows: list[_Row],
        cache: Any,
        mask: torch.Tensor,
        positions: torch.Tensor,
        task_ids: torch.Tensor,
    ) -> None:
        """Append prefilled rows; the shorter side's cache and mask are left-padded."""
        if not self.rows:
            self.rows, self.cache, self.mask = rows, cache, mask
            self.positions, self.task_ids = positions, task_ids
            return
        mine, theirs = self.mask.shape[1], mask.shape[1]
        if mine < theirs:
            kv_cache.left_pad(self.cache, theirs - mine)
            self.mask = F.pad(self.mask, (theirs - mine, 0))
        elif theirs < mine:
            kv_cache.left_pad(cache, mine - theirs)
            mask = F.pad(mask, (mine - theirs, 0))
        kv_cache.join_rows(self.cache, cache)
        self.rows = self.rows + rows
        self.mask = torch.cat([self.mask, mask])
        self.positions = torch.cat([self.positions, positions])
        self.task_ids = torch.cat([self.task_ids, task_ids])

    def _keep(self, keep: list[int]) -> None:
        """Keep rows ``keep``; drop the leading columns none of them uses."""
        if not keep:
            self._empty()
            return
        kept = torch.tensor(keep, dtype=torch.long)
        self.rows = [self.rows[i] for i in keep]
        kv_cache.select_rows(self.cache, kept)
        self.mask = self.mask[kept]
        self.positions, self.task_ids = self.positions[kept], self.task_ids[kept]
        start = int(self.mask.any(dim=0).long().argmax())  # first column some row uses
        kv_cache.drop_columns(self.cache, start)
        self.mask = self.mask[:, start:]


def decode(
    runtime: RuntimeModel,
    requests: Sequence[RowRequest],
    *,
    max_batch: int | None = None,
    on_text: OnText | None = None,
) -> list[Generation]:
    """Decode every request with continuous batching: at most ``max_batch`` rows at a time, a
    waiting request joining as soon as a row leaves.

    Returns:
        One :class:`Generation` per request, in order.
    """
    if len({r.key for r in requests}) != len(requests):
        raise ValueError("request keys must be distinct")
    limit = max_batch or max(len(requests), 1)
    decoder = Decoder(runtime, on_text=on_text)
    done: dict[Hashable, Generation] = {}
    waiting = list(requests)[::-1]  # popped from the end: in order
    while waiting or decoder:
        room = limit - len(decoder)
        if waiting and room > 0:
            joining = [waiting.pop() for _ in range(min(room, len(waiting)))]
            done.update(decoder.add(joining))
        done.update(decoder.step())
    return [done[r.key] for r in requests]


def generate_batch(
    runtime: RuntimeModel,
    prompt_ids: Sequence[Sequence[int]],
    tasks: Sequence[str],
    params: Sequence[SamplingParams],
    *,
    on_text: Callable[[int, str], None] | None = None,
) -> list[Generation]:
    """Decode every row of one batch, row ``b`` under ``tasks[b]`` with ``params[b]``.

    All rows are prefilled together; a row leaves the batch as soon as it finishes.

    Args:
        runtime: the model with its bundle installed.
        prompt_ids: token ids of each prompt (non-empty).
        tasks: the task of each row.
        params: the decoding settings of each row.
        on_text: optional callback (row index, text so far) after each step (streaming).

    Returns:
        One :class:`Generation` per row.
    """
    if not (len(prompt_ids) == len(tasks) == len(params)):
        raise ValueError("prompt_ids, tasks and params must have one entry per row")
    requests = [
        RowRequest(b, ids, task, p)
        for b, (ids, task, p) in enumerate(zip(prompt_ids, tasks, params, strict=True))
    ]
    return decode(runtime, requests, on_text=on_text)  # type: ignore[arg-type]


def _generator(params: SamplingParams, device: Any) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    return torch.Generator(device=device).manual_seed(params.seed or 0)


def _choose(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """(B,) next token per row: argmax for greedy rows, a draw for sampling rows."""
    next_ids = logits.argmax(dim=-1)  # (B,)
    for b, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.temperature > 0:  # greedy rows need no softmax
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
