"""im2col / col2im for the conv layer (spec stbp S17): the windows of a zero-padded input as rows.

With cols[n, y, x, (c, i, j)] = x_pad[n, c, s·y + i, s·x + j], the cross-correlation S17 is one
GEMM cols @ W.reshape(C_out, -1).T, its weight gradient g^T cols, and its input gradient the
col2im (scatter-add) of g @ W: the exact adjoint of im2col.
"""

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def im2col(x, k, stride, padding, Ho, Wo):
    """x (N, C, H, W) -> cols (N, Ho, Wo, C*k*k); padding positions read 0 (S17)."""
    N, C, H, W = x.shape
    cols = np.zeros((N, Ho, Wo, C * k * k), dtype=x.dtype)
    for n in prange(N):
        for y in range(Ho):
            for xo in range(Wo):
                col = 0
                for c in range(C):
                    for i in range(k):
                        yy = stride * y + i - padding
                        for j in range(k):
                            xx = stride * xo + j - padding
                            if 0 <= yy < H and 0 <= xx < W:
                                cols[n, y, xo, col] = x[n, c, yy, xx]
                            col += 1
    return cols


@njit(cache=True, parallel=True)
def col2im(gcols, C, H, W, k, stride, padding):
    """Adjoint of im2col: gcols (N, Ho, Wo, C*k*k) -> g_x (N, C, H, W), windows summed (S17)."""
    N, Ho, Wo, _ = gcols.shape
    gx = np.zeros((N, C, H, W), dtype=gcols.dtype)
    for n in prange(N):                       # each n writes only its own image
        for y in range(Ho):
            for xo in range(Wo):
                col = 0
                for c in range(C):
                    for i in range(k):
                        yy = stride * y + i - padding
                        for j in range(k):
                            xx = stride * xo + j - padding
                            if 0 <= yy < H and 0 <= xx < W:
                                gx[n, c, yy, xx] += gcols[n, y, xo, col]
                            col += 1
    return gx
