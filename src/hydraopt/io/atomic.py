"""Output directories: checked before any work, built beside the target, replaced only if ours.

A crash or a validation error mid-way must never leave a half-written bundle or adapter dir that
looks complete, so every writer fills a sibling temp dir and renames it into place at the end;
the previous output, when replaced, is removed only after the new one is in place.

Replacing is the dangerous part: ``force`` replaces only a directory hydraopt itself wrote (a
bundle, an export, a sweep, a fine-tuned adapter; see :func:`hydraopt_output_kind`) or an
empty one, never a directory holding anything else, never one of the inputs, never the current
directory. Files
and directories are created with the user's umask, like any other tool's (``tempfile.mkdtemp``
would make them 0700 and safetensors writes 0600, which a server running as another user cannot
read). Temp dirs left by a run that crashed are removed by the next run writing the same output.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydraopt.errors import HydraoptError

EXPORT_MARKER = ".hydraopt-export.json"  # written into every export dir
BUNDLE_FILES = frozenset({"bundle.json", "tensors.safetensors"})
EXPORTED_ADAPTER_FILES = frozenset(
    {"adapter_model.safetensors", "adapter_config.json", "hydraopt_export.json"}
)
SWEEP_FILES = frozenset({"sweep.json", "sweep.md", "sweep.png", "bundles"})
FINETUNED_FILES = frozenset({"adapter_model.safetensors", "adapter_config.json", "training.json"})
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16] or "host"
_STEM_CHARS = 64  # temp names stay far below NAME_MAX whatever the output's name


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None


def _is_bundle(path: Path) -> bool:
    meta = _read_json(path / "bundle.json")
    entries = {p.name for p in path.iterdir()}
    return (
        isinstance(meta, dict)
        and meta.get("format") == "hydraopt-bundle"
        and entries <= BUNDLE_FILES
    )


def _is_exported_adapter(path: Path) -> bool:
    if path.is_symlink() or not path.is_dir() or not (path / "hydraopt_export.json").is_file():
        return False
    return {p.name for p in path.iterdir()} <= EXPORTED_ADAPTER_FILES


def _is_export(path: Path) -> bool:
    children = [p for p in path.iterdir() if p.name != EXPORT_MARKER]
    has_marker = (path / EXPORT_MARKER).is_file()
    return (has_marker or bool(children)) and all(_is_exported_adapter(c) for c in children)


def _is_sweep(path: Path) -> bool:
    result = _read_json(path / "sweep.json")
    if not isinstance(result, dict) or "points" not in result:
        return False
    if not {p.name for p in path.iterdir()} <= SWEEP_FILES:
        return False
    bundles = path / "bundles"
    return not bundles.exists() or (
        bundles.is_dir()
        and not bundles.is_symlink()
        and all(c.is_dir() and not c.is_symlink() and _is_bundle(c) for c in bundles.iterdir())
    )


def _is_finetuned_adapter(path: Path) -> bool:
    record = _read_json(path / "training.json")
    entries = {p.name for p in path.iterdir()}
    return isinstance(record, dict) and "task" in record and entries <= FINETUNED_FILES


def hydraopt_output_kind(path: str | Path) -> str | None:
    """The kind (a key of :data:`OUTPUT_KINDS`) if hydraopt wrote the directory ``path`` and
    nothing else was added to it; ``"empty"`` for an empty directory; None otherwise.

    An export is recognised by its :data:`EXPORT_MARKER` or, for exports written before the
    marker existed, by every entry being an adapter dir with ``hydraopt_export.json``.
    """
    path = Path(path)
    try:
        if path.is_symlink() or not path.is_dir():
            return None
        if not any(path.iterdir()):
            return "empty"
        for kind, test in OUTPUT_KINDS.items():
            if test(path):
                return kind
    except OSError:
        return None
    return None


OUTPUT_KINDS = {
    "bundle": _is_bundle,
    "sweep": _is_sweep,
    "export": _is_export,
    "finetuned adapter": _is_finetuned_adapter,  # hydraopt finetune: PEFT files + training.json
}


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_dir(
    out: str | Path,
    *,
    force: bool,
    inputs: Iterable[str | Path] = (),
    force_hint: str = "force=True",
) -> None:
    """Refuse an output path that cannot or must not be written, before any work is done.

    Refused: a path naming no directory (``.``, ``..``, ``/``); the current directory or one
    above it; one of ``inputs`` or a directory holding one; a path whose nearest existing
    parent is not a writable directory; an existing path unless ``force``; and, even with
    ``force``, an existing path that is a file, a symbolic link, or a non-empty directory
    hydraopt did not write (:func:`hydraopt_output_kind`).

    Args:
        out: the output directory.
        force: whether an existing hydraopt output may be replaced.
        inputs: paths the run reads (adapter dirs, a bundle); the output may not be or hold one.
        force_hint: how the caller's user asks for replacing (the CLI passes ``--force``).
    """
    out = Path(out)
    if out.name in ("", "..") or str(out) in (".", ""):
        raise HydraoptError(f"output path {str(out)!r} names no new directory; give one")
    if len(os.fsencode(out.name)) > 255:
        raise HydraoptError(f"output name {out.name[:40]!r}... is longer than 255 bytes")
    try:
        real, inputs_real = out.resolve(), [(p, Path(p).resolve()) for p in inputs]
    except (OSError, RuntimeError) as e:  # a symlink loop, an unreadable component
        raise HydraoptError(f"cannot resolve output path {out} or an input ({e})") from e
    if _is_within(Path.cwd().resolve(), real):
        raise HydraoptError(f"output path {out} is the current directory or holds it")
    for inp, inp_real in inputs_real:
        if _is_within(inp_real, real):
            what = "is" if inp_real == real else "holds"
            raise HydraoptError(f"output path {out} {what} the input {inp}; choose another path")
    check_parent_writable(out)
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise HydraoptError(f"output path {out} already exists; pass {force_hint} to replace it")
    if out.is_symlink():
        raise HydraoptError(f"output path {out} is a symbolic link; hydraopt replaces only dirs")
    if not out.is_dir():
        raise HydraoptError(f"output path {out} exists and is not a directory")
    if hydraopt_output_kind(out) is None:
        raise HydraoptError(
            f"output path {out} holds files hydraopt did not write; it is replaced only when it "
            "is a bundle, export, sweep or fine-tuning output (or empty): move them or pick "
            "another path"
        )


def check_parent_writable(out: Path) -> None:
    """The directory in which ``out`` will be created (or its nearest existing ancestor) must
    be a directory this process can write to."""
    parent = out.absolute().parent
    while True:
        try:
            exists = parent.exists()
        except OSError as e:
            raise HydraoptError(f"cannot reach {parent} ({e.strerror})") from e
        if exists or parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise HydraoptError(f"cannot create {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise HydraoptError(f"cannot create {out}: no write permission in {parent}")


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text()
        return int(next(ln for ln in status.splitlines() if ln.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: the only portable read sets it; restore at once
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give every file and dir under ``root`` (itself included) the modes the umask allows."""
    mask = current_umask()
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for f in filenames:
            path = os.path.join(dirpath, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def _temp_prefix(out: Path, role: str) -> str:
    return f".{out.name[:_STEM_CHARS]}.{role}-{_HOST}-{os.getpid()}-"


def _make_temp_dir(out: Path, role: str) -> Path:
    """A new empty dir beside ``out``, created with the umask's mode (unlike mkdtemp's 0700)."""
    for _ in range(100):
        path = out.parent / (_temp_prefix(out, role) + secrets.token_hex(4))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise HydraoptError(f"cannot create a temp dir beside {out}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, owned by someone else
        return True
    return True


def clean_stale_temp_dirs(out: str | Path) -> list[Path]:
    """Remove temp dirs beside ``out`` left by a crashed run of this host; returns them.

    Safe only where nothing can be lost: a ``tmp`` dir (an unfinished new output) whose process
    is gone, and an ``old`` dir (a replaced output) only when ``out`` itself exists, i.e. the
    swap finished. A crash between the two renames of a swap leaves both for the user.
    """
    out = Path(out)
    pattern = re.compile(
        rf"^\.{re.escape(out.name[:_STEM_CHARS])}\.(tmp|old)-{_HOST}-(\d+)-[0-9a-f]{{8}}$"
    )
    removed = []
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return []
    for path in siblings:
        m = pattern.match(path.name)
        if m is None or path.is_symlink() or not path.is_dir() or _process_alive(int(m[2])):
            continue
        if m[1] == "old" and not out.is_dir():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def mark_export(directory: Path, tasks: list[str]) -> None:
    """Write the marker that lets a later run recognise ``directory`` as an export of hydraopt."""
    (directory / EXPORT_MARKER).write_text(json.dumps({"written_by": "hydraopt", "tasks": tasks}))


@contextmanager
def atomic_dir(
    out: str | Path, *, force: bool = False, inputs: Iterable[str | Path] = ()
) -> Iterator[Path]:
    """Yield a temp dir that becomes ``out`` when the block finishes without error.

    Args:
        out: final directory path (checked by :func:`check_output_dir`).
        force: replace an existing hydraopt output (only after the new content is complete).
        inputs: paths the writer reads; ``out`` may not be or hold one.

    Raises:
        HydraoptError: a refused ``out``, or an OS error while writing (nothing is left behind).
    """
    out = Path(out)
    check_output_dir(out, force=force, inputs=inputs)
    made = [p for p in out.absolute().parents if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temp_dirs(out)
        tmp = _make_temp_dir(out, "tmp")
    except OSError as e:
        _remove_empty(made)
        raise HydraoptError(f"cannot create {out}: {e.strerror or e}") from e
    try:
        yield tmp
        apply_umask(tmp)
        _swap_in(tmp, out, force=force)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        if isinstance(e, OSError):
            where = e.filename or out
            raise HydraoptError(f"{where}: {e.strerror or e}; nothing was written to {out}") from e
        raise


def _swap_in(tmp: Path, out: Path, *, force: bool) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and removed last.

    Without ``force``, an ``out`` that appeared while we wrote (another run with the same
    target) is left alone: the check at the start cannot see it.
    """
    if not out.exists():
        tmp.rename(out)
        return
    if not force:
        raise HydraoptError(f"output path {out} appeared while writing; nothing was replaced")
    old = _make_temp_dir(out, "old")
    old.rmdir()
    out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        old.rename(out)  # put the previous output back before reporting the failure
        raise
    shutil.rmtree(old, ignore_errors=True)


def _remove_empty(dirs: list[Path]) -> None:
    """Remove the parents this run created, deepest first, if they are still empty."""
    for d in dirs:
        with contextlib.suppress(OSError):
            d.rmdir()
