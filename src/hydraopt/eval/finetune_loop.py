"""The fine-tuning loop: AdamW with a warm-up/decay schedule on the target-token loss.

Adapter dropout can only draw from torch's global RNG (``nn.Dropout`` takes no generator); the
loop therefore runs inside ``torch.random.fork_rng`` with a seeded global RNG, which leaves the
caller's global RNG stream as it was.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from hydraopt.eval.finetune_config import FinetuneConfig
from hydraopt.eval.finetune_data import IGNORE_INDEX, batch_indices, collate
from hydraopt.progress import Progress


def lr_multiplier(step: int, warmup_steps: int, total_steps: int) -> float:
    """Factor on the peak learning rate for optimizer step ``step`` (0-based).

    Linear warm-up reaching 1 at step ``warmup_steps - 1``, then linear decay that would reach 0
    at ``total_steps``. Unlike transformers' ``get_linear_schedule_with_warmup`` the first step
    already has a non-zero rate, so no step is wasted.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def train(
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
        batches = batch_indices(len(data), config.batch_size, order)
        for step in bar.track(range(config.steps)):
            input_ids, attention_mask, labels = collate(
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
