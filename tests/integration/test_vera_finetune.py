"""VeRA fine-tuning and VeRA evaluation end to end on the tiny random Llama (no download, ~2 s).

A word-level tokenizer with a chat template is built in memory so ``finetune`` runs its real
data pipeline (prompt masking, EOS, batching) on the tiny model; what is checked is what VeRA
adds: the saved dir is a standard PEFT VeRA dir that ``PeftModel.from_pretrained`` loads, every
task shares the projections, and the in-memory application equals PEFT's.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TARGETS
from peft import PeftModel
from safetensors.torch import load_file

import hydraopt
from hydraopt.cli import evaluate as evaluate_cli
from hydraopt.cli import finetune as finetune_cli
from hydraopt.cli.main import main
from hydraopt.errors import HydraoptError
from hydraopt.eval.finetune import FinetuneConfig, finetune
from hydraopt.eval.generate import applied_adapter, generate, remove_adapters
from hydraopt.eval.systems import BundleSystem, PerTaskLora, PerTaskVera
from hydraopt.kinds.lora.apply import lora_layers
from hydraopt.kinds.vera.apply import (
    VeraWeights,
    apply_vera_weights,
    vera_layers,
    vera_projections,
)
from hydraopt.kinds.vera.finetune import init_vera_model
from hydraopt.kinds.vera.load import VeraAdapterSet
from hydraopt.types import VeraBundle

WORDS = ["fix", "this", "text", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "big", "red"]
PEFT_PREFIX = "base_model.model."


def tiny_tokenizer():
    """Word-level tokenizer over ``WORDS`` (ids < 64, the tiny model's vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", "<user>", "<assistant>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}> {{ m.content }} <eos> {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    tokenizer.padding_side = "left"
    return tokenizer


def write_task(root: Path, task_id: str, pairs: list[tuple[str, str]]) -> Path:
    task_dir = root / task_id
    task_dir.mkdir(parents=True)
    spec = {
        "id": task_id,
        "instruction": "fix this text",
        "metric": "ROUGE-L (best over references)",
        "max_new_tokens": 4,
    }
    (task_dir / "task.json").write_text(json.dumps(spec))
    lines = [json.dumps({"input": i, "target": t}) for i, t in pairs]
    for split in ("train", "test"):
        (task_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return task_dir


@pytest.fixture(scope="module")
def tiny(tiny_base: Path):
    """The tiny Llama (float32, eval mode) and its word-level tokenizer."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_base).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    return model, tiny_tokenizer()


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory) -> dict[str, Path]:
    """Two tasks, 3 VeRA steps each (r = 8), written to ``ROOT/<task>``."""
    work = tmp_path_factory.mktemp("vera")
    config = FinetuneConfig(
        adapter="vera", vera_r=8, vera_lr=5e-2, steps=3, batch_size=2, warmup_steps=0
    )
    tasks = {
        "t-cat": [("the cat sat", "a cat sat on a mat"), ("big red cat", "the big red cat")],
        "t-dog": [("the dog ran", "a dog ran"), ("big dog", "the big red dog")],
    }
    out = {}
    for task_id, pairs in tasks.items():
        task_dir = write_task(work / "tasks", task_id, pairs)
        out[task_id] = finetune(
            task_dir, work / "adapters" / task_id, config, base=tiny, progress=False
        )
    return out


def test_vera_finetune_writes_a_peft_vera_dir(tiny, trained) -> None:
    model, _ = tiny
    out = trained["t-cat"]
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "training.json",
    ]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["r"] == 8
    assert (config["save_projection"], config["projection_prng_key"]) == (True, 0)
    assert sorted(config["target_modules"]) == sorted(TARGETS)

    state = load_file(out / "adapter_model.safetensors")
    assert {v.dtype for v in state.values()} == {torch.float16}
    assert state["base_model.vera_A"].shape == (8, 16)  # (r, largest in_features)
    assert state["base_model.vera_B"].shape == (16, 8)  # (largest out_features, r)
    lambda_b = {k: v for k, v in state.items() if k.endswith("vera_lambda_b")}
    assert len(lambda_b) == 2 * len(TARGETS) and len(state) == 2 + 2 * len(lambda_b)
    assert all(v.float().abs().sum() > 0 for v in lambda_b.values())  # λb left its zero init

    summary = json.loads((out / "training.json").read_text())
    assert summary["adapter"] == "vera" and summary["vera_r"] == 8 and summary["vera_lr"] == 5e-2
    assert not {"r", "alpha", "dropout", "lr", "init_A_sha256"} & summary.keys()
    assert summary["steps_done"] == 3 and all(map(math.isfinite, summary["loss_history"]))
    # The base model came back bare: no adapter layers, base weights trainable as before.
    assert not isinstance(model, PeftModel) and not model.training
    assert not any("vera_" in name for name, _ in model.named_modules())


def test_every_task_shares_the_projections(trained) -> None:
    summaries = [json.loads((d / "training.json").read_text()) for d in trained.values()]
    assert len({s["projection_sha256"] for s in summaries}) == 1
    cat, dog = (load_file(d / "adapter_model.safetensors") for d in trained.values())
    for key in ("base_model.vera_A", "base_model.vera_B"):
        assert torch.equal(cat[key], dog[key])
    key = f"{PEFT_PREFIX}model.layers.0.self_attn.q_proj.vera_lambda_b"
    assert not torch.equal(cat[key], dog[key])  # while the trained vectors differ


def test_projections_follow_the_key_not_the_seed_or_global_rng(tiny) -> None:
    model, _ = tiny
    seen = {}
    for global_seed, seed, key in [(1, 0, 0), (2, 5, 0), (1, 0, 3)]:
        torch.manual_seed(global_seed)
        config = FinetuneConfig(adapter="vera", vera_r=8, seed=seed, projection_prng_key=key)
        peft_model = init_vera_model(model, config)
        try:
            seen[(global_seed, seed, key)] = [p.clone() for p in vera_projections(peft_model)]
            layers = vera_layers(peft_model)
            assert len(layers) == 2 * len(TARGETS) and not lora_layers(peft_model)
            trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
            assert trainable and all("vera_lambda_" in n for n in trainable)
        finally:
            remove_adapters(peft_model)
    first = seen[(1, 0, 0)]
    assert all(map(torch.equal, first, seen[(2, 5, 0)]))
    assert not any(map(torch.equal, first, seen[(1, 0, 3)]))


def _weights_of(adapter_dir: Path) -> VeraWeights:
    state = load_file(adapter_dir / "adapter_model.safetensors")
    lambdas = {
        key.removesuffix(".vera_lambda_b"): (state[key], state[key.replace("_b", "_d")])
        for key in state
        if key.endswith(".vera_lambda_b")
    }
    return VeraWeights(state["base_model.vera_A"], state["base_model.vera_B"], lambdas)


def prompt_batch(tokenizer):
    """Two chat-formatted prompts and their padded batch (the logit/generation comparisons' input)."""
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"fix this text {text}"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for text in ("the cat sat", "big red dog ran")
    ]
    return prompts, tokenizer(prompts, add_special_tokens=False, return_tensors="pt", padding=True)


def test_in_memory_vera_equals_peft_from_pretrained(tiny, trained) -> None:
    model, tokenizer = tiny
    out = trained["t-cat"]
    prompts, batch = prompt_batch(tokenizer)
    with torch.inference_mode():
        base_logits = model(**batch).logits  # (2, T, V)

    peft_model = PeftModel.from_pretrained(model, str(out), is_trainable=False).eval()
    try:
        with torch.inference_mode():
            reference = peft_model(**batch).logits
        reference_text = generate(peft_model, tokenizer, prompts, 4, progress=False)
    finally:
        remove_adapters(peft_model)

    global_state = torch.random.get_rng_state()
    with applied_adapter(model, _weights_of(out)) as adapted:
        with torch.inference_mode():
            in_memory = adapted(**batch).logits
        in_memory_text = generate(adapted, tokenizer, prompts, 4, progress=False)
    assert torch.equal(global_state, torch.random.get_rng_state())  # no global RNG drawn

    assert (reference - base_logits).abs().max() > 1e-4  # the adapter does change the model
    assert torch.equal(in_memory, reference)  # the same ops on the same fp16-saved numbers
    assert in_memory_text == reference_text
    with applied_adapter(model, out) as from_dir, torch.inference_mode():  # PerTaskVera's path
        assert torch.equal(from_dir(**batch).logits, reference)
    with torch.inference_mode():
        assert torch.equal(model(**batch).logits, base_logits)  # restored exactly


def test_apply_vera_weights_rejects_what_does_not_fit(tiny, trained) -> None:
    model, _ = tiny
    weights = _weights_of(trained["t-cat"])
    q = "model.layers.0.self_attn.q_proj"
    lambda_b, lambda_d = weights.lambdas[f"{PEFT_PREFIX}{q}"]
    cases = [
        ({"model.layers.9.self_attn.q_proj": (lambda_b, lambda_d)}, "no module"),
        ({"model.layers.0.self_attn": (lambda_b, lambda_d)}, "nn.Linear"),
        ({"model.layers.0.self_attn.k_proj": (lambda_b, lambda_d)}, "need λb (8,)"),
        ({q: (lambda_b, lambda_d[:4])}, "need λb (16,) and λd (8,)"),
    ]
    for lambdas, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            apply_vera_weights(model, VeraWeights(weights.vera_A, weights.vera_B, lambdas))
    small = VeraWeights(weights.vera_A[:, :8], weights.vera_B, {q: (lambda_b, lambda_d)})
    with pytest.raises(ValueError, match="smaller than the linear layer"):
        apply_vera_weights(model, small)
    assert not any("vera_" in name for name, _ in model.named_modules())


def test_cli_finetune_vera_flags(tiny, trained, monkeypatch) -> None:
    import hydraopt.eval.finetune as finetune_module

    monkeypatch.setattr(finetune_module, "load_base_model", lambda path=None: tiny)
    parser = argparse.ArgumentParser(prog="hydraopt")
    finetune_cli.register(parser.add_subparsers(dest="command", required=True))
    task_dir = trained["t-cat"].parent.parent / "tasks" / "t-cat"
    out = trained["t-cat"].parent.parent / "cli-vera"
    argv = ["finetune", str(task_dir), "--out", str(out), "--adapter", "vera", "--rank", "4"]
    argv += ["--lr", "0.02", "--steps", "1", "--batch-size", "1", "--projection-prng-key", "7"]
    args = parser.parse_args([*argv, "--quiet"])
    assert args.func(args) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["projection_prng_key"]) == ("VERA", 4, 7)
    summary = json.loads((out / "training.json").read_text())
    assert (summary["vera_lr"], summary["vera_r"], summary["steps_done"]) == (0.02, 4, 1)

    # The dir evaluates as a VeRA system, and is refused (by name) as a LoRA one.
    system = evaluate_cli.parse_system(f"vera={out.parent}:mine")
    assert isinstance(system, PerTaskVera) and system.label == "mine"
    system.check_tasks(["cli-vera"])
    with pytest.raises(HydraoptError, match="is a vera adapter, not lora; pass its root as"):
        PerTaskLora(root=out.parent).check_tasks(["cli-vera"])


def test_evaluate_cli_scores_vera_dirs_and_reruns_from_cache(tiny_base, trained, tmp_path) -> None:
    # The tiny model as a model dir with its tokenizer, so `evaluate --model` loads it itself.
    model_dir = Path(shutil.copytree(tiny_base, tmp_path / "tiny-model"))
    tiny_tokenizer().save_pretrained(model_dir)
    work = trained["t-cat"].parent.parent
    argv = [
        "evaluate", "--tasks", "t-cat", "t-dog", "--tasks-root", str(work / "tasks"),
        "--model", str(model_dir), "--system", "zero-shot",
        "--system", f"vera={work / 'adapters'}", "--out", str(tmp_path / "eval"), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    first = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [(s["label"], s["method"], s["storage_percent"]) for s in first["systems"]] == [
        ("zero-shot", "zero-shot", 0.0),
        ("VeRA", "vera", 100.0),
    ]
    assert first["generated_examples"] == 8
    assert main(argv) == 0
    second = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert second["generated_examples"] == 0  # every generation came from the cache
    assert [s["average"] for s in second["systems"]] == [s["average"] for s in first["systems"]]


def test_vera_bundle_generates_what_its_peft_export_does(tiny, trained, tmp_path) -> None:
    # A VeRA bundle is evaluated in memory (routed vectors + shared projections); its PEFT export
    # loaded by PEFT from disk must be the same model, bit for bit, in the default float16.
    model, tokenizer = tiny
    aset = hydraopt.load_adapter_set(list(trained.values()), list(trained))
    assert isinstance(aset, VeraAdapterSet)
    # M = 2 with λb shared: the tasks share λb and each gets its own λd row.
    options = {"heads": 2, "shared": "lambda_b", "refine_steps": 0}
    hydraopt.save_bundle(hydraopt.merge_adapter_set(aset, "hydraopt", options), tmp_path / "b")
    bundle = evaluate_cli.parse_system(f"bundle={tmp_path / 'b'}:vera-merge")
    assert isinstance(bundle, BundleSystem) and isinstance(bundle.bundle, VeraBundle)
    assert (bundle.label, bundle.method) == ("vera-merge", "hydraopt")
    hydraopt.export_peft_adapters(hydraopt.load_any_bundle(tmp_path / "b"), tmp_path / "peft")
    exported = PerTaskVera(root=tmp_path / "peft")
    exported.check_tasks(list(trained))
    prompts, batch = prompt_batch(tokenizer)
    with torch.inference_mode():
        base_logits = model(**batch).logits  # (2, T, V)
    logits = {}
    for task in trained:
        outputs = {}
        for name, adapter in (("bundle", bundle.adapter(task)), ("peft", exported.adapter(task))):
            with applied_adapter(model, adapter) as adapted:
                with torch.inference_mode():
                    logits[task, name] = adapted(**batch).logits
                outputs[name] = generate(adapted, tokenizer, prompts, 4, progress=False)
        assert torch.equal(logits[task, "bundle"], logits[task, "peft"]), task
        assert outputs["bundle"] == outputs["peft"], task
        assert (logits[task, "bundle"] - base_logits).abs().max() > 1e-4  # it did adapt
    # Routed to different λd rows, the two tasks get different models.
    assert not torch.equal(logits["t-cat", "bundle"], logits["t-dog", "bundle"])
    assert bundle.cache_id("t-cat") != bundle.cache_id("t-dog")


def test_evaluate_merge_from_a_vera_root(tiny_base, trained, tmp_path) -> None:
    model_dir = Path(shutil.copytree(tiny_base, tmp_path / "tiny-model"))
    tiny_tokenizer().save_pretrained(model_dir)
    work = trained["t-cat"].parent.parent
    argv = [
        "evaluate", "--tasks", "t-cat", "t-dog", "--tasks-root", str(work / "tasks"),
        "--model", str(model_dir), "--merge-from", str(work / "adapters"),
        "--methods", "ties", "--out", str(tmp_path / "eval"), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    first = json.loads((tmp_path / "eval" / "results.json").read_text())
    rows = [(s["label"], s["method"], s["storage_percent"]) for s in first["systems"]]
    assert [r[:2] for r in rows] == [
        ("zero-shot", "zero-shot"),
        ("VeRA", "vera"),
        ("ties", "ties"),
        ("hydraopt M=1", "hydraopt"),
        ("hydraopt M=2", "hydraopt"),
    ]
    assert rows[1][2] == 100.0 and rows[2][2] == rows[3][2] == 50.0 > 0  # K = 2: M = 1 is 1/K
    for name in ("ties", "hydraopt_M1", "hydraopt_M2"):
        meta = json.loads((tmp_path / "eval" / "bundles" / name / "bundle.json").read_text())
        assert meta["adapter_kind"] == "vera"
    assert first["generated_examples"] == 5 * 4
    assert main(argv) == 0  # bundles and generations are reused
    second = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert second["generated_examples"] == 0
    assert [s["average"] for s in second["systems"]] == [s["average"] for s in first["systems"]]


def test_evaluate_refuses_a_cached_bundle_of_the_other_kind(tiny, trained, tmp_path, capsys):
    # A VeRA bundle cached under OUT/bundles/ must not stand in for a merge of LoRA adapters
    # of the same tasks (and seed).
    work = trained["t-cat"].parent.parent
    out = tmp_path / "eval"
    vera = hydraopt.load_adapter_set(list(trained.values()), list(trained))
    bundle = hydraopt.merge_adapter_set(vera, "task_arithmetic")
    hydraopt.save_bundle(bundle, out / "bundles" / "task_arithmetic")
    lora = FinetuneConfig(adapter="lora", r=4, steps=1, batch_size=2, warmup_steps=0)
    for task in trained:
        finetune(work / "tasks" / task, tmp_path / "lora" / task, lora, base=tiny, progress=False)
    argv = ["evaluate", "--tasks", *trained, "--merge-from", str(tmp_path / "lora")]
    argv += ["--methods", "task_arithmetic", "--heads", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "merged from VERA adapters, but --merge-from holds LORA adapters" in err
