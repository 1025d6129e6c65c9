"""Unit tests of hydraopt.eval.tasks: no model needed (a fake tokenizer stands in)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from hydraopt.eval.tasks import (
    DEFAULT_MAX_NEW_TOKENS,
    MAX_NEW_TOKENS,
    TASKS_ENV_VAR,
    TaskSpec,
    build_prompt,
    default_tasks_root,
    list_tasks,
    load_split,
    load_task,
    measure_max_new_tokens,
    resolve_task_dir,
    shipped_tasks_root,
)


def write_task(root: Path, task_id: str = "en-qa", **extra: object) -> Path:
    task_dir = root / task_id
    task_dir.mkdir(parents=True)
    spec = {"id": task_id, "instruction": "Answer:", "metric": "F1", "language": "en", **extra}
    (task_dir / "task.json").write_text(json.dumps(spec))
    lines = [
        {"input": "q1", "target": "a1", "references": ["a1", "b1"]},
        {"input": "q2", "target": "a2"},
        {"input": "q3", "target": "a3", "references": ["a3"]},
    ]
    text = "\n".join(json.dumps(line) for line in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n"
    for split in ("train", "val", "test"):
        (task_dir / f"{split}.jsonl").write_text(text)
    return task_dir


class FakeTokenizer:
    """Whitespace tokenizer with a recognisable chat template."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": list(range(len(text.split())))}

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        self.calls.append(
            {"messages": messages, "tokenize": tokenize, "gen": add_generation_prompt}
        )
        body = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return body + ("<assistant>" if add_generation_prompt else "")


def test_load_task_reads_spec_and_table_cap(tmp_path: Path) -> None:
    spec = load_task(write_task(tmp_path, "en-qa"))
    assert spec == TaskSpec(
        id="en-qa",
        instruction="Answer:",
        metric="F1",
        max_new_tokens=MAX_NEW_TOKENS["en-qa"],
        language="en",
        application="",
    )


def test_load_task_cap_precedence(tmp_path: Path) -> None:
    in_json = write_task(tmp_path, "en-qa", max_new_tokens=7)
    assert load_task(in_json).max_new_tokens == 7
    assert load_task(in_json, max_new_tokens=3).max_new_tokens == 3
    with pytest.warns(UserWarning, match="no generation cap"):
        unknown = load_task(write_task(tmp_path, "xx-new"))
    assert unknown.max_new_tokens == DEFAULT_MAX_NEW_TOKENS


def test_load_task_rejects_bad_specs(tmp_path: Path) -> None:
    task_dir = write_task(tmp_path, "en-qa")
    with pytest.raises(ValueError, match="max_new_tokens"):
        load_task(task_dir, max_new_tokens=0)
    (task_dir / "task.json").write_text(json.dumps({"id": "en-qa", "metric": "F1"}))
    with pytest.raises(ValueError, match="instruction"):
        load_task(task_dir)


def test_load_split_order_limit_and_references(tmp_path: Path) -> None:
    task_dir = write_task(tmp_path)
    examples = load_split(task_dir, "test")
    assert [e.input for e in examples] == ["q1", "q2", "q3"]  # blank line skipped
    assert examples[0].references == ("a1", "b1")
    assert examples[1].references == ("a2",)  # defaults to the target
    assert [e.target for e in load_split(task_dir, "train", limit=2)] == ["a1", "a2"]
    assert load_split(task_dir, "val", limit=0) == []


def test_load_split_rejects_bad_input(tmp_path: Path) -> None:
    task_dir = write_task(tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_split(task_dir, "dev")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit"):
        load_split(task_dir, "test", limit=-1)
    (task_dir / "val.jsonl").write_text(json.dumps({"input": "no target"}) + "\n")
    with pytest.raises(ValueError, match="val.jsonl:1"):
        load_split(task_dir, "val")


def test_resolve_task_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task_dir = write_task(tmp_path / "root", "en-ts")
    assert resolve_task_dir(task_dir) == task_dir
    assert resolve_task_dir("en-ts", tmp_path / "root") == tmp_path / "root" / "en-ts"
    monkeypatch.setenv(TASKS_ENV_VAR, str(tmp_path / "root"))
    assert default_tasks_root() == tmp_path / "root"
    assert resolve_task_dir("en-ts") == tmp_path / "root" / "en-ts"
    with pytest.raises(FileNotFoundError, match="no task 'en-zz'"):
        resolve_task_dir("en-zz")


def test_default_tasks_root_is_the_shipped_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TASKS_ENV_VAR, raising=False)
    repo_root = Path(__file__).resolve().parents[3]
    assert default_tasks_root() == repo_root / "src" / "hydraopt" / "data" / "tasks"
    assert list_tasks() == ["de-qa", "en-gc", "en-qa", "en-sr", "en-ta", "en-ts", "es-qa", "zh-qa"]
    assert resolve_task_dir("en-qa") == default_tasks_root() / "en-qa"


def test_shipped_tasks_match_their_manifest() -> None:
    """Every shipped file is listed with its SHA-256, and every listed file is shipped intact."""
    root = shipped_tasks_root()
    listed = {}
    for line in (root / "MANIFEST.sha256").read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    shipped = {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.name != "MANIFEST.sha256"
    }
    assert shipped - set(listed) == {"ATTRIBUTION.md"}  # the one file added beside the data
    for name, digest in listed.items():
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, name
    for task in list_tasks(root):
        spec = json.loads((root / task / "task.json").read_text())
        assert spec["license"] and spec["source"], task  # every task names its license and source
        counts = {s: len(load_split(root / task, s)) for s in ("train", "val", "test")}
        assert counts == spec["counts"], task


def test_build_prompt_is_one_user_turn_with_generation_prompt() -> None:
    tokenizer = FakeTokenizer()
    spec = TaskSpec(
        id="t", instruction="Summarize the following text:", metric="m", max_new_tokens=4
    )
    prompt = build_prompt(tokenizer, spec, "A long text.")
    assert prompt == "<user>Summarize the following text: A long text.</user><assistant>"
    assert tokenizer.calls == [
        {
            "messages": [{"role": "user", "content": "Summarize the following text: A long text."}],
            "tokenize": False,
            "gen": True,
        }
    ]


def test_measure_max_new_tokens_by_hand() -> None:
    tokenizer = FakeTokenizer()
    targets = ["a", "a b", "a b c", "a b c d"]  # lengths with EOS: 2, 3, 4, 5
    assert measure_max_new_tokens(tokenizer, targets, quantile=1.0, multiple=1) == 5
    assert measure_max_new_tokens(tokenizer, targets, quantile=1.0, multiple=8) == 8
    # position 0.5 * 3 = 1.5 -> 3 + 0.5 * (4 - 3) = 3.5 -> rounded up to 4
    assert measure_max_new_tokens(tokenizer, targets, quantile=0.5, multiple=1) == 4
    assert measure_max_new_tokens(tokenizer, targets, quantile=0.5, multiple=3) == 6
    with pytest.raises(ValueError, match="no targets"):
        measure_max_new_tokens(tokenizer, [])
    with pytest.raises(ValueError, match="quantile"):
        measure_max_new_tokens(tokenizer, targets, quantile=0.0)


def test_every_shipped_task_has_a_cap() -> None:
    root = shipped_tasks_root()
    ids = sorted(p.name for p in root.iterdir() if (p / "task.json").is_file())
    assert ids, f"no task under {root}"
    assert [i for i in ids if i not in MAX_NEW_TOKENS] == []


def test_the_documented_task_format_loads(tmp_path: Path) -> None:
    """docs/tasks.md's example task.json and split line make a task that loads and scores."""
    import re

    from hydraopt.eval.metrics import METRICS

    doc = (Path(__file__).resolve().parents[3] / "docs" / "tasks.md").read_text()
    spec_text, line_text = re.findall(r"```json\n(.*?)```", doc, re.S)[:2]
    spec = json.loads(spec_text)
    task_dir = tmp_path / spec["id"]
    task_dir.mkdir()
    (task_dir / "task.json").write_text(spec_text)
    (task_dir / "test.jsonl").write_text(json.dumps(json.loads(line_text)) + "\n\n")
    loaded = load_task(resolve_task_dir(spec["id"], tmp_path))
    assert (loaded.id, loaded.max_new_tokens) == ("my-task", 64)
    assert loaded.metric in METRICS
    (example,) = load_split(task_dir, "test")
    assert example.references == ("all", "acceptable outputs")
