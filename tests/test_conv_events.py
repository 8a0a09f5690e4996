"""The conv layer's fast paths (refsnn/kernels/conv_events.py, conv.py ``*_gemm``) against the
per-sample loops they replace (spec stbp S17).

Event forward and weight gradient on 0/1 inputs, and the channels-last BLAS forward, weight
gradient and input gradient on any input: equal to the loops to 1e-12 relative in float64
(another order of the same sums) and close in float32, for hypothesis-drawn shapes (C_in, C_out,
k, stride, padding, H, W, samples) and densities including all-zero and all-one inputs; the same
bits with one and two threads; the path choice; the layer (Conv2d) and a whole STBP conv net
with every path forced.
"""

from contextlib import contextmanager

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from refsnn import layers
from refsnn.kernels import conv as K
from refsnn.kernels import conv_events as CE

FAST = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextmanager
def paths(mode, blas_ok=True, min_run=0):
    """conv_events.MODE = mode, BLAS allowed from numba's threads (blas_ok) and window runs of
    any length (min_run) inside the block; restored afterwards."""
    old = (CE.MODE, CE.MIN_RUN, CE.blas.pieces_allowed)
    CE.MODE, CE.MIN_RUN = mode, min_run
    CE.blas.pieces_allowed = lambda: blas_ok
    try:
        yield
    finally:
        CE.MODE, CE.MIN_RUN, CE.blas.pieces_allowed = old


def rel_err(got, want):
    """max |got - want| / max |want| (the error relative to the largest entry)."""
    return float(np.max(np.abs(got - want))) / max(float(np.max(np.abs(want))), 1e-300)


def close(got, want, dtype):
    assert got.shape == want.shape and got.dtype == want.dtype
    if not np.any(want):
        assert not np.any(got)
        return
    assert rel_err(got, want) <= (1e-12 if dtype == np.float64 else 2e-5)


@st.composite
def conv_case(draw):
    """A conv layer and its data: shapes, stride, padding, density (0 and 1 included)."""
    C, Co = draw(st.integers(1, 5)), draw(st.integers(1, 20))
    k, s, p = draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(0, 2))
    H, W = draw(st.integers(1, 11)), draw(st.integers(1, 11))
    assume(H + 2 * p >= k and W + 2 * p >= k)
    N = draw(st.integers(1, 7))
    density = draw(st.sampled_from([0.0, 1.0, 0.05, 0.2, 0.5]) | st.floats(0.0, 1.0))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    seed = draw(st.integers(0, 2**32 - 1))
    return C, Co, k, s, p, H, W, N, density, dtype, seed


def make(c):
    C, Co, k, s, p, H, W, N, density, dtype, seed = c
    rng = np.random.default_rng(seed)
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    x = (rng.random((N, C, H, W)) < density).astype(dtype)
    Wt = rng.normal(size=(Co, C, k, k)).astype(dtype)
    b = rng.normal(size=Co).astype(dtype)
    g = rng.normal(size=(N, Co, Ho, Wo)).astype(dtype)
    return x, Wt, b, g, Ho, Wo


@settings(max_examples=40, **FAST)
@given(c=conv_case(), bias=st.booleans())
def test_event_forward_equals_the_loops(c, bias):
    C, Co, k, s, p = c[:5]
    x, Wt, b, g, Ho, Wo = make(c)
    b = b if bias else np.zeros(0, x.dtype)
    want = K.conv_forward(x, Wt.reshape(Co, -1).copy(), b, k, s, p, Ho, Wo)
    got = CE.event_forward(x, CE.w_events(Wt, x.dtype), b, k, s, p, Ho, Wo)
    close(got, want, x.dtype)


@settings(max_examples=40, **FAST)
@given(c=conv_case())
def test_event_weight_grad_equals_the_loops(c):
    C, Co, k, s, p = c[:5]
    x, Wt, b, g, Ho, Wo = make(c)
    want = K.conv_weight_grad(g, x, k, s, p).reshape(Wt.shape)
    got = CE.dw_from_events(CE.event_weight_grad(g, x, k, s, p), Wt.shape)
    close(got, want, x.dtype)


@settings(max_examples=30, **FAST)
@given(c=conv_case(), bias=st.booleans(), analog=st.booleans())
def test_gemm_paths_equal_the_loops(c, bias, analog):
    """Channels-last windows + BLAS per chunk of samples, on 0/1 or analog inputs, with chunks of
    one sample and of several."""
    C, Co, k, s, p, H, W = c[:7]
    x, Wt, b, g, Ho, Wo = make(c)
    if analog:
        x = (x * np.random.default_rng(c[-1]).random(x.shape)).astype(x.dtype)
    b = b if bias else np.zeros(0, x.dtype)
    Wm = Wt.reshape(Co, -1).copy()
    Wr = CE.w_rows(Wt, x.dtype)
    for spc in (1, 3):
        close(K.conv_forward_gemm(x, Wr, b, k, s, p, Ho, Wo, spc),
              K.conv_forward(x, Wm, b, k, s, p, Ho, Wo), x.dtype)
        close(CE.dw_from_rows(K.conv_weight_grad_gemm(g, x, k, s, p, spc), Wt.shape),
              K.conv_weight_grad(g, x, k, s, p).reshape(Wt.shape), x.dtype)
        close(K.conv_input_grad_gemm(g, np.ascontiguousarray(Wr.T), C, H, W, k, s, p, spc),
              K.conv_input_grad(g, Wm, C, H, W, k, s, p), x.dtype)


def test_weight_layouts_round_trip():
    W = np.arange(3 * 2 * 4 * 4, dtype=np.float64).reshape(3, 2, 4, 4)
    Wev, Wr = CE.w_events(W, W.dtype), CE.w_rows(W, W.dtype)
    assert Wev[(1 * 2 + 1) * 4 + (4 - 1 - 2), 2] == W[2, 1, 1, 2]       # row (i, c', k-1-j)
    assert Wr[(1 * 4 + 2) * 2 + 1, 2] == W[2, 1, 1, 2]                  # row (i, j, c')
    assert np.array_equal(CE.dw_from_events(Wev, W.shape), W)
    assert np.array_equal(CE.dw_from_rows(Wr, W.shape), W)


def test_same_bits_with_one_and_two_threads():
    rng = np.random.default_rng(3)
    x = (rng.random((37, 3, 13, 11)) < 0.2).astype(np.float64)
    xa = x * rng.random(x.shape)
    Wt = rng.normal(size=(9, 3, 3, 3))
    g = rng.normal(size=(37, 9, 6, 5))
    b = rng.normal(size=9)
    Wr = CE.w_rows(Wt, np.float64)

    def run():
        return [CE.event_forward(x, CE.w_events(Wt, np.float64), b, 3, 2, 1, 6, 5),
                CE.event_weight_grad(g, x, 3, 2, 1),
                K.conv_forward_gemm(xa, Wr, b, 3, 2, 1, 6, 5, 4),
                K.conv_weight_grad_gemm(g, xa, 3, 2, 1, 4),
                K.conv_input_grad_gemm(g, np.ascontiguousarray(Wr.T), 3, 13, 11, 3, 2, 1, 4)]

    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run()
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = run()
    finally:
        numba.set_num_threads(old)
    for a, b_ in zip(one, two):
        assert np.array_equal(a, b_)


def test_path_choice():
    rng = np.random.default_rng(0)
    sparse = (rng.random((4, 3, 8, 8)) < 0.1).astype(np.float64)
    dense = np.ones((4, 3, 8, 8))
    analog = sparse * 0.5
    assert CE.spike_density(sparse) == pytest.approx(sparse.mean())
    assert CE.spike_density(analog) is None
    assert CE.spike_density(np.zeros((2, 1, 3, 3))) == 0.0
    mid = (rng.random((4, 3, 8, 8)) < 0.16).astype(np.float32)
    d = CE.spike_density(mid)
    with paths("auto"):
        assert CE.use_events(sparse)
        assert not CE.use_events(dense)                 # above MAX_DENSITY
        assert not CE.use_events(analog)                # not a spike train
        assert CE.use_gemm(3, 5)
        for op in ("forward", "wgrad"):                 # the limit of the product against BLAS
            assert CE.use_events(mid, op) == (d <= CE.MAX_DENSITY[(np.dtype(np.float32), op)])
    with paths("auto", min_run=100):                    # against the loops
        assert CE.use_events(mid) == (d <= CE.MAX_DENSITY_LOOP)
    with paths("events"):
        assert CE.use_events(dense)
        assert not CE.use_events(analog)
    with paths("gemm"):
        assert not CE.use_events(sparse)
    with paths("loop"):
        assert not CE.use_events(sparse) and not CE.use_gemm(3, 5)
    with paths("auto", blas_ok=False):
        assert not CE.use_gemm(3, 5)                    # BLAS threads would collide
    with paths("auto", min_run=32):
        assert not CE.use_gemm(1, 5) and CE.use_gemm(8, 4)


@settings(max_examples=15, **FAST)
@given(c=conv_case(), bias=st.booleans())
def test_conv2d_layer_same_on_every_path(c, bias):
    """Conv2d.forward / backward (T, B layout) with the loops, BLAS and events forced agree."""
    C, Co, k, s, p, H, W, N = c[:8]
    x, Wt, b, g, Ho, Wo = make(c)
    layer = layers.Conv2d(Wt, b if bias else None, in_hw=(H, W), stride=s, padding=p)
    x5, g5 = x.reshape((N, 1) + x.shape[1:]), g.reshape((N, 1) + g.shape[1:])
    out = {}
    for mode in ("loop", "gemm", "events"):
        with paths(mode):
            I = layer.forward(x5)
            gx, grads = layer.backward(g5, x5)
            out[mode] = [I, gx] + grads
    for mode in ("gemm", "events"):
        for got, want in zip(out[mode], out["loop"]):
            close(got, want, x.dtype)


def test_stbp_conv_net_same_on_every_path():
    """A whole STBP conv net (conv, pool, conv, pool, dense) in float64: spikes equal and loss and
    gradients within 1e-12 with the loops, BLAS and events (near-threshold rounding could flip a
    spike; none does on this case)."""
    from refsnn.methods import get_method
    from refsnn.network import Network
    m = get_method("stbp")
    p = m.Params.from_dict(dict(decay=0.8, v_th=1.0, surrogate="rect", surrogate_width=1.0))
    rng = np.random.default_rng(5)
    net = Network.build("14x14x1-6c3-a2-8c3p1-a2-10", m, p, rng=rng, dtype=np.float64)
    for arr in net.params():
        arr *= 3.0
    x = (rng.random((4, 5, 1, 14, 14)) < 0.2).astype(np.float64)
    target = net.make_target(rng.integers(0, 10, 5), 4)
    res = {}
    for mode in ("loop", "gemm", "events"):
        with paths(mode):
            loss, grads, trace = net.loss_and_grads(x, target)
            res[mode] = (loss, grads, [s_.spikes for s_ in trace.spiking_states])
    assert any(np.any(s_) for s_ in res["loop"][2][:2])
    for mode in ("gemm", "events"):
        loss, grads, spikes = res[mode]
        assert loss == pytest.approx(res["loop"][0], rel=1e-12)
        for a, b_ in zip(spikes, res["loop"][2]):
            assert np.array_equal(a, b_)
        for a, b_ in zip(grads, res["loop"][1]):
            close(np.asarray(a), np.asarray(b_), np.float64)
