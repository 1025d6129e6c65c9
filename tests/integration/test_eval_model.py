"""The evaluation side on the real base model: prompts, batched greedy decoding, adapters, and
a tiny fine-tune. The model is loaded once (conftest); every test leaves it un-wrapped."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file

import hydraopt.eval.finetune as finetune_module
from hydraopt.cli import finetune as finetune_cli
from hydraopt.eval.finetune import FinetuneConfig, finetune
from hydraopt.eval.finetune_loop import target_loss
from hydraopt.eval.generate import applied_adapter, apply_peft_adapter, generate, remove_adapters
from hydraopt.eval.tasks import (
    MAX_NEW_TOKENS,
    build_prompt,
    load_split,
    load_task,
    measure_max_new_tokens,
)
from hydraopt.kinds.lora.apply import apply_lora_factors, lora_layers
from hydraopt.kinds.lora.finetune import init_lora_model, lora_A_fingerprint

QUESTION = (
    "Context: The Eiffel Tower was finished in 1889 in Paris.\nQuestion: When was it finished?"
)


def tiny_task(src: Path, dst: Path, n_train: int = 8) -> Path:
    """A copy of a task with only its first ``n_train`` training lines."""
    dst.mkdir(parents=True)
    shutil.copy(src / "task.json", dst / "task.json")
    lines = (src / "train.jsonl").read_text(encoding="utf-8").splitlines()[:n_train]
    (dst / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dst


def test_base_model_and_tokenizer_are_ready_for_batching(base_model) -> None:
    model, tokenizer = base_model
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id is not None
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    n_params = sum(p.numel() for p in model.parameters())
    assert 130e6 < n_params < 140e6  # SmolLM2-135M (tied embeddings counted once)


def test_build_prompt_uses_the_chat_template(base_model, tasks_root: Path) -> None:
    _, tokenizer = base_model
    spec = load_task(tasks_root / "en-qa")
    prompt = build_prompt(tokenizer, spec, "Who?")
    assert prompt.startswith("<|im_start|>system\n")  # the template's default system turn
    assert prompt.endswith(
        "<|im_start|>user\nAnswer the following question: Who?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_max_new_tokens_table_is_reproducible(base_model, tasks_root: Path) -> None:
    _, tokenizer = base_model
    for task_id, cap in MAX_NEW_TOKENS.items():
        if not (tasks_root / task_id).is_dir():
            continue
        targets = [e.target for e in load_split(tasks_root / task_id, "test")]
        assert measure_max_new_tokens(tokenizer, targets) == cap, task_id


def test_batched_greedy_equals_unbatched(base_model, tasks_root: Path) -> None:
    model, tokenizer = base_model
    spec = load_task(tasks_root / "en-qa")
    inputs = [QUESTION, "What is 2 + 2?", "Who wrote the play Hamlet, and in which century?"]
    prompts = [build_prompt(tokenizer, spec, text) for text in inputs]
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert len(set(lengths)) == 3, "prompts must differ in length for padding to matter"
    batched = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3, progress=False)
    single = [generate(model, tokenizer, [p], 8, batch_size=1, progress=False)[0] for p in prompts]
    assert batched == single
    assert all(batched), batched


def test_in_memory_lora_matches_peft_from_pretrained(
    base_model, adapters_root: Path, tasks_root: Path, logits_of
) -> None:
    model, tokenizer = base_model
    adapter_dir = adapters_root / "en-qa"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    state = load_file(adapter_dir / "adapter_model.safetensors")
    factors = {
        key.removesuffix(".lora_A.weight"): (
            state[key],
            state[key.replace("lora_A", "lora_B")],
            scale,
        )
        for key in state
        if key.endswith(".lora_A.weight")
    }
    assert len(factors) == 120
    text = build_prompt(tokenizer, load_task(tasks_root / "en-qa"), QUESTION)
    base_logits = logits_of(model, tokenizer, text)

    with applied_adapter(model, adapter_dir) as peft_model:
        assert isinstance(peft_model, PeftModel)
        reference = logits_of(peft_model, tokenizer, text)
    global_state = torch.random.get_rng_state()
    with applied_adapter(model, factors) as in_memory:
        merged = logits_of(in_memory, tokenizer, text)
    assert torch.equal(global_state, torch.random.get_rng_state())  # no global RNG drawn

    assert (reference - base_logits).abs().max() > 1.0  # the adapter does change the model
    torch.testing.assert_close(merged, reference, atol=1e-4, rtol=0)
    assert not isinstance(model, PeftModel)
    assert torch.equal(logits_of(model, tokenizer, text), base_logits)  # restored exactly


def test_adapters_that_do_not_fit_are_rejected(base_model, tmp_path: Path) -> None:
    model, _ = base_model
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter dir"):
        apply_peft_adapter(model, tmp_path / "en-qq")  # never looked up on the Hub
    a, b = torch.zeros(4, 576), torch.zeros(576, 4)
    with pytest.raises(ValueError, match="no module"):
        apply_lora_factors(model, {"model.layers.99.self_attn.q_proj": (a, b, 1.0)})
    with pytest.raises(ValueError, match="do not fit"):  # k_proj maps 576 -> 192
        apply_lora_factors(model, {"model.layers.0.self_attn.k_proj": (a, b, 1.0)})
    with pytest.raises(ValueError, match="nn.Linear"):
        apply_lora_factors(model, {"model.layers.0.self_attn": (a, b, 1.0)})
    assert not any("lora_" in name for name, _ in model.named_modules())


def test_applying_adapters_leaves_the_rng_and_stderr_alone(base_model, adapters_root) -> None:
    """PEFT's injection draws a throw-away init and reads a deprecated transformers property;
    neither may reach the caller: the global RNG stream and the warnings stay as they were."""
    import warnings

    model, _ = base_model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        remove_adapters(apply_peft_adapter(model, adapters_root / "en-qa"))
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]

    name = "model.layers.0.self_attn.q_proj"
    layer = model.get_submodule(name)
    factors = {name: (torch.zeros(2, layer.in_features), torch.zeros(layer.out_features, 2), 1.0)}
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = apply_lora_factors(model, factors)
    try:
        torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)
        assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    finally:
        remove_adapters(peft_model)


def test_per_module_rank_and_scale_are_respected(base_model, logits_of) -> None:
    model, tokenizer = base_model
    generator = torch.Generator().manual_seed(0)
    names = ["model.layers.3.self_attn.q_proj", "model.layers.5.self_attn.v_proj"]
    ranks, scales = [2, 5], [0.5, 3.0]
    factors = {}
    for name, r, s in zip(names, ranks, scales, strict=True):
        layer = model.get_submodule(name)
        a = torch.randn(r, layer.in_features, generator=generator) * 0.05
        b = torch.randn(layer.out_features, r, generator=generator) * 0.05
        factors[name] = (a, b, s)
    peft_model = apply_lora_factors(model, factors)
    try:
        for name, r, s in zip(names, ranks, scales, strict=True):
            layer = peft_model.get_base_model().get_submodule(name)
            assert layer.r["default"] == r
            assert math.isclose(layer.scaling["default"], s, rel_tol=1e-12)
            x = torch.randn(3, layer.in_features, generator=generator)
            a, b, _ = factors[name]
            expected = layer.base_layer(x) + s * (x @ a.T @ b.T)
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    finally:
        remove_adapters(peft_model)


@pytest.fixture(scope="module")
def trained(base_model, tasks_root: Path, tmp_path_factory, logits_of):
    """en-ta (short examples), 3 steps on an 8-example slice; base logits before and after."""
    model, tokenizer = base_model
    work = tmp_path_factory.mktemp("finetune")
    task_dir = tiny_task(tasks_root / "en-ta", work / "en-ta")
    text = build_prompt(tokenizer, load_task(task_dir), QUESTION)
    before = logits_of(model, tokenizer, text)
    config = FinetuneConfig(steps=3, batch_size=2, warmup_steps=0)
    out = finetune(task_dir, work / "adapter-en-ta", config, base=base_model, progress=False)
    after = logits_of(model, tokenizer, text)
    return {"out": out, "text": text, "before": before, "after": after, "work": work}


def test_finetune_writes_a_peft_dir_that_loads(base_model, trained, logits_of) -> None:
    model, tokenizer = base_model
    out: Path = trained["out"]
    assert sorted(p.name for p in out.iterdir() if p.suffix in {".json", ".safetensors"}) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "training.json",
    ]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (32, 128)
    # portable base name, as ../shared/adapters record it, so adapters from here merge with those
    assert adapter_config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert not (out / "README.md").exists()
    assert sorted(adapter_config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    summary = json.loads((out / "training.json").read_text())
    assert summary["task"] == "en-ta"
    assert summary["steps_done"] == 3 and len(summary["loss_history"]) == 3
    assert all(math.isfinite(x) for x in summary["loss_history"])
    assert summary["tokens_per_s"] > 0 and summary["wall_time_s"] > 0

    with safe_open(out / "adapter_model.safetensors", "pt") as weights:
        keys = list(weights.keys())
        assert len(keys) == 240
        assert {weights.get_tensor(k).dtype for k in keys} == {torch.float16}
        b_norm = sum(weights.get_tensor(k).float().norm() for k in keys if "lora_B" in k)
    assert b_norm > 0  # training moved B away from its zero init

    # The base model was handed back un-wrapped and unchanged.
    assert not isinstance(model, PeftModel) and not model.training
    assert torch.equal(trained["before"], trained["after"])

    with applied_adapter(model, out) as peft_model:
        adapted = logits_of(peft_model, tokenizer, trained["text"])
    assert (adapted - trained["before"]).abs().max() > 1e-3


def test_same_seed_gives_every_task_the_same_initial_A(
    base_model, tasks_root: Path, trained
) -> None:
    model, _ = base_model
    task_dir = tiny_task(tasks_root / "en-gc", trained["work"] / "en-gc")
    config = FinetuneConfig(steps=1, batch_size=1, warmup_steps=0)
    other = finetune(
        task_dir, trained["work"] / "adapter-en-gc", config, base=base_model, progress=False
    )
    first = json.loads((trained["out"] / "training.json").read_text())["init_A_sha256"]
    second = json.loads((other / "training.json").read_text())["init_A_sha256"]
    assert first == second

    # Tensor-level: the same A whatever the global RNG did in between; another seed differs.
    initial = {}
    for global_seed, seed in [(1, 0), (2, 0), (1, 7)]:
        torch.manual_seed(global_seed)
        peft_model = init_lora_model(model, FinetuneConfig(seed=seed))
        try:
            initial[(global_seed, seed)] = {
                name: layer.lora_A["default"].weight.detach().clone()
                for name, layer in lora_layers(peft_model).items()
            }
            if seed == 0:
                assert lora_A_fingerprint(peft_model) == first
        finally:
            remove_adapters(peft_model)
    same, other_seed = initial[(1, 0)], initial[(2, 0)]
    assert len(same) == 120 and all(torch.equal(same[n], other_seed[n]) for n in same)
    assert not any(torch.equal(same[n], initial[(1, 7)][n]) for n in same)


def test_finetune_refuses_an_existing_out_dir(base_model, trained) -> None:
    with pytest.raises(ValueError, match="already exists"):
        finetune(trained["work"] / "en-ta", trained["out"], base=base_model, progress=False)


def test_target_loss_equals_loss_over_full_logits(base_model) -> None:
    model, _ = base_model
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(100, 20_000, (2, 12), generator=generator)  # (B, T)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # right padding of the second row
    labels = torch.full_like(input_ids, -100)
    labels[0, 6:] = input_ids[0, 6:]
    labels[1, 4:9] = input_ids[1, 4:9]
    with torch.no_grad():
        fast = target_loss(model, input_ids, attention_mask, labels)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        full = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
        )
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hydraopt")
    finetune_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_finetune_passes_flags_through(
    base_model, tasks_root: Path, trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reuse the session's model instead of loading it a second time.
    monkeypatch.setattr(finetune_module, "load_base_model", lambda path=None: base_model)
    out = trained["work"] / "cli-adapter"
    argv = ["finetune", str(trained["work"] / "en-ta"), "--out", str(out), "--steps", "1"]
    argv += ["--rank", "4", "--alpha", "8", "--batch-size", "1", "--seed", "3", "--quiet"]
    assert cli(argv) == 0
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 8)
    summary = json.loads((out / "training.json").read_text())
    assert (summary["steps_done"], summary["batch_size"], summary["seed"]) == (1, 1, 3)
    assert summary["lr"] == FinetuneConfig().lr  # an unset flag keeps the config default
    assert cli(argv) == 2  # exists now
    assert cli([*argv[:3], str(trained["work"] / "cli-2"), "--steps", "0"]) == 2
    assert (
        cli(["finetune", "no-such-task", "--out", str(out), "--tasks-root", str(tasks_root)]) == 2
    )
