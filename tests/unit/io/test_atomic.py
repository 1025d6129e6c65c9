"""Output directories: what ``force`` may replace, modes that follow the umask, crash leftovers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_factory import lora_bundle, write

from hydraopt import export_peft_adapters, load_bundle, save_bundle
from hydraopt.errors import HydraoptError
from hydraopt.io import atomic
from hydraopt.io.atomic import (
    EXPORT_MARKER,
    atomic_dir,
    check_output_dir,
    clean_stale_temp_dirs,
    hydraopt_output_kind,
)


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(saved)


def test_output_kinds_are_recognised_and_user_dirs_are_not(tmp_path):
    bundle = write(lora_bundle(), tmp_path / "b")
    export = tmp_path / "x"
    export_peft_adapters(load_bundle(bundle), export)
    assert (export / EXPORT_MARKER).is_file()
    assert hydraopt_output_kind(bundle) == "bundle"
    assert hydraopt_output_kind(export) == "export"
    (tmp_path / "empty").mkdir()
    assert hydraopt_output_kind(tmp_path / "empty") == "empty"
    (export / EXPORT_MARKER).unlink()  # exports written before the marker existed
    assert hydraopt_output_kind(export) == "export"
    sweep = tmp_path / "s"
    (sweep / "bundles").mkdir(parents=True)
    write(lora_bundle(), sweep / "bundles" / "hydraopt_M2")
    (sweep / "sweep.json").write_text(json.dumps({"points": []}))
    assert hydraopt_output_kind(sweep) == "sweep"
    tuned = tmp_path / "t"
    tuned.mkdir()
    for name in ["adapter_config.json", "adapter_model.safetensors"]:
        (tuned / name).write_text("{}")
    assert hydraopt_output_kind(tuned) is None  # a PEFT adapter from elsewhere
    (tuned / "training.json").write_text(json.dumps({"task": "en-gc", "steps": 10}))
    assert hydraopt_output_kind(tuned) == "finetuned adapter"

    for out, added in [(bundle, "notes.txt"), (export, "notes.txt"), (export / "alpha", "x.py")]:
        (out / added).write_text("mine")
        parent = out if out != export / "alpha" else export
        assert hydraopt_output_kind(parent) is None, out
        (out / added).unlink()
    (sweep / "bundles" / "mine").mkdir()
    assert hydraopt_output_kind(sweep) is None
    (tmp_path / "file").write_text("x")
    assert hydraopt_output_kind(tmp_path / "file") is None
    (tmp_path / "link").symlink_to(bundle)
    assert hydraopt_output_kind(tmp_path / "link") is None
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "bundle.json").write_text(json.dumps({"format": "something-else"}))
    assert hydraopt_output_kind(fake) is None


def test_check_output_dir_refusals_are_one_line_in_library_words(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    inp = tmp_path / "in" / "adapter"
    inp.mkdir(parents=True)
    (tmp_path / "afile").write_text("x")
    cases = [
        (".", "names no new directory"),
        ("..", "names no new directory"),
        ("/", "names no new directory"),
        (str(tmp_path), "current directory"),
        (str(tmp_path.parent), "current directory"),
        (str(user), "did not write"),
        (str(inp), "is the input"),
        (str(tmp_path / "in"), "holds the input"),
        (str(tmp_path / "afile"), "not a directory"),
        (str(tmp_path / "afile" / "sub"), "afile is not a directory"),
        (str(tmp_path / ("é" * 128)), "longer than 255 bytes"),
    ]
    for out, message in cases:
        with pytest.raises(HydraoptError, match=message) as e:
            check_output_dir(out, force=True, inputs=[inp])
        assert "\n" not in str(e.value) and "--force" not in str(e.value)
    with pytest.raises(HydraoptError, match="pass force=True to replace"):
        check_output_dir(user, force=False)
    with pytest.raises(HydraoptError, match="pass --force to replace"):
        check_output_dir(user, force=False, force_hint="--force")
    (tmp_path / "link").symlink_to(tmp_path / "empty-target", target_is_directory=True)
    with pytest.raises(HydraoptError, match="symbolic link"):
        check_output_dir(tmp_path / "link", force=True)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(HydraoptError, match="cannot resolve|symbolic link"):
        check_output_dir(tmp_path / "loop" / "b", force=True)
    assert (user / "thesis.tex").read_text() == "years of work"


def test_an_unwritable_parent_is_refused_before_any_work(tmp_path, monkeypatch):
    # Tests may run as root, for whom chmod does not block writes: fake the permission answer.
    monkeypatch.setattr(atomic.os, "access", lambda path, mode: Path(path) != tmp_path / "ro")
    (tmp_path / "ro").mkdir()
    with pytest.raises(HydraoptError, match="no write permission in .*ro"):
        check_output_dir(tmp_path / "ro" / "new" / "b", force=False)


def test_force_replaces_a_bundle_only_when_the_new_one_is_complete(tmp_path):
    out = write(lora_bundle(heads=2), tmp_path / "b")
    with pytest.raises(RuntimeError), atomic_dir(out, force=True) as tmp:
        (tmp / "partial").write_text("half")
        raise RuntimeError("crash mid-way")
    assert load_bundle(out).num_heads == 2  # the old output is untouched
    save_bundle(lora_bundle(heads=1), out, dtype="float32", force=True)
    assert load_bundle(out).num_heads == 1
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temp or old dir left


def test_an_output_that_appears_while_writing_is_not_replaced_without_force(tmp_path):
    out = tmp_path / "b"
    with pytest.raises(HydraoptError, match="appeared while writing"), atomic_dir(out) as tmp:
        (tmp / "ours").write_text("new")
        out.mkdir()  # another run (or the user) creates the same target meanwhile
        (out / "theirs").write_text("keep me")
    assert (out / "theirs").read_text() == "keep me" and not (out / "ours").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # our temp dir is gone


def test_an_os_error_while_writing_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "new" / "deeper" / "b"
    with pytest.raises(HydraoptError, match="No such file") as e, atomic_dir(out) as tmp:
        (tmp / "missing" / "x").write_text("boom")
    assert "nothing was written" in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # the parents it created are gone too


@pytest.mark.parametrize(
    ("mask", "dir_mode", "file_mode"),
    [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)],
)
def test_outputs_follow_the_umask(tmp_path, umask, mask, dir_mode, file_mode):
    umask(mask)
    bundle = write(lora_bundle(), tmp_path / "b")  # safetensors alone writes 0600
    export = tmp_path / "x"
    export_peft_adapters(load_bundle(bundle), export)
    for path in [bundle, export, export / "alpha"]:
        assert path.stat().st_mode & 0o777 == dir_mode, path
    for path in [
        bundle / "tensors.safetensors",
        bundle / "bundle.json",
        export / "alpha" / "adapter_model.safetensors",
    ]:
        assert path.stat().st_mode & 0o777 == file_mode, path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_dirs_of_crashed_runs_are_cleaned_where_safe(tmp_path):
    out = tmp_path / "b"
    host, dead, alive = atomic._HOST, dead_pid(), os.getppid()

    def leftover(role: str, pid: int, host: str = host) -> Path:
        d = tmp_path / f".b.{role}-{host}-{pid}-0123abcd"
        d.mkdir()
        (d / "tensors.safetensors").write_text("partial")
        return d

    crashed, running = leftover("tmp", dead), leftover("tmp", alive)
    elsewhere = leftover("tmp", dead, host="otherhost")
    old_before_swap = tmp_path / f".b.old-{host}-{dead}-4567cdef"
    old_before_swap.mkdir()  # out is missing: this may be the user's only copy
    assert clean_stale_temp_dirs(out) == [crashed]
    assert running.is_dir() and elsewhere.is_dir() and old_before_swap.is_dir()
    write(lora_bundle(), out)  # a run writing the same output cleans first
    assert clean_stale_temp_dirs(out) == [old_before_swap]  # the swap is done now
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".b.tmp-otherhost-{dead}-0123abcd", f".b.tmp-{host}-{alive}-0123abcd", "b"]
    )
