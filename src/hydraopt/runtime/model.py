"""A base model with a bundle installed: shared factors held once, any task per batch row.

:func:`load_model` loads a base causal LM (the packaged SmolLM2-135M GGUF by default, any local
Hugging Face dir or GGUF otherwise) and replaces every adapted linear layer by a
:class:`~hydraopt.runtime.layer.RoutedLinear`. Switching task is choosing a different index per
row: nothing is copied, merged or unloaded between requests.

Base-model check: bundles record ``base_model_name_or_path`` as the adapters did, often a hub id
(``HuggingFaceTB/SmolLM2-135M-Instruct``) that says nothing about the file given here. What must
hold is structural, so that is what is checked: every module of the bundle must be an
``nn.Linear`` of the loaded model with exactly the bundle's (out, in) features. A model that fails
is refused before anything is installed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hydraopt.errors import HydraoptError
from hydraopt.runtime.factors import ModuleFactors, SharedFactors, shared_factors
from hydraopt.runtime.layer import RoutedLinear, TaskRows

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    from hydraopt.runtime.generation import Generation, SamplingParams
    from hydraopt.types import Bundle, VeraBundle


class RuntimeModel:
    """A base model serving every task of one bundle.

    Args:
        model: the base causal LM (modified in place: adapted linears are wrapped).
        tokenizer: its tokenizer (left padding and a pad token, see
            :func:`hydraopt.eval.model.configure_tokenizer`).
        factors: the bundle's :class:`SharedFactors`; ``self.factors`` afterwards refers to the
            installed layers' tensors instead, so the caller may drop these.

    Raises:
        HydraoptError: if the bundle's modules do not fit the model (see module doc).
    """

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, factors: SharedFactors
    ) -> None:
        check_base_model(model, factors)
        self.model = model
        self.tokenizer = tokenizer
        self.rows = TaskRows()
        self._task_index = {task: i for i, task in enumerate(factors.tasks)}
        installed = {}
        for name, module_factors in factors.modules.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = RoutedLinear(getattr(parent, child), module_factors, self.rows)
            setattr(parent, child, layer)
            installed[name] = ModuleFactors(layer.A, layer.heads, layer.routing, layer.basis)
        # Keep the factors as the layers hold them (their dtype and layout), not the ones given:
        # a layer lays its heads side by side (a copy), so holding the given heads as well would
        # keep every head twice (RSS 2x the adapter bytes at M = K, RESULTS.md 16b).
        self.factors = dataclasses.replace(factors, modules=installed)
        model.eval()

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.factors.tasks

    @property
    def context_length(self) -> int:
        """Most positions the model attends over (prompt + generated tokens)."""
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def task_ids(self, tasks: Sequence[str]) -> torch.Tensor:
        """(B,) task indices of task names; unknown names raise ``KeyError`` with the name."""
        return torch.tensor([self._task_index[t] for t in tasks], dtype=torch.long)

    @contextmanager
    def routed(self, tasks: Sequence[str] | torch.Tensor) -> Iterator[None]:
        """Run the block with row ``b`` of every forward pass routed to ``tasks[b]``."""
        ids = tasks if isinstance(tasks, torch.Tensor) else self.task_ids(tasks)
        self.rows.ids = ids.to(self.model.device)
        try:
            yield
        finally:
            self.rows.ids = None

    def __call__(self, tasks: Sequence[str] | torch.Tensor, **inputs: Any) -> Any:
        """The model's forward pass (``input_ids``, ``attention_mask``, ...) with a task per row."""
        with self.routed(tasks), torch.inference_mode():
            return self.model(**inputs)

    def generate(
        self,
        prompts: Sequence[str],
        tasks: Sequence[str] | str,
        *,
        max_new_tokens: int = 64,
        chat: bool = True,
        batch_size: int = 16,
    ) -> list[str]:
        """Greedy continuations of ``prompts``, row ``i`` under task ``tasks[i]``.

        Args:
            prompts: user messages (``chat=True``: wrapped in the tokenizer's chat template as a
                user turn) or fully formatted prompts (``chat=False``).
            tasks: one task per prompt, or one task for all.
            max_new_tokens: cap on generated tokens per prompt.
            chat: apply the chat template.
            batch_size: most prompts decoded together (tasks mix freely inside a batch).

        Returns:
            One decoded continuation per prompt, cut at the first stop token, stripped.
        """
        from hydraopt.runtime.generation import RowRequest, SamplingParams, decode

        task_list = [tasks] * len(prompts) if isinstance(tasks, str) else list(tasks)
        if len(task_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(task_list)} tasks")
        unknown = sorted(set(task_list) - set(self.tasks))
        if unknown:
            raise HydraoptError(f"unknown task(s) {unknown}; the bundle has {list(self.tasks)}")
        texts = [self.chat_prompt(p) for p in prompts] if chat else list(prompts)
        params = SamplingParams(max_new_tokens=max_new_tokens)
        requests = [
            RowRequest(i, self.encode(text), task, params)
            for i, (text, task) in enumerate(zip(texts, task_list, strict=True))
        ]
        # continuous batching: a waiting prompt takes the place of a finished row at once
        return [g.text.strip() for g in decode(self, requests, max_batch=batch_size)]

    def run_batch(
        self,
        prompt_ids: Sequence[Sequence[int]],
        tasks: Sequence[str],
        params: Sequence[SamplingParams],
    ) -> list[Generation]:
        """Decode one mixed batch; see :func:`hydraopt.runtime.generation.generate_batch`."""
        from hydraopt.runtime.generation import generate_batch

        return generate_batch(self, prompt_ids, tasks, params)

    def chat_prompt(self, user: str) -> str:
        """``user`` as one user turn of the chat template, ending with the assistant header."""
        return self.chat_messages([{"role": "user", "content": user}])

    def chat_messages(self, messages: Sequence[dict[str, str]]) -> str:
        """A chat (role/content dicts) in the tokenizer's chat template, assistant header last."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise HydraoptError("the tokenizer has no chat template; send raw prompts instead")
        text = self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
        return str(text)

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt; no special tokens added (a chat template holds its own)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def adapter_bytes(self) -> int:
        """Bytes of adapter tensors held (A', heads, routing, basis of every module), counted
        once."""
        seen: set[int] = set()
        total = 0
        for module in self.model.modules():
            if isinstance(module, RoutedLinear):
                held = (module.A, module.heads, module.routing, module.basis)
                for t in (t for t in held if t is not None):
                    key = t.untyped_storage().data_ptr()
                    if key not in seen:
                        seen.add(key)
                        total += t.untyped_storage().nbytes()
        return total


def check_base_model(model: nn.Module, factors: SharedFactors) -> None:
    """Refuse a model whose linear layers do not match the bundle's modules (see module doc).

    Raises:
        HydraoptError: naming the first module that is missing, not linear, or of another shape.
    """
    problems = []
    for name, f in factors.modules.items():
        d, k, _ = f.shape
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"has no module {name}")
            continue
        if not isinstance(module, nn.Linear):
            problems.append(f"{name} is a {type(module).__name__}, not a linear layer")
        elif (module.out_features, module.in_features) != (d, k):
            problems.append(
                f"{name} is {module.in_features} -> {module.out_features}, the bundle needs "
                f"{k} -> {d}"
            )
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise HydraoptError(
            f"base model does not match the bundle (made for {factors.base_model!r}): the model "
            f"{problems[0]}{more}; pass the bundle's base model with --base-model"
        )


def resolve_base_model(factors: SharedFactors, base_model: str | Path | None) -> str | Path | None:
    """The model to load: the one given, else the bundle's when it is a local path, else None
    (the packaged default)."""
    if base_model is not None:
        return base_model
    recorded = Path(factors.base_model).expanduser()
    return recorded if recorded.exists() else None


def load_model(
    bundle: Bundle | VeraBundle | str | Path,
    base_model: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    threads: int | None = None,
) -> RuntimeModel:
    """Load a base model and install a bundle into it.

    Args:
        bundle: a bundle dir or an in-memory bundle (LoRA or VeRA, any merge method).
        base_model: a local Hugging Face model dir or GGUF file; default the bundle's
            ``base_model`` when that is a local path, else the packaged SmolLM2-135M GGUF.
        dtype: parameter dtype of the model and the installed factors.
        threads: ``torch.set_num_threads`` if given.

    Returns:
        The :class:`RuntimeModel`.

    Raises:
        HydraoptError: unreadable bundle, missing model, or a model that does not fit the bundle.
    """
    from hydraopt.eval.model import load_base_model

    factors = shared_factors(bundle)
    source = resolve_base_model(factors, base_model)
    try:
        model, tokenizer = load_base_model(source, dtype=dtype, threads=threads)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise HydraoptError(f"cannot load base model {source or '(packaged SmolLM2)'}: {e}") from e
    return RuntimeModel(model, tokenizer, factors)
