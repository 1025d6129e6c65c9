"""Progress that shows in terminals, logs and notebooks alike.

On a terminal (stderr is a TTY) a tqdm bar; anywhere else (``make demo > log``, CI, a notebook
cell, ``nohup``) one plain line every ``interval`` seconds and one at the end, because a bar
redrawn with carriage returns is either invisible there or hundreds of lines of noise::

    sweep: 1200/4800 modules (25%), 2m10s elapsed, ~6m30s left
    sweep: 4800/4800 modules (100%) in 8m41s

Every long-running entry point takes ``progress=`` (``True`` for this display, ``False``/``None``
for silence, or a callable told how many units just finished) and turns it into a callback with
:func:`as_callback`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, TypeVar

T = TypeVar("T")

# What the library's ``progress=`` arguments accept.
ProgressArg = bool | Callable[[int], None] | None

# Seconds between plain lines; HYDRAOPT_PROGRESS_INTERVAL overrides it (e.g. 5 for short jobs).
DEFAULT_INTERVAL = 30.0


def format_seconds(seconds: float) -> str:
    """``75`` -> ``"1m15s"``, ``3725`` -> ``"1h02m"``, ``9.5`` -> ``"9.5s"``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Counts units of work towards ``total`` and shows it (see the module docstring).

    Args:
        total: Units expected.
        desc: What is counted, e.g. ``"sweep"`` or ``"finetune en-qa"``.
        unit: Name of one unit (``"module"``, ``"step"``, ``"example"``).
        enabled: ``False`` shows nothing (the object still counts).
        stream: Where to write (default ``sys.stderr``).
        interval: Seconds between plain lines (default ``$HYDRAOPT_PROGRESS_INTERVAL`` or 30).
        clock: Time source (tests pass a fake one).
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "it",
        *,
        enabled: bool = True,
        stream: IO[str] | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.stream = stream if stream is not None else sys.stderr
        if interval is None:
            interval = float(os.environ.get("HYDRAOPT_PROGRESS_INTERVAL", DEFAULT_INTERVAL))
        self.interval, self.clock = interval, clock
        self.start = self.last_line = clock()
        self.postfix = ""
        self.closed = not enabled
        self.bar: Any = None
        if enabled and _is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True, leave=False
            )

    def update(self, n: int = 1) -> None:
        """``n`` more units done; a plain line if ``interval`` has passed; closes at ``total``."""
        self.n += n
        if self.closed:
            return
        if self.bar is not None:
            self.bar.update(n)
        elif self.clock() - self.last_line >= self.interval and self.n < self.total:
            self._line()
        if self.n >= self.total:
            self.close()

    def set_postfix(self, **values: Any) -> None:
        """Extra ``key=value`` shown after the count (e.g. the training loss)."""
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())
        if self.bar is not None and not self.closed:
            self.bar.set_postfix(values)

    def track(self, items: Iterable[T]) -> Iterator[T]:
        """Yield ``items``, counting one unit after each is processed."""
        for item in items:
            yield item
            self.update(1)

    def close(self) -> None:
        """Finish: the bar goes away; a plain display writes its final line."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        else:
            self._line(final=True)

    def _line(self, final: bool = False) -> None:
        elapsed = self.clock() - self.start
        self.last_line = self.clock()
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        text = f"{self.desc}: {self.n}/{self.total} {self.unit}s{share}"
        if final:
            text += f" in {format_seconds(elapsed)}"
        else:
            text += f", {format_seconds(elapsed)} elapsed"
            if 0 < self.n < self.total:
                text += f", ~{format_seconds(elapsed * (self.total - self.n) / self.n)} left"
        if self.postfix:
            text += f"; {self.postfix}"
        print(text, file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        elif self.bar is not None:  # failed: drop the bar, do not claim a finished count
            self.bar.close()
            self.closed = True


def as_callback(
    progress: ProgressArg, total: int, desc: str, unit: str = "it"
) -> Callable[[int], None] | None:
    """Turn a ``progress=`` argument into a callback told how many units just finished.

    ``True``: a :class:`Progress` on stderr (it closes itself at ``total``); ``False``/``None``:
    ``None``; a callable: itself.
    """
    if progress is None or progress is False:
        return None
    if progress is True:
        return Progress(total, desc, unit).update
    if callable(progress):
        return progress
    raise TypeError(f"progress must be a bool or a callable, got {type(progress).__name__}")


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or file-like objects without isatty
        return False
