"""STBP (spec/stbp.md): surrogates, forward, exact backward vs finite differences on the relaxed
forward and its tangent models (6.2), the hand examples (6.3), the worked example (11), the golden
cases, the batch engine against the oracle, dropout, init, presets and parameter errors."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from scipy import integrate

from refsnn import gradcheck
from refsnn.config import TrainConfig
from refsnn.errors import ConfigError, ShapeError
from refsnn.methods import get_method
from refsnn.methods.stbp import (SURROGATES, STBP, STBPParams, surrogate_H, surrogate_h,
                                 tangent_loss)
from refsnn.network import Network, parse_arch
from refsnn.oracle import run_case

from refsnn import layers

M = STBP()
GOLDEN = Path(__file__).parent / "golden" / "stbp.json"
FAST = dict(deadline=None, suppress_health_check=[HealthCheck.filter_too_much,
                                                  HealthCheck.too_slow])


def h_of(kind, a, x, rect_norm=True):
    return surrogate_h(float(x), SURROGATES.index(kind), float(a), rect_norm)


def H_of(kind, a, x):
    return surrogate_H(float(x), SURROGATES.index(kind), float(a))


# ---------------------------------------------------------------------------------------------
# 5.1 / 6.3 (b)-(d): the four surrogate curves
# ---------------------------------------------------------------------------------------------

def test_6_3_b_hand_values_of_the_surrogates():
    xs = (-0.6, -0.5, -0.4999, 0.0, 0.3, 0.5)
    assert [h_of("rect", 1.0, x) for x in xs] == [0, 0, 1, 1, 1, 0]         # official ActFun
    assert [h_of("poly", 4.0, x) for x in (0, 0.25, -0.5, 1, 1.2)] == [1, 0.75, 0.5, 0, 0]
    assert h_of("rect", 0.5, 0.1) == 2.0                                     # hewh16, normalised
    assert h_of("rect", 0.5, 0.1, rect_norm=False) == 1.0                    # master, lens 0.25
    assert h_of("rect", 0.5, 0.25, rect_norm=False) == 0.0                   # strict window
    for a in (0.1, 0.7, 2.0):
        assert h_of("sigmoid", a, 0.0) == pytest.approx(1 / (4 * a), rel=1e-15)
        assert h_of("gauss", a, 0.0) == pytest.approx(1 / math.sqrt(2 * math.pi * a), rel=1e-15)


def test_sigmoid_slope_keeps_its_precision_far_from_threshold():
    # even form (5.1): σ(1-σ)/a would give exactly 0 at x = 50a; the true value is e^-50/a (1-2e-22)
    for a in (0.25, 1.0):
        for x in (50 * a, -50 * a):
            assert h_of("sigmoid", a, x) == pytest.approx(math.exp(-50) / a, rel=1e-14)
    assert H_of("sigmoid", 0.1, -800.0) == 0.0 and H_of("sigmoid", 0.1, 800.0) == 1.0


WIDTH = {"rect": st.floats(0.2, 3.0), "poly": st.floats(0.3, 5.0),
         "sigmoid": st.floats(0.05, 2.0), "gauss": st.floats(0.01, 2.0)}


def kinks(kind, a):
    if kind == "rect":
        return [-a / 2, a / 2]
    if kind == "poly":
        w = 2 / math.sqrt(a)
        return [-w, 0.0, w]
    return []


@settings(deadline=None, max_examples=40)
@given(kind=st.sampled_from(SURROGATES), data=st.data(), x=st.floats(-4, 4))
def test_h_is_the_derivative_of_H_and_H_rises_from_0_to_1(kind, data, x):
    a = data.draw(WIDTH[kind])
    assume(all(abs(x - k) > 1e-4 for k in kinks(kind, a)))
    eps = 1e-6
    fd = (H_of(kind, a, x + eps) - H_of(kind, a, x - eps)) / (2 * eps)
    assert fd == pytest.approx(h_of(kind, a, x), abs=1e-8)
    assert h_of(kind, a, x) == h_of(kind, a, -x)                           # even
    assert 0.0 <= H_of(kind, a, x) <= 1.0
    assert H_of(kind, a, -1e4) == 0.0 and H_of(kind, a, 1e4) == 1.0
    assert H_of(kind, a, x) + H_of(kind, a, -x) == pytest.approx(1.0, abs=1e-15)


def width_for_variance(kind, s2):
    """6.3 (d): rect a = √(12 s²), poly a = 2/(3 s²), sigmoid a = √3 s/π, Gaussian a = s²."""
    return {"rect": math.sqrt(12 * s2), "poly": 2 / (3 * s2),
            "sigmoid": math.sqrt(3 * s2) / math.pi, "gauss": s2}[kind]


def quad(kind, a, fn):
    """∫ fn(x) h(x) dx over the real line, split at the kinks (adaptive Gauss-Kronrod)."""
    g = lambda x: fn(x) * h_of(kind, a, x)
    if kind in ("rect", "poly"):
        pts = kinks(kind, a)
        return sum(integrate.quad(g, lo, hi, epsabs=1e-14, epsrel=1e-13, limit=200)[0]
                   for lo, hi in zip(pts, pts[1:]))
    return integrate.quad(g, -np.inf, np.inf, epsabs=1e-14, epsrel=1e-13, limit=400)[0]


@pytest.mark.parametrize("kind", SURROGATES)
@pytest.mark.parametrize("s2", [0.01, 0.1, 1.0])
def test_6_3_c_every_curve_has_mass_1_mean_0_and_its_table_variance(kind, s2):
    a = width_for_variance(kind, s2)
    assert quad(kind, a, lambda x: 1.0) == pytest.approx(1.0, abs=1e-9)
    assert quad(kind, a, lambda x: x) == pytest.approx(0.0, abs=1e-9)
    assert quad(kind, a, lambda x: x * x) == pytest.approx(s2, abs=1e-9)


@pytest.mark.parametrize("kind", ["rect", "poly", "sigmoid"])
def test_6_3_d_curves_of_equal_variance_agree_to_order_s4(kind):
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    diff = []
    for s in (0.2, 0.1):
        ref = quad("gauss", width_for_variance("gauss", s * s), phi)
        diff.append(quad(kind, width_for_variance(kind, s * s), phi) - ref)
    ratio = diff[0] / diff[1]
    assert 14.5 < ratio < 17.0, ratio                                      # O(s⁴): about 16


# ---------------------------------------------------------------------------------------------
# Building cases: dense and conv networks with random weights, inputs and switches
# ---------------------------------------------------------------------------------------------

def params_strategy(surrogates=SURROGATES, variants=("code", "paper", "sd"), relax=False):
    @st.composite
    def draw(data):
        kind = data(st.sampled_from(surrogates))
        a = data(WIDTH[kind])
        rect_norm = True if (relax and kind == "rect") else data(st.booleans())
        return dict(decay=data(st.floats(0.1, 0.9)), surrogate=kind, surrogate_width=a,
                    rect_norm=rect_norm, reset_form=data(st.sampled_from(["linear", "exp"])),
                    reset_grad=data(st.booleans()), variant=data(st.sampled_from(variants)),
                    loss=data(st.sampled_from(["mse_mean", "paper"])),
                    S=data(st.integers(1, 4)), strict=data(st.booleans()), relax=relax)
    return draw()


@st.composite
def dense_case(draw, relax=False, surrogates=SURROGATES, variants=("code", "paper", "sd"),
               max_depth=3, max_T=10, B=1):
    params = draw(params_strategy(surrogates, variants, relax))
    depth = draw(st.integers(1, max_depth))
    T = draw(st.integers(1, max_T))
    vote_k = draw(st.sampled_from([1, 2]))
    C = draw(st.integers(1, 3))
    sizes = ([draw(st.integers(1, 5))] + [draw(st.integers(1, 4)) for _ in range(depth - 1)]
             + [C * vote_k])
    v_th = [draw(st.floats(0.3, 1.0)) for _ in range(depth)]
    params.update(vote_k=vote_k, v_th=v_th if draw(st.booleans()) else v_th[0])
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    gain = draw(st.floats(0.5, 2.5))
    Ws = [rng.uniform(-0.6, 1.0, (n, m)) * gain / math.sqrt(m) for m, n in zip(sizes, sizes[1:])]
    bs = [rng.uniform(-0.3, 0.3, n) for n in sizes[1:]]
    if draw(st.booleans()):
        x = (rng.random((T, B, sizes[0])) < 0.5).astype(float)
    else:
        x = rng.uniform(-0.5, 1.5, (T, B, sizes[0]))
    labels = rng.integers(0, C, B)
    return params, Ws, bs, x, labels


@st.composite
def conv_case(draw, relax=True, surrogates=SURROGATES, variants=("code", "paper", "sd")):
    params = draw(params_strategy(surrogates, variants, relax))
    T = draw(st.integers(1, 6))
    B = draw(st.integers(1, 2))
    cin, hw = draw(st.integers(1, 2)), draw(st.integers(5, 7))
    c1, k1 = draw(st.integers(1, 3)), draw(st.integers(2, 3))
    s1, p1 = draw(st.integers(1, 2)), draw(st.integers(0, 1))
    arch = f"{hw}x{hw}x{cin}-{c1}c{k1}s{s1}p{p1}"
    out_hw = (hw + 2 * p1 - k1) // s1 + 1
    if out_hw >= 2 and draw(st.booleans()):
        arch += "-a2"
    if draw(st.booleans()):
        arch += f"-{draw(st.integers(1, 2))}c2"
    arch += f"-{draw(st.integers(2, 4))}-2"
    try:
        parse_arch(arch)
        net = Network.build(arch, M, dict(params, v_th=draw(st.floats(0.3, 0.8))),
                            seed=draw(st.integers(0, 1000)))
    except ConfigError:
        assume(False)
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    gain = draw(st.floats(1.0, 4.0))
    for layer in net.layers:
        for arr in layer.params:
            arr *= gain
    x = (rng.random((T, B) + net.in_shape) < 0.5).astype(float)
    return net, x, rng.integers(0, 2, B)


def dense_layers(Ws, bs):
    return [layers.Dense(W.copy(), b.copy()) for W, b in zip(Ws, bs)]


def kink_margin(p, trace):
    """Distance of every hard/relaxed u to a kink of a piecewise H_k (6.2: redraw within 1e-4)."""
    ks = kinks(p.surrogate, p.surrogate_width)
    if not ks:
        return np.inf
    n = len(trace.spiking_states)
    out = np.inf
    for k, st_ in enumerate(trace.spiking_states):
        v = np.atleast_1d(p.v_th)[k if np.ndim(p.v_th) else 0]
        x = st_.u - v
        out = min(out, min(float(np.min(np.abs(x - kk))) for kk in ks))
    return out


def fd_check(p, lays, x, target):
    """Spec 6.2: F(W_ref) = L to 1e-12, then central FD (h = 1e-5, Richardson-extrapolated with
    h/2: narrow smooth surrogates curve F enough that D(h)'s own h² error, 3e-6 relative on one
    drawn case, exceeded the rule) of F on every W and b entry."""
    ref = M.forward(p, lays, x)
    grads = M.backward(p, lays, ref, target)
    arrays = [a for layer in lays for a in layer.params]
    an = [g for per in grads for g in (per or [])]
    F = lambda: tangent_loss(p, lays, x, target, ref)
    assert F() == pytest.approx(ref.loss, rel=1e-12, abs=1e-15)
    return ref, an, gradcheck.check(F, arrays, an, h=1e-5, rtol=1e-6, scale="global",
                                    richardson=True)


FD_SEEN = {}


def record(p, rep):
    key = (p.surrogate, p.variant, p.reset_grad)
    FD_SEEN[key] = max(FD_SEEN.get(key, 0.0), rep.max_rel)


# ---------------------------------------------------------------------------------------------
# 6.2: exact gradients of the relaxed forward and of the tangent models, dense networks
# ---------------------------------------------------------------------------------------------

@settings(max_examples=30, **FAST)
@given(case=dense_case(relax=True, surrogates=("sigmoid", "gauss")))
def test_6_2_dense_smooth_surrogates_all_variants_match_finite_differences(case):
    params, Ws, bs, x, labels = case
    p = STBPParams.from_dict(params)
    lays = dense_layers(Ws, bs)
    _, an, rep = fd_check(p, lays, x, M.make_target(p, labels, Ws[-1].shape[0], x.shape[0]))
    assume(max(float(np.max(np.abs(g))) for g in an) > 1e-4)          # above FD noise
    record(p, rep)
    assert rep.passed, rep


@settings(max_examples=30, **FAST)
@given(case=dense_case(relax=True, surrogates=("rect", "poly")))
def test_6_2_dense_piecewise_surrogates_away_from_kinks_match_finite_differences(case):
    params, Ws, bs, x, labels = case
    p = STBPParams.from_dict(params)
    lays = dense_layers(Ws, bs)
    ref = M.forward(p, lays, x)
    assume(kink_margin(p, ref) > 1e-4)                                  # 6.2: redraw near a kink
    _, an, rep = fd_check(p, lays, x, M.make_target(p, labels, Ws[-1].shape[0], x.shape[0]))
    assume(max(float(np.max(np.abs(g))) for g in an) > 1e-4)
    record(p, rep)
    assert rep.passed, rep


@settings(max_examples=15, **FAST)
@given(case=conv_case(relax=True))
def test_6_2_conv_pool_networks_match_finite_differences(case):
    net, x, labels = case
    p = net.p
    ref = M.forward(p, net.layers, x)
    assume(kink_margin(p, ref) > 1e-4)
    _, an, rep = fd_check(p, net.layers, x, net.make_target(labels, x.shape[0]))
    assume(max(float(np.max(np.abs(g))) for g in an) > 1e-4)
    record(p, rep)
    assert rep.passed, rep


def _mutation_case():
    rng = np.random.default_rng(3)
    Ws = [rng.uniform(-0.6, 1.0, (4, 3)) * 1.5, rng.uniform(-0.6, 1.0, (2, 4))]
    bs = [rng.uniform(-0.3, 0.3, 4), rng.uniform(-0.3, 0.3, 2)]
    x = (rng.random((6, 1, 3)) < 0.6).astype(float)
    return Ws, bs, x


@pytest.mark.parametrize("grad_of, model_of", [
    (dict(variant="code"), dict(variant="paper")),
    (dict(variant="paper"), dict(variant="code")),
    (dict(variant="code", reset_grad=False), dict(variant="code")),
    (dict(variant="sd"), dict(variant="code"))])
def test_6_2_mutation_check_each_variant_fails_against_another_model(grad_of, model_of):
    Ws, bs, x = _mutation_case()
    base = dict(surrogate="sigmoid", surrogate_width=0.3, decay=0.5, relax=True)
    pg, pm = STBPParams.from_dict({**base, **grad_of}), STBPParams.from_dict({**base, **model_of})
    lays = dense_layers(Ws, bs)
    y = M.make_target(pg, np.array([1]), 2, 6)
    ref = M.forward(pg, lays, x)
    an = [g for per in M.backward(pg, lays, ref, y) for g in per]
    ok = gradcheck.check(lambda: tangent_loss(pg, lays, x, y, ref),
                         [a for l in lays for a in l.params], an, h=1e-5, rtol=1e-6)
    bad = gradcheck.check(lambda: tangent_loss(pm, lays, x, y, ref),
                          [a for l in lays for a in l.params], an, h=1e-5, rtol=1e-6)
    assert ok.passed, ok
    assert bad.max_rel > 1e-2, bad


# ---------------------------------------------------------------------------------------------
# 6.3 (a), (d), (e): hand example, the Heaviside limit, variant properties
# ---------------------------------------------------------------------------------------------

def test_6_3_a_hand_example_one_neuron():
    out = run_case("stbp", [np.array([[0.45]])], np.array([[1.0], [0.0], [1.0]]), label=0)
    np.testing.assert_allclose(out["u"][0][:, 0], [0.45, 0.09, 0.468], rtol=1e-14)
    assert not out["spikes"][0].any() and out["h"][0].tolist() == [[1.0]] * 3
    assert out["loss"] == 1.0 and out["rate"].tolist() == [0.0]
    e1 = -2 / 3 + 0.2 * 0.09 * 2 / 3 - 0.2 * 2 / 3
    assert e1 == pytest.approx(-0.788, abs=1e-12)
    d0 = -2 / 3 + 0.2 * 0.45 * 0.788
    np.testing.assert_allclose(out["delta"][0][:, 0], [d0 + 0.2 * e1, e1, -2 / 3], rtol=1e-13)
    assert out["grads"][0][0, 0] == pytest.approx(-1.420013, abs=5e-7)
    paper = run_case("stbp", [np.array([[0.45]])], np.array([[1.0], [0.0], [1.0]]), label=0,
                     params={"variant": "paper"})
    assert paper["dL_do"][0][1, 0] * paper["h"][0][1, 0] == pytest.approx(-0.654667, abs=5e-7)
    assert paper["grads"][0][0, 0] == pytest.approx(-1.432013, abs=5e-7)


@settings(max_examples=20, **FAST)
@given(case=dense_case(relax=False), kind=st.sampled_from(SURROGATES))
def test_6_3_d_relaxed_forward_tends_to_the_hard_one(case, kind):
    params, Ws, bs, x, labels = case
    hard = run_case("stbp", Ws, x[:, 0], label=int(labels[0]), biases=bs, params=params)
    v = np.atleast_1d(params["v_th"])
    for k, u in enumerate(hard["u"]):
        assume(np.min(np.abs(u - v[min(k, len(v) - 1)])) >= 0.05)
    a = width_for_variance(kind, 1e-6)
    soft = run_case("stbp", Ws, x[:, 0], label=int(labels[0]), biases=bs,
                    params=dict(params, relax=True, surrogate=kind, surrogate_width=a,
                                rect_norm=True))
    for sh, ss in zip(hard["spikes"], soft["spikes"]):
        np.testing.assert_allclose(ss, sh, atol=1e-12, rtol=0)
    assert soft["loss"] == pytest.approx(hard["loss"], abs=1e-12)


@settings(max_examples=25, **FAST)
@given(case=dense_case(relax=False))
def test_6_3_e_variant_properties(case):
    params, Ws, bs, x, labels = case
    go = lambda **kw: run_case("stbp", Ws, x[:, 0], label=int(labels[0]), biases=bs,
                               params=dict(params, **kw))
    code, paper, sd = go(variant="code"), go(variant="paper"), go(variant="sd")
    for key in ("spikes", "u", "h"):                                  # forward ignores the variant
        for a, b, c in zip(code[key], paper[key], sd[key]):
            assert np.array_equal(a, b) and np.array_equal(a, c)
    assert code["loss"] == paper["loss"] == sd["loss"]
    # τ = 0: no temporal path at all, code == paper == sd
    z = [go(variant=v, decay=0.0, reset_form="linear") for v in ("code", "paper", "sd")]
    for name in ("grads", "grads_b"):
        for a, b, c in zip(*(r[name] for r in z)):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
            np.testing.assert_allclose(a, c, rtol=1e-13, atol=1e-15)
    # reset_grad off: the top layer's dW and db agree in code and paper
    c0, p0 = go(variant="code", reset_grad=False), go(variant="paper", reset_grad=False)
    np.testing.assert_allclose(c0["grads"][-1], p0["grads"][-1], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(c0["grads_b"][-1], p0["grads_b"][-1], rtol=1e-13, atol=1e-15)
    # a neuron whose u never enters the window gets e = 0 at every step
    for name in ("code", "paper"):
        r = go(variant=name)
        for h, dlt in zip(r["h"], r["delta"]):
            silent = np.all(h == 0, axis=0)
            assert np.all(dlt[:, silent] == 0)


# ---------------------------------------------------------------------------------------------
# Section 11: the worked example, every row
# ---------------------------------------------------------------------------------------------

X11 = np.array([(1, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 0), (1, 1, 1), (0, 1, 0)], float)
W11 = [np.array([[0.7, 0.3, -0.2], [0.1, 0.45, 0.35]]), np.array([[0.9, -0.3], [0.2, 0.6]])]
B11 = [np.array([0.05, -0.1]), np.array([0.0, 0.1])]


def ex11(**params):
    return run_case("stbp", W11, X11, label=0, biases=B11, params=params)


def close(a, b):
    np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-5, atol=1e-12)


def test_11_forward_table():
    out = ex11()
    I1 = layers.Dense(W11[0], B11[0]).forward(X11[:, None, :])[:, 0]
    I2 = layers.Dense(W11[1], B11[1]).forward(out["spikes"][0][:, None, :])[:, 0]
    close(I1, [[0.55, 0.35], [1.05, 0.45], [0.15, 0.7], [0.75, 0], [0.85, 0.8], [0.35, 0.35]])
    close(out["u"][0], [[0.55, 0.35], [1.05, 0.52], [0.15, 0.7], [0.78, 0], [0.85, 0.8],
                        [0.35, 0.35]])
    assert out["spikes"][0].tolist() == [[1, 0], [1, 1], [0, 1], [1, 0], [1, 1], [0, 0]]
    assert out["h"][0].tolist() == [[1, 1], [0, 1], [1, 1], [1, 0], [1, 1], [1, 1]]
    close(I2, [[0.9, 0.3], [0.6, 0.9], [-0.3, 0.7], [0.9, 0.3], [0.6, 0.9], [0, 0.1]])
    close(out["u"][1], [[0.9, 0.3], [0.6, 0.96], [-0.3, 0.7], [0.84, 0.3], [0.6, 0.96],
                        [0, 0.1]])
    assert out["spikes"][1].tolist() == [[1, 0], [1, 1], [0, 1], [1, 0], [1, 1], [0, 0]]
    assert out["h"][1].tolist() == [[1, 1], [1, 1], [0, 1], [1, 1], [1, 1], [0, 1]]
    close(out["rate"], [0.666667, 0.5])
    close(out["readout"], [0.666667, 0.5])
    close(out["loss"], 0.180556)


BACK_CODE = [  # t: dL/do2, dL/du2, dL/do1, dL/du1
    [(-0.0457552, 0.0791437), (-0.0457552, 0.0931091), (-0.0225579, 0.0658334), (-0.0225579, 0.0765723)],
    [(-0.0544462, 0.0698267), (-0.0544462, 0.0698267), (-0.0356401, 0.0536947), (0, 0.0536947)],
    [(-0.0583289, 0.0703469), (-0.00924444, 0.0703469), (0.00625659, 0.0436076), (0.00287523, 0.0436076)],
    [(-0.0462222, 0.0792933), (-0.0462222, 0.09276), (-0.0169068, 0.0695227), (-0.0169068, 0.00981333)],
    [(-0.0555556, 0.0673333), (-0.0555556, 0.0673333), (-0.0393667, 0.0490667), (-0.0393667, 0.0490667)],
    [(-0.0555556, 0.0833333), (0, 0.0833333), (0.0166667, 0.05), (0.0166667, 0.05)]]
BACK_PAPER = [
    [(-0.0455556, 0.0791654), (-0.0455556, 0.0930584), (-0.0251669, 0.0573973), (-0.0251669, 0.0681649)],
    [(-0.0555556, 0.0694647), (-0.0555556, 0.0694647), (-0.0392643, 0.0538382), (0, 0.0538382)],
    [(-0.0583289, 0.0722323), (-0.00924444, 0.0722323), (0.0150345, 0.0433394), (0.0111144, 0.0433394)],
    [(-0.0462222, 0.0792933), (-0.0462222, 0.09276), (-0.0196001, 0.0614427), (-0.0196001, 0.00981333)],
    [(-0.0555556, 0.0673333), (-0.0555556, 0.0673333), (-0.0393667, 0.0490667), (-0.0393667, 0.0490667)],
    [(-0.0555556, 0.0833333), (0, 0.0833333), (0.0166667, 0.05), (0.0166667, 0.05)]]


@pytest.mark.parametrize("variant, table", [("code", BACK_CODE), ("paper", BACK_PAPER)])
def test_11_backward_tables(variant, table):
    out = ex11(variant=variant)
    tab = np.array(table)                                              # (t, column, neuron)
    close(out["dL_do"][1], tab[:, 0])
    close(out["delta"][1], tab[:, 1])
    close(out["dL_do"][0], tab[:, 2])
    close(out["delta"][0], tab[:, 3])


GRAD_ROWS = {  # params -> (dW1, db1, dW2, db2)
    "defaults": ({}, [[-0.0788314, -0.0198248, -0.0590493], [0.189147, 0.196369, 0.169247]],
                 (-0.0592895, 0.282755), [[-0.201979, -0.119246], [0.323029, 0.207507]],
                 (-0.211224, 0.476709)),
    "paper": ({"variant": "paper"},
              [[-0.0841337, -0.0115856, -0.0534191], [0.180883, 0.196244, 0.160571]],
              (-0.0563526, 0.274222), [[-0.202889, -0.120356], [0.322616, 0.20903]],
              (-0.212133, 0.478182)),
    "reset_grad_off": ({"reset_grad": False},
                       [[-0.0933333, -0.016, -0.0626667], [0.236667, 0.236667, 0.21]],
                       (-0.076, 0.34), [[-0.222222, -0.122222], [0.366667, 0.25]],
                       (-0.233333, 0.533333)),
    "sd": ({"variant": "sd"}, [[-0.1, 0, -0.05], [0.2, 0.233333, 0.183333]], (-0.0666667, 0.3),
           [[-0.222222, -0.111111], [0.333333, 0.25]], (-0.222222, 0.5)),
    "sigmoid": ({"surrogate": "sigmoid", "surrogate_width": 0.25},
                [[-0.0502446, -0.0498803, -0.0314197], [0.135546, 0.11893, 0.107995]],
                (-0.0626265, 0.199915), [[-0.158827, -0.117145], [0.22183, 0.131105]],
                (-0.196913, 0.330553)),
    "exp": ({"reset_form": "exp"},
            [[-0.102549, -0.061489, -0.0629181], [0.258785, 0.251966, 0.170681]],
            (-0.130907, 0.378367), [[-0.221541, -0.121994], [0.315821, 0.248895]],
            (-0.28816, 0.482235)),
    "relax": ({"relax": True, "surrogate": "sigmoid", "surrogate_width": 0.25},
              [[-0.150365, -0.123169, -0.124716], [0.232832, 0.230788, 0.167218]],
              (-0.224378, 0.353545), [[-0.290055, -0.216142], [0.293245, 0.226315]],
              (-0.461548, 0.49298)),
}


@pytest.mark.parametrize("row", list(GRAD_ROWS))
def test_11_gradient_rows(row):
    params, dW1, db1, dW2, db2 = GRAD_ROWS[row]
    out = ex11(**params)
    close(out["grads"][0], dW1)
    close(out["grads_b"][0], db1)
    close(out["grads"][1], dW2)
    close(out["grads_b"][1], db2)
    default = ex11()
    if row == "relax":
        close(out["loss"], 0.297871)
        close(out["spikes"][0][0], [0.549834, 0.354344])
    else:
        assert out["loss"] == default["loss"]
        for a, b in zip(out["spikes"], default["spikes"]):
            assert np.array_equal(a, b)
    if row == "exp":
        close(out["u"][0][1], [1.050741, 0.52])
    # S15: dW = Σ_t e[t] o^{l-1}[t]^T, db = Σ_t e[t] (e is "delta", the S14 ε for "paper")
    pre = [X11, out["spikes"][0]]
    for l in range(2):
        np.testing.assert_allclose(out["grads"][l], out["delta"][l].T @ pre[l], rtol=1e-13)
        np.testing.assert_allclose(out["grads_b"][l], out["delta"][l].sum(axis=0), rtol=1e-13)


# ---------------------------------------------------------------------------------------------
# The oracle: golden cases, returned keys, batch engine == run_case, float32
# ---------------------------------------------------------------------------------------------

def golden_cases():
    return json.loads(GOLDEN.read_text())["cases"]


@pytest.mark.parametrize("i", range(len(golden_cases())))
def test_golden_case(i):
    case = golden_cases()[i]
    out = run_case("stbp", [np.array(w) for w in case["weights"]], np.array(case["inputs"]),
                   label=case.get("label"), target=case.get("target"),
                   biases=case.get("biases"), params=case["params"])
    exp = case["expected"]
    for got, want in zip(out["spikes"], exp["spikes"]):
        assert np.array_equal(got, np.array(want, dtype=float))
    scale = max([abs(exp["loss"])] + [float(np.max(np.abs(g))) for g in exp["grads"]])
    assert abs(out["loss"] - exp["loss"]) <= 1e-9 * scale
    for got, want in zip(out["grads"], exp["grads"]):
        assert np.max(np.abs(got - np.array(want))) <= 1e-9 * scale


def test_run_case_returns_the_keys_of_5_9_with_their_shapes():
    out = ex11(vote_k=1)
    assert set(out) == {"spikes", "loss", "grads", "grads_b", "u", "delta", "dL_do", "h",
                        "rate", "readout"}
    assert isinstance(out["loss"], float)
    for key in ("spikes", "u", "delta", "dL_do", "h"):
        assert [a.shape for a in out[key]] == [(6, 2), (6, 2)]
    nob = run_case("stbp", W11, X11, label=1)
    assert [b.shape for b in nob["grads_b"]] == [(2,), (2,)]
    voted = run_case("stbp", [W11[0], np.ones((4, 2))], X11, label=1, params={"vote_k": 2})
    assert voted["rate"].shape == (4,) and voted["readout"].shape == (2,)
    assert voted["readout"][1] == pytest.approx(voted["rate"][2:].mean(), rel=1e-15)


@settings(max_examples=15, **FAST)
@given(case=dense_case(relax=False, B=3), dtype_case=st.booleans())
def test_batch_engine_equals_run_case_per_sample(case, dtype_case):
    params, Ws, bs, x, labels = case
    B = x.shape[1]
    params = dict(params, S=B)
    sizes = [Ws[0].shape[1]] + [W.shape[0] for W in Ws]
    net = Network(dense_layers(Ws, bs), "stbp", params)
    loss, grads, trace = net.loss_and_grads(x, net.make_target(labels, x.shape[0]))
    per = [run_case("stbp", Ws, x[:, b], label=int(labels[b]), biases=bs, params=params)
           for b in range(B)]
    assert loss == pytest.approx(sum(r["loss"] for r in per), rel=1e-12, abs=1e-15)
    want = [sum(r[key][l] for r in per) for l in range(len(Ws)) for key in ("grads", "grads_b")]
    for g, w in zip(grads, want):
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-14 * max(1.0, np.max(np.abs(w))))
    for k, st_ in enumerate(trace.spiking_states):
        for b in range(B):
            assert np.array_equal(st_.spikes[:, b], per[b]["spikes"][k])
    assert len(sizes) == len(Ws) + 1


@settings(max_examples=15, **FAST)
@given(case=dense_case(relax=False, B=4))
def test_float32_engine_agrees_with_float64(case):
    params, Ws, bs, x, labels = case
    out = {}
    for dt in (np.float64, np.float32):
        net = Network([layers.Dense(W.astype(dt), b.astype(dt)) for W, b in zip(Ws, bs)],
                      "stbp", params)
        out[dt] = net.loss_and_grads(x.astype(dt), net.make_target(labels, x.shape[0]))
    (l64, g64, t64), (l32, g32, t32) = out[np.float64], out[np.float32]
    v = np.atleast_1d(params["v_th"])
    margin = min(float(np.min(np.abs(s.u - v[min(k, len(v) - 1)])))
                 for k, s in enumerate(t64.spiking_states))
    assume(margin > 1e-4)                                  # no float32 tie: same spikes
    assume(min(float(np.min(np.abs(np.abs(s.u - v[min(k, len(v) - 1)]) - kk)))
               for k, s in enumerate(t64.spiking_states)
               for kk in [abs(q) for q in kinks(params["surrogate"], params["surrogate_width"])]
               or [np.inf]) > 1e-4)                        # same surrogate support
    for a, b in zip(t64.spiking_states, t32.spiking_states):
        assert np.array_equal(a.spikes, b.spikes) and b.u.dtype == np.float32
    assert l32 == pytest.approx(l64, rel=1e-5, abs=1e-7)
    scale = max(float(np.max(np.abs(g))) for g in g64)
    for a, b in zip(g64, g32):
        assert b.dtype == np.float32
        assert np.max(np.abs(a - b)) <= 1e-4 * max(scale, 1e-3)


@settings(max_examples=10, **FAST)
@given(case=conv_case(relax=False))
def test_conv_batch_gradient_is_the_sum_of_per_sample_gradients(case):
    net, x, labels = case
    B = x.shape[1]
    p = net.p.replace(S=B)
    net = Network(net.layers, "stbp", p)
    y = net.make_target(labels, x.shape[0])
    _, grads, _ = net.loss_and_grads(x, y)
    total = None
    for b in range(B):
        _, gb, _ = net.loss_and_grads(x[:, b:b + 1], y[b:b + 1])
        total = gb if total is None else [s + g for s, g in zip(total, gb)]
    for g, w in zip(grads, total):
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# S19 dropout, S23 init, S18 pooling choice
# ---------------------------------------------------------------------------------------------

def _deep_net(dropout=0.5, relax=True):
    p = dict(dropout=dropout, relax=relax, surrogate="sigmoid", surrogate_width=0.3, v_th=0.4)
    net = Network.build("6x6x1-2c3p1-a2-2c2-5-4-2", "stbp", p, seed=1)
    for layer in net.layers:
        for arr in layer.params:
            arr *= 2.5
    return net


def test_S19_dropout_places_masks_per_step_and_scale():
    net = _deep_net()
    x = (np.random.default_rng(0).random((4, 3, 1, 6, 6)) < 0.5).astype(float)
    tr = net.forward(x, train=True, rng=np.random.default_rng(1))
    masks = tr.extra["dropout_masks"]
    spiking = net.spiking_layers()
    assert sorted(masks) == spiking[1:-1]              # every spiking layer but first and last
    for li, m in masks.items():
        assert m.shape == tr.inputs[li].shape
        assert set(np.unique(m)) <= {0.0, 2.0}         # m/(1-p) with p = 0.5
        assert not all(np.array_equal(m[0], m[t]) for t in range(1, m.shape[0]))   # new per step
    assert "dropout_masks" not in net.forward(x).extra  # test time: off
    with pytest.raises(ConfigError, match="rng"):
        net.forward(x, train=True)


def test_S19_dropout_backward_is_the_exact_adjoint_of_the_masked_forward():
    net = _deep_net()
    x = (np.random.default_rng(0).random((4, 2, 1, 6, 6)) < 0.5).astype(float)
    ref = net.forward(x, train=True, rng=np.random.default_rng(5))
    y = net.make_target(np.array([0, 1]), 4)
    grads = M.backward(net.p, net.layers, ref, y)
    an = [g for per in grads for g in (per or [])]
    F = lambda: tangent_loss(net.p, net.layers, x, y, ref)
    assert F() == pytest.approx(ref.loss, rel=1e-12)
    rep = gradcheck.check(F, net.params(), an, h=1e-5, rtol=1e-6)
    assert rep.passed, rep
    # the same weights without the masks give another gradient: the masks are really used
    plain = M.backward(net.p, net.layers, net.forward(x), y)
    assert not np.allclose(plain[0][0], grads[0][0])


def test_S23_rownorm_init_and_torch_default():
    rng = np.random.default_rng(0)
    W = layers.init_rownorm((5, 3, 2, 2), rng)
    np.testing.assert_allclose(np.sum(W.reshape(5, -1) ** 2, axis=1), 1.0, rtol=1e-14)
    dense = layers.Dense(np.zeros((4, 7)), np.ones(4))
    M.init_layer(STBPParams(), dense, rng, np.float64, init="rownorm")
    np.testing.assert_allclose(np.linalg.norm(dense.params[0], axis=1), 1.0, rtol=1e-14)
    assert np.all(dense.params[1] == 0)
    M.init_layer(STBPParams(), dense, rng, np.float64)               # PyTorch U(±1/√fan_in)
    assert np.all(np.abs(dense.params[0]) <= 1 / math.sqrt(7)) and np.any(dense.params[1] != 0)
    with pytest.raises(ConfigError, match="rownorm"):
        M.init_layer(STBPParams(), dense, rng, np.float64, init="xavier")


def test_network_build_with_rownorm_init_for_the_frontiers_presets():
    net = Network.build("6x6x1-3c3-a2-4-2", "stbp", seed=0, init="rownorm")
    conv, dense = net.layers[0], net.layers[3]
    np.testing.assert_allclose(np.linalg.norm(conv.params[0].reshape(3, -1), axis=1), 1.0,
                               rtol=1e-14)
    np.testing.assert_allclose(np.linalg.norm(dense.params[0], axis=1), 1.0, rtol=1e-14)
    assert all(np.all(l.params[1] == 0) for l in net.layers if l.params)


def test_fd_objective_and_random_case_serve_the_cli():
    net = Network.build("5-4-3", "stbp", {"surrogate": "gauss", "surrogate_width": 0.2,
                                           "variant": "paper"}, seed=2)
    for arr in net.params():
        arr *= 3.0
    x = (np.random.default_rng(0).random((5, 2, 5)) < 0.5).astype(float)
    chk = M.fd_objective(net.p, net.layers, x, net.make_target(np.array([0, 2]), 5))
    assert chk.h == 1e-5 and chk.rtol == 1e-6 and "6.2" in chk.rule
    rep = gradcheck.check(chk.F, net.params(), chk.grads, h=chk.h, rtol=chk.rtol)
    assert rep.passed, rep
    rng = np.random.default_rng(7)
    for _ in range(10):
        case = M.random_case(rng)
        out = run_case("stbp", **case)
        assert np.isfinite(out["loss"]) and all(np.all(np.isfinite(g)) for g in out["grads"])


def test_S18_pooling_is_the_shared_average_pool():
    net = Network.build("4x4x1-1c1-a2-2", "stbp", seed=0)
    assert [l.kind for l in net.layers] == ["conv", "avgpool", "flatten", "dense"]
    assert net.spiking_layers() == [0, 3]


# ---------------------------------------------------------------------------------------------
# Presets (8.1), defaults, parameter errors
# ---------------------------------------------------------------------------------------------

PRESETS = ["mnist-cnn32", "mnist-mlp512", "cifar10-cifarnet", "nmnist-mlp512", "mnist-mlp",
           "nmnist-mlp", "mnist-cnn"]


@pytest.mark.parametrize("name", PRESETS + ["defaults"])
def test_presets_are_valid_training_configs(name):
    m = get_method("stbp")
    preset = m.defaults if name == "defaults" else m.presets[name]
    cfg = TrainConfig().merged(m.defaults).merged(preset)
    STBPParams.from_dict(cfg.params)
    shape, specs = parse_arch(cfg.arch)
    n_out = specs[-1].n
    assert n_out % STBPParams.from_dict(cfg.params).vote_k == 0
    if name == "mnist-mlp":
        assert (cfg.T, cfg.params["decay"], cfg.params["v_th"]) == (30, 0.1, 0.5)
        assert cfg.params["variant"] == "paper" and cfg.params["reset_form"] == "exp"
        assert cfg.init == "rownorm" and cfg.params["loss"] == "paper"
    if name == "cifar10-cifarnet":
        assert cfg.params["vote_k"] == 10 and cfg.params["dropout"] == 0.5
        assert cfg.lr_milestones == (36, 71, 106) and cfg.optimizer == "sgd"
    if name == "defaults":
        assert (cfg.arch, cfg.T, cfg.epochs, cfg.batch_size, cfg.lr_milestones) == \
            ("784-400-10", 8, 15, 50, (10,))


@pytest.mark.parametrize("params, fragment", [
    ({"reset_form": "exp", "decay": 0.0}, "needs decay > 0"),
    ({"relax": True, "surrogate": "rect", "rect_norm": False, "surrogate_width": 0.5},
     "no antiderivative"),
    ({"decay": 1.0}, "decay"),
    ({"surrogate_width": 0.0}, "surrogate_width"),
    ({"surrogate": "triangle"}, "surrogate='triangle' is not valid"),
    ({"variant": "exact"}, "variant"),
    ({"vote_k": 0}, "vote_k"),
    ({"dropout": 1.0}, "dropout"),
    ({"tau": 0.3}, "'tau' is called 'decay'"),
    ({"v_th": float("nan")}, "finite"),
])
def test_bad_parameters_raise_config_errors(params, fragment):
    with pytest.raises(ConfigError, match=fragment):
        STBPParams.from_dict(params)


def test_oracle_input_errors_say_what_is_wrong():
    with pytest.raises(ConfigError, match="multiple of vote_k"):
        run_case("stbp", W11, X11, label=0, params={"vote_k": 3})
    with pytest.raises(ConfigError, match="3 values but the network has 2"):
        run_case("stbp", W11, X11, label=0, params={"v_th": [0.5, 0.5, 0.5]})
    with pytest.raises(ShapeError, match="C = n_L / vote_k = 2"):
        run_case("stbp", W11, X11, target=[1.0, 0.0, 0.0])
    with pytest.raises(ConfigError, match="class index in 0..1"):
        run_case("stbp", W11, X11, label=2)
    out = run_case("stbp", W11, X11, target=[1.0, 0.0], biases=B11)
    assert out["loss"] == pytest.approx(ex11()["loss"], rel=1e-15)


# ---------------------------------------------------------------------------------------------
# Slow: it learns
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_stbp_learns_mnist10k_subset():
    from refsnn.data import load_dataset
    from refsnn.encoding import encode
    from refsnn.optim import make_optimizer
    ds = load_dataset("mnist10k")
    rng = np.random.default_rng(0)
    xtr, ytr = ds.train_x[:2000].reshape(2000, -1) / 255.0, ds.train_y[:2000]
    xte, yte = ds.test_x[:500].reshape(500, -1) / 255.0, ds.test_y[:500]
    cfg = TrainConfig().merged(STBP.defaults)
    net = Network.build("784-200-10", "stbp", cfg.params, seed=0)
    opt = make_optimizer(cfg, net.params())
    for epoch in range(3):
        for i in rng.permutation(40):
            idx = slice(50 * i, 50 * i + 50)
            x = encode("bernoulli", xtr[idx], 8, rng)
            _, grads, _ = net.loss_and_grads(x, net.make_target(ytr[idx], 8))
            opt.step(net.params(), grads, cfg.lr)
    pred = net.predict(encode("bernoulli", xte, 8, rng))
    assert np.mean(pred == yte) > 0.75
