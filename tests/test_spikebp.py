"""Spike-based BP (spec/spikebp.md): golden cases, worked example, exact parts against central
finite differences on the relaxations of spec 6.2 (variant "code") and 6.3 (variant "paper"),
the properties of the approximations (6.4), pooling (B9), dropout in time (7.4), float32, batch."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from refsnn.config import TrainConfig
from refsnn.errors import ConfigError, ShapeError
from refsnn.gradcheck import central_fd, check, compare
from refsnn.methods import get_method
from refsnn.methods.spikebp import (
    SpikeBP, SpikeBPParams, SpikingAvgPool2d, accumulator_forward, count_model_loss,
    frozen_pattern_loss, leak_factor, lif_backward_code, lif_forward, pool_neuron_backward_code,
    pool_neuron_forward, window_mean_backward, window_mean_forward)
from refsnn.network import Network, parse_arch
from refsnn.oracle import run_case

GOLDEN = json.loads((Path(__file__).parent / "golden" / "spikebp.json").read_text())["cases"]
M = SpikeBP()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def build(arch, params, seed, mu=0.15, sigma=0.8, dtype=np.float64):
    """A network of ``arch`` with W ~ N(mu, sigma²)/sqrt(fan-in)·2: dense enough to spike."""
    net = Network.build(arch, "spikebp", params, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    for layer in net.layers:
        for a in layer.params:
            n = int(np.prod(a.shape[1:]))
            a[...] = rng.normal(mu, sigma, a.shape) * 2.0 / math.sqrt(n)
    return net


def inputs(rng, T, B, shape, signed):
    x = (rng.random((T, B) + tuple(shape)) < 0.5).astype(np.float64)
    if signed:
        x *= rng.choice([-1.0, 1.0], size=x.shape)
    return x


def flat(grads):
    return [g for per_layer in grads for g in (per_layer or [])]


def run(net, x, labels, train=False, rng=None):
    target = net.make_target(labels, x.shape[0])
    trace = net.method.forward(net.p, net.layers, x, train=train, rng=rng)
    grads = flat(net.method.backward(net.p, net.layers, trace, target))
    return trace, grads, target


@st.composite
def hyper(draw, paper=False):
    p = {
        "decay": draw(st.sampled_from([1.0, 0.99, draw(st.floats(0.8, 1.0))])),
        "v_th": draw(st.floats(0.5, 1.5)),
        "v_th_out": draw(st.floats(0.5, 2.0)),
        "v_th_pool": draw(st.floats(0.3, 1.0)),
        "loss_scale": draw(st.sampled_from([0.5, 1.0])),
        "lf_eps": draw(st.sampled_from([0.0, 1e-3, 0.5])),
        "dropout": draw(st.sampled_from([0.0, 0.0, 0.3])),
        "variant": "paper" if paper else "code",
    }
    if not paper:
        p["out_grad"] = draw(st.sampled_from(["code", "exact"]))
    return p


@st.composite
def dense_cases(draw, paper=False):
    n = [draw(st.integers(1, 6))] + [draw(st.integers(1, 7)) for _ in range(draw(st.integers(1, 3)))]
    n.append(draw(st.integers(1, 4)))
    return ("-".join(map(str, n)), draw(hyper(paper)), draw(st.integers(1, 10)),
            draw(st.integers(1, 3)), draw(st.booleans()), draw(st.integers(0, 2**31 - 1)))


@st.composite
def conv_cases(draw, paper=False):
    hw = draw(st.integers(4, 6))
    c_in = draw(st.integers(1, 2))
    k = draw(st.sampled_from([1, 3]))
    stride = draw(st.integers(1, 2))
    arch = f"{hw}x{hw}x{c_in}-{draw(st.integers(1, 3))}c{k}s{stride}p{k // 2}-a2"
    assume((hw + 2 * (k // 2) - k) // stride + 1 >= 2)
    if draw(st.booleans()):
        arch += f"-{draw(st.integers(1, 3))}c1"
    arch += f"-{draw(st.integers(1, 4))}-{draw(st.integers(1, 3))}"
    return (arch, draw(hyper(paper)), draw(st.integers(1, 8)), draw(st.integers(1, 2)),
            draw(st.booleans()), draw(st.integers(0, 2**31 - 1)))


def fd_check(case, relaxation):
    """Spec 6.2 / 6.3: F(W*) = L(W*) and ∇F(W*) = the method's gradient, central FD, 1e-7."""
    arch, params, T, B, signed, seed = case
    net = build(arch, params, seed)
    rng = np.random.default_rng(seed)
    x = inputs(rng, T, B, net.in_shape, signed)
    labels = rng.integers(0, net.n_out, B)
    trace, grads, target = run(net, x, labels, train=True, rng=rng)
    F = relaxation(net.p, net.layers, trace, target)
    assert F() == pytest.approx(trace.loss, rel=1e-12, abs=1e-12)
    report = check(F, net.params(), grads, h=1e-4, rtol=1e-7, names=net.param_names())
    assert report.passed, str(report)
    return trace, grads


# --------------------------------------------------------------------------------------------
# the oracle: golden cases and the worked example of spec 11
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("i", range(len(GOLDEN)))
def test_golden_case(i):
    case = GOLDEN[i]
    out = run_case("spikebp", case["weights"], case["inputs"], label=case.get("label"),
                   target=case.get("target"), params=case["params"])
    exp = case["expected"]
    assert len(out["spikes"]) == len(exp["spikes"])
    for got, want in zip(out["spikes"], exp["spikes"]):
        np.testing.assert_array_equal(got, np.array(want))
    scale = max([abs(exp["loss"])] + [float(np.max(np.abs(g))) for g in exp["grads"]])
    assert abs(out["loss"] - exp["loss"]) <= 1e-9 * scale
    for got, want in zip(out["grads"], exp["grads"]):
        assert np.max(np.abs(got - np.array(want))) <= 1e-9 * scale


EX_W = [[[0.8, 0.3, -0.2], [0.4, 0.6, 0.5]], [[1.0, -0.5], [-0.3, 0.7]]]
EX_X = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 0], [1, 1, 1], [0, 0, 1]], float)


def test_worked_example_forward_spec_11_2():
    out = run_case("spikebp", EX_W, EX_X, label=0, params={"decay": 0.9})
    r = dict(rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(out["u"][0], [[0.6, 0.9], [1.64, 1.81], [0.1, 1.1], [0.89, 0.4],
                                             [1.701, 1.86], [-0.2, 0.5]], **r)
    np.testing.assert_array_equal(out["spikes"][0], [[0, 0], [1, 1], [0, 1], [0, 0], [1, 1], [0, 0]])
    np.testing.assert_array_equal(out["spikes"][1], np.zeros((6, 2)))
    np.testing.assert_allclose(out["U_out"], [[0, 0], [0.45, 0.36], [-0.045, 0.954],
                                              [-0.0405, 0.8586], [0.41355, 1.13274],
                                              [0.372195, 1.01947]], **r)
    np.testing.assert_allclose(out["y"], [0.0620325, 0.169911], **r)
    assert out["loss"] == pytest.approx(0.908653, rel=1e-6)
    np.testing.assert_allclose(out["e"], [-1.87593, 0.339822], **r)
    np.testing.assert_allclose(out["counts"][0], [2, 3])
    np.testing.assert_allclose(out["D"][0], [0.918024, 0.919747], **r)


def test_worked_example_backward_spec_11_3_and_11_4():
    r = dict(rtol=1e-5, atol=1e-12)
    code = run_case("spikebp", EX_W, EX_X, label=0, params={"decay": 0.9})
    h = [-0.302624, 0.180246]
    np.testing.assert_allclose(code["delta"][0], [h] * 5 + [[0, 0]], **r)           # B5
    np.testing.assert_allclose(code["grads"][1], [[-0.625312, -0.937967], [0.113274, 0.169911]], **r)
    np.testing.assert_allclose(code["grads"][0], [[-1.2105, -0.907872, -0.907872],
                                                  [0.720985, 0.540739, 0.540739]], **r)
    paper = run_case("spikebp", EX_W, EX_X, label=0, params={"decay": 0.9, "variant": "paper"})
    np.testing.assert_allclose(paper["delta"][0], h, **r)
    np.testing.assert_allclose(paper["grads"][1], code["grads"][1], rtol=1e-14)
    np.testing.assert_allclose(paper["grads"][0], [[-1.2105, -0.907872, -1.2105],
                                                   [0.720985, 0.540739, 0.720985]], **r)
    exact = run_case("spikebp", EX_W, EX_X, label=0, params={"decay": 0.9, "out_grad": "exact"})
    np.testing.assert_allclose(exact["grads"][1], [[-0.437871, -0.643005], [0.0793196, 0.116479]], **r)
    np.testing.assert_allclose(exact["grads"][0], [[-0.847643, -0.668947, -0.668947],
                                                   [0.504866, 0.370693, 0.370693]], **r)


def test_oracle_returns_every_key_of_spec_5_6_also_without_hidden_layer():
    out = run_case("spikebp", [np.full((3, 4), 0.3)], np.ones((5, 4)), label=2)
    assert len(out["spikes"]) == 1 and out["spikes"][0].shape == (5, 3) and not out["spikes"][0].any()
    assert out["u"] == [] and out["D"] == [] and out["counts"] == [] and out["delta"] == []
    assert out["U_out"].shape == (5, 3) and out["y"].shape == (3,) and out["e"].shape == (3,)
    # y = Σ_t λ^(T-t) I[t] / (V_out T) with I = 1.2 (F5, closed form)
    assert out["y"][0] == pytest.approx(1.2 * sum(0.99 ** (5 - t) for t in range(5)) / 5, rel=1e-14)


# --------------------------------------------------------------------------------------------
# forward kernels against their closed forms
# --------------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=25)
@given(T=st.integers(1, 12), B=st.integers(1, 3), N=st.integers(1, 4),
       decay=st.floats(0.5, 1.0), v_th=st.floats(0.2, 2.0), seed=st.integers(0, 2**31 - 1))
def test_F1_F3_recurrence_identity_and_mask(T, B, N, decay, v_th, seed):
    rng = np.random.default_rng(seed)
    I = rng.normal(0.3, 1.0, (T, B, N))
    m = rng.choice([0.0, 1.0, 2.5], size=(B, N))
    u, s, a = lif_forward(I, m, decay, v_th)
    v_prev = np.vstack([np.zeros((1, B, N)), (u * (1 - s))[:-1]])     # v[t-1] = u[t-1](1 - s[t-1])
    np.testing.assert_allclose(u, decay * v_prev + I, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(s, (u > v_th).astype(float))
    np.testing.assert_array_equal(a, m[None] * s)


@settings(deadline=None, max_examples=20)
@given(T=st.integers(1, 15), decay=st.floats(0.5, 1.0), seed=st.integers(0, 2**31 - 1))
def test_F5_accumulator_is_the_decayed_sum(T, decay, seed):
    I = np.random.default_rng(seed).normal(size=(T, 2, 3))
    U = accumulator_forward(I, decay)
    closed = np.tensordot(decay ** (T - np.arange(T)), I, axes=1)     # Σ_t λ^(T-t) I[t]
    np.testing.assert_allclose(U[-1], closed, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------
# B3: the leak-correction factor (spec 6.4)
# --------------------------------------------------------------------------------------------

def test_B3_hand_example_and_tau_form():
    s = np.zeros((6, 1, 1))
    s[[1, 4], 0, 0] = 1.0
    D = leak_factor(s, 0.9, math.log(0.9), 1e-3)[2][0, 0]
    assert D == pytest.approx(1 + math.log(0.9) * (0.9 ** 4 + 0.9 ** 1) / 2, rel=1e-14)
    assert D == pytest.approx(0.918024, abs=5e-7)
    p = SpikeBPParams(tau_m=-1 / math.log(0.9))                         # λ = exp(-dt/τ_m) = 0.9
    assert p.lam == pytest.approx(0.9, rel=1e-14)
    assert leak_factor(s, p.lam, p.ln_lam, 1e-3)[2][0, 0] == pytest.approx(D, rel=1e-13)


def test_B3_cut_offs_code_quirks():
    # ε > 1: a neuron with 0 < γ < ε gets γ' = γ + 1 and 1[Λ > ε] = 0 (spec 5.2 notes)
    s = np.zeros((4, 1, 1))
    s[3, 0, 0] = 1.0
    Lam, gamma, D = leak_factor(s, 0.9, math.log(0.9), 2.5)
    assert (Lam[0, 0], gamma[0, 0]) == (1.0, 1.0)
    assert D[0, 0] == pytest.approx(math.log(0.9) * 1.0 / 2.0, rel=1e-14)
    # silent neuron: D = 0 with either cut-off
    assert leak_factor(np.zeros((4, 1, 1)), 0.9, math.log(0.9), 0.0)[2][0, 0] == 0.0
    assert leak_factor(np.zeros((4, 1, 1)), 0.9, math.log(0.9), 1e-3)[2][0, 0] == 0.0


@settings(deadline=None, max_examples=30)
@given(T=st.integers(1, 30), decay=st.floats(0.5, 1.0), seed=st.integers(0, 2**31 - 1))
def test_B3_bounds_and_explicit_form(T, decay, seed):
    s = (np.random.default_rng(seed).random((T, 2, 5)) < 0.3).astype(float)
    Lam, gamma, D = leak_factor(s, decay, math.log(decay), 0.0)        # no cut-off
    ln = math.log(decay)
    for b in range(2):
        for i in range(5):
            tk = np.flatnonzero(s[:, b, i])
            if tk.size == 0:
                assert D[b, i] == 0.0
                continue
            explicit = 1 + ln * np.sum(decay ** (T - 1 - tk)) / tk.size
            assert D[b, i] == pytest.approx(explicit, rel=1e-12, abs=1e-14)
            assert 1 + ln - 1e-12 <= D[b, i] <= 1 + ln * decay ** (T - 1) + 1e-12
            if decay == 1.0:
                assert D[b, i] == 1.0


# --------------------------------------------------------------------------------------------
# B4-B5 closed form; B9 pooling
# --------------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=25)
@given(T=st.integers(1, 12), seed=st.integers(0, 2**31 - 1), v_th=st.floats(0.3, 2.0))
def test_B5_delta_is_h_at_the_next_spike(T, seed, v_th):
    rng = np.random.default_rng(seed)
    s = (rng.random((T, 2, 3)) < 0.35).astype(float)
    g, m, D = rng.normal(size=(T, 2, 3)), rng.choice([0.0, 1.5], (2, 3)), rng.normal(size=(2, 3))
    delta = lif_backward_code(g, s, m, D, v_th)
    for b in range(2):
        for i in range(3):
            for t in range(T):
                nxt = [tt for tt in range(t, T) if s[tt, b, i]]
                want = m[b, i] * g[nxt[0], b, i] * D[b, i] / v_th if nxt else 0.0
                assert delta[t, b, i] == pytest.approx(want, rel=1e-14, abs=0)


def test_B9_pooling_neuron_hand_example():
    P = np.array([0.5, 0.5, 0.25, 1.0]).reshape(4, 1, 1)
    u, s = pool_neuron_forward(P, 0.75)
    np.testing.assert_allclose(u.ravel(), [0.5, 1.0, 0.25, 1.25])
    np.testing.assert_array_equal(s.ravel(), [0, 1, 0, 1])
    d = pool_neuron_backward_code(np.array([1.0, 2, 3, 4]).reshape(4, 1, 1), s)
    np.testing.assert_array_equal(d.ravel(), [2, 2, 4, 4])            # no 1/θ_p, no D


@settings(deadline=None, max_examples=20)
@given(k=st.integers(1, 3), H=st.integers(1, 7), W=st.integers(1, 7), seed=st.integers(0, 2**31 - 1))
def test_B9_window_mean_and_its_adjoint(k, H, W, seed):
    assume(H >= k and W >= k)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3, 2, H, W))
    P = window_mean_forward(x, k)
    Ho, Wo = H // k, W // k
    ref = x[:, :, :Ho * k, :Wo * k].reshape(3, 2, Ho, k, Wo, k).mean(axis=(3, 5))
    np.testing.assert_allclose(P, ref, rtol=1e-13, atol=1e-15)
    g = rng.normal(size=P.shape)
    gx = window_mean_backward(g, k, H, W)
    assert np.vdot(g, P) == pytest.approx(np.vdot(gx, x), rel=1e-12, abs=1e-12)
    assert not gx[:, :, Ho * k:, :].any() and not gx[:, :, :, Wo * k:].any()   # leftovers get 0
    layer = SpikingAvgPool2d((2, H, W), k)
    np.testing.assert_array_equal(layer.forward(x.reshape(1, 3, 2, H, W))[0], P)


# --------------------------------------------------------------------------------------------
# exact parts against central finite differences (spec 6.1-6.3)
# --------------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=25)
@given(case=dense_cases())
def test_code_variant_is_the_gradient_of_the_frozen_pattern_linearisation_dense(case):
    fd_check(case, frozen_pattern_loss)


@settings(deadline=None, max_examples=10)
@given(case=conv_cases())
def test_code_variant_is_the_gradient_of_the_frozen_pattern_linearisation_conv(case):
    fd_check(case, frozen_pattern_loss)


@settings(deadline=None, max_examples=25)
@given(case=dense_cases(paper=True))
def test_paper_variant_is_the_gradient_of_the_count_model_dense(case):
    fd_check(case, count_model_loss)


@settings(deadline=None, max_examples=10)
@given(case=conv_cases(paper=True))
def test_paper_variant_is_the_gradient_of_the_count_model_conv(case):
    fd_check(case, count_model_loss)


@settings(deadline=None, max_examples=20)
@given(case=st.one_of(dense_cases(), conv_cases()), exact=st.booleans())
def test_B2_output_gradient_is_exact_on_the_true_forward(case, exact):
    """6.1: out_grad 'exact' (any λ), or 'code' with λ = 1, is ∂L/∂W^L of the true model."""
    arch, params, T, B, signed, seed = case
    params = {**params, "out_grad": "exact"} if exact else {**params, "decay": 1.0}
    net = build(arch, params, seed)
    rng = np.random.default_rng(seed)
    x = inputs(rng, T, B, net.in_shape, signed)
    labels = rng.integers(0, net.n_out, B)
    trace, grads, target = run(net, x, labels)
    W_L = net.layers[-1].params[0]

    def true_loss():
        return float(net.method.loss(net.p, net.forward(x).states[-1], target)[0])

    fd = central_fd(true_loss, [W_L], h=1e-4)
    report = compare([grads[-1]], fd, rtol=1e-8)
    assert report.passed, str(report)


def test_fd_check_fails_on_a_mutated_gradient():
    """The FD check can fail: scale one layer's gradient by 1.01 and it must."""
    net = build("5-6-4-3", {"decay": 0.9}, 3)
    rng = np.random.default_rng(3)
    x = inputs(rng, 8, 2, net.in_shape, False)
    trace, grads, target = run(net, x, np.array([0, 1]))
    assert np.abs(grads[0]).max() > 1e-3                              # hidden layers do learn
    F = frozen_pattern_loss(net.p, net.layers, trace, target)
    grads[0] = grads[0] * 1.01
    assert not check(F, net.params(), grads, h=1e-4, rtol=1e-7).passed


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_fd_objective_for_refsnn_gradcheck(variant):
    """Method.fd_objective: the spec's relaxation, the hand gradient and the 1e-7 rule."""
    net = build("6-5-4-3", {"variant": variant, "decay": 0.9,
                            "dropout_masks": [[2.0, 0.0, 2.0, 2.0, 2.0], None]}, 5)
    rng = np.random.default_rng(5)
    x = inputs(rng, 9, 2, net.in_shape, False)
    target = net.make_target(np.array([2, 0]), 9)
    chk = net.method.fd_objective(net.p, net.layers, x, target)
    trace, grads, _ = run(net, x, np.array([2, 0]))
    assert chk.F() == pytest.approx(trace.loss, rel=1e-12) and (chk.h, chk.rtol) == (1e-4, 1e-7)
    assert chk.rule == ("spikebp 6.2" if variant == "code" else "spikebp 6.3")
    for a, b in zip(chk.grads, grads):
        np.testing.assert_array_equal(a, b)
    report = check(chk.F, net.params(), chk.grads, h=chk.h, rtol=chk.rtol)
    assert report.passed, str(report)


def test_random_cases_cover_every_parameter_and_run():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(60):
        case = M.random_case(rng)
        out = run_case("spikebp", **case)
        assert np.isfinite(out["loss"]) and len(out["grads"]) == len(case["weights"])
        seen |= set(case["params"]) | {f"{k}={case['params'][k]}" for k in ("variant", "out_grad")}
        seen |= {"target"} if case.get("target") is not None else set()
        seen |= {"signed"} if np.any(case["inputs"] < 0) else set()
        seen |= {"v_th list"} if isinstance(case["params"]["v_th"], list) else set()
    assert {"decay", "tau_m", "dt", "v_th_out", "lf_eps", "loss_scale", "dropout_masks", "target",
            "signed", "v_th list", "variant=paper", "variant=code", "out_grad=exact"} <= seen


# --------------------------------------------------------------------------------------------
# approximation properties (spec 6.4)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["code", "paper"])
def test_silent_hidden_neuron_gets_a_zero_incoming_row(variant):
    rng = np.random.default_rng(0)
    W1 = rng.normal(0.5, 0.5, (4, 6))
    W1[2] = -np.abs(W1[2])                                           # neuron 2 never fires
    W2 = rng.normal(0, 1, (3, 4))
    x = (rng.random((10, 6)) < 0.6).astype(float)
    out = run_case("spikebp", [W1, W2], x, label=1, params={"variant": variant, "decay": 0.9})
    assert out["counts"][0][2] == 0 and out["D"][0][2] == 0.0
    assert not out["grads"][0][2].any()
    assert np.abs(out["grads"][0]).max() > 0


@settings(deadline=None, max_examples=25)
@given(case=dense_cases(paper=True))
def test_code_equals_paper_when_T_is_1(case):
    arch, params, _, B, signed, seed = case
    _check_code_equals_paper(arch, params, 1, B, signed, seed)


@settings(deadline=None, max_examples=20)
@given(T=st.integers(1, 12), n=st.integers(1, 5), signs=st.lists(st.booleans(), min_size=4, max_size=4),
       seed=st.integers(0, 2**31 - 1), decay=st.floats(0.8, 1.0))
def test_code_equals_paper_when_every_neuron_is_silent_or_fires_every_step(T, n, signs, seed, decay):
    """6.4 limit: every hidden neuron silent or spiking at T-1 (here: at every step)."""
    rng = np.random.default_rng(seed)
    sg = np.where(signs, 1.0, -1.0)
    W1 = sg[:, None] * rng.uniform(1.1, 2.0, (4, n)) / n               # I = ±(>1.1) every step
    W2 = np.tile(sg[::-1, None], (1, 4)) * rng.uniform(1.1, 2.0, (4, 4))
    W3 = rng.normal(size=(3, 4))
    x = np.ones((T, n))
    outs = [run_case("spikebp", [W1, W2, W3], x, label=0,
                     params={"variant": v, "decay": decay}) for v in ("code", "paper")]
    for s in outs[0]["spikes"][:2]:
        assert all(col.all() or not col.any() for col in s.T)
    for gc, gp in zip(outs[0]["grads"], outs[1]["grads"]):
        np.testing.assert_allclose(gc, gp, rtol=0, atol=1e-14 * max(1.0, np.abs(gc).max()))


def _check_code_equals_paper(arch, params, T, B, signed, seed):
    grads = []
    for variant in ("code", "paper"):
        p = {**params, "variant": variant, "dropout": 0.0}
        p.pop("out_grad", None)
        net = build(arch, p, seed)
        rng = np.random.default_rng(seed)
        x = inputs(rng, T, B, net.in_shape, signed)
        grads.append(run(net, x, rng.integers(0, net.n_out, B))[1])
    for gc, gp in zip(*grads):
        np.testing.assert_allclose(gc, gp, rtol=0, atol=1e-13 * max(1.0, np.abs(gc).max()))


def test_variants_differ_on_generic_networks():
    """6.4 sanity: the routing matters (spec: 35 of 40 random cases differ)."""
    differ = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        W = [rng.normal(0.3, 0.9, (5, 6)), rng.normal(0.3, 0.9, (4, 5)), rng.normal(0, 1, (3, 4))]
        x = (rng.random((int(rng.integers(4, 12)), 6)) < 0.5).astype(float)
        g = [run_case("spikebp", W, x, label=0, params={"variant": v, "decay": 0.9})["grads"]
             for v in ("code", "paper")]
        differ += any(np.abs(a - b).max() > 1e-9 for a, b in zip(*g))
    assert differ >= 30


# --------------------------------------------------------------------------------------------
# batch engine: Network vs oracle, float32, dropout in time
# --------------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=15)
@given(case=dense_cases(), paper=st.booleans())
def test_batch_engine_equals_run_case_per_sample(case, paper):
    arch, params, T, B, signed, seed = case
    params = {**params, "dropout": 0.0}
    if paper:
        params.update(variant="paper", out_grad="code")
    rng = np.random.default_rng(seed)
    net = build(arch, params, seed)
    n_hidden = len(net.layers) - 1
    masks = [None if rng.random() < 0.3 else list(rng.choice([0.0, 2.0], net.layers[l].out_shape[0]))
             for l in range(n_hidden)]
    net.p = net.p.replace(dropout_masks=masks)
    x = inputs(rng, T, B, net.in_shape, signed)
    labels = rng.integers(0, net.n_out, B)
    trace, grads, _ = run(net, x, labels)
    W = [layer.params[0] for layer in net.layers]
    total = [np.zeros_like(w) for w in W]
    for b in range(B):
        out = run_case("spikebp", W, x[:, b], label=int(labels[b]),
                       params={**params, "dropout_masks": masks})
        for l, st_ in enumerate(trace.states[:-1]):
            np.testing.assert_array_equal(st_.spikes[:, b], out["spikes"][l])
        for l in range(len(W)):
            total[l] += out["grads"][l]
    for got, want in zip(grads, total):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * max(1.0, np.abs(want).max()))


@settings(deadline=None, max_examples=10)
@given(case=st.one_of(dense_cases(), conv_cases()))
def test_float32_engine_agrees_with_float64(case):
    arch, params, T, B, signed, seed = case
    params = {**params, "dropout": 0.0}
    net64 = build(arch, params, seed)
    net32 = build(arch, params, seed, dtype=np.float32)
    for a, b in zip(net32.params(), net64.params()):
        a[...] = b
    rng = np.random.default_rng(seed)
    x = inputs(rng, T, B, net64.in_shape, signed)
    labels = rng.integers(0, net64.n_out, B)
    t64, g64, _ = run(net64, x, labels)
    t32, g32, _ = run(net32, x.astype(np.float32), labels)
    # a float32 membrane within round-off of a threshold may flip a spike: skip those draws
    for st_ in t64.spiking_states[:-1]:
        th = st_.v_th if hasattr(st_, "v_th") else net64.p.v_th_pool
        assume(np.min(np.abs(st_.u - th)) > 1e-4)
    for s64, s32 in zip(t64.spiking_states[:-1], t32.spiking_states[:-1]):
        np.testing.assert_array_equal(s64.spikes, s32.spikes)
    assert g32[0].dtype == np.float32
    assert t32.loss == pytest.approx(t64.loss, rel=1e-4, abs=1e-5)
    for a, b in zip(g32, g64):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * max(1.0, np.abs(b).max()))


def test_dropout_in_time_one_mask_per_sample_for_all_steps():
    net = build("20-30-4", {"dropout": 0.25}, 0, mu=0.6)
    x = np.ones((12, 50, 20))
    trace = net.forward(x, train=True, rng=np.random.default_rng(1))
    st_ = trace.states[0]
    assert st_.m.shape == (50, 30)
    assert set(np.unique(st_.m)) <= {0.0, 1.0 / 0.75}
    assert 0.6 < np.mean(st_.m > 0) < 0.9
    np.testing.assert_array_equal(st_.out, st_.m[None] * st_.spikes)   # same mask at every t
    assert st_.spikes.any()
    assert np.all(net.forward(x).states[0].m == 1.0)                    # no mask at test time
    again = net.forward(x, train=True, rng=np.random.default_rng(1)).states[0].m
    np.testing.assert_array_equal(again, st_.m)                          # seeded
    with pytest.raises(ConfigError, match="needs a random generator"):
        net.forward(x, train=True)


# --------------------------------------------------------------------------------------------
# parameters, presets, layers, errors
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("params, fragment", [
    ({"decay": 0.0}, "decay=0.0 is out of range"),
    ({"decay": 1.2}, "decay=1.2 is out of range"),
    ({"tau_m": -3.0}, "tau_m=-3.0 is out of range"),
    ({"v_th": -1.0}, "v_th=-1.0 is out of range"),
    ({"v_th": (1.0, 0.0)}, "v_th=.* is out of range"),
    ({"v_th_out": 0.0}, "v_th_out=0.0 is out of range"),
    ({"lf_eps": -1e-3}, "lf_eps=-0.001 is out of range"),
    ({"loss_scale": 0.0}, "loss_scale=0.0 is out of range"),
    ({"dropout": 1.0}, "dropout=1.0 is out of range"),
    ({"variant": "paper", "out_grad": "exact"}, "out_grad='exact' is defined for variant='code'"),
    ({"variant": "both"}, "variant='both' is not valid"),
    ({"leak": 0.9}, "'leak' is called 'decay'"),
    ({"V_th_out": 0.9}, "'V_th_out' is called 'v_th_out'"),
    ({"dropout_masks": [[1.0, float("nan")]]}, "dropout_masks\\[0\\] must hold finite values"),
])
def test_bad_parameters_raise_config_errors(params, fragment):
    with pytest.raises(ConfigError, match=fragment):
        SpikeBPParams.from_dict(params)


def test_tau_m_replaces_decay_and_cli_strings_parse():
    p = SpikeBPParams.from_dict({"tau_m": "20", "dt": "0.5", "decay": "0.5", "v_th": "1,0.8"})
    assert p.lam == pytest.approx(math.exp(-0.025)) and p.ln_lam == -0.025
    assert p.v_th == (1.0, 0.8)


def test_user_errors_of_the_oracle_and_the_engine():
    W = [np.ones((2, 3)), np.ones((2, 2))]
    x = np.ones((4, 3))
    with pytest.raises(ConfigError, match="2 values but the network has 1 hidden LIF"):
        run_case("spikebp", W, x, label=0, params={"v_th": [1.0, 1.0]})
    with pytest.raises(ShapeError, match="dropout_masks has 2 entries"):
        run_case("spikebp", W, x, label=0, params={"dropout_masks": [None, None]})
    with pytest.raises(ShapeError, match="dropout_masks\\[0\\] has 3 values"):
        run_case("spikebp", W, x, label=0, params={"dropout_masks": [[1.0, 1.0, 1.0]]})
    with pytest.raises(ShapeError, match="target has shape \\(3,\\)"):
        run_case("spikebp", W, x, target=[1.0, 0.0, 0.0])
    with pytest.raises(ConfigError, match="no biases"):
        run_case("spikebp", W, x, label=0, biases=[np.zeros(2), np.zeros(2)])
    net = build("3-2-2", {"dropout": 0.5, "dropout_masks": [[1.0, 0.0]]}, 0)
    with pytest.raises(ConfigError, match="not both"):
        net.forward(np.ones((2, 1, 3)), train=True, rng=np.random.default_rng(0))
    with pytest.raises(ConfigError, match="class indices"):
        net.make_target(np.array([0, 5]), 2)


def test_presets_and_defaults_are_valid_training_configs():
    m = get_method("spikebp")
    for name, preset in {**m.presets, "defaults": m.defaults}.items():
        cfg = TrainConfig().merged(preset)
        parse_arch(cfg.arch)
        SpikeBPParams.from_dict(cfg.params)
    lenet = m.presets["mnist-lenet"]
    assert (lenet["T"], lenet["batch_size"], lenet["epochs"], lenet["lr"]) == (100, 64, 125, 0.0085)
    assert (lenet["optimizer"], lenet["momentum"], lenet["weight_decay"]) == ("sgd", 0.0, 5e-4)
    assert (lenet["lr_schedule"], tuple(lenet["lr_milestones"]), lenet["lr_gamma"]) == ("step", (75,), 0.2)


def test_lenet_shapes_of_spec_7_1_and_the_init_of_7_2():
    net = Network.build(SpikeBP.presets["mnist-lenet"]["arch"], "spikebp", seed=0)
    shapes = [tuple(layer.out_shape) for layer in net.layers]
    assert shapes == [(20, 28, 28), (20, 14, 14), (50, 14, 14), (50, 7, 7), (2450,), (200,), (10,)]
    assert [layer.kind for layer in net.layers][1] == "spikepool"
    assert net.spiking_layers() == [0, 1, 2, 3, 5, 6]                   # pools carry IF neurons
    W = net.layers[2].params[0]                                          # 50C5 on 20 channels
    assert W.std() == pytest.approx(math.sqrt(2 / (5 * 5 * 20)), rel=0.03)
    assert abs(W.mean()) < 0.01
    assert all(len(layer.params) <= 1 for layer in net.layers)           # no biases anywhere


# --------------------------------------------------------------------------------------------
# learning (slow)
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_learns_mnist_subset():
    """A short run on 2,000 digits of mnist10k: test accuracy far above chance (10%)."""
    from refsnn.data import load_dataset
    from refsnn.encoding import encode
    ds = load_dataset("mnist10k")
    rng = np.random.default_rng(0)
    xtr, ytr = ds.x01("train", slice(0, 2000)).reshape(2000, -1), ds.train_y[:2000]
    xte, yte = ds.x01("test", slice(0, 500)).reshape(500, -1), ds.test_y[:500]
    net = Network.build("784-200-10", "spikebp", seed=0)
    T, lr, wd = 12, 0.0085, 5e-4
    for epoch in range(2):
        order = rng.permutation(len(ytr))
        for i in range(0, len(order), 32):
            idx = order[i:i + 32]
            x = encode("poisson", xtr[idx], T, rng, rate=0.5)
            _, grads, _ = net.loss_and_grads(x, net.make_target(ytr[idx], T), train=True, rng=rng)
            for w, g in zip(net.params(), grads):
                w -= lr * (g + wd * w)                                   # spec 7.3 SGD
    pred = np.concatenate([net.predict(encode("poisson", xte[i:i + 100], T, rng, rate=0.5))
                           for i in range(0, 500, 100)])
    assert np.mean(pred == yte) > 0.8
