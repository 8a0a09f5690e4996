"""The conv layer's three maps (spec stbp S17), one sample's windows at a time.

For one sample n, the windows of the zero-padded input as columns,

    cols[(c, i, j), (y, x)] = x[n, c, s·y + i - p, s·x + j - p]      (0 where that is padding),

turn the cross-correlation S17 into one small GEMM per sample, in NCHW order with no transpose:

    forward       I[n]  = W_m cols + b            W_m = W.reshape(C_out, C_in·k·k)
    weight grad   dW_m  = Σ_n g[n] colsᵀ
    input grad    g_x[n] = col2im(W_mᵀ g[n])       col2im = the exact adjoint of the window copy

``cols`` of one sample stays in cache; the loop over samples is a ``prange`` with disjoint writes.
benchmarks/bench_conv.py measured this against im2col of all T·B rows + one GEMM and against a
direct loop (results in benchmarks/README.md). The GEMMs are numba's ``np.dot`` (BLAS).

The batch sum of the weight gradient is split into a number of chunks fixed by the batch size
alone (not by the thread count), each summed serially, then the chunks in order: the result is the
same bits whatever the number of threads.
"""

import numpy as np
from numba import njit, prange

#: number of pieces the batch is cut into (each piece: one buffer, one partial weight gradient)
N_CHUNKS = 32


@njit(cache=True)
def _chunk(N, n_chunks, c):
    """Samples [a, z) of chunk c of n_chunks (as even as possible, fixed by N and n_chunks)."""
    return (c * N) // n_chunks, ((c + 1) * N) // n_chunks


@njit(cache=True)
def _valid_x(Wd, Wo, j, stride, padding):
    """Range [x0, x1) of output columns x whose tap j reads inside the input: 0 <= s·x+j-p < Wd."""
    x0 = max(0, (padding - j + stride - 1) // stride)
    x1 = min(Wo, (Wd - 1 + padding - j) // stride + 1)
    return x0, max(x0, x1)


@njit(cache=True)
def im2col_sample(x, n, k, stride, padding, Ho, Wo, cols):
    """S17 windows of sample n into cols (C·k·k, Ho·Wo): cols[(c,i,j), (y,x)] = x[n, c, s·y+i-p,
    s·x+j-p], 0 where the index falls in the zero padding."""
    _, C, H, Wd = x.shape
    for c in range(C):
        for i in range(k):
            for j in range(k):
                q = (c * k + i) * k + j
                x0, x1 = _valid_x(Wd, Wo, j, stride, padding)
                for y in range(Ho):
                    yi = stride * y + i - padding
                    r = y * Wo
                    if yi < 0 or yi >= H:
                        for xo in range(Wo):
                            cols[q, r + xo] = 0.0
                        continue
                    for xo in range(x0):
                        cols[q, r + xo] = 0.0
                    for xo in range(x0, x1):
                        cols[q, r + xo] = x[n, c, yi, stride * xo + j - padding]
                    for xo in range(x1, Wo):
                        cols[q, r + xo] = 0.0


@njit(cache=True)
def col2im_sample(dcols, n, k, stride, padding, Ho, Wo, gx):
    """Adjoint of im2col_sample (S17 input gradient): gx[n, c, s·y+i-p, s·x+j-p] += dcols[(c,i,j),
    (y,x)] for every index inside the input; gx[n] must hold zeros on entry."""
    _, C, H, Wd = gx.shape
    for c in range(C):
        for i in range(k):
            for j in range(k):
                q = (c * k + i) * k + j
                x0, x1 = _valid_x(Wd, Wo, j, stride, padding)
                for y in range(Ho):
                    yi = stride * y + i - padding
                    if yi < 0 or yi >= H:
                        continue
                    r = y * Wo
                    for xo in range(x0, x1):
                        gx[n, c, yi, stride * xo + j - padding] += dcols[q, r + xo]


@njit(cache=True, parallel=True)
def conv_forward(x, Wm, b, k, stride, padding, Ho, Wo):
    """S17 forward: I[n, c, y, x] = b[c] + Σ_{c',i,j} W[c,c',i,j] · x[n, c', s·y+i-p, s·x+j-p].

    x (N, C_in, H, W) C-contiguous; Wm (C_out, C_in·k·k) = W reshaped, same dtype as x; b (C_out,)
    or an empty array for no bias. Returns I (N, C_out, Ho, Wo) in x's dtype.
    """
    N = x.shape[0]
    Co, Q = Wm.shape
    out = np.empty((N, Co, Ho, Wo), dtype=x.dtype)
    n_chunks = min(N, N_CHUNKS)
    for ch in prange(n_chunks):                              # each chunk writes its own samples
        a, z = _chunk(N, n_chunks, ch)
        cols = np.empty((Q, Ho * Wo), dtype=x.dtype)
        for n in range(a, z):
            im2col_sample(x, n, k, stride, padding, Ho, Wo, cols)
            I = out[n].reshape(Co, Ho * Wo)
            np.dot(Wm, cols, I)                              # Σ_{c',i,j} W · window
            for c in range(b.shape[0]):                      # + b[c]
                for r in range(Ho * Wo):
                    I[c, r] += b[c]
    return out


@njit(cache=True, parallel=True)
def conv_weight_grad(g, x, k, stride, padding):
    """S17 weight gradient: dW[c, c', i, j] = Σ_{n,y,x} g[n, c, y, x] · x[n, c', s·y+i-p, s·x+j-p].

    g (N, C_out, Ho, Wo), x (N, C_in, H, W), both C-contiguous, same dtype. Returns dW reshaped
    (C_out, C_in·k·k). Summed per fixed chunk of samples, then over chunks in order (deterministic).
    """
    N, Co, Ho, Wo = g.shape
    C = x.shape[1]
    Q = C * k * k
    n_chunks = min(N, N_CHUNKS)
    part = np.zeros((n_chunks, Co, Q), dtype=x.dtype)
    for ch in prange(n_chunks):
        a, z = _chunk(N, n_chunks, ch)
        cols = np.empty((Q, Ho * Wo), dtype=x.dtype)
        dW = np.empty((Co, Q), dtype=x.dtype)
        for n in range(a, z):
            im2col_sample(x, n, k, stride, padding, Ho, Wo, cols)
            np.dot(g[n].reshape(Co, Ho * Wo), cols.T, dW)    # g[n] colsᵀ
            part[ch] += dW
    out = np.zeros((Co, Q), dtype=x.dtype)
    for ch in range(n_chunks):
        out += part[ch]
    return out


@njit(cache=True, parallel=True)
def conv_input_grad(g, Wm, C, H, Wd, k, stride, padding):
    """S17 input gradient: g_x[n, c', y', x'] = Σ W[c, c', i, j] · g[n, c, y, x] over all
    (c, y, x, i, j) with s·y+i-p = y', s·x+j-p = x'; an input no window covers gets 0.

    g (N, C_out, Ho, Wo) C-contiguous; Wm (C_out, C_in·k·k), same dtype. Returns (N, C_in, H, W).
    """
    N, Co, Ho, Wo = g.shape
    Q = Wm.shape[1]
    gx = np.zeros((N, C, H, Wd), dtype=g.dtype)
    WmT = np.ascontiguousarray(Wm.T)
    n_chunks = min(N, N_CHUNKS)
    for ch in prange(n_chunks):                              # each chunk writes its own samples
        a, z = _chunk(N, n_chunks, ch)
        dcols = np.empty((Q, Ho * Wo), dtype=g.dtype)
        for n in range(a, z):
            np.dot(WmT, g[n].reshape(Co, Ho * Wo), dcols)    # W_mᵀ g[n]
            col2im_sample(dcols, n, k, stride, padding, Ho, Wo, gx)
    return gx
