"""Average pooling (spec stbp S18): k×k windows, stride k, no padding, floor.

Only whole windows are pooled: an odd last row or column (H or W not a multiple of k) is read by
no window, so its gradient is 0.
"""

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def avgpool_forward(x, k):
    """S18: P[n, c, Y, X] = (Σ_{i,j<k} x[n, c, k·Y+i, k·X+j]) / k².

    x (N, C, H, W) -> P (N, C, H // k, W // k), same dtype.
    """
    N, C, H, W = x.shape
    Ho, Wo = H // k, W // k
    P = np.empty((N, C, Ho, Wo), dtype=x.dtype)
    kk = k * k
    zero = np.zeros(1, dtype=x.dtype)[0]                     # accumulate in x's dtype
    for n in prange(N):                                      # each n writes only its own maps
        for c in range(C):
            for Y in range(Ho):
                for X in range(Wo):
                    acc = zero
                    for i in range(k):
                        for j in range(k):
                            acc += x[n, c, k * Y + i, k * X + j]
                    P[n, c, Y, X] = acc / kk
    return P


@njit(cache=True, parallel=True)
def avgpool_backward(g, k, H, W):
    """S18 adjoint: g_x[n, c, y, x] = g[n, c, y // k, x // k] / k² inside the pooled area, 0 in an
    odd last row or column.

    g (N, C, H // k, W // k) -> g_x (N, C, H, W), same dtype.
    """
    N, C, Ho, Wo = g.shape
    gx = np.zeros((N, C, H, W), dtype=g.dtype)
    kk = k * k
    for n in prange(N):                                      # each n writes only its own maps
        for c in range(C):
            for Y in range(Ho):
                for X in range(Wo):
                    v = g[n, c, Y, X] / kk
                    for i in range(k):
                        for j in range(k):
                            gx[n, c, k * Y + i, k * X + j] = v
    return gx
