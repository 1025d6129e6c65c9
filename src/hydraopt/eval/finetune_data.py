"""Fine-tuning data: a task's examples as token ids with the loss on the target tokens only.

Prompt tokens are labelled ``IGNORE_INDEX``; the target is followed by the EOS token that ends the
assistant turn. Batches come from their own ``torch.Generator`` (a fresh permutation each epoch).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from hydraopt.eval.tasks import Example, TaskSpec, build_prompt

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt and padding)


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


def batch_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless batches of example indices; a new permutation each epoch, batches span epochs."""
    pending: list[int] = []
    while True:
        while len(pending) < batch_size:
            pending.extend(torch.randperm(n, generator=generator).tolist())
        yield pending[:batch_size]
        pending = pending[batch_size:]


def collate(
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
