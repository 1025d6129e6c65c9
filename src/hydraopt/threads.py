"""Threading defaults that hold on a busy machine, set by the program itself.

PyTorch's CPU kernels run on OpenMP. Left to its default wait policy, every OpenMP worker keeps
spinning for a while after each parallel region, waiting for the next one; when other processes
want the same cores, those spinning threads steal their time slices from the threads doing the
work, and a merge on a busy machine ran 4-5x slower than with ``OMP_WAIT_POLICY=PASSIVE``
(workers sleep at once; benchmarks/RESULTS.md section 10). The Makefile set it; users' shells do not.
OpenMP reads the variable once, when torch loads its runtime, so it has to be set before the
first ``import torch``: this module must not import torch.
"""

from __future__ import annotations

import os
import sys

DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def apply_thread_defaults() -> bool:
    """Set :data:`DEFAULTS` in the environment where the user has not set them.

    Returns:
        Whether they can still take effect: False when torch was already imported (its OpenMP
        runtime has read the environment by then), True otherwise.
    """
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    return "torch" not in sys.modules


def max_threads() -> int:
    """The most threads a run may ask for: generous (a Ray worker may be larger than this
    machine), but far below the count at which starting OpenMP's threads fails mid-run."""
    return max(64, 8 * (os.cpu_count() or 1))


def check_threads(threads: int | None) -> None:
    """A thread count given by the user: None (library default) or 1 .. :func:`max_threads`."""
    from hydraopt.errors import HydraoptError

    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise HydraoptError(f"threads must be a positive integer, got {threads}")
    if threads is not None and threads > max_threads():
        raise HydraoptError(
            f"threads = {threads} is more than this machine can run ({os.cpu_count()} CPUs; "
            f"at most {max_threads()})"
        )
