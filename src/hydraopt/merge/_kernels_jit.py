"""The numba kernels behind :mod:`hydraopt.merge.kernels`, imported only when one first runs.

Module-level functions so that numba's on-disk cache (``cache=True``) holds them, helpers
included: compiled once per machine, not once per process. The Python-side contracts, the
key mapping and the tests live in :mod:`hydraopt.merge.kernels`.
"""

# mypy: ignore-errors
from __future__ import annotations

import numba
import numpy as np

from hydraopt.merge.kernel_blocks import BLOCK, MEDIAN_BLOCK


@numba.njit(inline="always", cache=True)
def target_keys(row, raw, mask, buf):
    """A row of keys: the row itself, or (raw targets) its bits mapped into ``buf``."""
    if not raw:
        return row
    for j in range(row.size):
        v = row[j]
        buf[j] = v if v >= 0 else -(v & mask)
    return buf[: row.size]


@numba.njit(inline="always", cache=True)
def route_members(route, g, c, members):
    """The tasks module ``g`` routes to head ``c``, written into ``members``; returns how many."""
    m = 0
    for i in range(route.shape[1]):
        if route[g, i] == c:
            members[m] = i
            m += 1
    return m


# fastmath reassoc only lets the float64 loss sums vectorise; their order is still fixed per
# work item, so the loss does not depend on the thread count.
@numba.njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc"})
def sign_sum_kernel(x, t, raw, route, shift, mask, out, partial, with_signs):
    G, M, n = x.shape
    K = t.shape[1]
    blocks = partial.shape[1]
    with_loss = partial.shape[2] > 0
    for job in numba.prange(G * blocks):
        g, b = job // blocks, job % blocks
        lo = b * BLOCK
        w = min(n, lo + BLOCK) - lo
        # One head at a time: BLOCK-sized buffers per work item whatever M is (small enough
        # for the allocator's fast path and for L1/L2). Keys and sums in the bits' integer
        # width: 16-bit lanes for bfloat16, twice as many per instruction as 32-bit ones.
        kx = np.empty(BLOCK, x.dtype)  # order keys of X_c
        acc = np.empty(BLOCK, x.dtype)
        fx = np.empty(BLOCK, np.float32)  # values, for the loss
        ix = fx.view(np.int32)
        members = np.empty(K, np.int64)
        kt0 = np.empty(BLOCK, x.dtype)  # raw targets: their keys, two rows at a time
        kt1 = np.empty(BLOCK, x.dtype)

        for c in range(M):
            m = route_members(route, g, c, members)
            if m == 0 and with_signs:
                out[g, c, lo : lo + w] = 0
                continue
            xr = x[g, c, lo : lo + w]
            for j in range(w):
                v = xr[j]
                kx[j] = v if v >= 0 else -(v & mask)
            if with_signs:
                acc[:w] = 0
                # Two tasks per sweep: half the loads and stores of the running sums.
                p = 0
                while p + 1 < m:
                    t0 = target_keys(t[g, members[p], lo : lo + w], raw, mask, kt0)
                    t1 = target_keys(t[g, members[p + 1], lo : lo + w], raw, mask, kt1)
                    for j in range(w):
                        u = kx[j]
                        acc[j] += (u > t0[j]) - (u < t0[j]) + (u > t1[j]) - (u < t1[j])
                    p += 2
                if p < m:
                    t0 = target_keys(t[g, members[p], lo : lo + w], raw, mask, kt0)
                    for j in range(w):
                        u = kx[j]
                        acc[j] += (u > t0[j]) - (u < t0[j])
                orow = out[g, c, lo : lo + w]
                for j in range(w):  # small integers: the low 16 bits are zero, exact in bf16
                    orow[j] = np.float32(acc[j]).view(np.int32) >> shift
            if with_loss:
                for j in range(w):
                    ix[j] = np.int32(xr[j]) << shift
                for p in range(m):
                    tr = target_keys(t[g, members[p], lo : lo + w], raw, mask, kt0)
                    s = 0.0
                    for j in range(w):
                        # Back from the key: its magnitude's bits, then the sign.
                        key = tr[j]
                        mag = np.int32(key if key >= 0 else -key) << shift
                        tv = np.float64(np.int32(mag).view(np.float32))
                        s += abs(np.float64(fx[j]) - (tv if key >= 0 else -tv))
                    partial[g, b, members[p]] = s


# float32: the values compare as they are (-0 == +0, like their keys), so neither X nor T needs
# mapping; the sums and the loss come out bit for bit as sign_sum_kernel's on the keys.
@numba.njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc"})
def float_sign_sum_kernel(x, t, route, out, partial, with_signs):
    G, M, n = x.shape
    K = t.shape[1]
    blocks = partial.shape[1]
    with_loss = partial.shape[2] > 0
    for job in numba.prange(G * blocks):
        g, b = job // blocks, job % blocks
        lo = b * BLOCK
        w = min(n, lo + BLOCK) - lo
        acc = np.empty(BLOCK, np.float32)  # small integers: exact
        members = np.empty(K, np.int64)
        for c in range(M):
            m = route_members(route, g, c, members)
            if m == 0 and with_signs:
                out[g, c, lo : lo + w] = 0
                continue
            xr = x[g, c, lo : lo + w]
            if with_signs:
                acc[:w] = 0
                p = 0
                while p + 1 < m:  # two tasks per sweep, as in sign_sum_kernel
                    t0 = t[g, members[p], lo : lo + w]
                    t1 = t[g, members[p + 1], lo : lo + w]
                    for j in range(w):
                        u = xr[j]
                        acc[j] += np.float32((u > t0[j]) - (u < t0[j]) + (u > t1[j]) - (u < t1[j]))
                    p += 2
                if p < m:
                    t0 = t[g, members[p], lo : lo + w]
                    for j in range(w):
                        u = xr[j]
                        acc[j] += np.float32((u > t0[j]) - (u < t0[j]))
                out[g, c, lo : lo + w] = acc[:w]
            if with_loss:
                for p in range(m):
                    tr = t[g, members[p], lo : lo + w]
                    s = 0.0
                    for j in range(w):
                        s += abs(np.float64(xr[j]) - np.float64(tr[j]))
                    partial[g, b, members[p]] = s


@numba.njit(parallel=True, cache=True, nogil=True)
def keys_kernel(bits, mask, out):
    for j in numba.prange(bits.size):
        v = bits[j]
        out[j] = v if v >= 0 else -(v & mask)


@numba.njit(parallel=True, cache=True, nogil=True)
def median_kernel(values, route, out):
    G, K, n = values.shape
    M = out.shape[1]
    blocks = -(-n // MEDIAN_BLOCK)
    for job in numba.prange(G * M * blocks):
        g, rest = job // (M * blocks), job % (M * blocks)
        c, b = rest // blocks, rest % blocks
        members = np.nonzero(route[g] == c)[0]
        m = members.size
        if m == 0:
            continue
        lo = b * MEDIAN_BLOCK
        w = min(n, lo + MEDIAN_BLOCK) - lo
        # Insertion sort of the member rows, a compare-exchange of whole rows at a time
        # (vectorised min/max; m(m-1)/2 of them for m tasks).
        buf = np.empty((m, MEDIAN_BLOCK), np.float32)
        for p in range(m):
            src, dst = values[g, members[p], lo : lo + w], buf[p]
            for j in range(w):
                dst[j] = src[j]
            for q in range(p, 0, -1):
                below, above = buf[q - 1], buf[q]
                for j in range(w):
                    u, v = below[j], above[j]
                    below[j] = min(u, v)
                    above[j] = max(u, v)
        low, high, orow = buf[(m - 1) // 2], buf[m // 2], out[g, c, lo : lo + w]
        for j in range(w):
            orow[j] = np.float32(0.5) * (low[j] + high[j])


# One tile of many adapters' closing measurements (measure._tiled_errors): tile (n, rows, k) the
# n tasks' rows of ΔW, xs (rows, Q, k) the same rows of the points' H_c A', sel (n, P) the one task
# i is compared with for point p. out (n, P + 1): per task, sum |T - X_sel| (or the squares) for
# each point, and sum |T| (the zero yardstick) last.
# Each row of the tile is read from L1 by every point in turn, nothing is written back (the torch
# path: a subtraction, abs_ and a sum per point, three passes over the 4 MiB tile): 2-3x less
# time per point. E = T - X in float32 as torch's; each row's k-element sum in float32 (16 lanes,
# ~1e-7 relative; float64 sums cost a third more), the rows' sums in float64.
@numba.njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc"})
def tile_sums_kernel(tile, xs, sel, square, out):
    n, rows, k = tile.shape
    P = sel.shape[1]
    for i in numba.prange(n):
        sums = np.zeros(P + 1)
        for row in range(rows):
            t = tile[i, row]  # one row (k floats) stays in L1 while every point reads it
            for p in range(P):
                x = xs[row, sel[i, p]]
                s = np.float32(0.0)
                if square:
                    for j in range(k):
                        e = t[j] - x[j]
                        s += e * e
                else:
                    for j in range(k):
                        s += abs(t[j] - x[j])
                sums[p] += np.float64(s)
            s = np.float32(0.0)
            if square:
                for j in range(k):
                    s += t[j] * t[j]
            else:
                for j in range(k):
                    s += abs(t[j])
            sums[P] += np.float64(s)
        out[i] = sums
