"""``hydraopt generate`` against PEFT-loaded exports, and the bad inputs of both CLI commands."""

from __future__ import annotations

import json

import pytest
from unit.runtime.tiny_chat import build_bundle_and_export, build_tiny_chat_model, peft_answers

from hydraopt.cli.main import main

TASKS = ("t0", "t1")
PROMPTS = ["hello there", "What is 2+2?", "abc"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_bundle_and_export(tmp_path_factory.mktemp("cli"), TASKS)


def test_generate_prompt_and_mixed_task_input_equal_peft(setup, tmp_path, capsys):
    base, bundle, export = setup
    want = {t: peft_answers(base, export / t, PROMPTS, 8) for t in TASKS}
    args = ["generate", str(bundle), "--base-model", str(base), "--max-tokens", "8"]
    assert main([*args, "--task", "t1", "--prompt", PROMPTS[0]]) == 0
    assert capsys.readouterr().out == want["t1"][0] + "\n"
    lines = [{"prompt": p, "task": t} for t in TASKS for p in PROMPTS]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert main([*args, "--input", str(tmp_path / "in.jsonl")]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["output"] for r in rows] == want["t0"] + want["t1"]
    assert [(r["task"], r["prompt"]) for r in rows] == [(x["task"], x["prompt"]) for x in lines]


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ('{"prompt": "x"}\n{oops\n', [], "in.jsonl:2: not JSON"),
        ('{"text": "x"}\n', ["--task", "t0"], 'need an object with a string "prompt"'),
        ('{"prompt": "x"}\n', [], "no task"),
        ('{"prompt": "x", "task": "nope"}\n', [], "unknown task(s) ['nope']"),
        ('{"prompt": "x"}\n', ["--task", "t0", "--max-tokens", "0"], "--max-tokens must be >= 1"),
    ],
)
def test_generate_bad_input_is_one_line_and_exit_2(
    setup, tmp_path, capsys, content, extra, message
):
    _, bundle, _ = setup
    (tmp_path / "in.jsonl").write_text(content)
    code = main(["generate", str(bundle), "--input", str(tmp_path / "in.jsonl"), *extra])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and message in captured.err


def test_serve_refuses_a_base_model_that_does_not_fit_the_bundle(setup, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, bundle, _ = setup
    # same layer names, another width: only the structural check can tell
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=104,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    other.save_pretrained(tmp_path / "other")
    build_tiny_chat_model(tmp_path / "tok")  # a tokenizer for the other model
    for f in (tmp_path / "tok").glob("tokenizer*"):
        (tmp_path / "other" / f.name).write_bytes(f.read_bytes())
    for command in ("serve", "generate"):
        extra = ["--port", "0"] if command == "serve" else ["--task", "t0", "--prompt", "x"]
        code = main([command, str(bundle), "--base-model", str(tmp_path / "other"), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2
        assert err[-1].startswith("hydraopt: error: base model does not match the bundle")
        assert "is 8 -> 4, the bundle needs 16 -> 8 (and 7 more)" in err[-1]
