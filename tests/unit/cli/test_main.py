"""The ``hydraopt`` entry point: cheap help, one summary per subcommand, defaults in help text."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hydraopt.cli.main import SUBCOMMANDS, build_parser, chosen_command

SRC = str(Path(__file__).resolve().parents[3] / "src")


def _modules_after(code: str) -> set[str]:
    """Run ``code`` in a fresh interpreter (our src first); the heavy modules it imported."""
    probe = (
        code
        + "\nimport sys\nprint(' '.join(m for m in ('torch', 'transformers', 'numba') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    return set(done.stdout.split("\n")[-2].split())


def test_help_and_version_import_no_torch() -> None:
    help_run = (
        "from hydraopt.cli.main import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
    )
    assert _modules_after(help_run) == set()
    bad_command = (
        "from hydraopt.cli.main import main\n"
        "try:\n    main(['mrege'])\nexcept SystemExit as e:\n    assert e.code == 2\n"
    )
    assert _modules_after(bad_command) == set()


# Every parser, the flags generated from the merge methods' configs included, is built from
# torch-free modules: torch is imported when a command starts work, never for its --help.
@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_subcommand_parsers_import_no_torch(command: str) -> None:
    build = f"from hydraopt.cli.main import build_parser\nbuild_parser({command!r})"
    assert _modules_after(build) == set()
    run = (
        "from hydraopt.cli.main import main\n"
        f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
    )
    assert "torch" not in _modules_after(run)


def test_the_torch_probe_can_fail() -> None:
    # The check above must be able to fail: using a method imports its implementation and torch.
    assert "torch" in _modules_after("from hydraopt.merge import get_method\nget_method('ties')")


def test_import_hydraopt_is_lazy_but_complete() -> None:
    assert _modules_after("import hydraopt") == set()
    # the first public name used imports its module, and only then torch
    assert "torch" in _modules_after("import hydraopt\nhydraopt.merge_adapter_set")


def test_every_public_name_resolves() -> None:
    import hydraopt

    for name in hydraopt.__all__:
        assert getattr(hydraopt, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = hydraopt.nope  # type: ignore[attr-defined]


def test_chosen_command() -> None:
    assert chosen_command(["merge", "a", "--out", "b"]) == "merge"
    assert chosen_command(["--version"]) is None
    assert chosen_command(["--help", "sweep"]) == "sweep"
    assert chosen_command(["nope"]) is None
    assert chosen_command([]) is None


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def test_summaries_match_the_modules() -> None:
    """The summaries listed without importing equal what each module registers."""
    full = _subparsers(build_parser("*"))
    registered = {a.dest: a.help for a in full._choices_actions}
    assert registered == SUBCOMMANDS


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_every_argument_has_help_with_its_default(command: str) -> None:
    parser = _subparsers(build_parser(command)).choices[command]
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        has_default = action.default not in (None, False, [], argparse.SUPPRESS)
        if not action.help or (has_default and "default" not in action.help):
            missing.append(name)
    assert missing == [], f"{command}: no help, or help without the default"
