"""Event-driven conv kernels (spec stbp S17) for 0/1 spike inputs, and the choice of path.

When the input of a conv layer is a spike train (every entry 0 or 1) with few ones, its two
products that read the input need only the active input pixels. In the channels-last weight
arrangement Wr[(i, j, c'), c] = W[c, c', i, j] (each (tap, c') a contiguous row over C_out):

    forward       I_cl[(y, x), :] = b + Σ_{active (c', y', x')} Wr[(i, j, c'), :]
    weight grad   dWr[(i, j, c'), :] = Σ_n Σ_{active (c', y', x')} g_cl[n, (y, x), :]

over the taps (i, j) with s·y + i - p = y', s·x + j - p = x' inside the output: each active
pixel scatters its k x k x C_out weight patch (forward), or gathers the error rows its window
taps hit (weight gradient, the transposed gather). Additions only, no multiplication, along
contiguous rows of C_out. The output is then put back in NCHW order (the neuron kernels'
layout). The input gradient does not read the input; it keeps the dense path.

Threads: ``prange`` over the fixed chunks of conv.py (fixed by the batch size alone); each chunk
writes its own samples (forward) or its own partial weight gradient (summed in chunk order), and
within a sample the pixels are visited in NCHW order, so the result is the same bits with any
number of threads. The rounding differs from the dense paths (another order of the same sums):
1e-12 relative in float64 (tests/test_conv_events.py).

Path of each product (:func:`forward`, :func:`weight_grad`, :func:`input_grad`), by ``MODE``:
- events, for a 0/1 input whose density is at most ``MAX_DENSITY[dtype]``;
- else channels-last windows + one BLAS call per chunk of samples (conv.py, ``*_gemm``) when
  BLAS runs on one thread (the CLI's policy, ``blas.pieces_allowed``) and the window runs are
  long enough (C_in·k >= ``MIN_RUN``);
- else the per-sample numba loops (conv.py, the path that does not depend on BLAS threading).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import blas
from .conv import (N_CHUNKS, _chunk, _g_rows, conv_forward, conv_forward_gemm, conv_input_grad,
                   conv_input_grad_gemm, conv_weight_grad, conv_weight_grad_gemm, gemm_samples)

#: Largest input density (fraction of ones) at which the events beat the BLAS path, per dtype and
#: product; measured by benchmarks/bench_conv.py --events on conv5's and spikebp's LeNet layer
#: shapes (benchmarks/README.md, "Conv event path").
MAX_DENSITY = {(np.dtype(np.float32), "forward"): 0.12, (np.dtype(np.float32), "wgrad"): 0.25,
               (np.dtype(np.float64), "forward"): 0.20, (np.dtype(np.float64), "wgrad"): 0.25}

#: The same where the alternative is the per-sample loops (no BLAS path for the layer): the
#: events were 1.04-1.6x faster than the loops at 30% on every shape measured.
MAX_DENSITY_LOOP = 0.30

#: Shortest run k·C_in of the channels-last windows for the BLAS path; shorter runs (C_in = 1
#: or 2 with k = 5) make the window copies slower than the loops (bench_conv.py).
MIN_RUN = 32

#: "auto" (the rules above), "loop" (the per-sample loops only), "gemm" (never events; BLAS
#: where allowed), "events" (events for any 0/1 input whatever its density: used by tests).
MODE = "auto"


# --------------------------------------------------------------------------------------------
# Is the input a spike train, and how dense?
# --------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True)
def count_ones(xf, n_pieces):
    """(number of ones, number of entries neither 0 nor 1) of the flat array xf."""
    L = xf.shape[0]
    ones = np.zeros(n_pieces, np.int64)
    bad = np.zeros(n_pieces, np.int64)
    for c in prange(n_pieces):
        a, z = (c * L) // n_pieces, ((c + 1) * L) // n_pieces
        o = 0
        nb = 0
        for i in range(a, z):
            v = xf[i]
            o += v == 1.0
            nb += (v != 0.0) & (v != 1.0)
        ones[c] = o
        bad[c] = nb
    return ones.sum(), bad.sum()


def spike_density(xs: np.ndarray) -> float | None:
    """Fraction of ones of xs if every entry is 0 or 1, else None."""
    ones, bad = count_ones(np.ascontiguousarray(xs).reshape(-1), 64)
    if bad:
        return None
    return float(ones) / max(xs.size, 1)


# --------------------------------------------------------------------------------------------
# S17 forward and weight gradient on the events
# --------------------------------------------------------------------------------------------

@njit(cache=True)
def _first_tap(v, padding, stride, n_out, k):
    """The taps t of input index v that land on an output o = (v + p - t) / s in [0, n_out) are
    t0, t0 + s, ... < t1 (t ≡ v + p mod s); returns (t0, t1, o of t0)."""
    lo = max(0, v + padding - stride * (n_out - 1))
    t1 = min(k, v + padding + 1)
    t0 = lo + (v + padding - lo) % stride
    return t0, t1, (v + padding - t0) // stride


@njit(cache=True)
def _add_run(dst, d0, src, s0, L):
    """dst[d0:d0+L] += src[s0:s0+L] (flat arrays). Through slices: indexing dst[d0 + t] makes
    numba check each index for wrap-around, which keeps LLVM from vectorising (10x slower)."""
    d = dst[d0:d0 + L]
    s = src[s0:s0 + L]
    for t in range(L):
        d[t] += s[t]


@njit(cache=True)
def _scatter_sample(x, n, Wf, Co, k, stride, padding, Ho, Wo, af, gather):
    """The taps of every active pixel of x[n] (NCHW order). Rows are Co wide, flat: the event
    weights Wf rows (i, c', k-1-j) and the channels-last rows af (y·W' + x). gather False:
    af[(y, x)] += Wf[(i, c', k-1-j)] (forward); True: Wf[(i, c', k-1-j)] += af[(y, x)] (weight
    gradient). With stride 1 the taps j0..j1-1 of one (pixel, i) hit consecutive outputs
    x0, x0-1, ... and consecutive rows k-1-j of Wf: one run of (j1-j0)·Co entries each."""
    C, H, Wd = x.shape[1], x.shape[2], x.shape[3]
    for cc in range(C):
        for yi in range(H):
            i0, i1, y0 = _first_tap(yi, padding, stride, Ho, k)
            for xi in range(Wd):
                if x[n, cc, yi, xi] == 0.0:
                    continue
                j0, j1, x0 = _first_tap(xi, padding, stride, Wo, k)
                y = y0
                for i in range(i0, i1, stride):
                    qi = (i * C + cc) * k + k - 1
                    if stride == 1:
                        L = (j1 - j0) * Co
                        a0 = (y * Wo + x0 - (j1 - 1 - j0)) * Co    # output of tap j1-1
                        w0 = (qi - (j1 - 1)) * Co                  # row k-1-(j1-1)
                        if gather:
                            _add_run(Wf, w0, af, a0, L)
                        else:
                            _add_run(af, a0, Wf, w0, L)
                    else:
                        r = y * Wo + x0
                        for j in range(j0, j1, stride):
                            if gather:
                                _add_run(Wf, (qi - j) * Co, af, r * Co, Co)
                            else:
                                _add_run(af, r * Co, Wf, (qi - j) * Co, Co)
                            r -= 1
                    y -= 1


@njit(cache=True, parallel=True)
def event_forward(x, Wev, b, k, stride, padding, Ho, Wo):
    """S17 forward on a 0/1 input: I[n, c, y, x] = b[c] + Σ W[c, c', i, j] over the active
    x[n, c', s·y+i-p, s·x+j-p]. x (N, C_in, H, W) C-contiguous; Wev (k·C_in·k, C_out) =
    :func:`w_events` of W; b (C_out,) or empty. Returns (N, C_out, Ho, Wo) in x's dtype."""
    N = x.shape[0]
    Co = Wev.shape[1]
    P = Ho * Wo
    out = np.empty((N, Co, Ho, Wo), dtype=x.dtype)
    has_b = b.shape[0] > 0
    Wf = Wev.reshape(Wev.size)
    n_chunks = min(N, N_CHUNKS)
    for ch in prange(n_chunks):                              # each chunk writes its own samples
        a, z = _chunk(N, n_chunks, ch)
        acc = np.empty((P, Co), dtype=x.dtype)
        af = acc.reshape(P * Co)
        for n in range(a, z):
            for r in range(P):
                for c in range(Co):
                    acc[r, c] = b[c] if has_b else 0.0       # b[c]
            _scatter_sample(x, n, Wf, Co, k, stride, padding, Ho, Wo, af, False)  # + W[:, c', i, j]
            o = out[n].reshape(Co, P)
            for c in range(Co):
                for r in range(P):
                    o[c, r] = acc[r, c]
    return out


@njit(cache=True, parallel=True)
def event_weight_grad(g, x, k, stride, padding):
    """S17 weight gradient on a 0/1 input, in the layout of :func:`w_events`: dWev[(i, c', k-1-j),
    c] = dW[c, c', i, j] = Σ_{n, y, x} g[n, c, y, x] over the active x[n, c', s·y+i-p, s·x+j-p].
    g (N, C_out, Ho, Wo), x (N, C_in, H, W), both C-contiguous. Summed per fixed chunk of samples,
    then over the chunks in order."""
    N, Co, Ho, Wo = g.shape
    C = x.shape[1]
    P = Ho * Wo
    Q = k * k * C
    n_chunks = min(N, N_CHUNKS)
    part = np.zeros((n_chunks, Q, Co), dtype=x.dtype)
    for ch in prange(n_chunks):                              # each chunk its own partial
        a, z = _chunk(N, n_chunks, ch)
        G = np.empty((P, Co), dtype=x.dtype)
        Gf = G.reshape(P * Co)
        df = part[ch].reshape(Q * Co)
        for n in range(a, z):
            _g_rows(g, n, G, 0)
            _scatter_sample(x, n, df, Co, k, stride, padding, Ho, Wo, Gf, True)  # + g[n, :, y, x]
    out = part[0].copy()
    for ch in range(1, n_chunks):
        out += part[ch]
    return out


# --------------------------------------------------------------------------------------------
# The layer's three products, choosing the path
# --------------------------------------------------------------------------------------------

def w_rows(W: np.ndarray, dtype) -> np.ndarray:
    """W (C_out, C_in, k, k) as Wr (k·k·C_in, C_out), Wr[(i, j, c'), c] = W[c, c', i, j]."""
    Co = W.shape[0]
    return np.ascontiguousarray(W.transpose(2, 3, 1, 0).reshape(-1, Co), dtype=dtype)


def w_events(W: np.ndarray, dtype) -> np.ndarray:
    """W (C_out, C_in, k, k) as the event kernels' Wev (k·C_in·k, C_out), Wev[(i, c', k-1-j), c]
    = W[c, c', i, j]: for one (i, c') the taps j are consecutive rows, in reverse."""
    Co = W.shape[0]
    return np.ascontiguousarray(W[:, :, :, ::-1].transpose(2, 1, 3, 0).reshape(-1, Co),
                                dtype=dtype)


def dw_from_events(dWev: np.ndarray, W_shape) -> np.ndarray:
    """dWev (k·C_in·k, C_out) in the layout of :func:`w_events` back to dW (C_out, C_in, k, k)."""
    Co, C, k, _ = W_shape
    return np.ascontiguousarray(dWev.reshape(k, C, k, Co)[:, :, ::-1].transpose(3, 1, 0, 2))


def dw_from_rows(dWr: np.ndarray, W_shape) -> np.ndarray:
    """dWr (k·k·C_in, C_out) back to dW (C_out, C_in, k, k), C-contiguous."""
    Co, C, k, _ = W_shape
    return np.ascontiguousarray(dWr.reshape(k, k, C, Co).transpose(3, 2, 0, 1))


def use_events(xs: np.ndarray, op: str = "forward", C_in: int = 0, k: int = 0,
               density: float | None = -1.0) -> bool:
    """The event rule for the product ``op`` ("forward" or "wgrad") of an input xs (N, C_in, H,
    W): MODE, 0/1 entries, and the density under the limit against the path it would replace
    (BLAS when :func:`use_gemm`, else the loops). ``density``: :func:`spike_density` of xs when
    already known."""
    if MODE in ("loop", "gemm"):
        return False
    d = spike_density(xs) if density == -1.0 else density
    if d is None:
        return False
    if MODE == "events":
        return True
    if use_gemm(C_in or xs.shape[1], k or 1):
        return d <= MAX_DENSITY.get((np.dtype(xs.dtype), op), 0.0)
    return d <= MAX_DENSITY_LOOP


def use_gemm(C_in: int, k: int) -> bool:
    """The BLAS rule: MODE, the one-BLAS-thread policy, window runs of at least MIN_RUN."""
    return MODE != "loop" and blas.pieces_allowed() and C_in * k >= MIN_RUN


def forward(xs, W, b, stride, padding, Ho, Wo, events=None):
    """S17 forward of xs (N, C_in, H, W) C-contiguous: (N, C_out, Ho, Wo). ``events``: the
    result of :func:`use_events` for xs when already known. b: (C_out,) or empty."""
    k = W.shape[2]
    if events is None:
        events = use_events(xs, "forward", W.shape[1], k)
    if events:
        return event_forward(xs, w_events(W, xs.dtype), b, k, stride, padding, Ho, Wo)
    if use_gemm(W.shape[1], k):
        return conv_forward_gemm(xs, w_rows(W, xs.dtype), b, k, stride, padding, Ho, Wo,
                                 gemm_samples(Ho * Wo))
    Wm = np.ascontiguousarray(W.reshape(W.shape[0], -1), dtype=xs.dtype)
    return conv_forward(xs, Wm, b, k, stride, padding, Ho, Wo)


def weight_grad(gs, xs, W_shape, stride, padding, events=None):
    """S17 weight gradient (C_out, C_in, k, k) from gs (N, C_out, Ho, Wo) and xs, both
    C-contiguous in one dtype."""
    k = W_shape[2]
    if events is None:
        events = use_events(xs, "wgrad", W_shape[1], k)
    if events:
        return dw_from_events(event_weight_grad(gs, xs, k, stride, padding), W_shape)
    if use_gemm(W_shape[1], k):
        dWr = conv_weight_grad_gemm(gs, xs, k, stride, padding, gemm_samples(gs.shape[2] * gs.shape[3]))
        return dw_from_rows(dWr, W_shape)
    return conv_weight_grad(gs, xs, k, stride, padding).reshape(W_shape)


def input_grad(gs, W, in_shape, stride, padding):
    """S17 input gradient (N, C_in, H, W) from gs (N, C_out, Ho, Wo) C-contiguous."""
    C, H, Wd = in_shape
    k = W.shape[2]
    if use_gemm(C, k):
        WrT = np.ascontiguousarray(w_rows(W, gs.dtype).T)
        return conv_input_grad_gemm(gs, WrT, C, H, Wd, k, stride, padding,
                                    gemm_samples(gs.shape[2] * gs.shape[3]))
    Wm = np.ascontiguousarray(W.reshape(W.shape[0], -1), dtype=gs.dtype)
    return conv_input_grad(gs, Wm, C, H, Wd, k, stride, padding)
