"""TSSL-BP (spec/tsslbp.md): kernels E1-E8 and E12-E14, the losses E9-E11, pooling E16, dropout,
the whole gradient vs finite differences on the tangent model of 6.2 (dense and conv), the property
checks of 6.3, the worked examples (6.3 g, 11), the golden cases, the batch engine against the
oracle, float32, presets and parameter errors."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from refsnn.config import TrainConfig
from refsnn.errors import ConfigError, ShapeError
from refsnn.gradcheck import central_fd
from refsnn.methods import get_method
from refsnn.methods.tsslbp import (TSSLBP, TSSLBPParams, SumPool2d, count_loss, desired_train,
                                   kernel_loss, lif_backward, lif_forward, psp_backward,
                                   psp_forward, softmax_loss, surrogate_slope, tangent_model,
                                   tsslbp_delta, warm_mask)
from refsnn.network import Network, parse_arch
from refsnn.oracle import run_case

layers = pytest.importorskip("refsnn.layers")

M = TSSLBP()
GOLDEN = Path(__file__).parent / "golden" / "tsslbp.json"
FAST = dict(deadline=None, suppress_health_check=[HealthCheck.filter_too_much,
                                                  HealthCheck.too_slow])
VARIANTS, WARMUPS, LOSSES = ("code", "paper"), ("code", "none", "all", "layer_rate"), \
    ("kernel", "count", "softmax")


def col(v):
    """A 1-D sequence as (T, 1, 1)."""
    return np.asarray(v, dtype=np.float64).reshape(-1, 1, 1)


# ---------------------------------------------------------------------------------------------
# E1/E4 synaptic filter and its adjoint E6
# ---------------------------------------------------------------------------------------------

def naive_psp(s, theta_s):
    """E4 by its kernel form: a[t] = Σ_k ε[k] s[t-k], ε[k] = θ_s (1-θ_s)^k."""
    eps = theta_s * (1.0 - theta_s) ** np.arange(s.shape[0])
    return np.stack([np.tensordot(eps[: t + 1], s[t::-1], axes=1) for t in range(s.shape[0])])


@pytest.mark.parametrize("T, B, N", [(1, 1, 1), (7, 3, 5), (40, 2, 1)])
def test_E4_recursion_equals_the_kernel_form(T, B, N):
    s = (np.random.default_rng(0).random((T, B, N)) < 0.3).astype(np.float64)
    np.testing.assert_allclose(psp_forward(s, 1 / 3), naive_psp(s, 1 / 3), rtol=1e-13, atol=1e-15)


def test_E1_constant_input_and_kernel_sums_to_one():
    # spec 3: constant x gives a^0[t] = x(1 - (1-θ_s)^{t+1}): 0.333x, 0.556x, 0.704x for τ_s = 3
    a = psp_forward(col([2.0] * 60), 1 / 3).ravel()
    np.testing.assert_allclose(a[:3], 2.0 * np.array([1 / 3, 5 / 9, 19 / 27]), rtol=1e-14)
    assert a[-1] == pytest.approx(2.0, rel=1e-10)


shapes = st.tuples(st.integers(1, 12), st.integers(1, 3), st.integers(1, 4))


@settings(deadline=None, max_examples=30)
@given(shape=shapes, tau_s=st.floats(1.0, 10.0), data=st.data())
def test_E6_is_the_exact_adjoint_of_E4(shape, tau_s, data):
    s, g = (data.draw(arrays(np.float64, shape, elements=st.floats(-1, 1))) for _ in range(2))
    lhs = np.vdot(g, psp_forward(s, 1 / tau_s))
    rhs = np.vdot(psp_backward(g, 1 / tau_s), s)
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# E2-E3 forward, E7-E8 backward: the hand example 6.3 g, and the properties of 6.3
# ---------------------------------------------------------------------------------------------

def test_6_3_g_hand_example():
    u, du, s = lif_forward(col([0.6, 0.7, 0.2, 1.5]), 0.2, 1.0)
    np.testing.assert_allclose(u.ravel(), [0.6, 1.18, 0.2, 1.66], rtol=1e-14)
    assert s.ravel().tolist() == [0, 1, 0, 1]
    np.testing.assert_allclose(du.ravel()[[1, 3]], [0.58, 1.46], rtol=1e-14)
    G = psp_backward(col([0.0, -1.0, 0.0, -1.0]), 1 / 3)
    np.testing.assert_allclose(G.ravel(), [-0.320988, -0.481481, -0.222222, -0.333333], atol=5e-7)
    D, c = lif_backward(G, u, du, s, 0.2, 8.0)
    np.testing.assert_allclose(D.ravel(), [-0.723568, -0.904459, -0.182648, -0.228311], atol=5e-7)
    # the check line of 6.3 g, from G and the forward only
    G = G.ravel()
    D3 = G[3] / 1.46
    D2 = 0.8 * D3
    D1 = (G[1] + 1.18 * 0.2 * D2) / 0.58
    np.testing.assert_allclose(D.ravel(), [0.8 * D1, D1, D2, D3], rtol=1e-12)
    np.testing.assert_allclose(c.ravel(), [0, 1 / 0.58, 0, 1 / 1.46], rtol=1e-14)


def test_E3_fires_strictly_above_threshold_and_resets_to_zero():
    u, du, s = lif_forward(col([1.0, 0.5, 0.6]), 0.5, 1.0)     # u = 1 (no spike), 1.0, 1.1
    assert s.ravel().tolist() == [0, 0, 1]
    np.testing.assert_allclose(u.ravel(), [1.0, 1.0, 1.1], rtol=1e-15)
    u, du, s = lif_forward(col([2.0, 0.3]), 0.2, 1.0)           # reset: û = 0 after the spike
    assert u[1, 0, 0] == 0.3 and du[1, 0, 0] == 0.3


def spike_list_D(G, u, s, theta_m, c_max, du):
    """E8 read by spikes (spec 5.2): D[t_m] = c(G[t_m] + u θ_m θ'^(t_p-t_m-1) D[t_p]) at a spike,
    D[t] = θ'^(t_p - t) D[t_p] between spikes (t_p the next spike), 0 after the last spike."""
    T = len(G)
    leak = 1 - theta_m
    D = np.zeros(T)
    spikes = [t for t in range(T) if s[t] == 1]
    for idx in range(len(spikes) - 1, -1, -1):
        tm = spikes[idx]
        nxt = spikes[idx + 1] if idx + 1 < len(spikes) else None
        c = min(1 / du[tm], c_max) if du[tm] > 0 else 0.0
        carry = 0.0 if nxt is None else leak ** (nxt - tm - 1) * D[nxt]
        D[tm] = c * (G[tm] + u[tm] * theta_m * carry)
        prev = spikes[idx - 1] if idx > 0 else -1
        for t in range(prev + 1, tm):
            D[t] = leak ** (tm - t) * D[tm]
    return D


@settings(deadline=None, max_examples=30)
@given(T=st.integers(1, 15), tau_m=st.floats(1.2, 10), c_max=st.floats(0.5, 10), data=st.data())
def test_6_3_f_closed_recursion_equals_the_spike_by_spike_form(T, tau_m, c_max, data):
    I = np.array(data.draw(st.lists(st.floats(-0.5, 2.0), min_size=T, max_size=T)))
    g = np.array(data.draw(st.lists(st.floats(-1, 1), min_size=T, max_size=T)))
    u, du, s = lif_forward(col(I), 1 / tau_m, 1.0)
    G = psp_backward(col(g), 1 / 3)
    D, _ = lif_backward(G, u, du, s, 1 / tau_m, c_max)
    ref = spike_list_D(G.ravel(), u.ravel(), s.ravel(), 1 / tau_m, c_max, du.ravel())
    np.testing.assert_allclose(D.ravel(), ref, rtol=1e-12, atol=1e-12)


def layer_backward_parts(p, I, g, v_th=1.0):
    """E2-E14 on one layer's current I and ∂L/∂a g, (T, B, N) each."""
    u, du, s = lif_forward(I, p.theta_m, v_th)
    a = psp_forward(s, p.theta_s)
    G = psp_backward(g, p.theta_s)
    D, c = lif_backward(G, u, du, s, p.theta_m, p.c_max)
    warm = warm_mask(p, a, s)
    delta = tsslbp_delta(D, G, u, s, warm, p.variant == "paper", v_th, p.surrogate_width, p.x_clip)
    return dict(u=u, du=du, s=s, a=a, G=G, D=D, c=c, warm=warm, delta=delta)


currents = arrays(np.float64, st.tuples(st.integers(1, 12), st.integers(1, 3), st.integers(1, 4)),
                  elements=st.floats(-1.0, 2.5))


@settings(**FAST, max_examples=30)
@given(I=currents, variant=st.sampled_from(VARIANTS), warmup=st.sampled_from(WARMUPS),
       tau_m=st.floats(1.5, 10), tau_s=st.floats(1, 6), c_max=st.floats(0.5, 10), data=st.data())
def test_6_3_a_b_d_e_properties(I, variant, warmup, tau_m, tau_s, c_max, data):
    p = TSSLBPParams(tau_m=tau_m, tau_s=tau_s, variant=variant, warmup=warmup, c_max=c_max)
    g = -np.abs(data.draw(arrays(np.float64, I.shape, elements=st.floats(0, 1))))
    r = layer_backward_parts(p, I, g)
    # (a) sign: g <= 0 everywhere gives δ <= 0 everywhere
    assert np.all(r["delta"] <= 0)
    # (b) 0 <= c <= c_max; c = 1/Δu where Δu > 1/c_max; c = 0 without a spike
    assert np.all((r["c"] >= 0) & (r["c"] <= c_max))
    big = (r["s"] == 1) & (r["du"] > 1 / c_max)
    np.testing.assert_allclose(r["c"][big], 1 / r["du"][big], rtol=1e-15)
    assert np.all(r["c"][r["s"] == 0] == 0)
    # (d) the HEAD warm-up never fires at a spike step (a >= θ_s there)
    if warmup == "code":
        assert not np.any(r["warm"] & (r["s"] == 1))
        assert np.all(r["a"][r["s"] == 1] >= p.theta_s)
    # (e) a neuron that never spikes gets δ = 0 with warmup "none"
    if warmup == "none":
        silent = r["s"].sum(axis=0) == 0
        assert np.all(r["delta"][:, silent] == 0)


@settings(**FAST, max_examples=30)
@given(I=currents, tau_m=st.floats(1.5, 10), data=st.data())
def test_6_3_c_paper_variant_is_s_times_code_variant(I, tau_m, data):
    g = data.draw(arrays(np.float64, I.shape, elements=st.floats(-1, 1)))
    code = layer_backward_parts(TSSLBPParams(tau_m=tau_m, warmup="none"), I, g)
    paper = layer_backward_parts(TSSLBPParams(tau_m=tau_m, warmup="none", variant="paper"), I, g)
    np.testing.assert_array_equal(paper["delta"], code["s"] * code["delta"])


def test_E7_code_conventions_at_zero_and_negative_increments():
    # a negative threshold can make a spike with Δu <= 0 (spec 5.2)
    for I, want in (([0.0], 8.0), ([-0.0], 0.0), ([-0.3], 0.0), ([0.05], 8.0), ([0.5], 2.0)):
        u, du, s = lif_forward(col(I), 0.2, -1.0)
        assert s.ravel()[0] == 1
        _, c = lif_backward(col([1.0]), u, du, s, 0.2, 8.0)
        assert c.ravel()[0] == want and math.copysign(1, du.ravel()[0]) == math.copysign(1, I[0])


def test_E12_surrogate_slope_values_and_clip():
    a = 0.2
    assert surrogate_slope(1.0, 1.0, a, 8.0) == pytest.approx(1 / (4 * a), rel=1e-15)
    # outside the clip the slope is taken at the clipped argument, not 0
    edge = math.exp(8) / (1 + math.exp(8)) ** 2 / a
    assert surrogate_slope(1.0 - 5.0, 1.0, a, 8.0) == pytest.approx(edge, rel=1e-14)
    assert surrogate_slope(1.0 + 5.0, 1.0, a, 8.0) == pytest.approx(edge, rel=1e-14)


def test_E14_warm_masks():
    p = TSSLBPParams()
    a = np.array([0.0, 1 / 12 - 1e-12, 1 / 12, 0.5]).reshape(4, 1, 1)
    s = np.zeros_like(a)
    assert warm_mask(p, a, s).ravel().tolist() == [True, True, False, False]      # strict <
    assert not warm_mask(p.replace(warmup="none"), a, s).any()
    assert warm_mask(p.replace(warmup="all"), a, s).all()
    s2 = np.zeros((10, 2, 1))
    s2[:1, 0] = 1.0                                                  # rate 1/20 = 0.05 <= 0.05
    assert warm_mask(p.replace(warmup="layer_rate"), s2, s2).all()
    s2[:2, 0] = 1.0                                                  # 0.1 > 0.05
    assert not warm_mask(p.replace(warmup="layer_rate"), s2, s2).any()


# ---------------------------------------------------------------------------------------------
# Losses E9-E11 (exact ∂L/∂a vs FD) and targets 4.1
# ---------------------------------------------------------------------------------------------

def test_4_1_desired_trains():
    p = TSSLBPParams()
    assert desired_train(p, 5).tolist() == [0, 1, 1, 1, 1]
    assert desired_train(p, 6).tolist() == [0, 1, 1, 1, 1, 0]
    assert desired_train(p, 12).tolist() == [0, 1] * 6
    assert desired_train(p.replace(desired_pattern=(0, 1, 0, 1, 1)), 7).tolist() == \
        [0, 1, 0, 1, 1, 0, 1]
    tgt = M.make_target(p, np.array([2, 0]), 3, 5)
    assert tgt.d.shape == (5, 2, 3) and tgt.d[:, 0, 2].tolist() == [0, 1, 1, 1, 1]
    assert tgt.d.sum() == 8 and tgt.labels.tolist() == [2, 0]


@settings(**FAST, max_examples=15)
@given(shape=st.tuples(st.integers(1, 8), st.integers(1, 3), st.integers(2, 5)),
       loss=st.sampled_from(LOSSES), passes=st.integers(0, 3), data=st.data())
def test_E9_E11_loss_gradient_matches_finite_differences(shape, loss, passes, data):
    T, B, N = shape
    p = TSSLBPParams(loss=loss, target_passes=passes, desired_count=2.0, undesired_count=0.5)
    a = data.draw(arrays(np.float64, shape, elements=st.floats(0, 1)))
    labels = np.array(data.draw(st.lists(st.integers(0, N - 1), min_size=B, max_size=B)))
    tgt = M.make_target(p, labels, N, T)
    if loss == "count":   # away from the clipping kinks of E10
        n = a.sum(axis=0)
        c = np.where(np.arange(N)[None] == labels[:, None], 2.0, 0.5)
        assume(np.all(np.abs(n - c) > 1e-3))
    st_ = M.neuron_forward(p, 0, 1, np.zeros(shape), True)._replace(out=a)
    L, g = M.loss(p, st_, tgt)
    fd = central_fd(lambda: M.loss(p, st_, tgt)[0], [a])[0]
    np.testing.assert_allclose(g, fd, rtol=0, atol=1e-7 * max(1, np.abs(g).max()))


def test_E9_E11_hand_values():
    a = np.array([[0.2, 0.5], [0.4, 0.1]]).reshape(2, 1, 2)            # T = 2, one sample
    a_hat = np.array([[0.0, 0.5], [0.3, 0.0]]).reshape(2, 1, 2)
    L, g = kernel_loss(a, a_hat)
    assert L == pytest.approx(0.5 * (0.04 + 0.01 + 0.01), rel=1e-14)
    # count: n = (0.6, 0.6), label 0 wants 4 (e = -1.7), neuron 1 wants 1 (e = -0.2 -> clipped 0)
    L, g = count_loss(a, np.array([0]), 4.0, 1.0)
    assert L == pytest.approx(0.5 * 2 * 1.7 ** 2, rel=1e-14) and g[:, 0, 1].tolist() == [0, 0]
    L, g = softmax_loss(a, np.array([1]))
    z = np.array([0.6, 0.6])
    assert L == pytest.approx(math.log(2), rel=1e-14) and g[0, 0].tolist() == [0.5, -0.5]
    del z


def test_E9_target_filtered_by_the_same_recursion_gives_zero_exactly():
    # spec 2.3: when the output fires exactly the desired train, loss and gradient are exactly 0
    p = TSSLBPParams(target_passes=1)
    d = M.make_target(p, np.array([1]), 2, 5)
    st_ = M.neuron_forward(p, 0, 1, np.zeros((5, 1, 2)), True)
    st_ = st_._replace(out=psp_forward(np.ascontiguousarray(d.d), p.theta_s))
    L, g = M.loss(p, st_, d)
    assert L == 0.0 and not g.any()


# ---------------------------------------------------------------------------------------------
# 11: the worked example, number by number
# ---------------------------------------------------------------------------------------------

EX_X = np.array([(1, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 0), (1, 1, 1), (0, 1, 0)], float)
EX_W = [np.array([[1.5, 1.2, -0.5], [0.6, -0.4, 2.0]]), np.array([[1.2, 0.6], [-0.5, 2.0]])]
FWD = {   # t: a0, I1, u1, s1, a1, I2, u2, s2, a2
    0: [(0.333333, 0, 0.333333), (0.333333, 0.866667), (0.333333, 0.866667), (0, 0), (0, 0),
        (0, 0), (0, 0), (0, 0), (0, 0)],
    1: [(0.555556, 0.333333, 0.222222), (1.12222, 0.644444), (1.38889, 1.33778), (1, 1),
        (0.333333, 0.333333), (0.6, 0.5), (0.6, 0.5), (0, 0), (0, 0)],
    2: [(0.37037, 0.555556, 0.481481), (0.981481, 0.962963), (0.981481, 0.962963), (0, 0),
        (0.222222, 0.222222), (0.4, 0.333333), (0.88, 0.733333), (0, 0), (0, 0)],
    3: [(0.580247, 0.37037, 0.320988), (1.15432, 0.841975), (1.93951, 1.61235), (1, 1),
        (0.481481, 0.481481), (0.866667, 0.722222), (1.57067, 1.30889), (1, 1),
        (0.333333, 0.333333)],
    4: [(0.720165, 0.580247, 0.547325), (1.50288, 1.29465), (1.50288, 1.29465), (1, 1),
        (0.654321, 0.654321), (1.17778, 0.981481), (1.17778, 0.981481), (1, 0),
        (0.555556, 0.222222)],
    5: [(0.48011, 0.720165, 0.364883), (1.40192, 0.729767), (1.40192, 0.729767), (1, 0),
        (0.769547, 0.436214), (1.18519, 0.487654), (1.18519, 1.27284), (1, 1),
        (0.703704, 0.481481)],
}
BWD = {   # layer index -> rows t: g, G, c, D, warm, delta
    1: [[(0, 0), (-0.0620464, 0.0686887), (0, 0), (0.0131883, 0.308846), (1, 1), (-0.00206244, 0.00228323)],
        [(-0.111111, 0), (-0.0930696, 0.103033), (0, 0), (0.0164854, 0.386058), (1, 1), (-0.0488586, 0.036115)],
        [(-0.259259, 0), (-0.0840488, 0.15455), (0, 0), (0.0206067, 0.482573), (1, 1), (-0.0961453, 0.127574)],
        [(-0.0740741, 0.333333), (0.00355637, 0.231824), (1.44788, 1.73745), (0.0257584, 0.603216), (0, 0), (0.0257584, 0.603216)],
        [(0.0164609, 0.222222), (0.0423716, 0.18107), (0.849057, 0), (0.0453123, 0.440678), (0, 0), (0.0453123, 0.440678)],
        [(0.165981, 0.481481), (0.0553269, 0.160494), (0.84375, 3.4322), (0.0466821, 0.550847), (0, 0), (0.0466821, 0.550847)]],
    0: [[(-0.00361654, 0.003329), (-0.0920839, 0.269991), (0, 0), (-0.136809, 1.19676), (1, 1), (-0.015313, 0.302602)],
        [(-0.0766878, 0.0429149), (-0.136318, 0.403322), (0.947368, 2.12264), (-0.171012, 1.49595), (0, 0), (-0.171012, 1.49595)],
        [(-0.179161, 0.19746), (-0.166132, 0.583525), (0, 0), (-0.159101, 1.12663), (0, 0), (-0.159101, 1.12663)],
        [(-0.270698, 1.22189), (-0.159618, 0.776558), (1.04381, 1.53992), (-0.198876, 1.40829), (0, 0), (-0.198876, 1.40829)],
        [(-0.165964, 0.908543), (-0.104078, 0.553893), (0.665389, 0.772409), (-0.079686, 0.427832), (0, 0), (-0.079686, 0.427832)],
        [(-0.219405, 1.1297), (-0.0731351, 0.376568), (0.713307, 0), (-0.0521678, 0), (0, 0), (-0.0521678, 0)]],
}


def close6(got, want):
    """The spec prints 6 significant digits."""
    np.testing.assert_allclose(got, want, rtol=6e-6, atol=6e-7)


def test_11_forward_table_and_loss():
    out = run_case("tsslbp", EX_W, EX_X, label=0)
    for t, (a0, I1, u1, s1, a1, I2, u2, s2, a2) in FWD.items():
        close6(out["psp"][0][t], a0)
        close6(EX_W[0] @ out["psp"][0][t], I1)
        close6(out["u"][0][t], u1)
        assert out["spikes"][0][t].tolist() == list(s1)
        close6(out["psp"][1][t], a1)
        close6(EX_W[1] @ out["psp"][1][t], I2)
        close6(out["u"][1][t], u2)
        assert out["spikes"][1][t].tolist() == list(s2)
        close6(out["psp"][2][t], a2)
    assert out["loss"] == pytest.approx(0.252593, abs=5e-7)
    # target PSP of neuron 0 after two passes: â = a - g
    close6(out["psp"][2][:, 0] - out["g_out"][:, 0],
           [0, 0.111111, 0.259259, 0.407407, 0.539095, 0.537723])


def test_11_backward_tables():
    out = run_case("tsslbp", EX_W, EX_X, label=0)
    for layer, rows in BWD.items():
        for t, (g, G, c, D, warm, delta) in enumerate(rows):
            g_here = out["g_out"] if layer == 1 else (EX_W[1].T @ out["delta"][1].T).T
            close6(g_here[t], g)
            close6(out["G"][layer][t], G)
            close6(out["c"][layer][t], c)
            close6(out["D"][layer][t], D)
            assert out["warm"][layer][t].tolist() == [bool(w) for w in warm]
            close6(out["delta"][layer][t], delta)


@pytest.mark.parametrize("params, loss, dW1, dW2", [
    ({}, 0.252593, [[-0.356868, -0.302858, -0.246197], [2.47449, 1.8944, 1.66196]],
     [[0.0403233, 0.0247626], [1.04307, 0.859457]]),
    ({"warmup": "none"}, 0.252593, [[-0.428911, -0.315646, -0.305452], [3.50505, 2.19136, 2.39556]],
     [[0.0880495, 0.0724888], [1.23861, 1.05499]]),
    ({"variant": "paper", "warmup": "none", "target_passes": 1}, 0.51934,
     [[-0.300885, -0.216321, -0.165941], [1.15199, 0.739123, 0.589324]],
     [[-0.0953106, -0.111129], [0.71434, 0.530725]]),
])
def test_11_gradients(params, loss, dW1, dW2):
    out = run_case("tsslbp", EX_W, EX_X, label=0, params=params)
    assert out["loss"] == pytest.approx(loss, abs=6e-6)
    close6(out["grads"][0], dW1)
    close6(out["grads"][1], dW2)
    if params.get("variant") == "paper":
        d2 = out["delta"][1]
        assert not d2[:3].any()
        close6(d2[3:], [(-0.234991, 0.603216), (-0.0285557, 0), (0.0474537, 0.550847)])


# ---------------------------------------------------------------------------------------------
# The golden cases (shared/spec/golden/tsslbp.json)
# ---------------------------------------------------------------------------------------------

CASES = json.loads(GOLDEN.read_text())["cases"]


@pytest.mark.parametrize("i", range(len(CASES)))
def test_golden_case(i):
    c = CASES[i]
    out = run_case("tsslbp", [np.array(w) for w in c["weights"]], np.array(c["inputs"]),
                   label=c.get("label"), target=c.get("target"), params=c["params"])
    e = c["expected"]
    for got, want in zip(out["spikes"], e["spikes"]):
        np.testing.assert_array_equal(got, np.array(want))
    scale = max([abs(e["loss"])] + [np.abs(np.array(g)).max() for g in e["grads"]])
    assert abs(out["loss"] - e["loss"]) <= 1e-9 * scale
    for got, want in zip(out["grads"], e["grads"]):
        assert np.abs(got - np.array(want)).max() <= 1e-9 * scale


def test_run_case_returns_the_quantities_of_5_6():
    out = run_case("tsslbp", EX_W, EX_X, label=1, params={"input_psp": False})
    for key in ("u", "du", "delta", "D", "warm", "spikes"):
        assert [a.shape for a in out[key]] == [(6, 2), (6, 2)], key
    assert [a.shape for a in out["psp"]] == [(6, 3), (6, 2), (6, 2)]
    np.testing.assert_array_equal(out["psp"][0], EX_X)                 # input_psp = False: a^0 = x
    assert out["g_out"].shape == (6, 2) and out["warm"][0].dtype == bool


# ---------------------------------------------------------------------------------------------
# 6.2: the whole gradient = the exact gradient of the tangent model (dense, conv, pool, dropout)
# ---------------------------------------------------------------------------------------------

def fd_rule(F, weights, grads):
    """6.2: central differences, h = 1e-6; max|FD - grad| / max(1, max|grad|) <= 1e-6."""
    fd = central_fd(F, weights, h=1e-6)
    scale = max(1.0, max(np.abs(g).max() for g in grads))
    return max(np.abs(f - g).max() for f, g in zip(fd, grads)) / scale


def check_tangent(net, x, labels, train_rng=None):
    T = x.shape[0]
    tgt = net.make_target(labels, T)
    trace = net.forward(x, train=train_rng is not None, rng=train_rng)
    grads = net.method.backward(net.p, net.layers, trace, tgt)
    F = tangent_model(net.method, net.p, net.layers, x, tgt, trace)
    assert F() == pytest.approx(trace.loss, rel=1e-12, abs=1e-15)    # F(W_ref) = L(W_ref)
    weights = [lay.params[0] for lay in net.layers if lay.params]
    an = [g[0] for g in grads if g]
    return fd_rule(F, weights, an), trace


def check_tangent_directional(net, x, labels, train_rng, rng, n_dir=2):
    """6.2 along random directions (jax check_vjp style), per parameter array: the central
    difference of F along a unit direction v against <grad, v>; the spec's h and pass rule."""
    T = x.shape[0]
    tgt = net.make_target(labels, T)
    trace = net.forward(x, train=True, rng=train_rng)
    grads = [g[0] for g in net.method.backward(net.p, net.layers, trace, tgt) if g]
    F = tangent_model(net.method, net.p, net.layers, x, tgt, trace)
    assert F() == pytest.approx(trace.loss, rel=1e-12, abs=1e-15)
    weights = [lay.params[0] for lay in net.layers if lay.params]
    scale = max(1.0, max(np.abs(g).max() for g in grads))
    worst = 0.0
    for W, g in zip(weights, grads):
        for _ in range(n_dir):
            v = rng.normal(size=W.shape)
            v /= np.linalg.norm(v)
            W0 = W.copy()
            W[...] = W0 + 1e-6 * v
            fp = F()
            W[...] = W0 - 1e-6 * v
            fm = F()
            W[...] = W0
            worst = max(worst, abs((fp - fm) / 2e-6 - np.vdot(g, v)) / scale)
    return worst


def count_margin(net, trace, labels):
    """Distance of the count loss from its clipping kinks (E10), or inf for the other losses."""
    if net.p.loss != "count":
        return np.inf
    n = trace.states[-1].out.sum(axis=0)
    c = np.where(np.arange(n.shape[1])[None] == labels[:, None], net.p.desired_count,
                 net.p.undesired_count)
    return np.abs(n - c).min()


params_st = st.fixed_dictionaries({
    "variant": st.sampled_from(VARIANTS), "warmup": st.sampled_from(WARMUPS),
    "loss": st.sampled_from(LOSSES), "tau_m": st.floats(1.5, 8), "tau_s": st.floats(1, 5),
    "c_max": st.floats(1, 10), "surrogate_width": st.floats(0.1, 0.6), "x_clip": st.floats(1, 9),
    "warm_rate": st.floats(0, 0.5), "target_passes": st.integers(0, 3),
    "input_psp": st.booleans(), "desired_count": st.floats(0.5, 3),
    "undesired_count": st.floats(0, 0.5)})


@settings(**FAST, max_examples=25)
@given(params=params_st, sizes=st.lists(st.integers(1, 5), min_size=2, max_size=4),
       T=st.integers(1, 8), B=st.integers(1, 3), seed=st.integers(0, 2 ** 31))
def test_6_2_dense_gradient_is_the_gradient_of_the_tangent_model(params, sizes, T, B, seed):
    rng = np.random.default_rng(seed)
    sizes[-1] = max(sizes[-1], 2)
    net = Network.build("-".join(map(str, sizes)), "tsslbp", params, seed=seed)
    for lay in net.layers:
        lay.params[0][...] = rng.normal(0, 1.5, lay.params[0].shape)
    x = rng.uniform(-0.5, 2.0, (T, B, sizes[0]))
    labels = rng.integers(0, sizes[-1], B)
    trace = net.forward(x)
    assume(count_margin(net, trace, labels) > 1e-4)
    err, _ = check_tangent(net, x, labels)
    assert err <= 1e-6


@settings(**FAST, max_examples=10)
@given(params=params_st, seed=st.integers(0, 2 ** 31), pad=st.integers(0, 1),
       hw=st.sampled_from([(6, 6), (7, 6)]), dropout=st.sampled_from([0.0, 0.3]))
def test_6_2_conv_pool_dropout_gradient_is_the_gradient_of_the_tangent_model(
        params, seed, pad, hw, dropout):
    rng = np.random.default_rng(seed)
    H, W = hw
    arch = f"{H}x{W}x2-3c3p{pad}-a2-2c2-3"
    net = Network.build(arch, "tsslbp", dict(params, dropout=dropout), seed=seed)
    for lay in net.layers:
        if lay.params:
            lay.params[0][...] = rng.normal(0, 1.0, lay.params[0].shape)
    T, B = 4, 2
    x = rng.uniform(-0.5, 2.0, (T, B, 2, H, W))
    labels = rng.integers(0, 3, B)
    trace = net.forward(x)
    assume(count_margin(net, trace, labels) > 1e-4)
    err = check_tangent_directional(net, x, labels, np.random.default_rng(seed), rng)
    assert err <= 1e-6


def mutated_lif_backward(rho_scale=1.0, leak_at_spikes=False):
    """E7-E8 in plain Python with one deliberate error (spec 6.2 lists what the check catches)."""
    def lif_backward_mutant(G, u, du, s, theta_m, c_max):
        D, c = np.zeros_like(G), np.zeros_like(G)
        T = G.shape[0]
        for b, i in np.ndindex(G.shape[1:]):
            nxt = 0.0
            for t in range(T - 1, -1, -1):
                ct = min(1 / du[t, b, i], c_max) if s[t, b, i] and du[t, b, i] > 0 else 0.0
                rho = rho_scale * ct * u[t, b, i] * theta_m
                lam = (1 - theta_m) * (1.0 if leak_at_spikes else 1 - s[t, b, i])
                nxt = ct * G[t, b, i] + (rho + lam) * nxt
                D[t, b, i], c[t, b, i] = nxt, ct
        return D, c
    return lif_backward_mutant


def unclipped_delta(D, G, u, s, warm, paper, v_th, alpha, x_clip):
    """E13-E14 with the surrogate's argument clip dropped (a mutation)."""
    z = (v_th - u) / alpha
    slope = np.exp(z) / (1 + np.exp(z)) ** 2 / alpha
    return np.where(warm, slope * G, s * D if paper else D)


@pytest.mark.parametrize("mutation", ["no rho", "rho x 1.1", "leak at spikes", "no x_clip"])
def test_6_2_the_tangent_check_catches_each_mutation_of_spec_6_2(mutation, monkeypatch):
    from refsnn.methods import tsslbp as mod
    params = {"warmup": "none"}
    if mutation == "no rho":
        monkeypatch.setattr(mod, "lif_backward", mutated_lif_backward(rho_scale=0.0))
    elif mutation == "rho x 1.1":
        monkeypatch.setattr(mod, "lif_backward", mutated_lif_backward(rho_scale=1.1))
    elif mutation == "leak at spikes":
        monkeypatch.setattr(mod, "lif_backward", mutated_lif_backward(leak_at_spikes=True))
    else:
        params = {"warmup": "all", "surrogate_width": 0.1, "x_clip": 2.0}
        monkeypatch.setattr(mod, "tsslbp_delta", unclipped_delta)
    worst = 0.0
    for seed in range(3):
        rng = np.random.default_rng(seed)
        net = Network.build("4-6-5-3", "tsslbp", params, seed=seed)
        for lay in net.layers:
            lay.params[0][...] = rng.normal(0, 1.5, lay.params[0].shape)
        x = rng.uniform(0, 2.0, (8, 2, 4))
        worst = max(worst, check_tangent(net, x, rng.integers(0, 3, 2))[0])
    assert worst > 1e-4, f"the mutation '{mutation}' was not caught (max error {worst:.1e})"


# ---------------------------------------------------------------------------------------------
# E16 pooling and dropout: exact linear maps
# ---------------------------------------------------------------------------------------------

def test_E16_sum_pool_values_and_dropped_edges():
    pool = SumPool2d((1, 3, 5), k=2, theta_pool=1.1)
    x = np.arange(15, dtype=float).reshape(1, 1, 1, 3, 5)
    y = pool.forward(x)
    assert pool.out_shape == (1, 1, 2) and y.shape == (1, 1, 1, 1, 2)
    np.testing.assert_allclose(y.ravel(), [1.1 * (0 + 1 + 5 + 6), 1.1 * (2 + 3 + 7 + 8)], rtol=1e-15)
    gx, grads = pool.backward(np.ones((1, 1, 1, 1, 2)), x)
    assert grads == [] and gx[..., 2, :].sum() == 0 and gx[..., 4].sum() == 0
    assert gx.sum() == pytest.approx(8 * 1.1)


@settings(deadline=None, max_examples=15)
@given(C=st.integers(1, 3), H=st.integers(2, 7), W=st.integers(2, 7), k=st.integers(1, 3),
       theta=st.floats(0.5, 2), seed=st.integers(0, 1000))
def test_E16_backward_matches_finite_differences(C, H, W, k, theta, seed):
    assume(H >= k and W >= k)
    rng = np.random.default_rng(seed)
    pool = SumPool2d((C, H, W), k=k, theta_pool=theta)
    x = rng.normal(size=(2, 1, C, H, W))
    w = rng.normal(size=(2, 1) + pool.out_shape)
    gx, _ = pool.backward(w, x)
    fd = central_fd(lambda: float(np.vdot(w, pool.forward(x))), [x])[0]
    np.testing.assert_allclose(gx, fd, atol=1e-8)


def test_dropout_masks_are_per_unit_fixed_over_time_scaled_and_off_at_test():
    net = Network.build("8x8x1-4c3-6-5-3", "tsslbp", {"dropout": 0.4}, seed=0)
    x = np.random.default_rng(1).uniform(0, 2, (5, 64, 1, 8, 8))
    tr = net.forward(x, train=True, rng=np.random.default_rng(2))
    masks = tr.extra["dropout_masks"]
    assert sorted(masks) == [2, 3, 4]                       # not the first spiking layer, flatten
    for mk in masks.values():
        assert mk.shape[:2] == (1, 64) and set(np.unique(mk)) <= {0.0, 1 / 0.6}
        assert 0.25 < np.mean(mk == 0) < 0.55
    conv_psp = tr.states[0].out.reshape(5, 64, -1)          # flattened (c, y, x), then masked
    np.testing.assert_array_equal(tr.inputs[2], conv_psp * masks[2])
    np.testing.assert_array_equal(tr.inputs[3], tr.states[2].out * masks[3])
    test = net.forward(x)
    assert "dropout_masks" not in test.extra


# ---------------------------------------------------------------------------------------------
# The batch engine: B > 1 equals run_case per sample; float32 agrees with float64
# ---------------------------------------------------------------------------------------------

@settings(**FAST, max_examples=15)
@given(params=params_st, seed=st.integers(0, 2 ** 31), B=st.integers(2, 4))
def test_batch_engine_equals_run_case_per_sample(params, seed, B):
    assume(params["warmup"] != "layer_rate")            # its rate is taken over the batch (E14)
    rng = np.random.default_rng(seed)
    net = Network.build("6-5-4", "tsslbp", params, seed=seed)
    for lay in net.layers:
        lay.params[0][...] = rng.normal(0, 1.2, lay.params[0].shape)
    T = 6
    x = rng.uniform(-0.5, 2.0, (T, B, 6))
    labels = rng.integers(0, 4, B)
    loss, grads, trace = net.loss_and_grads(x, net.make_target(labels, T))
    per = [run_case("tsslbp", [lay.params[0] for lay in net.layers], x[:, b], label=labels[b],
                    params=params) for b in range(B)]
    scale = 1.0 / B if params["loss"] == "softmax" else 1.0         # E11 is the batch mean
    assert loss == pytest.approx(scale * sum(o["loss"] for o in per), rel=1e-12, abs=1e-14)
    for l, g in enumerate(grads):
        np.testing.assert_allclose(g, scale * sum(o["grads"][l] for o in per), rtol=1e-11,
                                   atol=1e-13)
    for b in range(B):
        np.testing.assert_array_equal(trace.states[-1].spikes[:, b], per[b]["spikes"][-1])


def test_float32_engine_agrees_with_float64():
    rng = np.random.default_rng(3)
    net64 = Network.build("28x28x1-4c5-a2-3c3-a2-20-10", "tsslbp", None, seed=1)
    net32 = Network.build("28x28x1-4c5-a2-3c3-a2-20-10", "tsslbp", None, seed=1, dtype=np.float32)
    x = rng.uniform(-0.4, 2.8, (5, 8, 1, 28, 28))
    labels = rng.integers(0, 10, 8)
    l64, g64, t64 = net64.loss_and_grads(x, net64.make_target(labels, 5))
    l32, g32, t32 = net32.loss_and_grads(x.astype(np.float32), net32.make_target(labels, 5))
    assert all(g.dtype == np.float32 for g in g32)
    # spikes can flip where u is within float32 round-off of V_th; require near-total agreement
    for s64, s32 in zip(t64.spiking_states, t32.spiking_states):
        assert np.mean(s64.spikes != s32.spikes) < 1e-3
    assert l32 == pytest.approx(l64, rel=1e-3)
    for a, b in zip(g64, g32):
        assert np.abs(a - b).max() <= 2e-3 * np.abs(a).max()


# ---------------------------------------------------------------------------------------------
# Init, weight clamp, presets, parameter errors
# ---------------------------------------------------------------------------------------------

def test_spec_7_init_and_weight_clamp():
    net = Network.build("16x16x1-8c5-a2-400-10", "tsslbp", {"conv_weight_scale": 5.0}, seed=0)
    conv, pool, dense = net.layers[0], net.layers[1], net.layers[3]
    assert isinstance(pool, SumPool2d) and not net.method.has_neurons(pool)
    bound = 5.0 / math.sqrt(25)
    Wc = conv.params[0]
    assert np.abs(Wc).max() <= bound and np.abs(Wc).max() > 0.9 * bound
    Wd = dense.params[0]
    assert Wd.std() == pytest.approx(math.sqrt(2 / Wd.shape[1]), rel=0.05)
    Wd[0, 0], Wd[0, 1] = 7.0, -9.0
    net.method.post_update(net.p, net.layers)
    assert Wd[0, 0] == 4.0 and Wd[0, 1] == -4.0 and np.abs(Wc).max() <= 4.0


def test_scores_are_the_time_sum_of_the_output_psp():
    net = Network.build("5-4-3", "tsslbp", None, seed=0)
    x = np.random.default_rng(0).uniform(0, 3, (5, 2, 5))
    tr = net.forward(x)
    np.testing.assert_allclose(net.scores(x), tr.states[-1].out.sum(axis=0))


@pytest.mark.parametrize("name", sorted(TSSLBP.presets) + ["defaults"])
def test_presets_are_valid_training_configs(name):
    cfg = TSSLBP.presets[name] if name != "defaults" else TSSLBP.defaults
    tc = TrainConfig().merged(cfg)
    TSSLBPParams.from_dict(tc.params)
    parse_arch(tc.arch)
    if name in ("defaults", "fashion-mnist-mlp", "mnist-cnn"):
        net = Network.build(tc.arch, "tsslbp", tc.params, seed=0)
        assert net.n_out == 10
    assert tc.optimizer == "adamw" and tc.weight_decay == 0.01 and tc.grad_clip_norm == 1.0


def test_fashion_mnist_mlp_preset_is_the_spec_8_row():
    cfg = TSSLBP.presets["fashion-mnist-mlp"]
    assert (cfg["arch"], cfg["T"], cfg["lr"], cfg["batch_size"], cfg["epochs"]) == \
        ("784-400-400-10", 5, 5e-4, 100, 100)
    assert cfg["params"]["tau_m"] == 5 and cfg["params"]["tau_s"] == 3


@pytest.mark.parametrize("params, fragment", [
    ({"tau_m": 1.0}, "tau_m"), ({"tau_s": 0.5}, "tau_s"), ({"variant": "x"}, "variant"),
    ({"warmup": "cosine"}, "warmup"), ({"loss": "mse"}, "loss"), ({"target_passes": -1}, "target_passes"),
    ({"target_passes": 1.5}, "target_passes"), ({"desired_pattern": (0, 2)}, "desired_pattern"),
    ({"c_max": -1.0}, "c_max"), ({"surrogate_width": 0.0}, "surrogate_width"),
    ({"x_clip": 0.0}, "x_clip"), ({"dropout": 1.0}, "dropout"), ({"warm_rate": 2.0}, "warm_rate"),
    ({"theta_pool": 0.0}, "theta_pool"), ({"v_th": float("nan")}, "v_th"),
    ({"alpha": 0.2}, "surrogate_width"), ({"V_th": 1.0}, "v_th"),
])
def test_bad_parameters_raise_config_errors(params, fragment):
    with pytest.raises(ConfigError, match=fragment):
        TSSLBPParams.from_dict(params)


def test_oracle_input_errors_say_what_is_wrong():
    with pytest.raises(ShapeError, match=r"\(T, n_L\) = \(6, 2\)"):
        run_case("tsslbp", EX_W, EX_X, target=np.zeros((6, 3)))
    with pytest.raises(ConfigError, match="needs a label"):
        run_case("tsslbp", EX_W, EX_X, target=np.zeros((6, 2)), params={"loss": "count"})
    with pytest.raises(ConfigError, match="no biases"):
        run_case("tsslbp", EX_W, EX_X, label=0, biases=[np.zeros(2), np.zeros(2)])
    with pytest.raises(ConfigError, match="not a class"):
        run_case("tsslbp", EX_W, EX_X, label=5)
    with pytest.raises(ConfigError, match="2 values but the network has 3"):
        run_case("tsslbp", EX_W + [np.eye(2)], EX_X, label=0, params={"v_th": [1.0, 1.0]})


def test_registry_finds_the_method():
    assert isinstance(get_method("tsslbp"), TSSLBP)


# ---------------------------------------------------------------------------------------------
# Learning on real data (slow)
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tsslbp_learns_mnist10k_subset(tmp_path):
    from refsnn.train import train
    cfg = TrainConfig().merged(dict(TSSLBP.defaults, arch="784-100-10", epochs=3, n_train=3000,
                                    n_test=1000))
    report = train(cfg, "tsslbp", tmp_path / "run", quiet=True)
    acc = report["test_acc"]
    assert acc > 0.6             # chance is 0.1; this seed reached 0.784 (0.75 after 2 epochs)


# ---------------------------------------------------------------------------------------------
# The batch kernels (prange over samples, rows of neurons) against plain per-neuron loops
# ---------------------------------------------------------------------------------------------

def _plain_kernels(I, g, theta_m, theta_s, v_th, c_max):
    """E1/E4, E2-E3, E6, E7-E8 one neuron at a time in plain Python, float64 carries."""
    T, B, N = I.shape
    a, u, du, s, G, D, c = (np.zeros(I.shape, I.dtype) for _ in range(7))
    for b in range(B):
        for i in range(N):
            prev = u_hat = 0.0
            for t in range(T):
                prev = (1.0 - theta_s) * prev + theta_s * float(I[t, b, i])
                a[t, b, i] = prev
                d = (-theta_m) * u_hat + float(I[t, b, i])
                v = u_hat + d
                du[t, b, i], u[t, b, i] = d, v
                s[t, b, i] = 1.0 if v > v_th else 0.0
                u_hat = 0.0 if v > v_th else v
            nxt_g = nxt_d = 0.0
            for t in range(T - 1, -1, -1):
                nxt_g = theta_s * float(g[t, b, i]) + (1.0 - theta_s) * nxt_g
                G[t, b, i] = nxt_g
                ct = 0.0
                if s[t, b, i] != 0.0:
                    d = float(du[t, b, i])
                    ct = min(1.0 / d, c_max) if d > 0.0 else \
                        (c_max if d == 0.0 and math.copysign(1.0, d) > 0.0 else 0.0)
                nxt_d = ct * float(G[t, b, i]) + (ct * float(u[t, b, i]) * theta_m
                                                  + (1.0 - float(s[t, b, i])) * (1.0 - theta_m)) * nxt_d
                D[t, b, i], c[t, b, i] = nxt_d, ct
    return a, (u, du, s), G, (D, c)


@settings(max_examples=25, **FAST)
@given(T=st.integers(1, 8), B=st.integers(1, 5), N=st.integers(1, 6), f32=st.booleans(),
       theta_m=st.floats(0.05, 0.9), theta_s=st.floats(0.05, 0.9), seed=st.integers(0, 2**31))
def test_batch_kernels_equal_plain_per_neuron_loops_bit_for_bit(T, B, N, f32, theta_m, theta_s,
                                                                 seed):
    rng = np.random.default_rng(seed)
    dt = np.float32 if f32 else np.float64
    I = rng.normal(0.6, 1.0, (T, B, N)).astype(dt)
    I[rng.random(I.shape) < 0.15] = 0.0                              # Δu = ±0 cases of E7
    g = rng.normal(size=(T, B, N)).astype(dt)
    a, fwd, G, bwd = _plain_kernels(I, g, theta_m, theta_s, 1.0, 8.0)
    np.testing.assert_array_equal(psp_forward(I, theta_s), a)
    for got, want in zip(lif_forward(I, theta_m, 1.0), fwd):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(psp_backward(g, theta_s), G)
    for got, want in zip(lif_backward(G, *fwd, theta_m, 8.0), bwd):
        np.testing.assert_array_equal(got, want)
