"""A tiny random Llama with a real (character-level) tokenizer and chat template, on disk.

The runtime and the server need a tokenizer; the tiny model of tests/conftest.py has none. This
one is built offline with the ``tokenizers`` library: one token per character, ChatML specials,
so prompts, chat templates, stop tokens and decoding all run for real in milliseconds. Adapters
(LoRA and VeRA) are written by PEFT itself with weights from explicit generators.
"""

from __future__ import annotations

import socket
import string
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONTEXT = 192


def build_tiny_chat_model(path: Path) -> Path:
    """Write a tiny Llama + tokenizer into ``path`` (a Hugging Face model dir); return it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\r\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        pad_token_id=vocab["<pad>"],
        eos_token_id=vocab["<|im_end|>"],
        bos_token_id=None,
    )
    torch.manual_seed(0)  # model init draws from the global RNG; isolated to this builder
    model = LlamaForCausalLM(config)
    # Larger random weights than the default init: outputs then depend visibly on the adapter.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_adapter(base: Path, out: Path, *, kind: str = "lora", seed: int = 0, r: int = 4) -> Path:
    """A real PEFT adapter dir (``kind`` lora or vera) on the model in ``base``."""
    from peft import LoraConfig, VeraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base)
    gen = torch.Generator().manual_seed(seed)
    if kind == "lora":
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)
    else:
        cfg = VeraConfig(r=r, target_modules=TARGETS, projection_prng_key=0, save_projection=True)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if any(key in name for key in ("lora_A", "lora_B", "vera_lambda")):
                p.copy_(
                    torch.randn(p.shape, generator=gen) * 0.5 + (0.3 if "lambda" in name else 0)
                )
    peft_model.save_pretrained(out)
    return out


def build_bundle_and_export(root: Path, tasks: tuple[str, ...]) -> tuple[Path, Path, Path]:
    """A tiny base, one LoRA per task, their HydraOpt M = 2 bundle and its PEFT export.

    Returns:
        (base model dir, bundle dir, export dir).
    """
    import hydraopt

    base = build_tiny_chat_model(root / "base")
    dirs = [build_adapter(base, root / t, seed=i) for i, t in enumerate(tasks)]
    bundle = hydraopt.merge_adapter_set(hydraopt.load_adapter_set(dirs), "hydraopt", {"heads": 2})
    hydraopt.save_bundle(bundle, root / "bundle")
    hydraopt.export_peft_adapters(hydraopt.load_any_bundle(root / "bundle"), root / "export")
    return base, root / "bundle", root / "export"


def peft_answers(base: Path, adapter: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """PEFT's greedy answers to ``prompts`` (as chat user turns) with the adapter dir loaded."""
    from peft import PeftModel

    from hydraopt.eval.generate import generate
    from hydraopt.eval.model import load_base_model

    model, tokenizer = load_base_model(base)
    peft = PeftModel.from_pretrained(model, str(adapter)).eval()
    chat = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    return generate(peft, tokenizer, chat, max_new_tokens=max_new_tokens, progress=False)


@contextmanager
def running_server(app: Any) -> Iterator[Any]:
    """A real uvicorn server for ``app`` on a free 127.0.0.1 port, in a thread; yields an
    ``httpx.Client`` whose base URL is its ``/v1``."""
    import httpx
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=60) as client:
            yield client
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
