"""kernels/blas.py: the layers' GEMMs cut into pieces of rows for numba's threads under the
one-BLAS-thread policy equal the plain products (1e-12 relative in float64), give the same bits
with one or two threads, and are the plain products under any other BLAS threading."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refsnn.kernels import blas


@pytest.fixture
def pieces(monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.setattr(blas, "ROWS", 3)             # small shapes still cut into pieces


def _rel(a, b):
    return float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(b))), 1e-300)


shapes = st.tuples(st.integers(1, 40), st.integers(1, 30), st.integers(1, 30))


@settings(deadline=None, max_examples=40,
          suppress_health_check=[HealthCheck.function_scoped_fixture])   # the same setting for all
@given(mkn=shapes, fortran_b=st.booleans(), f32=st.booleans(), seed=st.integers(0, 2**31))
def test_pieces_equal_the_plain_products(pieces, mkn, fortran_b, f32, seed):
    M, K, N = mkn
    dt = np.float32 if f32 else np.float64
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((M, K)).astype(dt)
    B = rng.standard_normal((K, N)).astype(dt)
    if fortran_b:
        B = np.asfortranarray(B)
    C = rng.standard_normal((K, N)).astype(dt)
    tol = 1e-12 if dt == np.float64 else 1e-5
    got, tn = blas.matmul(A, B), blas.matmul_tn(B, C)
    assert got.dtype == tn.dtype == dt and got.shape == (M, N) and tn.shape == (N, N)
    assert _rel(got, A @ B) <= tol
    assert _rel(tn, B.T @ C) <= tol
    numba.set_num_threads(1)
    try:
        one, tn_one = blas.matmul(A, B), blas.matmul_tn(B, C)
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    np.testing.assert_array_equal(one, got)         # the pieces are fixed by the shapes
    np.testing.assert_array_equal(tn_one, tn)


def test_other_blas_threading_keeps_the_plain_products(monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    monkeypatch.setattr(blas, "ROWS", 3)
    assert not blas.pieces_allowed()
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((50, 7)), rng.standard_normal((7, 9))
    np.testing.assert_array_equal(blas.matmul(A, B), A @ B)
    np.testing.assert_array_equal(blas.matmul_tn(A, rng.standard_normal((50, 4))).shape, (7, 4))


def test_a_piece_boundary_mistake_would_show(pieces):
    # every row of the product is computed once: a product of a ramp keeps its rows in order
    A = np.arange(20.0)[:, None] * np.ones((1, 3))
    B = np.eye(3)
    np.testing.assert_array_equal(blas.matmul(A, B), A)
    np.testing.assert_array_equal(blas.matmul_tn(A, np.ones((20, 1))), A.sum(0)[:, None])
