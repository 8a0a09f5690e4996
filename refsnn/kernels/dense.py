"""Event-driven kernels of the dense layer (spec stbp S1 and S15) for 0/1 spike inputs.

When the input of a dense layer is a spike train (every entry 0 or 1) with few ones, the two
products that read the input need only its active entries:

    forward (S1)       I[r, :] = b + Σ_{j ∈ A(r)} Wᵀ[j, :]         A(r) = {j : x[r, j] = 1}
    weight grad (S15)  dWᵀ[j, :] = Σ_{r ∈ C(j)} g[r, :]              C(j) = {r : x[r, j] = 1}

r runs over the T·B rows. Both are sums of contiguous rows (of Wᵀ, of g): additions only, no
multiplication, vectorised along the output axis. ``A`` is an event list per row (indices in
ascending order, padded, with a count), ``C`` the same events by column (CSC). The forward walks
the rows in a ``prange`` (each r writes only I[r]), the weight gradient the columns j (each j
writes only dWᵀ[j]); every sum is taken in a fixed order that does not depend on the thread
count, so the results are the same bits with any number of threads.

The rounding differs from BLAS's GEMM (another order of the same sum): equal to 1e-12 relative
in float64 (tests/test_dense_sparse.py). :func:`spike_events` says when the input qualifies
(every entry 0 or 1, density at most ``MAX_DENSITY[dtype]``); otherwise the layer uses the GEMM.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import blas

#: Largest input density (fraction of ones) at which the event path is used, per dtype; above
#: it the GEMM is faster. Measured by benchmarks/bench_dense.py (see benchmarks/README.md).
MAX_DENSITY = {np.dtype(np.float64): 0.20, np.dtype(np.float32): 0.25}

#: Smallest output width for the event path: rows of Wᵀ narrower than this are too short to
#: vectorise well, and the GEMM of such a layer is cheap anyway (perf_notes technique 9).
MIN_OUT = 32

#: Smallest input (rows x columns) worth building event lists for.
MIN_SIZE = 4096

#: Master switch: "auto" (choose by the rules above), "gemm" (never events), "events" (events
#: whenever the input is 0/1, whatever its density and size: used by the tests).
MODE = "auto"


# --------------------------------------------------------------------------------------------
# Event lists
# --------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True)
def build_events(x, idx, cnt):
    """Event list of each row of x (R, n): idx[r, :cnt[r]] = the j with x[r, j] != 0, ascending.

    Branch-free: every j is written at the current end of the list, which moves on only when
    x[r, j] != 0. Returns the number of entries that are neither 0 nor 1 (the event path
    needs a 0/1 input; the caller falls back to the GEMM when it is not zero).
    """
    R, n = x.shape
    bad = np.zeros(R, np.int64)
    for r in prange(R):
        c = 0
        nb = 0
        for j in range(n):
            v = x[r, j]
            idx[r, c] = j
            c += v != 0.0
            nb += (v != 0.0) & (v != 1.0)
        cnt[r] = c
        bad[r] = nb
    return bad.sum()


@njit(cache=True)
def events_by_column(idx, cnt, n):
    """The same events by column (CSC): rows[ptr[j]:ptr[j+1]] = the r with x[r, j] = 1, ascending."""
    R = cnt.shape[0]
    ptr = np.zeros(n + 1, np.int64)
    for r in range(R):
        for k in range(cnt[r]):
            ptr[idx[r, k] + 1] += 1
    for j in range(n):
        ptr[j + 1] += ptr[j]
    rows = np.empty(ptr[n], np.int32)
    pos = ptr[:n].copy()
    for r in range(R):                                     # r ascending: each list is sorted
        for k in range(cnt[r]):
            j = idx[r, k]
            rows[pos[j]] = r
            pos[j] += 1
    return ptr, rows


# --------------------------------------------------------------------------------------------
# S1 forward and S15 weight gradient on the events
# --------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True)
def event_forward(idx, cnt, WT, b, out):
    """S1 on a 0/1 input: out[r, :] = b + Σ_{j ∈ A(r)} WT[j, :]  (b of length 0: no bias).

    WT (n_in, n_out) = Wᵀ, contiguous. Rows of WT are summed 8, then 4 at a time before they
    are added to out[r] (fewer passes over out[r]); the order is fixed by the event list alone.
    """
    R = cnt.shape[0]
    n_out = WT.shape[1]
    has_b = b.shape[0] > 0
    for r in prange(R):
        for i in range(n_out):
            out[r, i] = b[i] if has_b else 0.0
        c = cnt[r]
        k = 0
        while k + 8 <= c:
            j0, j1, j2, j3 = idx[r, k], idx[r, k + 1], idx[r, k + 2], idx[r, k + 3]
            j4, j5, j6, j7 = idx[r, k + 4], idx[r, k + 5], idx[r, k + 6], idx[r, k + 7]
            for i in range(n_out):
                out[r, i] += (((WT[j0, i] + WT[j1, i]) + (WT[j2, i] + WT[j3, i]))
                              + ((WT[j4, i] + WT[j5, i]) + (WT[j6, i] + WT[j7, i])))
            k += 8
        if k + 4 <= c:
            j0, j1, j2, j3 = idx[r, k], idx[r, k + 1], idx[r, k + 2], idx[r, k + 3]
            for i in range(n_out):
                out[r, i] += (WT[j0, i] + WT[j1, i]) + (WT[j2, i] + WT[j3, i])
            k += 4
        while k < c:
            j0 = idx[r, k]
            for i in range(n_out):
                out[r, i] += WT[j0, i]
            k += 1
    return out


#: Rows of g visited together by the weight gradient: a chunk of g (ROW_CHUNK x n_out) stays
#: in the L2 cache while every column's events in it are summed (perf_notes technique 8).
ROW_CHUNK = 256


@njit(cache=True, parallel=True)
def event_weight_grad(ptr, rows, g, dWT, row_chunk):
    """S15 on a 0/1 input: dWT[j, :] = Σ_{r ∈ C(j)} g[r, :]  (the transposed dW = Σ_r gᵀ x).

    g (R, n_out) contiguous. The rows are visited in chunks of ``row_chunk`` (in order; each
    column list is sorted, so a cursor per column marks where the chunk ends); within a chunk
    rows are summed 8, then 4, then 1 at a time. The order depends on R and row_chunk only.
    """
    n_in = ptr.shape[0] - 1
    R, n_out = g.shape
    pos = ptr[:n_in].copy()
    for j in prange(n_in):
        for i in range(n_out):
            dWT[j, i] = 0.0
    for r_hi in range(row_chunk, R + row_chunk, row_chunk):
        for j in prange(n_in):
            k = pos[j]
            end = ptr[j + 1]
            d = dWT[j]
            while k + 8 <= end and rows[k + 7] < r_hi:
                g0, g1, g2, g3 = g[rows[k]], g[rows[k + 1]], g[rows[k + 2]], g[rows[k + 3]]
                g4, g5, g6, g7 = g[rows[k + 4]], g[rows[k + 5]], g[rows[k + 6]], g[rows[k + 7]]
                for i in range(n_out):
                    d[i] += (((g0[i] + g1[i]) + (g2[i] + g3[i]))
                             + ((g4[i] + g5[i]) + (g6[i] + g7[i])))
                k += 8
            while k + 4 <= end and rows[k + 3] < r_hi:
                g0, g1, g2, g3 = g[rows[k]], g[rows[k + 1]], g[rows[k + 2]], g[rows[k + 3]]
                for i in range(n_out):
                    d[i] += (g0[i] + g1[i]) + (g2[i] + g3[i])
                k += 4
            while k < end and rows[k] < r_hi:
                g0 = g[rows[k]]
                for i in range(n_out):
                    d[i] += g0[i]
                k += 1
            pos[j] = k
    return dWT


# --------------------------------------------------------------------------------------------
# The layer's two products, choosing the path
# --------------------------------------------------------------------------------------------

class Events:
    """The events of one 0/1 input xs (R, n_in): row lists (idx, cnt) and their density."""

    def __init__(self, idx, cnt, n_in):
        self.idx, self.cnt, self.n_in = idx, cnt, n_in
        self.density = float(cnt.sum()) / max(cnt.shape[0] * n_in, 1)

    def by_column(self):
        return events_by_column(self.idx, self.cnt, self.n_in)

    def match(self, xs: np.ndarray) -> bool:
        """Are these still the events of xs (same shape, same ones, zeros elsewhere)?"""
        return (xs.ndim == 2 and xs.shape == (self.cnt.shape[0], self.n_in)
                and events_match(np.ascontiguousarray(xs), self.idx, self.cnt))


@njit(cache=True, parallel=True)
def events_match(x, idx, cnt):
    """True if every row r of x has exactly cnt[r] nonzero entries and x[r, idx[r, k]] = 1 for
    k < cnt[r]: then idx lists the ones of x and every other entry is 0."""
    R, n = x.shape
    bad = np.zeros(R, np.int64)
    for r in prange(R):
        nz = 0
        for j in range(n):
            nz += x[r, j] != 0.0
        ok = nz == cnt[r]
        for k in range(cnt[r]):
            ok &= x[r, idx[r, k]] == 1.0
        bad[r] = not ok
    return bad.sum() == 0


def _limit(dtype) -> float:
    return MAX_DENSITY.get(np.dtype(dtype), 0.0)


def spike_events(xs: np.ndarray, n_out: int) -> Events | None:
    """Events of xs (R, n_in) when the event path applies (MODE, size, 0/1, density), else None.

    The density is first estimated on about 64 evenly spaced rows (cheap), then taken exactly
    from the event lists.
    """
    if not _may_use_events(xs, n_out):
        return None
    R, n = xs.shape
    xs = np.ascontiguousarray(xs)
    idx = np.empty((R, n), np.int32)
    cnt = np.empty(R, np.int64)
    if build_events(xs, idx, cnt) != 0:                   # not a spike train: GEMM
        return None
    return _dense_enough(xs, Events(idx, cnt, n))


def _may_use_events(xs: np.ndarray, n_out: int) -> bool:
    """The cheap part of the rule: MODE, a 2-D input, the layer's size, and the density of about
    64 evenly spaced rows under the dtype's limit (auto mode)."""
    if MODE == "gemm" or xs.ndim != 2:
        return False
    if MODE == "events":
        return True
    R, n = xs.shape
    if n_out < MIN_OUT or R * n < MIN_SIZE:
        return False
    sample = xs[::max(1, R // 64)]
    return np.count_nonzero(sample) <= _limit(xs.dtype) * sample.size


def _dense_enough(xs: np.ndarray, ev: Events) -> Events | None:
    """``ev``, unless (auto mode) its exact density is above the dtype's limit."""
    if MODE != "events" and ev.density > _limit(xs.dtype):
        return None
    return ev


def forward(xs: np.ndarray, W: np.ndarray, b, ev: Events | None) -> np.ndarray:
    """S1 for rows xs (R, n_in): xs Wᵀ + b; by the events ``ev`` of xs (:func:`spike_events`)
    when given, else one GEMM (kernels/blas.py). W (n_out, n_in) and b (n_out,) or None, in xs's dtype."""
    if ev is None:
        I = blas.matmul(xs, W.T)
        if b is not None:
            I += b
        return I
    WT = np.ascontiguousarray(W.T)
    bb = np.zeros(0, xs.dtype) if b is None else np.ascontiguousarray(b)
    out = np.empty((xs.shape[0], W.shape[0]), xs.dtype)
    return event_forward(ev.idx, ev.cnt, WT, bb, out)


def weight_grad(gs: np.ndarray, xs: np.ndarray, ev: Events | None) -> np.ndarray:
    """S15: Σ_r gs[r]ᵀ xs[r] = gsᵀ xs (n_out, n_in); by the events ``ev`` of xs when given,
    else one GEMM (kernels/blas.py)."""
    if ev is None:
        return blas.matmul_tn(xs, gs).T                    # Fortran-ordered, like Network's W
    ptr, rows = ev.by_column()
    dWT = np.empty((xs.shape[1], gs.shape[1]), gs.dtype)
    event_weight_grad(ptr, rows, np.ascontiguousarray(gs), dWT, ROW_CHUNK)
    return dWT.T                                           # Fortran-ordered, like Network's W


def events_from_lists(xs: np.ndarray, idx: np.ndarray, cnt: np.ndarray,
                      n_out: int) -> Events | None:
    """The decision of :func:`spike_events` for a 0/1 input xs (R, n_in) whose event lists
    (idx, cnt) are already built (e.g. by a fused neuron kernel): the same rules (MODE, size,
    sampled density, exact density), without another pass over xs."""
    if not _may_use_events(xs, n_out):
        return None
    return _dense_enough(xs, Events(idx, cnt, xs.shape[1]))
