"""The conv layer's three maps (spec stbp S17), one sample's window matrix at a time.

For one sample n, the windows of the zero-padded input as a matrix,

    cols[(c, i, j), (y, x)] = x[n, c, s·y + i - p, s·x + j - p]      (0 where that is padding),

turn the cross-correlation S17 into three small matrix products per sample, in NCHW order:

    forward       I[n]   = b + W_m cols            W_m = W.reshape(C_out, C_in·k·k)
    weight grad   dW_m  += g[n] colsᵀ              (colsᵀ built directly, or as dW_mᵀ += cols g[n]ᵀ)
    input grad    g_x[n] = col2im(W_mᵀ g[n])        col2im = the exact adjoint of the window copy

One sample's matrices stay in cache. The products are numba loops (``_matmul_add``), not BLAS:
benchmarks/bench_conv.py measured this against im2col of all T·B rows + one numpy GEMM, against a
direct loop without a window matrix, and against the same per-sample scheme calling BLAS from the
threads (1.0-1.7x faster with one OpenBLAS thread, but 10-20 times slower on some shapes once
OpenBLAS's own threads collide with numba's); results and the choice in benchmarks/README.md.

Threads: ``prange`` over chunks of samples, each chunk writing only its own samples. The weight
gradient sums each chunk serially into its own partial, then the partials in order; the chunks
are fixed by the batch size alone (not by the thread count), so every result is the same bits
whatever the number of threads.
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


@njit(cache=True)
def im2row_sample(x, n, k, stride, padding, Ho, Wo, rows):
    """The transpose of im2col_sample, built directly: rows[(y,x), (c,i,j)] = x[n, c, s·y+i-p,
    s·x+j-p], 0 in the zero padding (S17 weight gradient)."""
    _, C, H, Wd = x.shape
    for y in range(Ho):
        for xo in range(Wo):
            r = y * Wo + xo
            for c in range(C):
                for i in range(k):
                    yi = stride * y + i - padding
                    for j in range(k):
                        xj = stride * xo + j - padding
                        if 0 <= yi < H and 0 <= xj < Wd:
                            rows[r, (c * k + i) * k + j] = x[n, c, yi, xj]
                        else:
                            rows[r, (c * k + i) * k + j] = 0.0


@njit(cache=True)
def _matmul_add(A, B, C):
    """C += A B for one sample's small row-major matrices: A (M, Q), B (Q, P), C (M, P).

    Written so that the inner loop (over P) vectorises without reassociation: two rows of C at a
    time, and the terms of q in blocks of 4, c[r] += (a0·b0[r] + a1·b1[r] + a2·b2[r] + a3·b3[r]).
    """
    M, Q = A.shape
    P = B.shape[1]
    Q4 = Q - Q % 4
    for i in range(0, M - M % 2, 2):
        c0, c1 = C[i], C[i + 1]
        for q in range(0, Q4, 4):
            b0, b1, b2, b3 = B[q], B[q + 1], B[q + 2], B[q + 3]
            a0, a1, a2, a3 = A[i, q], A[i, q + 1], A[i, q + 2], A[i, q + 3]
            e0, e1, e2, e3 = A[i + 1, q], A[i + 1, q + 1], A[i + 1, q + 2], A[i + 1, q + 3]
            for r in range(P):
                v0, v1, v2, v3 = b0[r], b1[r], b2[r], b3[r]
                c0[r] += a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3
                c1[r] += e0 * v0 + e1 * v1 + e2 * v2 + e3 * v3
        for q in range(Q4, Q):
            bq, a0, e0 = B[q], A[i, q], A[i + 1, q]
            for r in range(P):
                c0[r] += a0 * bq[r]
                c1[r] += e0 * bq[r]
    if M % 2:
        i = M - 1
        c0 = C[i]
        for q in range(0, Q4, 4):
            b0, b1, b2, b3 = B[q], B[q + 1], B[q + 2], B[q + 3]
            a0, a1, a2, a3 = A[i, q], A[i, q + 1], A[i, q + 2], A[i, q + 3]
            for r in range(P):
                c0[r] += a0 * b0[r] + a1 * b1[r] + a2 * b2[r] + a3 * b3[r]
        for q in range(Q4, Q):
            bq, a0 = B[q], A[i, q]
            for r in range(P):
                c0[r] += a0 * bq[r]


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
            for c in range(Co):
                I[c, :] = b[c] if b.shape[0] > 0 else 0.0    # b[c]
            _matmul_add(Wm, cols, I)                         # + Σ_{c',i,j} W · window
    return out


@njit(cache=True, parallel=True)
def conv_weight_grad(g, x, k, stride, padding):
    """S17 weight gradient: dW[c, c', i, j] = Σ_{n,y,x} g[n, c, y, x] · x[n, c', s·y+i-p, s·x+j-p].

    g (N, C_out, Ho, Wo), x (N, C_in, H, W), both C-contiguous, same dtype. Returns dW reshaped
    (C_out, C_in·k·k). Summed per fixed chunk of samples, then over chunks in order (deterministic).
    The product runs along the longer of C_in·k·k and C_out (the axis its inner loop vectorises
    over): dW += g[n] rows, or dWᵀ += cols g[n]ᵀ.
    """
    N, Co, Ho, Wo = g.shape
    Q = x.shape[1] * k * k
    P = Ho * Wo
    n_chunks = min(N, N_CHUNKS)
    wide = Q >= Co
    part = np.zeros((n_chunks, Co * Q), dtype=x.dtype)
    for ch in prange(n_chunks):                              # each chunk its own partial
        a, z = _chunk(N, n_chunks, ch)
        if wide:
            rows = np.empty((P, Q), dtype=x.dtype)
            dW = part[ch].reshape(Co, Q)
            for n in range(a, z):
                im2row_sample(x, n, k, stride, padding, Ho, Wo, rows)
                _matmul_add(g[n].reshape(Co, P), rows, dW)          # dW += g[n] colsᵀ
        else:
            cols = np.empty((Q, P), dtype=x.dtype)
            gT = np.empty((P, Co), dtype=x.dtype)
            dWT = part[ch].reshape(Q, Co)
            for n in range(a, z):
                im2col_sample(x, n, k, stride, padding, Ho, Wo, cols)
                gT[:, :] = g[n].reshape(Co, P).T
                _matmul_add(cols, gT, dWT)                          # dWᵀ += cols g[n]ᵀ
    out = np.zeros(Co * Q, dtype=x.dtype)
    for ch in range(n_chunks):
        out += part[ch]
    if wide:
        return out.reshape(Co, Q)
    return np.ascontiguousarray(out.reshape(Q, Co).T)


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
            dcols[:, :] = 0.0
            _matmul_add(WmT, g[n].reshape(Co, Ho * Wo), dcols)      # W_mᵀ g[n]
            col2im_sample(dcols, n, k, stride, padding, Ho, Wo, gx)
    return gx


# --------------------------------------------------------------------------------------------
# Channels-last windows + one BLAS product per chunk of samples (the CLI's one-BLAS-thread policy)
# --------------------------------------------------------------------------------------------
#
# The same three maps with the windows in channels-last order: for an output position (y, x) the
# window row is rows[(y, x), (i, j, c)] = x[c, s·y+i-p, s·x+j-p], so for each i the k·C_in
# entries (j, c) are one contiguous run of the channels-last input (the NCHW window matrix above
# copies runs of W' entries, e.g. 8 for a 12x12 input, which is what made it slow). The weights
# are arranged to match, Wr[(i, j, c'), c] = W[c, c', i, j] (Q x C_out). A chunk of samples
# stacks its rows (m·H'·W' of them), so one BLAS call per chunk does
#
#     forward       out_cl = rows Wr                 (m·P, C_out), then back to NCHW (+ b)
#     weight grad   dWr   += rowsᵀ g_cl              g_cl = g in channels-last rows
#     input grad    drows  = g_cl Wrᵀ, then the adjoint of the window copy, back to NCHW
#
# Chunks are fixed by N and P (``gemm_samples``), never by the thread count; the weight gradient
# sums its chunk partials in chunk order; one-thread BLAS gives the same bits for the same shapes.
# So results do not depend on the number of threads. The rounding differs from the loops above
# (another order of the same sums): 1e-12 relative in float64 (tests/test_conv_events.py).

#: rows (samples x output positions) per BLAS call: 256-512 measured alike for 12x12x15-40c5
GEMM_ROWS = 256


def gemm_samples(P: int) -> int:
    """Samples per chunk for P = H'·W' output positions (at least one)."""
    return max(1, -(-GEMM_ROWS // P))


@njit(cache=True)
def _to_channels_last(x, n, xc):
    """xc[y, x, c] = x[n, c, y, x]."""
    C, H, Wd = x.shape[1], x.shape[2], x.shape[3]
    for c in range(C):
        for y in range(H):
            for xo in range(Wd):
                xc[y, xo, c] = x[n, c, y, xo]


@njit(cache=True)
def im2row_cl(xc, k, stride, padding, Ho, Wo, rows, r0):
    """S17 windows of one channels-last input xc (H, W, C) into rows r0 + y·W' + x of ``rows``:
    rows[r0 + y·W' + x, (i·k + j)·C + c] = xc[s·y+i-p, s·x+j-p, c], 0 in the zero padding."""
    H, Wd, C = xc.shape
    kC = k * C
    xf = xc.reshape(H * Wd * C)
    for y in range(Ho):
        for xo in range(Wo):
            r = r0 + y * Wo + xo
            x0 = stride * xo - padding
            inside = x0 >= 0 and x0 + k <= Wd
            for i in range(k):
                yi = stride * y + i - padding
                base = i * kC
                if yi < 0 or yi >= H:
                    for q in range(kC):
                        rows[r, base + q] = 0.0
                elif inside:                                  # one run of k·C entries
                    o = (yi * Wd + x0) * C
                    dst = rows[r, base:base + kC]             # slices: no wrap-around checks,
                    src = xf[o:o + kC]                        # so the copy vectorises
                    for q in range(kC):
                        dst[q] = src[q]
                else:
                    for j in range(k):
                        xj = x0 + j
                        if 0 <= xj < Wd:
                            o = (yi * Wd + xj) * C
                            for c in range(C):
                                rows[r, base + j * C + c] = xf[o + c]
                        else:
                            for c in range(C):
                                rows[r, base + j * C + c] = 0.0


@njit(cache=True)
def row2im_cl(drows, r0, k, stride, padding, Ho, Wo, gc):
    """Adjoint of im2row_cl: gc[s·y+i-p, s·x+j-p, c] += drows[r0 + y·W' + x, (i·k + j)·C + c]
    for every index inside the input (gc channels-last (H, W, C))."""
    H, Wd, C = gc.shape
    kC = k * C
    gf = gc.reshape(H * Wd * C)
    for y in range(Ho):
        for xo in range(Wo):
            r = r0 + y * Wo + xo
            x0 = stride * xo - padding
            inside = x0 >= 0 and x0 + k <= Wd
            for i in range(k):
                yi = stride * y + i - padding
                if yi < 0 or yi >= H:
                    continue
                base = i * kC
                if inside:
                    o = (yi * Wd + x0) * C
                    dst = gf[o:o + kC]
                    src = drows[r, base:base + kC]
                    for q in range(kC):
                        dst[q] += src[q]
                else:
                    for j in range(k):
                        xj = x0 + j
                        if 0 <= xj < Wd:
                            o = (yi * Wd + xj) * C
                            for c in range(C):
                                gf[o + c] += drows[r, base + j * C + c]


@njit(cache=True)
def _g_rows(g, n, G, r0):
    """G[r0 + p, c] = g[n, c, p] (one sample's gradient as channels-last rows)."""
    Co = g.shape[1]
    P = g.shape[2] * g.shape[3]
    gn = g[n].reshape(Co, P)
    for c in range(Co):
        for p in range(P):
            G[r0 + p, c] = gn[c, p]


@njit(cache=True, parallel=True)
def conv_forward_gemm(x, Wr, b, k, stride, padding, Ho, Wo, spc):
    """S17 forward (as conv_forward) by channels-last windows and one BLAS product per chunk of
    ``spc`` samples. Wr (C_in·k·k, C_out) = W arranged as Wr[(i, j, c'), c]."""
    N, C, H, Wd = x.shape
    Q, Co = Wr.shape
    P = Ho * Wo
    out = np.empty((N, Co, Ho, Wo), dtype=x.dtype)
    n_chunks = (N + spc - 1) // spc
    has_b = b.shape[0] > 0
    for ch in prange(n_chunks):                              # each chunk writes its own samples
        a = ch * spc
        z = min(N, a + spc)
        xc = np.empty((H, Wd, C), dtype=x.dtype)
        rows = np.empty(((z - a) * P, Q), dtype=x.dtype)
        for n in range(a, z):
            _to_channels_last(x, n, xc)
            im2row_cl(xc, k, stride, padding, Ho, Wo, rows, (n - a) * P)
        res = np.empty(((z - a) * P, Co), dtype=x.dtype)
        np.dot(rows, Wr, res)                                # Σ_{c',i,j} W · window
        for n in range(a, z):
            o = out[n].reshape(Co, P)
            r0 = (n - a) * P
            for c in range(Co):
                bc = b[c] if has_b else 0.0
                for p in range(P):
                    o[c, p] = res[r0 + p, c] + bc            # + b[c]
    return out


@njit(cache=True, parallel=True)
def conv_weight_grad_gemm(g, x, k, stride, padding, spc):
    """S17 weight gradient (as conv_weight_grad) in the channels-last arrangement: returns
    dWr (C_in·k·k, C_out), dWr[(i, j, c'), c] = dW[c, c', i, j]. One BLAS product per chunk of
    ``spc`` samples into the chunk's partial; partials summed in chunk order."""
    N, Co, Ho, Wo = g.shape
    _, C, H, Wd = x.shape
    P = Ho * Wo
    Q = k * k * C
    n_chunks = (N + spc - 1) // spc
    part = np.empty((n_chunks, Q, Co), dtype=x.dtype)
    for ch in prange(n_chunks):                              # each chunk its own partial
        a = ch * spc
        z = min(N, a + spc)
        xc = np.empty((H, Wd, C), dtype=x.dtype)
        rows = np.empty(((z - a) * P, Q), dtype=x.dtype)
        G = np.empty(((z - a) * P, Co), dtype=x.dtype)
        for n in range(a, z):
            _to_channels_last(x, n, xc)
            im2row_cl(xc, k, stride, padding, Ho, Wo, rows, (n - a) * P)
            _g_rows(g, n, G, (n - a) * P)
        np.dot(rows.T, G, part[ch])                          # Σ window ⊗ g
    out = part[0].copy()
    for ch in range(1, n_chunks):
        out += part[ch]
    return out


@njit(cache=True, parallel=True)
def conv_input_grad_gemm(g, WrT, C, H, Wd, k, stride, padding, spc):
    """S17 input gradient (as conv_input_grad) by one BLAS product per chunk of ``spc`` samples,
    then the adjoint of the channels-last window copy. WrT (C_out, C_in·k·k) = Wrᵀ, contiguous."""
    N, Co, Ho, Wo = g.shape
    Q = WrT.shape[1]
    P = Ho * Wo
    gx = np.empty((N, C, H, Wd), dtype=g.dtype)
    n_chunks = (N + spc - 1) // spc
    for ch in prange(n_chunks):                              # each chunk writes its own samples
        a = ch * spc
        z = min(N, a + spc)
        G = np.empty(((z - a) * P, Co), dtype=g.dtype)
        for n in range(a, z):
            _g_rows(g, n, G, (n - a) * P)
        drows = np.empty(((z - a) * P, Q), dtype=g.dtype)
        np.dot(G, WrT, drows)                                # W_mᵀ g, one row per window
        gc = np.empty((H, Wd, C), dtype=g.dtype)
        for n in range(a, z):
            gc[:, :, :] = 0.0
            row2im_cl(drows, (n - a) * P, k, stride, padding, Ho, Wo, gc)
            for c in range(C):
                for y in range(H):
                    for xo in range(Wd):
                        gx[n, c, y, xo] = gc[y, xo, c]
    return gx
