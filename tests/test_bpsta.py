"""BPSTA (spec/bpsta.md): worked example, golden cases, the frozen-mask surrogate of 6.1 (dense and
conv), the loss head of 6.2, the properties of 6.3, BN and max pooling of 5.4, engine agreement."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from refsnn import gradcheck
from refsnn.config import TrainConfig
from refsnn.errors import ConfigError, DataError, ShapeError
from refsnn.methods import get_method
from refsnn.methods.bpsta import (BPSTA, BPSTAParams, BatchNorm2d, MaxPool2d, bpsta_backward,
                                  surrogate_loss, vote_mse)
from refsnn.network import Network, parse_arch
from refsnn.oracle import run_case

HERE = Path(__file__).parent
M = BPSTA()


def spec_rule_ok(an, fd):
    """Spec 6.1 pass rule: |fd - an| <= 1e-7 + 1e-5·(|an| + max|an|), entry by entry."""
    an, fd = np.asarray(an), np.asarray(fd)
    return np.all(np.abs(fd - an) <= 1e-7 + 1e-5 * (np.abs(an) + np.max(np.abs(an), initial=0.0)))


# --------------------------------------------------------------------------------------------
# Spec 11: the worked example, number by number
# --------------------------------------------------------------------------------------------

W1 = [[0.40, 0.30, -0.10], [0.10, 0.35, 0.30]]
W2 = [[0.55, 0.25], [0.05, 0.60]]
X11 = [[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 1, 1], [0, 0, 1], [1, 1, 0]]


def close6(a, b):
    """Equal to the 6 significant digits the spec prints."""
    np.testing.assert_allclose(a, b, rtol=5e-6, atol=5e-7)


def test_spec_11_worked_example_forward_eps_loss_and_grads():
    out = run_case("bpsta", [np.array(W1), np.array(W2)], np.array(X11, float), label=1,
                   params={"n_classes": 2})
    close6(out["I"][0], [[0.3, 0.4], [0.7, 0.45], [0.2, 0.65], [0.6, 0.75], [-0.1, 0.3],
                         [0.7, 0.45]])
    close6(out["u"][0], [[0.3, 0.4], [0.97, 0.81], [0.2, 0.65], [0.78, 0.75], [-0.1, 0.3],
                         [0.61, 0.72]])
    np.testing.assert_array_equal(out["spikes"][0], [[0, 0], [1, 1], [0, 1], [1, 1], [0, 0],
                                                     [1, 1]])
    close6(out["eps"][0], [[0.0697401, -0.0651377], [0.077489, -0.0723753],
                           [0.0721292, -0.0979228], [0.0801435, -0.0604015],
                           [0.0782235, -0.0315505], [0.086915, -0.0350561]])
    close6(out["I"][1], [[0, 0], [0.8, 0.65], [0.25, 0.6], [0.8, 0.65], [0, 0], [0.8, 0.65]])
    close6(out["u"][1], [[0, 0], [0.8, 0.65], [0.25, 0.6], [1.025, 0.65], [0, 0], [0.8, 0.65]])
    np.testing.assert_array_equal(out["o"][1], [[0, 0], [1, 1], [0, 1], [1, 1], [0, 0], [1, 1]])
    close6(out["eps"][1], [[0.111568, -0.107983], [0.123964, -0.119981],
                           [0.0879878, -0.124624], [0.0977642, -0.106772],
                           [0.09375, -0.0769231], [0.104167, -0.0854701]])
    close6(out["rate"], [0.5, 0.666667])
    np.testing.assert_array_equal(out["y"], [0, 1])
    close6(out["loss"], 0.180556)
    close6(out["e"][1], np.tile([0.0833333, -0.0555556], (6, 1)))
    close6(out["grads"][0], [[0.314288, 0.316677, 0.300236], [-0.232971, -0.265756, -0.255013]])
    close6(out["grads"][1], [[0.325895, 0.413883], [-0.312223, -0.436847]])
    # the hand check printed under the table (layer 2, neuron 1)
    assert out["eps"][1][5, 0] == pytest.approx(0.0833333 / 0.8, rel=1e-6)
    assert out["eps"][1][4, 0] == pytest.approx(0.9 * out["eps"][1][5, 0], rel=1e-14)
    assert out["eps"][1][3, 0] == pytest.approx((1 / 12 + 0.2 * 0.9 * 0.09375) / 1.025, rel=1e-14)


@pytest.mark.parametrize("params, dW1, dW2, loss", [
    ({"alpha": 0.0}, [[0.242614, 0.240085, 0.225928], [-0.135538, -0.16482, -0.158199]],
     [[0.289634, 0.362805], [-0.25641, -0.349003]], 0.180556),
    ({"adjust": "bpsa"}, [[0.242614, 0.240085, 0.225928], [-0.135538, -0.16482, -0.158199]],
     [[0.289634, 0.362805], [-0.25641, -0.349003]], 0.180556),
    ({"loss_reduction": "sum"}, 2 * np.array([[0.314288, 0.316677, 0.300236],
                                              [-0.232971, -0.265756, -0.255013]]),
     2 * np.array([[0.325895, 0.413883], [-0.312223, -0.436847]]), 0.361111),
    ({"relu_current": True}, [[0.300056, 0.300705, 0.217254], [-0.232971, -0.265756, -0.255013]],
     [[0.325895, 0.413883], [-0.312223, -0.436847]], 0.180556),
])
def test_spec_11_variants(params, dW1, dW2, loss):
    out = run_case("bpsta", [np.array(W1), np.array(W2)], np.array(X11, float), label=1,
                   params=params)
    close6(out["loss"], loss)
    close6(out["grads"][0], dW1)
    close6(out["grads"][1], dW2)


# --------------------------------------------------------------------------------------------
# Public golden cases
# --------------------------------------------------------------------------------------------

GOLDEN = json.loads((HERE / "golden" / "bpsta.json").read_text())["cases"]


@pytest.mark.parametrize("i", range(len(GOLDEN)))
def test_golden_case(i):
    case = GOLDEN[i]
    out = run_case("bpsta", [np.array(w) for w in case["weights"]], np.array(case["inputs"]),
                   label=case.get("label"), target=case.get("target"),
                   biases=case.get("biases"), params=case["params"])
    exp = case["expected"]
    for got, want in zip(out["spikes"], exp["spikes"]):
        np.testing.assert_array_equal(got, np.array(want))
    scale = max([abs(exp["loss"])] + [np.max(np.abs(g)) for g in exp["grads"]])
    assert abs(out["loss"] - exp["loss"]) <= 1e-9 * scale
    for got, want in zip(out["grads"], exp["grads"]):
        assert np.max(np.abs(got - np.array(want))) <= 1e-9 * scale


# --------------------------------------------------------------------------------------------
# Spec 6.3: properties of the approximations (hand cases)
# --------------------------------------------------------------------------------------------

def test_6_3_bpta_hand_case_and_its_alpha_zero_limit():
    u = np.array([0.2, 0.6, 0.3, 0.8]).reshape(4, 1, 1)
    o = np.array([0.0, 1.0, 0.0, 1.0]).reshape(4, 1, 1)
    e = np.array([0.0, 0.0, 0.0, 1.0]).reshape(4, 1, 1)
    eps, delta = bpsta_backward(e, u, o, u, False, 0.9, 0.2)
    np.testing.assert_allclose(eps.ravel(), [0.30375, 0.3375, 1.125, 1.25], rtol=1e-13)
    assert delta is not eps and np.array_equal(delta, eps)
    eps0, _ = bpsta_backward(e, u, o, u, False, 0.9, 0.0)
    np.testing.assert_allclose(eps0.ravel(), [0.0, 0.0, 1.125, 1.25], rtol=1e-13)
    # the error crosses the spike at t = 2 with factor λ·α/u[2] (spec 6.3)
    assert eps[1, 0, 0] == pytest.approx(0.9 * 0.2 / 0.6 * eps[2, 0, 0], rel=1e-13)


def test_6_3_single_neuron_hand_example():
    out = run_case("bpsta", [np.array([[0.7]])], np.array([[1.0], [0.0], [1.0], [1.0]]), label=0)
    assert out["grads"][0][0, 0] == pytest.approx(-0.633586005831, abs=1e-12)


@settings(deadline=None, max_examples=20)
@given(n_in=st.integers(1, 5), n_out=st.integers(1, 5), seed=st.integers(0, 2**32 - 1),
       v_th=st.floats(0.1, 1.0), label=st.integers(0, 4))
def test_6_3_bpsa_magnitude_T1_one_layer(n_in, n_out, seed, v_th, label):
    """T = 1, one layer: ∂L/∂W[i, j] = e_i·(o_i/u_i)·x_j exactly."""
    rng = np.random.default_rng(seed)
    W = rng.normal(0.3, 1.0, (n_out, n_in))
    x = rng.uniform(0, 1.5, (1, n_in))
    out = run_case("bpsta", [W], x, label=label % n_out, params={"v_th": v_th})
    u, o, e = out["u"][0][0], out["spikes"][0][0], out["e"][0][0]
    g = np.where(o > 0, 1.0 / np.where(o > 0, u, 1.0), 0.0)
    np.testing.assert_allclose(out["grads"][0], np.outer(e * g, x[0]), rtol=1e-14, atol=0)


def test_6_3_silent_hidden_neuron_and_silent_output():
    rng = np.random.default_rng(3)
    W1 = rng.uniform(0.2, 0.8, (4, 3))
    W1[2] = -1.0                                # hidden neuron 2 never fires
    W2 = rng.uniform(0.2, 0.8, (3, 4))
    x = np.ones((6, 3))
    out = run_case("bpsta", [W1, W2], x, label=0)
    assert out["spikes"][0][:, 2].sum() == 0 and out["spikes"][1].sum() > 0
    assert np.all(out["grads"][0][2] == 0) and np.all(out["grads"][1][:, 2] == 0)
    assert np.any(out["grads"][0] != 0)
    # no output spike at all: every gradient is exactly 0, although the loss is not
    out = run_case("bpsta", [W1, -W2], x, label=0)
    assert out["spikes"][1].sum() == 0 and out["loss"] > 0
    assert all(np.all(g == 0) for g in out["grads"])


def test_6_3_forward_is_independent_of_alpha_and_adjust():
    rng = np.random.default_rng(5)
    W = [rng.normal(0.3, 0.6, (5, 4)), rng.normal(0.3, 0.6, (3, 5))]
    x = rng.uniform(0, 1, (7, 4))
    ref = run_case("bpsta", W, x, label=1)
    for params in ({"alpha": 0.0}, {"alpha": 0.5}, {"adjust": "bpsa"}, {"adjust": "baseline"}):
        out = run_case("bpsta", W, x, label=1, params=params)
        assert out["loss"] == ref["loss"]
        for a, b in zip(out["spikes"], ref["spikes"]):
            np.testing.assert_array_equal(a, b)


def test_baseline_window_hand_case():
    """Baseline (spec 5.3): h = 1[|u - θ| < 0.5], ε[t] = h·e + λ·((1 - o) - u·h)·ε[t+1]."""
    from refsnn.methods.bpsta import baseline_backward
    u = np.array([0.2, 1.2, 0.7, 0.8]).reshape(4, 1, 1)
    o = np.array([0.0, 1.0, 1.0, 1.0]).reshape(4, 1, 1)
    e = np.array([0.0, 1.0, 0.0, 1.0]).reshape(4, 1, 1)
    eps, _ = baseline_backward(e, u, o, u, False, 0.5, 0.9)
    e4 = 1.0                                   # |0.8 - 0.5| < 0.5
    e3 = 0.0 + 0.9 * (0.0 - 0.7) * e4          # h = 1 at u = 0.7, no error at t = 3
    e2 = 0.0 + 0.9 * (0.0 - 0.0) * e3          # u = 1.2 outside the window: h = 0
    e1 = 1.0 * 0.0 + 0.9 * (1.0 - 0.2) * e2    # h = 1 at u = 0.2, e = 0
    np.testing.assert_allclose(eps.ravel(), [e1, e2, e3, e4], rtol=1e-14, atol=0)
    assert eps[1, 0, 0] == 0.0                 # a spike outside the window passes nothing


# --------------------------------------------------------------------------------------------
# Spec 6.2: loss head, exact
# --------------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=20)
@given(T=st.integers(1, 6), B=st.integers(1, 3), C=st.integers(1, 4), G=st.integers(1, 3),
       use_sum=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_6_2_loss_head_against_finite_differences(T, B, C, G, use_sum, seed):
    rng = np.random.default_rng(seed)
    o = rng.uniform(0, 1, (T, B, G * C))
    y = rng.uniform(0, 1, (B, C))
    L, rate, e = vote_mse(o, y, G, use_sum)
    np.testing.assert_allclose(rate, o.reshape(T, B, C, G).mean(axis=(0, 3)), rtol=1e-13)
    s = 1.0 if use_sum else 1.0 / C
    np.testing.assert_allclose(L, s * ((rate - y) ** 2).sum(axis=1), rtol=1e-13)
    # L is quadratic in o: central differences have no truncation error, and h = 1e-3 keeps
    # their round-off (~1e-16·L/h) far below the 1e-10 of spec 6.2
    fd = gradcheck.central_fd(lambda: float(vote_mse(o, y, G, use_sum)[0].sum()), [o], h=1e-3)[0]
    assert np.max(np.abs(fd - e)) <= 1e-10 * max(1.0, np.max(np.abs(e)))


# --------------------------------------------------------------------------------------------
# Spec 6.1: the whole backward pass against the frozen-mask surrogate function
# --------------------------------------------------------------------------------------------

param_sets = st.fixed_dictionaries({
    "v_th": st.floats(0.2, 1.0), "decay": st.floats(0.0, 1.0), "alpha": st.floats(0.0, 0.6),
    "adjust": st.sampled_from(["bpsta", "bpsa", "baseline"]),
    "loss_reduction": st.sampled_from(["mean", "sum"]), "target_value": st.floats(0.2, 1.0),
    "relu_current": st.booleans(), "fire_on_equal": st.booleans(),
})


def check_surrogate(net, x, labels, train, rng=None):
    """F(W_ref) = L(W_ref) to 1e-12 and the hand gradient = central FD of F (spec 6.1)."""
    target = net.make_target(labels, x.shape[0])
    loss, grads, trace = net.loss_and_grads(x, target, train=train, rng=rng)
    F = lambda: surrogate_loss(net.method, net.p, net.layers, x, target, trace)
    assert F() == pytest.approx(loss, rel=1e-12, abs=1e-15)
    fd = gradcheck.central_fd(F, net.params(), h=1e-6)
    for name, an, num in zip(net.param_names(), grads, fd):
        assert spec_rule_ok(an, num), (name, np.max(np.abs(an - num)), an, num)
    return grads


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.filter_too_much])
@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=3), C=st.integers(1, 3),
       G=st.integers(1, 3), T=st.integers(1, 7), B=st.integers(1, 3), params=param_sets,
       spikes_in=st.booleans(), dropout=st.sampled_from([0.0, 0.5]),
       seed=st.integers(0, 2**32 - 1))
def test_6_1_dense_backward_is_the_gradient_of_the_frozen_mask_surrogate(
        sizes, C, G, T, B, params, spikes_in, dropout, seed):
    rng = np.random.default_rng(seed)
    arch = "-".join(map(str, sizes + [C * G]))
    net = Network.build(arch, "bpsta", {**params, "n_classes": C, "dropout": dropout}, seed=seed)
    for a in net.params():                       # weights and biases that keep the net active
        a[...] = rng.normal(0.25, 0.7, a.shape)
    x = (rng.random((T, B, sizes[0])) < 0.6).astype(float) if spikes_in \
        else rng.uniform(-0.2, 1.5, (T, B, sizes[0]))
    labels = rng.integers(0, C, B)
    grads = check_surrogate(net, x, labels, train=dropout > 0, rng=rng)
    assume(any(np.any(g != 0) for g in grads))


@settings(deadline=None, max_examples=8)
@given(c1=st.integers(1, 3), c2=st.integers(1, 2), hw=st.sampled_from([4, 5]),
       B=st.integers(1, 3), T=st.integers(1, 4), params=param_sets, batch_norm=st.booleans(),
       train=st.booleans(), pool=st.sampled_from(["m2", "a2"]), seed=st.integers(0, 2**32 - 1))
def test_6_1_conv_bn_pool_backward_is_the_gradient_of_the_frozen_mask_surrogate(
        c1, c2, hw, B, T, params, batch_norm, train, pool, seed):
    """Conv → BN → (ReLU) → LIF blocks, max/avg pooling, dropout: every parameter by FD."""
    rng = np.random.default_rng(seed)
    arch = f"{hw}x{hw}x2-{c1}c3p1-{pool}-{c2}c3p1-a2-4"
    net = Network.build(arch, "bpsta", {**params, "n_classes": 2, "batch_norm": batch_norm,
                                        "dropout": 0.5 if train else 0.0}, seed=seed)
    for layer in net.layers:
        for a in layer.params:
            a[...] = rng.normal(0.2, 0.6, a.shape)
        if layer.kind == "batchnorm":            # eval mode reads these
            layer.running_mean[...] = rng.normal(0, 0.3, layer.running_mean.shape)
            layer.running_var[...] = rng.uniform(0.2, 2.0, layer.running_var.shape)
    x = rng.uniform(0, 1.5, (T, B, 2, hw, hw))
    check_surrogate(net, x, rng.integers(0, 2, B), train=train, rng=rng)


# --------------------------------------------------------------------------------------------
# Spec 5.4 layers: BatchNorm2d and MaxPool2d on their own
# --------------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=15)
@given(T=st.integers(1, 3), B=st.integers(1, 3), C=st.integers(1, 3), H=st.integers(1, 3),
       train=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_batchnorm_backward_against_finite_differences(T, B, C, H, train, seed):
    assume(B * H * H >= 2)
    rng = np.random.default_rng(seed)
    bn = BatchNorm2d((C, H, H))
    bn.gamma[...] = rng.normal(1, 0.5, C)
    bn.beta[...] = rng.normal(0, 0.5, C)
    bn.running_mean[...] = rng.normal(0, 1, C)
    bn.running_var[...] = rng.uniform(0.5, 2, C)
    x = rng.normal(0.3, 1.2, (T, B, C, H, H))
    g = rng.normal(0, 1, x.shape)
    f = lambda: float(np.sum(g * bn.forward(x, train=train, update=False)))
    gx, (dgamma, dbeta) = bn.backward(g, x, train=train)
    fd = gradcheck.central_fd(f, [x, bn.gamma, bn.beta], h=1e-6)
    for an, num in zip([gx, dgamma, dbeta], fd):
        assert np.max(np.abs(an - num)) <= 1e-7 * max(1.0, np.max(np.abs(an)))


def test_batchnorm_statistics_and_running_update():
    """Spec 5.4: per-step batch statistics (biased); T running updates (unbiased variance)."""
    rng = np.random.default_rng(0)
    bn = BatchNorm2d((2, 3, 3))
    x = rng.normal(1.0, 2.0, (3, 4, 2, 3, 3))
    out = bn.forward(x, train=True)
    mu = x.mean(axis=(1, 3, 4))                  # (T, C)
    var = x.var(axis=(1, 3, 4))
    np.testing.assert_allclose(out, (x - mu[:, None, :, None, None])
                               / np.sqrt(var[:, None, :, None, None] + 1e-5), rtol=1e-12)
    m = 4 * 9
    rm, rv = np.zeros(2), np.ones(2)
    for t in range(3):
        rm = 0.9 * rm + 0.1 * mu[t]
        rv = 0.9 * rv + 0.1 * var[t] * m / (m - 1)
    np.testing.assert_allclose(bn.running_mean, rm, rtol=1e-13)
    np.testing.assert_allclose(bn.running_var, rv, rtol=1e-13)
    ev = bn.forward(x, train=False)
    np.testing.assert_allclose(ev, (x - rm[None, None, :, None, None])
                               / np.sqrt(rv[None, None, :, None, None] + 1e-5), rtol=1e-12)
    np.testing.assert_allclose(bn.running_mean, rm, rtol=1e-13)     # eval leaves them alone
    with pytest.raises(ShapeError, match="more than one value per channel"):
        BatchNorm2d((2, 1, 1)).forward(np.zeros((1, 1, 2, 1, 1)), train=True)


@settings(deadline=None, max_examples=15)
@given(T=st.integers(1, 2), B=st.integers(1, 2), C=st.integers(1, 3), H=st.integers(2, 7),
       W=st.integers(2, 7), k=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_maxpool_backward_against_finite_differences(T, B, C, H, W, k, seed):
    assume(H >= k and W >= k)
    rng = np.random.default_rng(seed)
    pool = MaxPool2d((C, H, W), k)
    x = rng.normal(0, 1, (T, B, C, H, W))       # distinct values: no ties
    g = rng.normal(0, 1, (T, B) + pool.out_shape)
    gx, _ = pool.backward(g, x)
    fd = gradcheck.central_fd(lambda: float(np.sum(g * pool.forward(x))), [x], h=1e-6)[0]
    assert np.max(np.abs(gx - fd)) <= 1e-8
    # floor mode: rows and columns that fill no window get nothing
    assert np.all(gx[..., (H // k) * k:, :] == 0) and np.all(gx[..., (W // k) * k:] == 0)
    # the frozen-selection forward of the 6.1 check equals the plain forward at its reference
    np.testing.assert_array_equal(pool.forward(x, index=pool.argmax(x)), pool.forward(x))


def test_maxpool_tie_rule_is_pytorchs_first_argmax():
    """Spec 5.4: gradient to the first maximal element in order (0,0), (0,1), (1,0), (1,1)."""
    pool = MaxPool2d((1, 2, 6), 2)
    x = np.array([[0, 1, 0, 0, 0, 0],
                  [1, 1, 1, 1, 0, 0]], float).reshape(1, 1, 1, 2, 6)
    np.testing.assert_array_equal(pool.forward(x).ravel(), [1, 1, 0])
    gx, _ = pool.backward(np.ones((1, 1, 1, 1, 3)), x)
    np.testing.assert_array_equal(gx.reshape(2, 6), [[0, 1, 0, 0, 1, 0],
                                                     [0, 0, 1, 0, 0, 0]])


# --------------------------------------------------------------------------------------------
# The batch engine: float32 vs float64, B > 1 vs run_case per sample
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("adjust", ["bpsta", "baseline"])
def test_batch_engine_equals_run_case_per_sample(adjust):
    rng = np.random.default_rng(11)
    params = {"n_classes": 3, "relu_current": True, "adjust": adjust}
    net = Network.build("6-7-6", "bpsta", params, seed=1)
    for a in net.params():
        a[...] = rng.normal(0.25, 0.6, a.shape)
    x = rng.uniform(0, 1.2, (5, 4, 6))
    labels = np.array([0, 2, 1, 2])
    loss, grads, trace = net.loss_and_grads(x, net.make_target(labels, 5))
    W = [net.layers[0].params[0], net.layers[1].params[0]]
    b = [net.layers[0].params[1], net.layers[1].params[1]]
    per = [run_case("bpsta", W, x[:, s], label=labels[s], biases=b, params=params)
           for s in range(4)]
    assert loss == pytest.approx(sum(o["loss"] for o in per), rel=1e-13)
    for s in range(4):
        np.testing.assert_array_equal(trace.states[1].spikes[:, s], per[s]["spikes"][1])
    expect = [sum(o["grads"][0] for o in per), sum(o["grads_b"][0] for o in per),
              sum(o["grads"][1] for o in per), sum(o["grads_b"][1] for o in per)]
    for got, want in zip(grads, expect):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    assert any(np.any(g != 0) for g in grads)


@pytest.mark.parametrize("arch", ["20-16-10", "6x6x2-3c3p1-m2-10"])
def test_float32_agrees_with_float64(arch):
    rng = np.random.default_rng(2)
    params = {"relu_current": True, "n_classes": 5}
    n64 = Network.build(arch, "bpsta", params, seed=4)
    n32 = Network.build(arch, "bpsta", params, seed=4, dtype=np.float32)
    for a64, a32 in zip(n64.params(), n32.params()):
        a64[...] = a32                          # the same (float32-representable) weights
    x = rng.uniform(0, 1, (6, 8) + n64.in_shape).astype(np.float32)
    tgt = n64.make_target(rng.integers(0, 5, 8), 6)
    l64, g64, t64 = n64.loss_and_grads(x.astype(np.float64), tgt, train=True)
    l32, g32, t32 = n32.loss_and_grads(x, tgt, train=True)
    for s64 in t64.spiking_states:              # margins that float32 round-off cannot cross
        assert np.min(np.abs(s64.u - 0.5)) > 1e-5
    for s64, s32 in zip(t64.spiking_states, t32.spiking_states):
        np.testing.assert_array_equal(s64.spikes, s32.spikes)
        assert s32.u.dtype == np.float32
    assert l32 == pytest.approx(l64, rel=1e-6)
    scale = max(np.max(np.abs(a)) for a in g64)    # a conv bias before BN has a ~0 gradient
    assert scale > 0
    for a, b in zip(g64, g32):
        assert b.dtype == np.float32
        assert np.max(np.abs(a - b)) <= 1e-4 * scale


# --------------------------------------------------------------------------------------------
# Parameters, targets, errors, presets and the training setup
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("params, fragment", [
    ({"v_th": 0.0}, "v_th=0.0 is out of range"),
    ({"decay": 1.5}, "decay=1.5 is out of range"),
    ({"alpha": -0.1}, "alpha=-0.1 is out of range"),
    ({"adjust": "stbp"}, "adjust='stbp' is not valid"),
    ({"loss_reduction": "max"}, "loss_reduction='max' is not valid"),
    ({"dropout": 1.0}, "dropout=1.0 is out of range"),
    ({"n_classes": 2.5}, "n_classes=2.5 must be a positive integer"),
    ({"lam": 0.9}, "'lam' is called 'decay'"),
    ({"theta": 0.9}, "'theta' is called 'v_th'"),
    ({"relu_current": "yes"}, "relu_current='yes' must be true or false"),
])
def test_bad_parameters_are_refused(params, fragment):
    with pytest.raises(ConfigError, match=fragment):
        BPSTAParams.from_dict(params)


def test_defaults_are_the_spec_values():
    p = BPSTAParams()
    assert (p.v_th, p.decay, p.alpha, p.adjust, p.n_classes, p.loss_reduction, p.target_value,
            p.relu_current, p.fire_on_equal) == (0.5, 0.9, 0.2, "bpsta", None, "mean", 1.0,
                                                 False, True)
    assert p.alpha_eff == 0.2 and p.replace(adjust="bpsa").alpha_eff == 0.0
    assert isinstance(get_method("bpsta"), BPSTA)


def test_targets_voting_and_their_errors():
    p = BPSTAParams(n_classes=3, target_value=0.7)
    np.testing.assert_array_equal(M.make_target(p, np.array([2, 0]), 6, 4),
                                  [[0, 0, 0.7], [0.7, 0, 0]])
    with pytest.raises(ConfigError, match="not a multiple of n_classes=3"):
        M.make_target(p, np.array([0]), 7, 4)
    with pytest.raises(DataError, match="class indices 0..2"):
        M.make_target(p, np.array([3]), 6, 4)
    W = [np.full((4, 2), 0.6)]
    with pytest.raises(ShapeError, match=r"shape \(2,\)"):
        run_case("bpsta", W, np.ones((3, 2)), target=[0.5, 0.5, 0.5], params={"n_classes": 2})
    with pytest.raises(ConfigError, match="not a multiple"):
        run_case("bpsta", W, np.ones((3, 2)), label=0, params={"n_classes": 3})
    # an explicit target wins over the label (spec 4)
    out = run_case("bpsta", W, np.ones((3, 2)), label=0, target=[0.2, 0.9],
                   params={"n_classes": 2})
    np.testing.assert_array_equal(out["y"], [0.2, 0.9])
    np.testing.assert_array_equal(out["rate"], [1.0, 1.0])
    assert out["loss"] == pytest.approx(0.5 * (0.8 ** 2 + 0.1 ** 2), rel=1e-14)


def test_dropout_needs_a_generator_and_max_pooling_needs_an_image():
    net = Network.build("4-6-2", "bpsta", {"dropout": 0.5}, seed=0)
    with pytest.raises(ConfigError, match="needs a random generator"):
        net.loss_and_grads(np.ones((2, 1, 4)), net.make_target([0], 2), train=True)
    with pytest.raises(ConfigError, match="needs an image"):
        Network.build("4-m2-2", "bpsta", seed=0)
    from refsnn.methods.base import Method
    with pytest.raises(ConfigError, match="no max pooling in its spec; use 'a2'"):
        Method().make_maxpool(None, (1, 4, 4), 2)        # the other methods' default


def test_conv_block_layout_and_init():
    net = Network.build("8x8x1-4c3p1-m2-3c3p1-a2-20", "bpsta", {"n_classes": 10}, seed=0)
    kinds = [layer.kind for layer in net.layers]
    assert kinds == ["conv", "batchnorm", "maxpool", "conv", "batchnorm", "avgpool", "flatten",
                     "dense"]
    assert [net.method.has_neurons(layer) for layer in net.layers] == \
        [False, True, False, False, True, False, False, True]
    W = net.layers[0].params[0]
    assert np.all(np.abs(W) <= 1 / 3) and np.std(W) > 0.1           # U(±1/sqrt(9)) (spec 7)
    assert np.all(net.layers[1].gamma == 1) and np.all(net.layers[1].beta == 0)
    assert "gamma1" in net.param_names()
    off = Network.build("8x8x1-4c3p1-m2-20", "bpsta", {"n_classes": 10, "batch_norm": False},
                        seed=0)
    assert [layer.kind for layer in off.layers] == ["conv", "maxpool", "flatten", "dense"]
    assert off.method.has_neurons(off.layers[0])


def test_presets_and_defaults_are_valid_training_configs():
    for name, preset in {**M.presets, "defaults": M.defaults}.items():
        cfg = TrainConfig().merged(preset)
        p = BPSTAParams.from_dict(cfg.params)
        _, specs = parse_arch(cfg.arch)
        M.n_classes(p, specs[-1].n)              # output = G·C voters
        assert cfg.optimizer == "adamw" and cfg.weight_decay == 1e-4 and cfg.lr == 1e-3
        assert cfg.lr_schedule == "warmup_cosine" and cfg.warmup_epochs == 5, name
    assert M.presets["mnist-small"]["T"] == 16 and M.presets["mnist-small"]["epochs"] == 300


def test_warmup_cosine_schedule_is_spec_7():
    from refsnn.optim import lr_at
    cfg = TrainConfig().merged({**M.defaults, "epochs": 25})
    np.testing.assert_allclose([lr_at(cfg, e) for e in range(5)],
                               [2e-4, 2.5e-4, 1e-3 / 3, 5e-4, 1e-3], rtol=1e-15)
    for e in range(5, 25):
        assert lr_at(cfg, e) == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * (e - 5) / 20)),
                                              rel=1e-15)


# --------------------------------------------------------------------------------------------
# Training (slow)
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_bpsta_learns_mnist10k_subset():
    from refsnn.data import load_dataset
    from refsnn.optim import AdamW
    ds = load_dataset("mnist10k")
    rng = np.random.default_rng(0)
    idx = rng.permutation(ds.n_train)[:2000]
    xtr, ytr = ds.x01("train", idx).reshape(-1, 784), ds.train_y[idx]
    xte, yte = ds.x01("test").reshape(-1, 784)[:1000], ds.test_y[:1000]
    net = Network.build("784-200-100", "bpsta", {"relu_current": True, "n_classes": 10},
                        seed=0, dtype=np.float32)
    opt = AdamW(net.params(), weight_decay=1e-4)
    T = 4
    for epoch in range(3):
        order = rng.permutation(len(ytr))
        for s in range(0, len(ytr), 50):
            b = order[s:s + 50]
            x = np.broadcast_to(xtr[b].astype(np.float32), (T, len(b), 784))
            _, grads, _ = net.loss_and_grads(x, net.make_target(ytr[b], T), train=True, rng=rng)
            opt.step(net.params(), grads, 1e-3)
    pred = net.predict(np.broadcast_to(xte.astype(np.float32), (T,) + xte.shape))
    assert np.mean(pred == yte) > 0.7                 # chance is 0.1; seen 0.79


@pytest.mark.parametrize("arch", ["5-6-4", "5x5x1-2c3p1-m2-4"])
def test_fd_objective_for_refsnn_gradcheck(arch):
    """Method.fd_objective (the `refsnn gradcheck` hook) passes its own rule, leaves BN alone."""
    rng = np.random.default_rng(7)
    net = Network.build(arch, "bpsta", {"n_classes": 2, "relu_current": True, "dropout": 0.5},
                        seed=3)
    for a in net.params():
        a[...] = rng.normal(0.3, 0.6, a.shape)
    x = rng.uniform(0, 1.2, (4, 3) + net.in_shape)
    bufs = [b.copy() for layer in net.layers for b in getattr(layer, "buffers", [])]
    chk = M.fd_objective(net.p, net.layers, x, net.make_target([0, 1, 1], 4))
    assert all(np.array_equal(a, b) for a, b in
               zip(bufs, [b for layer in net.layers for b in getattr(layer, "buffers", [])]))
    rep = gradcheck.check(chk.F, net.params(), chk.grads, h=chk.h, rtol=chk.rtol,
                          scale="global")
    assert rep.passed, rep
    assert max(np.max(np.abs(g)) for g in chk.grads) > 0


def test_random_cases_run_and_cover_the_switches():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(30):
        case = M.random_case(rng)
        out = run_case("bpsta", **case)
        assert len(out["grads"]) == len(case["weights"]) and np.isfinite(out["loss"])
        seen.add((case["params"]["adjust"], case["params"]["relu_current"]))
    assert len(seen) == 6


@pytest.mark.parametrize("arch", ["12-8-6", "8x8x1-3c3p1-m2-6"])
def test_ndropout_on_the_base_chain_replays_masks_has_an_adjoint_and_is_off_at_test(arch):
    """NDropout (5.4, 7) through Method.input_mask: one mask M per sample on the output layer's
    input, the same at every step, scaled by 1/(1 - p); replaying it reproduces the training
    step; an input unit dropped for every sample gets no error (the adjoint); eval has none."""
    net = Network.build(arch, "bpsta", {"n_classes": 3, "dropout": 0.6}, seed=1)
    rng = np.random.default_rng(2)
    for a in net.params():
        a[...] += rng.normal(0.1, 0.3, a.shape)
    T, B = 5, 4
    x = (rng.random((T, B) + net.in_shape) < 0.6).astype(np.float64)
    y = net.make_target([0, 2, 1, 2], T)
    loss, grads, tr = net.loss_and_grads(x, y, train=True, rng=np.random.default_rng(3))
    masks = tr.extra["dropout_masks"]
    out_li = len(net.layers) - 1
    assert list(masks) == [out_li]
    M_ = masks[out_li]
    assert M_.shape == (1, B) + net.layers[out_li].in_shape            # one mask per sample
    assert set(np.unique(M_)) <= {0.0, 1 / 0.4} and 0 < np.mean(M_ > 0) < 1
    assert np.all(tr.inputs[out_li][np.broadcast_to(M_ == 0, tr.inputs[out_li].shape)] == 0)
    # replay: the given masks, no generator, reproduce the step bit for bit
    trace = net.method.forward(net.p, net.layers, x, train=True, masks=masks)
    grads2 = net.method.backward(net.p, net.layers, trace, y)
    assert trace.loss == loss
    for g1, g2 in zip(grads, [g for gl in grads2 for g in (gl or [])]):
        np.testing.assert_array_equal(g1, g2)
    if arch == "12-8-6":        # adjoint: a hidden unit dropped for every sample gets no error
        Md = np.ones((1, B, 8)) / 0.4
        Md[..., 3] = 0.0
        tr3 = net.method.forward(net.p, net.layers, x, train=True, masks={out_li: Md})
        g3 = net.method.backward(net.p, net.layers, tr3, y)
        assert np.all(g3[0][0][3] == 0) and g3[0][1][3] == 0 and np.any(g3[0][0] != 0)
    # eval: no masks, and the generator is not read
    ev = net.forward(x)
    assert "dropout_masks" not in ev.extra and not ev.train
    r = np.random.default_rng(5)
    net.method.forward(net.p, net.layers, x, train=False, rng=r)
    assert r.random() == np.random.default_rng(5).random()
