"""hydraopt.progress: plain lines when the stream is not a terminal, a bar when it is."""

from __future__ import annotations

import io

import pytest

from hydraopt.progress import Progress, as_callback, format_seconds


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_every_interval_and_one_at_the_end() -> None:
    out, clock = io.StringIO(), FakeClock()
    with Progress(10, "sweep", "module", stream=out, interval=30, clock=clock) as p:
        for _ in range(4):
            clock.now += 10  # 10, 20, 30, 40 s
            p.update(1)
        assert out.getvalue().splitlines() == [
            "sweep: 3/10 modules (30%), 30.0s elapsed, ~1m10s left"  # 30 s * 7 / 3 = 70 s
        ]
        clock.now = 61
        p.set_postfix(loss="0.512")
        p.update(2)
        clock.now = 125
        p.update(4)  # reaches total: the final line, and close() afterwards adds nothing
    assert out.getvalue().splitlines()[1:] == [
        "sweep: 6/10 modules (60%), 1m01s elapsed, ~40.7s left; loss 0.512",
        "sweep: 10/10 modules (100%) in 2m05s; loss 0.512",
    ]


def test_disabled_is_silent_but_counts() -> None:
    out = io.StringIO()
    p = Progress(3, "x", stream=out, interval=0, enabled=False)
    for _ in p.track(range(3)):
        pass
    assert p.n == 3 and out.getvalue() == ""


def test_a_terminal_gets_a_bar_not_lines() -> None:
    out = FakeTerminal()
    with Progress(5, "merge", "module", stream=out, interval=0) as p:
        p.update(2)
        assert p.bar is not None
    assert "merge" in out.getvalue() and "2/5 modules (40%)" not in out.getvalue()


def test_a_failure_writes_no_final_line() -> None:
    out = io.StringIO()
    with pytest.raises(RuntimeError), Progress(5, "merge", stream=out, interval=1e9) as p:
        p.update(1)
        raise RuntimeError
    assert "in " not in out.getvalue()


def test_as_callback() -> None:
    assert as_callback(None, 3, "x") is None and as_callback(False, 3, "x") is None
    seen: list[int] = []
    assert as_callback(seen.append, 3, "x") == seen.append
    assert callable(as_callback(True, 3, "x"))
    with pytest.raises(TypeError, match="bool or a callable"):
        as_callback("yes", 3, "x")  # type: ignore[arg-type]


def test_format_seconds() -> None:
    assert [format_seconds(s) for s in (9.54, 75, 3725)] == ["9.5s", "1m15s", "1h02m"]


def test_merge_adapter_set_shows_progress_when_asked(make_adapter, capsys) -> None:
    import hydraopt

    aset = hydraopt.load_adapter_set([make_adapter(t, seed=i) for i, t in enumerate("ab")])
    capsys.readouterr()  # transformers' own bars while the adapters were built
    hydraopt.merge_adapter_set(aset, "task_arithmetic")
    assert capsys.readouterr().err == ""  # silent by default
    hydraopt.merge_adapter_set(aset, "task_arithmetic", progress=True)
    n = len(aset.modules)
    assert capsys.readouterr().err.startswith(f"merge task_arithmetic: {n}/{n} modules (100%) in ")
