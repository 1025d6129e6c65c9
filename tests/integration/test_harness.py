"""`hydraopt evaluate` and its harness on the real base model and the real adapters.

The model is the session fixture of conftest; the CLI's own loader is patched to hand it over,
so the suite loads it once. Slices are tiny (2-3 examples, a few new tokens): these tests check
wiring, identity and caching, not quality.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import hydraopt
import hydraopt.eval.harness as harness
import hydraopt.sweep
from hydraopt.cli.main import main
from hydraopt.errors import HydraoptError
from hydraopt.eval.generate import applied_adapter, generate
from hydraopt.eval.generation_cache import GenerationCache
from hydraopt.eval.report import markdown_table
from hydraopt.eval.results import EvalConfig, EvalResults, SystemResult, TaskResult
from hydraopt.eval.systems import PerTaskLora, ZeroShot, bundle_system
from hydraopt.eval.tasks import build_prompt, load_split, load_task

THREADS = int(os.environ.get("HYDRAOPT_TEST_THREADS", "1"))
GC = "F0.5 (ERRANT) and GLEU against all references"
QA = "SQuAD F1 (max over references)"


@pytest.fixture(scope="module")
def bundle_dirs(adapters_root: Path, tmp_path_factory) -> dict[str, Path]:
    """HydraOpt M=2 over three real adapters (two tasks share a head), saved in float16 and
    float32, and each exported as PEFT dirs."""
    torch.set_num_threads(THREADS)
    tasks = ["en-qa", "en-ta", "en-gc"]
    aset = hydraopt.load_adapter_set([adapters_root / t for t in tasks])
    # refine_steps=0: the closed form alone; routing and heads are what matter here, not quality.
    bundle = hydraopt.merge_adapter_set(aset, "hydraopt", {"heads": 2, "refine_steps": 0})
    root = tmp_path_factory.mktemp("bundles")
    dirs = {}
    for dtype in ("float16", "float32"):
        hydraopt.save_bundle(bundle, root / f"bundle-{dtype}", dtype=dtype)
        exported = root / f"exported-{dtype}"
        hydraopt.export_peft_adapters(hydraopt.load_bundle(root / f"bundle-{dtype}"), exported)
        dirs[f"bundle-{dtype}"] = root / f"bundle-{dtype}"
        dirs[f"exported-{dtype}"] = exported
    return dirs


def _prompts(tokenizer, tasks_root: Path, task: str, n: int) -> list[str]:
    spec = load_task(tasks_root / task)
    return [
        build_prompt(tokenizer, spec, ex.input) for ex in load_split(tasks_root / task, "test", n)
    ]


# ------------------------------------------------------- exported adapters == in-memory bundle --


def test_exported_adapter_generates_exactly_what_the_in_memory_bundle_does(
    base_model, bundle_dirs, tasks_root
) -> None:
    model, tokenizer = base_model
    bundle = bundle_system(bundle_dirs["bundle-float16"])  # the default storage dtype
    exported = PerTaskLora(root=bundle_dirs["exported-float16"])
    changed_something = False
    for task in ("en-qa", "en-ta"):
        prompts = _prompts(tokenizer, tasks_root, task, 3)
        outputs = {}
        for name, adapter in (
            ("bundle", bundle.adapter(task)),
            ("exported", exported.adapter(task)),
            ("zero-shot", None),
        ):
            with applied_adapter(model, adapter) as adapted:
                outputs[name] = generate(adapted, tokenizer, prompts, 8, progress=False)
        assert outputs["bundle"] == outputs["exported"], task
        changed_something |= outputs["bundle"] != outputs["zero-shot"]
    # Otherwise the equality above could hold because no adapter was applied at all.
    assert changed_something


def test_float32_export_gives_bit_identical_logits(base_model, bundle_dirs, tasks_root, logits_of):
    # PEFT multiplies the exported B'/scale back by scale = 4, a power of two, so in float32 the
    # two paths compute the very same numbers; in float16 B'/4 can underflow to a subnormal.
    model, tokenizer = base_model
    prompt = _prompts(tokenizer, tasks_root, "en-ta", 1)[0]
    bundle = bundle_system(bundle_dirs["bundle-float32"])
    exported = PerTaskLora(root=bundle_dirs["exported-float32"])
    with applied_adapter(model, bundle.adapter("en-ta")) as adapted:
        in_memory = logits_of(adapted, tokenizer, prompt)
    with applied_adapter(model, exported.adapter("en-ta")) as adapted:
        from_disk = logits_of(adapted, tokenizer, prompt)
    assert torch.equal(in_memory, from_disk)
    assert not torch.equal(in_memory, logits_of(model, tokenizer, prompt))


# ----------------------------------------------------------------------- content-based cache ids --


def test_cache_ids_follow_content_not_paths(adapters_root, bundle_dirs, tmp_path) -> None:
    renamed = tmp_path / "renamed"
    shutil.copytree(adapters_root / "en-qa", renamed / "en-qa")
    original, copy = PerTaskLora(root=adapters_root), PerTaskLora(root=renamed, label="copy")
    assert original.cache_id("en-qa") == copy.cache_id("en-qa")

    weights = renamed / "en-qa" / "adapter_model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor value
    weights.write_bytes(bytes(data))
    assert original.cache_id("en-qa") != copy.cache_id("en-qa")

    bundle = bundle_system(bundle_dirs["bundle-float16"])
    moved = bundle_system(shutil.copytree(bundle_dirs["bundle-float16"], tmp_path / "moved"))
    assert bundle.cache_id("en-qa") == moved.cache_id("en-qa")
    # en-qa and en-ta differ in routing or in name: never one cache for two tasks.
    assert bundle.cache_id("en-qa") != bundle.cache_id("en-ta")
    assert bundle.storage_percent == pytest.approx(bundle.bundle.storage["storage_percent"])
    with pytest.raises(HydraoptError, match="lacks task"):
        bundle.check_tasks(["en-qa", "en-sr"])


def test_cache_skips_a_cut_line_and_appends_on_a_fresh_one(tmp_path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"index": 0, "prompt_sha256": "a", "output": "x"}\n{"index": 1, "pro')
    cache = GenerationCache(path)
    assert cache.get(0, "a") == "x" and cache.get(1, "b") is None
    assert cache.get(0, "other prompt") is None  # same index, changed prompt: a miss
    cache.append([(1, "b", "y")])
    reread = GenerationCache(path)
    assert reread.get(0, "a") == "x" and reread.get(1, "b") == "y"


# --------------------------------------------------------------------------- CLI end to end --


def test_evaluate_cli_writes_table_json_plot_and_reruns_from_cache(
    base_model, adapters_root, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(harness, "load_base_model", lambda *a, **k: base_model)
    calls = {"generate": 0, "merge": 0}
    real_generate, real_merge = harness.generate, hydraopt.sweep.merge_adapter_set

    def counting_generate(*args, **kwargs):
        calls["generate"] += 1
        return real_generate(*args, **kwargs)

    def counting_merge(*args, **kwargs):
        calls["merge"] += 1
        return real_merge(*args, **kwargs)

    monkeypatch.setattr(harness, "generate", counting_generate)
    monkeypatch.setattr(hydraopt.sweep, "merge_adapter_set", counting_merge)
    out = tmp_path / "eval"
    argv = [
        "evaluate", "--tasks", "en-qa", "en-gc", "--system", "zero-shot",
        "--merge-from", str(adapters_root), "--methods", "task_arithmetic", "--heads",
        "--limit", "2", "--max-new-tokens", "4", "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    assert calls == {"generate": 6, "merge": 1}  # 3 systems x 2 tasks, one batch each
    first = json.loads((out / "results.json").read_text())
    assert [s["label"] for s in first["systems"]] == ["zero-shot", "LoRA", "task_arithmetic"]
    assert [s["storage_percent"] for s in first["systems"]] == pytest.approx([0, 100, 50])
    assert first["generated_examples"] == 12 and first["generated_tokens"] > 0
    for system in first["systems"]:
        for task, result in system["tasks"].items():
            assert result["examples"] == 2 and result["generated"] == 2, (system["label"], task)
            assert len(Path(result["cache_file"]).read_text().splitlines()) == 2
        primaries = [r["scores"]["primary"] for r in system["tasks"].values()]
        assert system["average"] == pytest.approx(sum(primaries) / 2)
    assert "gleu" in first["systems"][0]["tasks"]["en-gc"]["scores"]

    table = (out / "results.md").read_text().splitlines()
    assert table[0] == "| system | S % | en-qa | en-gc | en-gc GLEU | Avg |"
    lora = first["systems"][1]
    assert table[3] == (
        f"| LoRA | 100.0 | {lora['tasks']['en-qa']['scores']['primary']:.1f} "
        f"| {lora['tasks']['en-gc']['scores']['primary']:.1f} "
        f"| {lora['tasks']['en-gc']['scores']['gleu']:.1f} | {lora['average']:.1f} |"
    )
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (out / "bundles" / "task_arithmetic" / "bundle.json").is_file()

    # Second run: every generation and the bundle come from disk.
    capsys.readouterr()
    assert main(argv) == 0
    assert calls == {"generate": 6, "merge": 1}
    second = json.loads((out / "results.json").read_text())
    assert second["generated_examples"] == 0
    for a, b in zip(first["systems"], second["systems"], strict=True):
        for task in ("en-qa", "en-gc"):
            assert b["tasks"][task]["cached"] == 2
            assert b["tasks"][task]["scores"] == a["tasks"][task]["scores"]
    assert "decoded 0 examples" in capsys.readouterr().out

    # A renamed copy of the adapters is the same content: still nothing to decode.
    renamed = tmp_path / "renamed-adapters"
    for task in ("en-qa", "en-gc"):
        shutil.copytree(adapters_root / task, renamed / task)
    argv_renamed = [
        "evaluate", "--tasks", "en-qa", "en-gc", "--system", f"lora={renamed}:LoRA copy",
        "--limit", "2", "--max-new-tokens", "4", "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert main(argv_renamed) == 0
    assert calls["generate"] == 6
    third = json.loads((out / "results.json").read_text())
    assert [s["label"] for s in third["systems"]] == ["LoRA copy"]


def test_evaluate_cli_refuses_bad_input_before_loading_the_model(
    bundle_dirs, tmp_path, monkeypatch, capsys
) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a bad command")

    monkeypatch.setattr(harness, "load_base_model", no_model)
    out = str(tmp_path / "out")
    cases = [
        (["--tasks", "xx-nope", "--system", "zero-shot"], "no task 'xx-nope'"),
        (["--tasks", "en-sr", "--system", f"bundle={bundle_dirs['bundle-float16']}"], "lacks task"),
        (["--tasks", "en-qa", "--system", f"lora={tmp_path}"], "no PEFT adapter for task 'en-qa'"),
        (["--tasks", "en-qa", "--system", "zero-shot", "--system", "zero-shot"], "two systems"),
        (["--tasks", "en-qa", "--system", "base"], "expected zero-shot"),
        (["--tasks", "en-qa"], "nothing to evaluate"),
        (["--tasks", "en-qa", "--merge-from", str(tmp_path)], "no PEFT adapter for task(s)"),
    ]
    for args, message in cases:
        assert main(["evaluate", *args, "--out", out]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)


# ---------------------------------------------------------------- table and average formatting --


def _results(systems: list[SystemResult], tasks: tuple[str, ...]) -> EvalResults:
    return EvalResults(config=EvalConfig(tasks=tasks), tasks=tasks, systems=tuple(systems))


def test_markdown_table_matches_the_papers_layout() -> None:
    rows = [
        SystemResult(
            "zero-shot",
            "zero-shot",
            0.0,
            {
                "en-gc": TaskResult(
                    "en-gc", GC, {"primary": 13.14, "f0.5": 13.14, "gleu": 40.04}, 3
                ),
                "en-qa": TaskResult("en-qa", QA, {"primary": 15.8, "f1": 15.8}, 3),
            },
        ),
        SystemResult(
            "hydraopt M=2",
            "hydraopt",
            28.0,
            {
                "en-gc": TaskResult("en-gc", GC, {"primary": 26.9, "f0.5": 26.9, "gleu": 51.0}, 3),
                "en-qa": TaskResult("en-qa", QA, {"primary": 28.25, "f1": 28.25}, 3),
            },
        ),
    ]
    assert rows[1].average == pytest.approx((26.9 + 28.25) / 2)
    assert markdown_table(_results(rows, ("en-gc", "en-qa"))).splitlines() == [
        "| system | S % | en-gc | en-gc GLEU | en-qa | Avg |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        "| zero-shot | 0.0 | 13.1 | 40.0 | 15.8 | 14.5 |",  # Avg leaves GLEU out
        "| hydraopt M=2 | 28.0 | 26.9 | 51.0 | 28.2 | 27.6 |",
        "",
        "Scores in 0..100 on the test split, greedy decoding. "
        "Avg: mean of the primary metrics (extra columns not included).",
        f"- en-gc: {GC}; 3 examples.",
        f"- en-qa: {QA}; 3 examples.",
    ]


def test_markdown_table_without_gleu_has_no_extra_column() -> None:
    rows = [
        SystemResult(
            "LoRA", "lora", 100.0, {"en-qa": TaskResult("en-qa", QA, {"primary": 61.5}, 1)}
        )
    ]
    table = markdown_table(_results(rows, ("en-qa",))).splitlines()
    assert table[0] == "| system | S % | en-qa | Avg |"
    assert table[2] == "| LoRA | 100.0 | 61.5 | 61.5 |"
    assert table[4].endswith("mean of the primary metrics.")


def test_eval_config_refuses_bad_values() -> None:
    with pytest.raises(HydraoptError, match="batch_size must be >= 1"):
        EvalConfig(tasks=("en-qa",), batch_size=0)
    with pytest.raises(HydraoptError, match="unique"):
        EvalConfig(tasks=("en-qa", "en-qa"))
    assert ZeroShot().storage_percent == 0.0
