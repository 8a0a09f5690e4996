"""The fused STBP path (refsnn/kernels/stbp_fused.py, STBP.forward/backward on dense chains) is
the general layer-by-layer chain, computed in fewer passes: spikes, u and h the same bits, loss
the same, gradients equal to 1e-12 of the largest entry in float64 (bit-identical when the error
is sent down by the same GEMM). Also: the hand-written neuron rows of stbp.lif_forward give the
same bits as a plain step-by-step NumPy reference of S2-S4 and S9-S12."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refsnn.kernels import dense as dense_kernels
from refsnn.layers import Dense
from refsnn.methods import get_method
from refsnn.methods import stbp as S
from refsnn.network import Network

M = get_method("stbp")


@pytest.fixture(autouse=True)
def _restore_switches():
    saved = (S.FUSED, S.G_DOWN, dense_kernels.MODE)
    yield
    S.FUSED, S.G_DOWN, dense_kernels.MODE = saved


def _layers(rng, sizes, dtype, bias, gain):
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        W = (rng.uniform(-1, 1, (n_out, n_in)) * gain / np.sqrt(n_in)).astype(dtype)
        b = (rng.uniform(-0.3, 0.3, n_out)).astype(dtype) if bias else None
        layers.append(Dense(W, b))
    return layers


def _run(p, layers, x, target, fused):
    S.FUSED = fused
    trace = M.forward(p, layers, x)
    took = "_fused" in trace.extra
    grads = M.backward(p, layers, trace, target)
    return trace, [g for per in grads for g in per], took


def _rel(a, b):
    return float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(a))), 1e-300)


@st.composite
def cases(draw):
    n = draw(st.integers(1, 3))
    sizes = [draw(st.integers(1, 70)) for _ in range(n)] + [draw(st.sampled_from([2, 4, 10]))]
    params = dict(
        decay=draw(st.floats(0.05, 0.95)), v_th=draw(st.floats(0.2, 1.5)),
        surrogate=draw(st.sampled_from(S.SURROGATES)),
        surrogate_width=draw(st.floats(0.4, 2.0)), rect_norm=draw(st.booleans()),
        reset_form=draw(st.sampled_from(["linear", "exp"])), reset_grad=draw(st.booleans()),
        variant=draw(st.sampled_from(S.VARIANTS)), strict=draw(st.booleans()),
        loss=draw(st.sampled_from(["mse_mean", "paper"])), vote_k=draw(st.sampled_from([1, 2])))
    sizes[-1] *= params["vote_k"]
    return dict(sizes=sizes, params=params, T=draw(st.integers(1, 7)), B=draw(st.integers(1, 6)),
                density=draw(st.floats(0.0, 0.6)), bias=draw(st.booleans()),
                gain=draw(st.floats(0.5, 6.0)),
                mode=draw(st.sampled_from(["auto", "events", "gemm"])),
                g_down=draw(st.sampled_from(["rows", "gemm", "auto"])), seed=draw(st.integers(0, 2**31)))


@settings(deadline=None, max_examples=40)
@given(case=cases())
def test_fused_equals_general_float64(case):
    _check(case, np.float64)


@settings(deadline=None, max_examples=20)
@given(case=cases())
def test_fused_equals_general_float32(case):
    _check(case, np.float32)


def _check(case, dtype):
    rng = np.random.default_rng(case["seed"])
    p = S.STBPParams.from_dict(case["params"])
    layers = _layers(rng, case["sizes"], dtype, case["bias"], case["gain"])
    T, B = case["T"], case["B"]
    x = (rng.random((T, B, case["sizes"][0])) < case["density"]).astype(dtype)
    C = case["sizes"][-1] // p.vote_k
    target = np.eye(C)[rng.integers(0, C, B)]
    dense_kernels.MODE, S.G_DOWN = case["mode"], case["g_down"]
    ref, g_ref, took_ref = _run(p, layers, x, target, "off")
    fus, g_fus, took = _run(p, layers, x, target, "auto")
    assert took and not took_ref
    for a, b in zip(ref.states, fus.states):
        for name in ("spikes", "u", "h"):
            assert getattr(a, name).dtype == getattr(b, name).dtype == dtype
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert ref.loss == fus.loss
    assert "dL_do" in ref.extra and "dL_do" not in fus.extra
    tol = 1e-12 if dtype == np.float64 else 1e-4     # float32: another order of ~100-term sums
    for a, b in zip(g_ref, g_fus):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape
        if case["g_down"] == "gemm" or len(layers) == 1:
            np.testing.assert_array_equal(a, b)      # the same sums in the same order
        elif np.any(a):
            assert _rel(a, b) <= tol
        else:
            assert not np.any(b)
    for a, b in zip(ref.extra["delta"], fus.extra["delta"]):
        if np.any(a):
            assert _rel(a, b) <= tol


def test_fused_path_taken_only_where_it_applies():
    rng = np.random.default_rng(0)
    p = S.STBPParams(decay=0.8, v_th=1.0)
    x = (rng.random((3, 2, 30)) < 0.3).astype(np.float64)
    layers = _layers(rng, [30, 20, 20, 4], np.float64, True, 3.0)
    assert M.fused_applies(p, layers, x)
    assert not M.fused_applies(p.replace(relax=True), layers, x)
    assert not M.fused_applies(p, layers, x.astype(np.float32))          # weights in f64
    assert not M.fused_applies(p, layers, x, masks={1: np.ones((3, 2, 20))})
    assert not M.fused_applies(p.replace(dropout=0.5), layers, x, train=True)
    assert M.fused_applies(p.replace(dropout=0.5), layers, x, train=False)
    S.FUSED = "off"
    assert not M.fused_applies(p, layers, x)
    S.FUSED = "auto"
    net = Network.build("8x8x1-4c3-a2-10", M, p, rng=rng)
    assert not M.fused_applies(p, net.layers, rng.random((2, 2, 1, 8, 8)))
    # the oracle runs the general chain (it records dL_do)
    out = M.run_case([l.W for l in layers], x[:, 0], label=1, p=p)
    assert "dL_do" in out and len(out["dL_do"]) == 3


@settings(deadline=None, max_examples=15)
@given(seed=st.integers(0, 2**31), density=st.floats(0.0, 0.4),
       dtype=st.sampled_from([np.float64, np.float32]), steps=st.integers(1, 3))
def test_training_steps_same_network(seed, density, dtype, steps):
    """A few SGD steps of Network.loss_and_grads (the path of refsnn/train.py): the fused and
    the general chain keep the same spikes, and the weights stay within rounding."""
    from refsnn.config import TrainConfig
    from refsnn.optim import make_optimizer
    nets = []
    for fused in ("off", "auto"):
        S.FUSED = fused
        rng = np.random.default_rng(seed)
        p = M.Params.from_dict({"decay": 0.8, "v_th": 1.0})
        net = Network.build("60-40-30-10", M, p, rng=rng, dtype=np.dtype(dtype))
        for a in net.params():
            a *= 3.0
        opt = make_optimizer(TrainConfig(optimizer="sgd", lr=0.1), net.params())
        spikes = []
        for _ in range(steps):
            x = (rng.random((4, 5, 60)) < density).astype(dtype)
            tgt = net.make_target(rng.integers(0, 10, 5), 4)
            _, grads, trace = net.loss_and_grads(x, tgt, train=True, rng=rng)
            opt.step(net.params(), grads, 0.1)
            spikes.append([s.spikes.copy() for s in trace.spiking_states])
        nets.append((net, spikes))
    (n0, s0), (n1, s1) = nets
    for a, b in zip(s0, s1):
        for x0, x1 in zip(a, b):
            np.testing.assert_array_equal(x0, x1)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for a, b in zip(n0.params(), n1.params()):
        assert _rel(a, b) <= tol


# ------------------------------------------------------------------------------------------
# stbp.lif_forward (hand-written rows) against a plain NumPy S2-S4 + S9-S12 reference
# ------------------------------------------------------------------------------------------

def _lif_reference(I, decay, v_th, reset_exp, strict, kind, a, rect_norm):
    T = I.shape[0]
    u, o, h = np.empty_like(I), np.empty_like(I), np.empty_like(I)
    up = np.zeros(I.shape[1:])
    op = np.zeros(I.shape[1:])
    for t in range(T):
        f = decay * np.exp(-op / decay) if reset_exp else decay * (1.0 - op)        # S3
        u[t] = f * up + I[t]                                                         # S2
        ut = u[t].astype(np.float64)
        o[t] = ut > v_th if strict else ut >= v_th                                   # S4
        h[t] = np.vectorize(lambda v: S.surrogate_h(v - v_th, kind, a, rect_norm))(ut)
        up, op = ut, o[t].astype(np.float64)
    return u, o, h


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**31), T=st.integers(1, 6), B=st.integers(1, 4),
       N=st.integers(1, 40), kind=st.integers(0, 3), reset_exp=st.booleans(),
       strict=st.booleans(), rect_norm=st.booleans(), a=st.floats(0.3, 2.0),
       decay=st.floats(0.05, 0.95), v_th=st.floats(0.1, 1.5),
       dtype=st.sampled_from([np.float64, np.float32]))
def test_lif_forward_rows_equal_reference(seed, T, B, N, kind, reset_exp, strict, rect_norm, a,
                                          decay, v_th, dtype):
    rng = np.random.default_rng(seed)
    I = rng.normal(0.4, 0.8, (T, B, N)).astype(dtype)
    I[rng.random(I.shape) < 0.1] = v_th                                   # ties at the threshold
    got = S.lif_forward(I, decay, v_th, reset_exp, strict, False, kind, a, rect_norm)
    want = _lif_reference(I, decay, v_th, reset_exp, strict, kind, a, rect_norm)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
