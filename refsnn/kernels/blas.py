"""The dense layers' GEMMs on every core under the one-BLAS-thread policy.

The CLI runs BLAS on one thread (benchmarks/README.md, "Threading": OpenBLAS's and numba's thread
pools on the same cores wait for each other). A plain ``A @ B`` then uses one core. Here the
product is cut into pieces that numba's threads compute at once, each piece one single-threaded
BLAS call:

    matmul(A, B)      A B    pieces of rows of A            (forward current S1, e W of S13c)
    matmul_tn(A, B)   Aᵀ B   pieces of the shared rows,     (weight gradient S15: Σ_r xᵀ g)
                             partial products summed in piece order

The pieces depend on the shapes alone (ROWS rows each), never on the number of threads, so the
result is the same bits with any thread count. It can differ from one ``A @ B`` in the last bits
(BLAS may order a sum differently for another M; matmul_tn sums its partials in another order):
1e-12 relative in float64 (tests/test_blas.py). Under any other BLAS threading (a library user's
default: several BLAS threads) the plain product is used, as a BLAS call from numba's threads
would then start threads of its own.
"""

from __future__ import annotations

import os

import numpy as np
from numba import njit, prange

#: Rows per piece. Halves of a 320-row product (batch 64, T 5) were 1.3-2x faster than one call
#: on this project's 2-core machine; pieces of 16-64 rows lose BLAS's own efficiency
#: (benchmarks/README.md, "Fused STBP path").
ROWS = 160


def pieces_allowed() -> bool:
    """True when BLAS runs on one thread by the environment (the CLI's policy)."""
    return (os.environ.get("OPENBLAS_NUM_THREADS") == "1"
            and os.environ.get("MKL_NUM_THREADS", "1") == "1")


@njit(cache=True, parallel=True)
def _matmul_rows(A, B, out, rows):
    """out[a:z] = A[a:z] B for pieces [a, z) of ``rows`` rows, in ``prange``."""
    M = A.shape[0]
    for c in prange((M + rows - 1) // rows):
        a = c * rows
        z = min(M, a + rows)
        np.dot(A[a:z], B, out[a:z])
    return out


@njit(cache=True, parallel=True)
def _matmul_tn_pieces(A, B, part, rows):
    """part[c] = A[a:z]ᵀ B[a:z] for pieces [a, z) of ``rows`` shared rows, in ``prange``."""
    K = A.shape[0]
    for c in prange(part.shape[0]):
        a = c * rows
        z = min(K, a + rows)
        np.dot(A[a:z].T, B[a:z], part[c])
    return part


def matmul(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """A B (C-ordered) for A (M, K) and B (K, N) of one dtype, B C- or Fortran-contiguous."""
    M = A.shape[0]
    if M < 2 * ROWS or not pieces_allowed() or not (B.flags.c_contiguous or B.flags.f_contiguous):
        return A @ B
    out = np.empty((M, B.shape[1]), A.dtype)
    return _matmul_rows(np.ascontiguousarray(A), B, out, ROWS)


def matmul_tn(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Aᵀ B (C-ordered, (M, N)) for A (K, M) and B (K, N) of one dtype."""
    K = A.shape[0]
    if K < 2 * ROWS or not pieces_allowed():
        return A.T @ B
    n = (K + ROWS - 1) // ROWS
    part = np.empty((n, A.shape[1], B.shape[1]), A.dtype)
    _matmul_tn_pieces(np.ascontiguousarray(A), np.ascontiguousarray(B), part, ROWS)
    out = part[0]
    for c in range(1, n):                              # in piece order
        out += part[c]
    return out
