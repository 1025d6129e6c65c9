"""OMP_WAIT_POLICY=PASSIVE is in the environment before torch loads, unless the user chose."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# Records the policy at the moment torch is first imported: OpenMP reads it only then.
PROBE = """
import builtins, os
real, seen = builtins.__import__, []
def hook(name, *args, **kwargs):
    if name == "torch" and not seen:
        seen.append(os.environ.get("OMP_WAIT_POLICY"))
    return real(name, *args, **kwargs)
builtins.__import__ = hook
import {module}
import torch
print(seen[0])
"""


@pytest.mark.parametrize("module", ["hydraopt", "hydraopt.cli.main"])
@pytest.mark.parametrize(("user", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_policy_is_set_before_torch_loads_unless_the_user_set_it(module, user, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(SRC)
    if user is not None:
        env["OMP_WAIT_POLICY"] = user
    probe = PROBE.format(module=module)
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == expected
