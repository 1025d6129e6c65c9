"""The CLI on a busy machine: OpenMP's wait policy, measured side by side under a competing load.

Starts ``--load`` busy Python loops (one per core by default), all at the same nice level as the
runs, then runs the same merge once per setup, one after another, while the loops keep spinning:

  - ``before``: the CLI of ``--before-src`` (the commit before threads.py), OMP_WAIT_POLICY unset
  - ``after``:  this checkout's CLI, OMP_WAIT_POLICY unset (the program sets PASSIVE itself)
  - ``passive``: this checkout's CLI with OMP_WAIT_POLICY=PASSIVE set by the user (the reference)

Prints one markdown table of wall seconds and the ratio to ``passive``. Outputs go to a temp dir.

``--command sweep`` times ``hydraopt sweep`` (HydraOpt M = 1, 2 and every baseline) on the same
slice instead, ``--command evaluate`` ``hydraopt evaluate --tasks en-qa --system zero-shot
--limit 8`` with a fresh generation cache per run; ``--skip-before`` drops the ``before`` run.

Usage: python benchmarks/busy_machine.py [--command merge|sweep|evaluate] [--adapters DIR]
           [--modules REGEX] [--heads M] [--before-src DIR] [--skip-before] [--load N]
           [--nice N] [--timeout S]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_merge(src: Path, policy: str | None, args: argparse.Namespace, out: Path) -> float | None:
    """Wall seconds of one merge, None if it ran past ``--timeout`` (then it is stopped)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(src)
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, "-m", "hydraopt.cli.main", *command_args(args, out)]
    start = time.perf_counter()
    try:
        subprocess.run(
            ["nice", "-n", str(args.nice), *cmd],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=args.timeout,
        )
    except subprocess.TimeoutExpired:
        return None
    return time.perf_counter() - start


def command_args(args: argparse.Namespace, out: Path) -> list[str]:
    """The hydraopt arguments of one timed run (writes only under ``out``)."""
    if args.command == "sweep":
        return [
            "sweep",
            args.adapters,
            "--heads",
            "1",
            "2",
            "--modules",
            args.modules,
            "--out",
            str(out),
        ]
    if args.command == "evaluate":
        return ["evaluate", "--tasks", "en-qa", "--system", "zero-shot", "--limit", "8"] + [
            "--cache",
            str(out) + "-cache",
            "--quiet",
            "--out",
            str(out),
        ]
    return ["merge", args.adapters, "--heads", str(args.heads), "--modules", args.modules] + [
        "--out",
        str(out),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--command", choices=("merge", "sweep", "evaluate"), default="merge")
    p.add_argument("--skip-before", action="store_true", help="time only this checkout")
    p.add_argument("--adapters", default=str(REPO.parent / "shared" / "adapters"))
    p.add_argument("--modules", default=r"layers\.[0-3]\.")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--before-src", default="/work/main/src")
    p.add_argument("--load", type=int, default=os.cpu_count() or 2)
    p.add_argument("--nice", type=int, default=10)
    p.add_argument("--timeout", type=float, default=420, help="seconds before a run is stopped")
    args = p.parse_args()
    busy = [
        subprocess.Popen(["nice", "-n", str(args.nice), sys.executable, "-c", "while True: pass"])
        for _ in range(args.load)
    ]
    setups = (
        []
        if args.skip_before
        else [("before (OMP_WAIT_POLICY unset)", Path(args.before_src), None)]
    )
    setups += [
        ("after (OMP_WAIT_POLICY unset)", REPO / "src", None),
        ("after, OMP_WAIT_POLICY=PASSIVE by the user", REPO / "src", "PASSIVE"),
    ]
    seconds = {}
    try:
        time.sleep(2)  # let the loops reach the run queue
        with tempfile.TemporaryDirectory() as tmp:
            for i, (label, src, policy) in enumerate(setups):
                seconds[label] = run_merge(src, policy, args, Path(tmp) / f"b{i}")
                print(f"{label}: {seconds[label]} s", file=sys.stderr)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    ref = seconds[setups[-1][0]] or float("nan")
    print(
        f"{platform.node()}, {os.cpu_count()} CPUs, load: {args.load} busy loops at nice {args.nice}"
    )
    print("hydraopt " + " ".join(command_args(args, Path("OUT"))) + "\n")
    print("| setup | wall s | / PASSIVE |\n| --- | ---: | ---: |")
    for label, s in seconds.items():
        if s is None:
            print(f"| {label} | > {args.timeout:.0f} (stopped) | > {args.timeout / ref:.2f} |")
        else:
            print(f"| {label} | {s:.1f} | {s / ref:.2f} |")


if __name__ == "__main__":
    main()
