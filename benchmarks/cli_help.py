"""Time ``hydraopt [COMMAND] --help`` for one or more source trees, side by side in one run.

Each measurement is a fresh interpreter (``python -m hydraopt.cli.main ... --help``, the console
script's work), the trees interleaved round by round so that a busy machine slows every tree
alike; the table shows the median wall time per command and tree, and whether torch was imported.

    python benchmarks/cli_help.py --src before=/path/to/old/src --src after=src --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS = ("", "merge", "sweep", "inspect", "export", "evaluate")
PROBE = (
    "import sys, runpy\n"
    "sys.argv = ['hydraopt', *sys.argv[1:], '--help']\n"
    "try:\n"
    "    runpy.run_module('hydraopt.cli.main', run_name='__main__')\n"
    "except SystemExit:\n"
    "    pass\n"
    "sys.stderr.write('torch' if 'torch' in sys.modules else '-')\n"
)


def time_help(src: str, command: str) -> tuple[float, bool]:
    """(seconds, torch imported) of one ``--help`` in a fresh interpreter on ``src``."""
    env = {**os.environ, "PYTHONPATH": src, "OMP_WAIT_POLICY": "PASSIVE"}
    argv = [sys.executable, "-c", PROBE, *([command] if command else [])]
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, done.stderr.endswith("torch")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", action="append", required=True, help="LABEL=DIR of a src tree")
    p.add_argument("--repeats", type=int, default=5, help="runs per command and tree (default 5)")
    args = p.parse_args()
    trees = dict(s.split("=", 1) for s in args.src)
    times: dict[tuple[str, str], list[float]] = {}
    torch_seen: dict[tuple[str, str], bool] = {}
    for _ in range(args.repeats):
        for command in COMMANDS:
            for label, src in trees.items():
                seconds, torch_loaded = time_help(src, command)
                times.setdefault((command, label), []).append(seconds)
                torch_seen[command, label] = torch_loaded
    print(f"median of {args.repeats} fresh interpreters; load average {os.getloadavg()[0]:.1f}")
    print("| command | " + " | ".join(f"{label} s (torch?)" for label in trees) + " |")
    print("| --- |" + " ---: |" * len(trees))
    for command in COMMANDS:
        cells = [
            f"{statistics.median(times[command, label]):.2f} "
            f"({'torch' if torch_seen[command, label] else 'no torch'})"
            for label in trees
        ]
        name = f"hydraopt {command} --help".replace("  ", " ")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
