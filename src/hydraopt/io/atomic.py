"""Atomic directory writes: build in a temp dir beside the target, then rename.

A crash or a validation error mid-way must never leave a half-written bundle or adapter dir that
looks complete, so every writer fills a sibling temp dir and renames it into place at the end.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydraopt.errors import HydraoptError


def check_output_dir(out: Path, *, force: bool) -> None:
    """Refuse an existing output path unless ``force``; refuse a file in any case."""
    if out.exists() and not force:
        raise HydraoptError(
            f"output path {out} already exists; force=True (--force on the command line) "
            "replaces it"
        )
    if out.exists() and not out.is_dir():
        raise HydraoptError(f"output path {out} exists and is not a directory")


@contextmanager
def atomic_dir(out: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir that becomes ``out`` when the block finishes without error.

    Args:
        out: final directory path.
        force: replace an existing ``out`` (only after the new content is complete).
    """
    out = Path(out)
    check_output_dir(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        # Move the old one aside first so that a failure in between loses nothing.
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
