"""Work-item sizes shared by :mod:`hydraopt.merge.kernels` and the numba kernels it compiles.

Their own module so that the compiled kernels (:mod:`hydraopt.merge._kernels_jit`) need not
import the module that imports them.
"""

BLOCK = 8192  # elements per parallel work item (its buffers stay small: see the kernel)
MEDIAN_BLOCK = 2048  # the median holds one row per task of its head
