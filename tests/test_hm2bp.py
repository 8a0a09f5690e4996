"""HM2-BP (spec/hm2bp.md): exact parts against central differences, identities, properties,
the worked example of spec 11, the public golden cases, and the batch engine.

Independent references used here (none is a copy of a kernel):
- ``naive_spsp``: the S-PSP of spec 5.1 straight from its table, a double loop over
  (post spike, pre spike) pairs with κ(s, u) as written;
- ``step_spsp``: the step simulation of (5.1a);
- ``tangent_loss``: the tangent surrogate Ẽ of spec 6.1 (C3), built from the "aux" quantities.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from refsnn import oracle
from refsnn.errors import ConfigError, ShapeError
from refsnn.gradcheck import central_fd, compare
from refsnn.methods.hm2bp import (
    HM2BP, HM2BPParams, SpikingPool2d, count_loss, fix_silent_target, lif_forward, regulariser,
    spsp_matrix)

GOLDEN = Path(__file__).parent / "golden" / "hm2bp.json"
METHOD = HM2BP()


# ------------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------------

def naive_spsp(post, pre, tau_m, tau_s, t_ref, spsp, window=None, e_silent=0.1):
    """Spec 5.1 by its table: Σ_f Σ_{g ∈ G_f} κ(s_f, u_fg), silent rules first."""
    taus, sig = np.flatnonzero(post), np.flatnonzero(pre)
    if len(sig) == 0:
        return 0.0
    if len(taus) == 0:
        return e_silent
    tr = int(t_ref)
    c = 1.0 / (1.0 - tau_s / tau_m)
    W = 4 * tau_m if window is None else window
    e, r = 0.0, (1 if spsp == "code" else 0)
    for tau in taus:
        s = tau - r
        for sg in sig:
            if spsp == "discrete":
                if not sg < tau or s <= 0:
                    continue
                u = tau - sg
                a, b = 1 - 1 / tau_m, 1 - 1 / tau_s
                e += c * b ** max(u - s, 0) * (a ** min(s, u) - b ** min(s, u))
            else:
                if not (max(1, int(tau - W)) <= sg < tau and sg + tr <= tau):
                    continue
                u = tau - sg - tr
                e += c * math.exp(-max(u - s, 0) / tau_s) * (
                    math.exp(-min(s, u) / tau_m) - math.exp(-min(s, u) / tau_s))
        r = tau + tr
    return e


def step_spsp(post, pre, tau_m, tau_s, t_ref):
    """(5.1a): unit-weight response of post's membrane to pre alone, with post's clamps/resets."""
    p = q = e = 0.0
    ref = 0
    for t in range(len(post)):
        p = p - p / tau_s
        if t >= 1:
            p = p + pre[t - 1]
        q = q - q / tau_m + p / tau_s
        if ref > 0:
            q = 0.0
            ref -= 1
        if post[t]:
            e += q
            q = 0.0
            ref = int(t_ref)
    return e


def reg_value(Ws, lam, beta, L):
    """(7.1) R = Σ_l Σ_i (λ N_in L_w / 2) exp(β (Q_i - 1)), rows = post neurons / out channels."""
    R = 0.0
    for W in Ws:
        W2 = W.reshape(W.shape[0], -1)
        Q = ((W2 / L) ** 2).mean(axis=1)
        R += np.sum(lam * W2.shape[1] * L / 2 * np.exp(beta * (Q - 1)))
    return R


def thresholds(p, n):
    return [float(p.v_th)] * n if np.ndim(p.v_th) == 0 else [float(v) for v in p.v_th]


def tangent_loss(Ws, W0s, aux, p):
    """Spec 6.1 C3 for a dense network: Ẽ(W) with e, ρ, s, Λ and the mask frozen at W0."""
    L = len(Ws)
    nu = thresholds(p, L)
    d = np.zeros_like(aux["counts"][0])
    for l in range(1, L + 1):
        lam = aux["lat_factor"] if l == L else 1.0
        dW = Ws[l - 1] - W0s[l - 1]
        d = ((dW * aux["e"][l]).sum(axis=1) * (1 + aux["side"][l]) * lam
             + (W0s[l - 1] * aux["rho"][l]) @ d) / nu[l - 1]
    o = aux["counts"][L] + d
    E = 0.5 * p.sample_weight * np.sum(aux["mask"] * (o - aux["targets"]) ** 2)
    return E + (reg_value(Ws, p.lambda_reg, p.beta_reg, p.w_limit) if p.lambda_reg else 0.0)


# ------------------------------------------------------------------------------------------------
# strategies
# ------------------------------------------------------------------------------------------------

@st.composite
def spike_pair(draw, max_T=60):
    T = draw(st.integers(1, max_T))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dens = draw(st.floats(0.0, 0.7)), draw(st.floats(0.0, 0.7))
    post = (rng.random(T) < dens[0]).astype(float)
    pre = (rng.random(T) < dens[1]).astype(float)
    return post, pre


taus = st.tuples(st.floats(1.5, 70.0), st.floats(1.0, 12.0)).filter(
    lambda t: abs(t[0] - t[1]) > 0.3)


@st.composite
def dense_case(draw, max_depth=3, spsp=None, w_lat=None, reg=None):
    """A random one-sample dense case with spikes in every layer most of the time."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    depth = draw(st.integers(1, max_depth))
    sizes = [int(v) for v in rng.integers(2, 7, size=depth + 1)]
    T = draw(st.integers(15, 50))
    tau_m, tau_s = draw(taus)
    params = dict(
        tau_m=tau_m, tau_s=tau_s, t_ref=draw(st.sampled_from([0, 1, 2, 1.7])),
        v_th=[float(v) for v in rng.uniform(0.5, 1.5, depth)],
        spsp=spsp or draw(st.sampled_from(["discrete", "code"])),
        w_lat=(w_lat if w_lat is not None else draw(st.sampled_from([0.0, 0.0, 1.0, 0.6]))),
        desired_count=float(draw(st.integers(2, 9))),
        undesired_count=float(draw(st.integers(0, 2))),
        margin=float(draw(st.integers(0, 2))), sample_weight=draw(st.floats(0.3, 2.0)),
        window=draw(st.sampled_from([None, 5, 12, 30])), e_silent=draw(st.floats(0.0, 0.5)),
        side_effect=draw(st.booleans()), side_silent=draw(st.floats(0.0, 1.0)),
        fix_target=draw(st.booleans()), effect_ratio=draw(st.booleans()),
        th_eps=draw(st.sampled_from([0.0, 1e-6])))
    if reg if reg is not None else draw(st.booleans()):
        params.update(lambda_reg=draw(st.floats(0.1, 5.0)), beta_reg=draw(st.floats(0.01, 0.5)),
                      w_limit=draw(st.floats(2.0, 8.0)))
    weights = [rng.uniform(-0.6, 1.6, (n_out, n_in)) for n_in, n_out in zip(sizes, sizes[1:])]
    inputs = (rng.random((T, sizes[0])) < rng.uniform(0.2, 0.6)).astype(np.float64)
    label = int(rng.integers(sizes[-1]))
    return weights, inputs, label, params


# ------------------------------------------------------------------------------------------------
# spec 11: the worked example, number by number
# ------------------------------------------------------------------------------------------------

W1_EX = np.array([[1.6, 0.9, -0.5], [0.4, 1.3, 1.1]])
W2_EX = np.array([[1.5, 0.6], [-0.7, 2.4]])
EX_PARAMS = dict(tau_m=8.0, tau_s=2.0, t_ref=1, v_th=[1.0, 1.0], desired_count=3.0,
                 undesired_count=1.0, margin=0.0)


def example_inputs():
    x = np.zeros((12, 3))
    x[[0, 2, 4, 6, 8], 0] = 1
    x[[1, 4, 7], 1] = 1
    x[[3, 9], 2] = 1
    return x


def test_spec11_forward_table():
    x = example_inputs()
    I1 = x @ W1_EX.T
    S1, v1, ep1 = lif_forward(I1[:, None, :], 8.0, 2.0, 1, 1.0, 0.0)
    ep_tab = [[0, 0], [1.6, 0.4], [1.7, 1.5], [2.45, 1.15], [0.725, 1.675], [2.8625, 2.5375],
              [1.43125, 1.26875], [2.31562, 1.03438], [2.05781, 1.81719], [2.62891, 1.30859],
              [0.814453, 1.7543], [0.407227, 0.877148]]
    v_tab = [[0, 0], [0.8, 0.2], [1.55, 0.925], [0, 1.38437], [0.3625, 0], [1.74844, 1.26875],
             [0, 0], [1.15781, 0.517188], [0, 1.36113], [1.31445, 0], [0, 0.877148],
             [0.203613, 1.20608]]
    np.testing.assert_allclose(ep1[:, 0], ep_tab, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v1[:, 0], v_tab, rtol=1e-5, atol=1e-6)
    assert np.flatnonzero(S1[:, 0, 0]).tolist() == [2, 5, 7, 9]
    assert np.flatnonzero(S1[:, 0, 1]).tolist() == [3, 5, 8, 11]
    S2, v2, ep2 = lif_forward((S1[:, 0] @ W2_EX.T)[:, None, :], 8.0, 2.0, 1, 1.0, 0.0)
    v2_tab = [[0, 0]] * 3 + [[0.75, -0.35], [1.33125, 0.71875], [0, 1.14141], [1.21875, 0],
                             [0, 0.553125], [1.05469, 0.410547], [0, 1.52251], [1.16367, 0],
                             [0, 0.11582]]
    np.testing.assert_allclose(v2[:, 0], v2_tab, rtol=1e-5, atol=1e-6)
    assert np.flatnonzero(S2[:, 0, 0]).tolist() == [4, 6, 8, 10]
    assert np.flatnonzero(S2[:, 0, 1]).tolist() == [5, 9]
    # (5.1b) for output 0: potentials at its spikes = Σ_j w_0j e_0|j
    assert v2[[4, 6, 8, 10], 0, 0].sum() == pytest.approx(4.76836, abs=1e-5)


@pytest.mark.parametrize("spsp, want", [
    ("discrete", dict(
        e2=[[2.55078, 1.57031], [1.82275, 1.6416]], s2=[1.19209, 1.33196],
        rho2=[[0.637695, 0.392578], [0.455688, 0.4104]], g1=[0.637561, 1.22051],
        e1=[[2.94727, 1.59766, 0.765625], [3.25378, 2.1394, 1.03418]], s1=[1.44268, 1.30508],
        dW1=[[4.58994, 2.48812, 1.19235], [9.15411, 6.01894, 2.90953]],
        dW2=[[5.59154, 3.44227], [4.25059, 3.82815]])),
    ("code", dict(
        e2=[[1.09989, 1.00871], [1.67282, 1.21451]], s2=[0.563765, 0.871921],
        rho2=[[0.274972, 0.252179], [0.418205, 0.303627]], g1=[0.119715, 0.880011],
        e1=[[1.18865, 1.07366, 0.553115], [1.89658, 1.33279, 0.982443]],
        s1=[0.647897, 0.892988],
        dW1=[[0.234495, 0.21181, 0.109117], [3.15942, 2.22023, 1.6366]],
        dW2=[[1.71997, 1.57739], [3.13139, 2.27346]])),
])
def test_spec11_backward_numbers(spsp, want):
    out = oracle.run_case("hm2bp", [W1_EX, W2_EX], example_inputs(), label=0,
                          params=dict(EX_PARAMS, spsp=spsp))
    aux = out
    assert [s.sum(axis=0).tolist() for s in out["spikes"]] == [[4, 4], [4, 2]]
    assert out["loss"] == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(aux["dE_do"][2], [1, 1], atol=1e-12)
    np.testing.assert_allclose(aux["delta"][2], [1, 1], atol=1e-12)
    for key, got in [("e2", aux["e"][2]), ("s2", aux["side"][2]), ("rho2", aux["rho"][2]),
                     ("g1", aux["dE_do"][1]), ("e1", aux["e"][1]), ("s1", aux["side"][1]),
                     ("dW1", out["grads"][0]), ("dW2", out["grads"][1])]:
        np.testing.assert_allclose(got, want[key], rtol=6e-6, err_msg=key)
    np.testing.assert_allclose(aux["delta"][1], want["g1"], rtol=6e-6)
    if spsp == "discrete":     # hand check of spec 11: e²_{0|0} summed over post spikes 4, 6, 8, 10
        assert aux["e"][2][0, 0] == pytest.approx(0.6875 + 0.5625 + 0.640625 + 0.66015625,
                                                  rel=1e-14)
        assert out["grads"][1][0, 0] == pytest.approx(2.55078125 * (1 + aux["side"][2][0]),
                                                      rel=1e-14)


# ------------------------------------------------------------------------------------------------
# the S-PSP (5.1): C4, C7, C8, C9, C11, and both variants against the table
# ------------------------------------------------------------------------------------------------

def kernel_spsp(post, pre, **params):
    p = HM2BPParams.from_dict(params)
    return spsp_matrix(p, post[:, None, None], pre[:, None, None])[0, 0, 0]


def test_C7_C8_hand_examples():
    T = 40
    post, pre = np.zeros(T), np.zeros(T)
    post[[10, 30]] = 1
    pre[[3, 20]] = 1
    c = 1 / (1 - 1 / 8)
    code = (c * (math.exp(-5 / 64) - math.exp(-5 / 8))
            + c * math.exp(-7 / 8) * (math.exp(-18 / 64) - math.exp(-18 / 8))
            + c * (math.exp(-8 / 64) - math.exp(-1)))
    assert code == pytest.approx(1.342779284, abs=1e-9)
    a, b = 63 / 64, 7 / 8
    disc = c * ((a**7 - b**7) + b**9 * (a**18 - b**18) + (a**10 - b**10))
    assert disc == pytest.approx(1.478179350, abs=1e-9)
    kw = dict(tau_m=64.0, tau_s=8.0, t_ref=2)
    assert kernel_spsp(post, pre, spsp="code", **kw) == pytest.approx(code, rel=1e-13)
    assert kernel_spsp(post, pre, spsp="discrete", **kw) == pytest.approx(disc, rel=1e-13)


@settings(deadline=None, max_examples=40)
@given(pair=spike_pair(), tau=taus, t_ref=st.sampled_from([0, 1, 2, 3]))
def test_C4_discrete_closed_form_equals_step_simulation(pair, tau, t_ref):
    post, pre = pair
    assume(post.any() and pre.any())
    want = step_spsp(post, pre, tau[0], tau[1], t_ref)
    got = kernel_spsp(post, pre, tau_m=tau[0], tau_s=tau[1], t_ref=t_ref)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


@settings(deadline=None, max_examples=60)
@given(pair=spike_pair(), tau=taus, t_ref=st.sampled_from([0, 1, 2, 3, 2.5]),
       spsp=st.sampled_from(["discrete", "code"]),
       window=st.sampled_from([None, 1, 3, 7, 20, 6.5]), e_silent=st.floats(0, 1))
def test_spsp_both_variants_equal_the_table_of_5_1(pair, tau, t_ref, spsp, window, e_silent):
    """Arbitrary post trains: spikes closer than t_ref give s <= 0 (as after a target fix)."""
    post, pre = pair
    want = naive_spsp(post, pre, tau[0], tau[1], t_ref, spsp, window, e_silent)
    got = kernel_spsp(post, pre, tau_m=tau[0], tau_s=tau[1], t_ref=t_ref, spsp=spsp,
                      window=window, e_silent=e_silent)
    assert got == pytest.approx(want, rel=1e-11, abs=1e-12)


@settings(deadline=None, max_examples=30)
@given(pair=spike_pair(), split=st.integers(0, 2**32 - 1), tau=taus,
       t_ref=st.sampled_from([0, 1, 2]), spsp=st.sampled_from(["discrete", "code"]),
       window=st.sampled_from([None, 4, 15]))
def test_C9_additivity_over_disjoint_pre_spike_sets(pair, split, tau, t_ref, spsp, window):
    post, pre = pair
    assume(post.any())
    mask = np.random.default_rng(split).random(len(pre)) < 0.5
    A, B = pre * mask, pre * ~mask
    assume(A.any() and B.any())
    kw = dict(tau_m=tau[0], tau_s=tau[1], t_ref=t_ref, spsp=spsp, window=window)
    whole = kernel_spsp(post, pre, **kw)
    assert whole == pytest.approx(kernel_spsp(post, A, **kw) + kernel_spsp(post, B, **kw),
                                  rel=1e-12, abs=1e-13)


def test_C11_silent_rules_and_target_fix():
    T = 30
    pre = np.zeros(T)
    pre[[2, 9]] = 1
    kw = dict(tau_m=20.0, tau_s=4.0, t_ref=1)
    for spsp in ("discrete", "code"):
        assert kernel_spsp(np.zeros(T), pre, spsp=spsp, e_silent=0.37, **kw) == 0.37
        assert kernel_spsp(pre, np.zeros(T), spsp=spsp, e_silent=0.37, **kw) == 0.0
    # 5.3: Δ = floor(T / int(desired)); spikes at kΔ, k >= 1, t < T; others unchanged
    S = np.zeros((400, 2, 10))
    S[[5, 50], 1, 3] = 1
    o = S.sum(axis=0)
    S_hat = fix_silent_target(S, o, np.array([4, 3]), 35)
    assert np.flatnonzero(S_hat[:, 0, 4]).tolist() == list(range(11, 400, 11))
    assert S_hat[:, 0, 4].sum() == 36
    np.testing.assert_array_equal(np.delete(S_hat, 4, axis=2)[:, 0], np.delete(S, 4, axis=2)[:, 0])
    np.testing.assert_array_equal(S_hat[:, 1], S[:, 1])      # label 3 fires: no fix


def test_target_fix_is_used_for_e_but_not_for_the_loss():
    """5.3: g_label = -β_s·desired from the original count; e^L from Ŝ^L."""
    rng = np.random.default_rng(3)
    W = [rng.uniform(-1, 0, (3, 4))]                    # output never fires
    x = (rng.random((40, 4)) < 0.5).astype(float)
    out = oracle.run_case("hm2bp", W, x, label=1,
                          params=dict(v_th=1.0, desired_count=8.0, undesired_count=0.0,
                                      margin=0.0, sample_weight=2.0))
    aux = out
    assert out["spikes"][0].sum() == 0
    np.testing.assert_allclose(aux["dE_do"][1], [0, -16.0, 0])
    assert np.flatnonzero(aux["S_post_out_fixed"][:, 1]).tolist() == [5, 10, 15, 20, 25, 30, 35]
    want = [naive_spsp(aux["S_post_out_fixed"][:, 1], x[:, j], 64.0, 8.0, 2, "discrete")
            for j in range(4)]
    np.testing.assert_allclose(aux["e"][1][1], want, rtol=1e-12)
    np.testing.assert_allclose(aux["e"][1][0], np.where(x.sum(0) > 0, 0.1, 0.0))


# ------------------------------------------------------------------------------------------------
# the T-PSP identity (5.1b): C5, C6 and the limit property
# ------------------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=25)
@given(case=dense_case(spsp="discrete"))
def test_C5_C6_tpsp_identity(case):
    weights, inputs, label, params = case
    params = dict(params, fix_target=False, th_eps=0.0)
    out = oracle.run_case("hm2bp", weights, inputs, label=label, params=params)
    aux = out
    p = HM2BPParams.from_dict(params)
    nu = thresholds(p, len(weights))
    for l, W in enumerate(weights, start=1):
        S = out["spikes"][l - 1]
        a = (W * aux["e"][l]).sum(axis=1)
        if l == len(weights) and p.w_lat:
            e_lat = spsp_matrix(p, S[:, None, :], S[:, None, :])[0]
            a = a - p.w_lat * (e_lat.sum(axis=1) - np.diag(e_lat))
        v_sum = aux["v_fire"][l].sum(axis=0)
        fires = S.sum(axis=0) > 0
        np.testing.assert_allclose(a[fires], v_sum[fires], rtol=1e-10, atol=1e-10)   # C5
        assert np.all(a[fires] >= nu[l - 1] * S.sum(axis=0)[fires] - 1e-10)           # C6
        over = aux["v_fire"][l] - nu[l - 1] * S                                        # limit
        assert np.all(a[fires] < nu[l - 1] * S.sum(0)[fires]
                      + S.sum(0)[fires] * over.max(axis=0)[fires] + 1e-10)


# ------------------------------------------------------------------------------------------------
# exact parts against central differences: C1, C2, C3
# ------------------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 12), margin=st.floats(0, 4),
       beta_s=st.floats(0.1, 3.0))
def test_C1_output_error_is_the_derivative_of_the_count_loss(seed, n, margin, beta_s):
    rng = np.random.default_rng(seed)
    o = rng.uniform(0, 40, (1, n))
    lab = np.array([int(rng.integers(n))])
    y = np.where(np.arange(n) == lab[0], 35.0, 5.0)
    assume(np.all(np.abs(np.abs(o[0] - y) - margin) > 1e-3))        # away from the kinks
    beta = np.array([beta_s])
    E, _, _, g = count_loss(o, lab, 35.0, 5.0, margin, beta)
    fd = central_fd(lambda: float(count_loss(o, lab, 35.0, 5.0, margin, beta)[0][0]), [o],
                    h=1e-5)[0]
    rep = compare([g], [fd], rtol=1e-7)
    assert rep.passed, rep


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from([(3, 4), (5, 2), (2, 3, 2, 2)]),
       lam=st.floats(0.1, 10), beta=st.floats(0.01, 0.5), L=st.floats(1.0, 8.0))
def test_C2_regulariser_gradient(seed, shape, lam, beta, L):
    W = np.random.default_rng(seed).uniform(-3, 3, shape)
    grad = np.zeros((shape[0], int(np.prod(shape[1:]))))
    R = regulariser(W.reshape(shape[0], -1), lam, beta, L, grad)
    assert R == pytest.approx(reg_value([W], lam, beta, L), rel=1e-13)
    fd = central_fd(lambda: reg_value([W], lam, beta, L), [W], h=1e-5)[0]
    rep = compare([grad.reshape(shape)], [fd], rtol=1e-6)
    assert rep.passed, rep


@settings(deadline=None, max_examples=40)
@given(case=dense_case())
def test_C3_tangent_surrogate_dense(case):
    weights, inputs, label, params = case
    out = oracle.run_case("hm2bp", weights, inputs, label=label, params=params)
    p = HM2BPParams.from_dict(params)
    W0s = [w.copy() for w in weights]
    Ws = [w.copy() for w in weights]
    f = lambda: tangent_loss(Ws, W0s, out, p)                       # noqa: E731
    assert f() == pytest.approx(out["loss"], rel=1e-12, abs=1e-12)
    fd = central_fd(f, Ws, h=1e-4)
    rep = compare(out["grads"], fd, rtol=1e-6, scale="global")
    assert rep.passed, rep


# ------------------------------------------------------------------------------------------------
# approximations by their properties: C10a, C10b
# ------------------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=25)
@given(case=dense_case(w_lat=0.0, reg=False))
def test_C10a_sign_at_the_output_layer(case):
    weights, inputs, label, params = case
    weights[-1] = np.abs(weights[-1])
    params = dict(params, side_effect=True)
    out = oracle.run_case("hm2bp", weights, inputs, label=label, params=params)
    delta, e, side = out["delta"][-1], out["e"][-1], out["side"][-1]
    dW = out["grads"][-1]
    pos = (e > 0) & (delta[:, None] != 0) & (1 + side[:, None] > 0)
    assert np.all(np.sign(dW[pos]) == np.sign(np.broadcast_to(delta[:, None], dW.shape)[pos]))


@settings(deadline=None, max_examples=15)
@given(case=dense_case(reg=False))
def test_C10b_no_gradient_inside_the_dead_zone(case):
    weights, inputs, label, params = case
    params = dict(params, margin=1000.0)
    out = oracle.run_case("hm2bp", weights, inputs, label=label, params=params)
    assert out["loss"] == 0.0
    assert all(np.all(g == 0) for g in out["grads"])


def test_lateral_factor_by_hand():
    """5.7 on a 2-output case: Λ_j = 1/(1 - w0² ρ_lj d_l ρ_jl d_j)."""
    weights, inputs = [np.array([[1.2, 0.8, 0.5], [0.9, 1.1, 0.7]])], np.zeros((40, 3))
    inputs[::3, 0] = inputs[1::4, 1] = inputs[2::5, 2] = 1
    params = dict(v_th=1.0, tau_m=10.0, tau_s=3.0, t_ref=1, w_lat=0.7, desired_count=30.0,
                  undesired_count=0.0, margin=0.0)
    out = oracle.run_case("hm2bp", weights, inputs, label=0, params=params)
    S = out["spikes"][0]
    o = S.sum(axis=0)
    assert np.all(o > 0)
    p = HM2BPParams.from_dict(params)
    e = spsp_matrix(p, S[:, None, :], S[:, None, :])[0]
    r10, r01 = e[1, 0] / o[0], e[0, 1] / o[1]
    lam = 1 / (1 - 0.49 * r10 * r01 / 1.0)
    np.testing.assert_allclose(out["lat_factor"], [lam, lam], rtol=1e-13)


# ------------------------------------------------------------------------------------------------
# forward properties (2.1)
# ------------------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**32 - 1), T=st.integers(1, 40), t_ref=st.integers(0, 4),
       w_lat=st.sampled_from([0.0, 1.0]))
def test_forward_delay_clamp_and_no_spike_at_0(seed, T, t_ref, w_lat):
    rng = np.random.default_rng(seed)
    I = rng.uniform(-1, 3, (T, 2, 4))
    S, v, ep = lif_forward(I, 10.0, 3.0, t_ref, 1.0, w_lat)
    assert not S[0].any()
    for b in range(2):
        for i in range(4):
            ts = np.flatnonzero(S[:, b, i])
            assert np.all(np.diff(ts) > t_ref)                   # next spike at τ + t_ref + 1
    I2 = I.copy()
    I2[-1] += 100.0                                              # the last input step is never read
    np.testing.assert_array_equal(lif_forward(I2, 10.0, 3.0, t_ref, 1.0, w_lat)[0], S)
    if T > 2:                                                    # a change at t reaches S from t+1
        I3 = I.copy()
        I3[T // 2] += 5.0
        S3 = lif_forward(I3, 10.0, 3.0, t_ref, 1.0, w_lat)[0]
        np.testing.assert_array_equal(S3[:T // 2 + 1], S[:T // 2 + 1])


def test_threshold_is_strict():
    I = np.zeros((2, 1, 1))
    I[0] = 4.0                                          # ep = 4 at t = 1, v = 4/τ_s = 1 exactly
    assert lif_forward(I, 10.0, 4.0, 0, 1.0, 0.0)[0][1, 0, 0] == 0
    assert lif_forward(I, 10.0, 4.0, 0, 1.0 - 1e-6, 0.0)[0][1, 0, 0] == 1


# ------------------------------------------------------------------------------------------------
# the public golden cases (spec README): spikes equal, loss & grads within 1e-9
# ------------------------------------------------------------------------------------------------

GOLDEN_CASES = json.loads(GOLDEN.read_text())["cases"]


@pytest.mark.parametrize("case", GOLDEN_CASES, ids=[f"g{i}" for i in range(len(GOLDEN_CASES))])
def test_golden_case(case):
    out = oracle.run_case("hm2bp", case["weights"], case["inputs"], label=case["label"],
                          params=case["params"])
    ex = case["expected"]
    for a, b in zip(ex["spikes"], out["spikes"]):
        np.testing.assert_array_equal(np.asarray(a), b)
    scale = max([abs(ex["loss"])] + [float(np.abs(np.asarray(g)).max()) for g in ex["grads"]])
    assert abs(out["loss"] - ex["loss"]) <= 1e-9 * scale
    for a, b in zip(ex["grads"], out["grads"]):
        assert np.abs(np.asarray(a) - b).max() <= 1e-9 * scale


def test_golden_cases_cover_the_switches():
    ps = [c["params"] for c in GOLDEN_CASES]
    assert {p["spsp"] for p in ps} == {"discrete", "code"}
    assert any(p.get("w_lat", 0) > 0 for p in ps) and any(p.get("lambda_reg", 0) > 0 for p in ps)
    fixed = 0
    for c in GOLDEN_CASES:
        out = oracle.run_case("hm2bp", c["weights"], c["inputs"], label=c["label"],
                              params=c["params"])
        fixed += int(not np.array_equal(out["S_post_out_fixed"], out["spikes"][-1]))
    assert fixed >= 1                                    # the silent-target fix is exercised


# ------------------------------------------------------------------------------------------------
# parameters and user errors
# ------------------------------------------------------------------------------------------------

def test_params_defaults_and_errors():
    p = HM2BPParams()
    assert (p.tau_m, p.tau_s, p.t_ref, p.v_th, p.spsp, p.look_back) == (64.0, 8.0, 2, 20.0,
                                                                        "discrete", 256.0)
    assert HM2BPParams(t_ref=1.7).n_ref == 1
    with pytest.raises(ConfigError, match="'desired' is called 'desired_count'"):
        HM2BPParams.from_dict({"desired": 30})
    with pytest.raises(ConfigError, match="spsp='exact' is not valid"):
        HM2BPParams(spsp="exact")
    with pytest.raises(ConfigError, match="different values"):
        HM2BPParams(tau_m=8.0, tau_s=8.0)
    for bad in (dict(v_th=0.0), dict(margin=-1.0), dict(window=0.0), dict(tau_s=0.5),
                dict(t_ref=-1), dict(w_limit=0.0)):
        with pytest.raises(ConfigError):
            HM2BPParams(**bad)


def test_run_case_user_errors():
    W = [np.ones((2, 3))]
    x = np.zeros((10, 3))
    with pytest.raises(ConfigError, match="one per spiking layer"):
        oracle.run_case("hm2bp", W, x, label=0, params=dict(v_th=[1.0, 2.0]))
    with pytest.raises(ConfigError, match="not a class"):
        oracle.run_case("hm2bp", W, x, label=5)
    with pytest.raises(ConfigError, match="not a target"):
        oracle.run_case("hm2bp", W, x, target=[1.0, 0.0])
    with pytest.raises(ConfigError, match="no biases"):
        oracle.run_case("hm2bp", W, x, label=0, biases=[np.zeros(2)])
    with pytest.raises(ShapeError, match="0 or 1"):
        oracle.run_case("hm2bp", W, x + 0.5, label=0)
    with pytest.raises(ConfigError, match="int\\(desired_count\\) <= T"):
        oracle.run_case("hm2bp", W, x, label=0, params=dict(desired_count=35.0))


# ------------------------------------------------------------------------------------------------
# conv (5.8) and spiking pooling (5.9)
# ------------------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**32 - 1), H=st.integers(2, 7), W=st.integers(2, 7),
       k=st.integers(1, 3), stride=st.integers(1, 3))
def test_spiking_pool_map_and_its_exact_adjoint(seed, H, W, k, stride):
    rng = np.random.default_rng(seed)
    pool = SpikingPool2d((2, H, W), k, stride)
    assert pool.out_shape == (2, -(-H // stride), -(-W // stride))        # ceil(D/stride)
    x = rng.normal(size=(3, 2, 2, H, W))
    y = pool.forward(x)
    X, Y = pool.out_shape[1] - 1, pool.out_shape[2] - 1              # a border window, cut short
    rows = slice(X * stride, min(H, X * stride + k))
    cols = slice(Y * stride, min(W, Y * stride + k))
    want = x[..., rows, cols].sum((-1, -2))
    np.testing.assert_allclose(y[..., X, Y], want, rtol=1e-13)
    g = rng.normal(size=y.shape)
    gx, grads = pool.backward(g, x)
    assert grads == []
    fd = central_fd(lambda: float(np.vdot(g, pool.forward(x))), [x], h=1e-3)[0]
    assert compare([gx], [fd], rtol=1e-9).passed


def conv_net(rng, params, arch="7x7x1-2c3-a2-4-3", T=30, B=1):
    from refsnn.network import Network
    net = Network.build(arch, "hm2bp", params, rng=rng)
    for layer in net.layers:
        for a in layer.params:
            a[...] = rng.uniform(-0.4, 1.4, a.shape)
    x = (rng.random((T, B) + net.in_shape) < rng.uniform(0.2, 0.5)).astype(np.float64)
    return net, x


def tangent_net(Ws, W0s, rec, layers, p):
    """Spec 6.1 C3 over dense, conv and pooling layers, geometry written out here (5.8, 5.9)."""
    spk = [layer for layer in layers if layer.kind != "flatten"]
    nu = thresholds(p, len(spk))
    d = np.zeros(rec["counts"][0].shape[1])
    wi = 0
    for pos, layer in enumerate(spk):
        e, rho = rec["e"][pos + 1][0], rec["rho"][pos + 1][0]
        if layer.kind == "dense":
            s = rec["side"][pos + 1][0]
            lam = rec["lat_factor"][0] if pos == len(spk) - 1 else 1.0
            d = (((Ws[wi] - W0s[wi]) * e).sum(1) * (1 + s) * lam + (W0s[wi] * rho) @ d) / nu[pos]
            wi += 1
            continue
        C, H, Wd = layer.in_shape
        Co, Ho, Wo = layer.out_shape
        new = np.zeros(Co * Ho * Wo)
        if layer.kind == "conv":
            s = rec["side"][pos + 1][0]
            k, st_, P = layer.k, layer.stride, layer.padding
            for oc in range(Co):
                for x in range(Ho):
                    for y in range(Wo):
                        n = (oc * Ho + x) * Wo + y
                        A = Bv = 0.0
                        for c in range(C):
                            for ki in range(k):
                                for kj in range(k):
                                    xi, yi = x * st_ + ki - P, y * st_ + kj - P
                                    if 0 <= xi < H and 0 <= yi < Wd:
                                        q, j = (c * k + ki) * k + kj, (c * H + xi) * Wd + yi
                                        A += (Ws[wi] - W0s[wi])[oc, c, ki, kj] * e[n, q]
                                        Bv += W0s[wi][oc, c, ki, kj] * rho[n, q] * d[j]
                        new[n] = (A * (1 + s[n]) + Bv) / nu[pos]
            wi += 1
        else:
            kp, st_ = layer.k, layer.stride
            for c in range(C):
                for X in range(Ho):
                    for Y in range(Wo):
                        n = (c * Ho + X) * Wo + Y
                        for di in range(kp):
                            for dj in range(kp):
                                xi, yi = X * st_ + di, Y * st_ + dj
                                if xi < H and yi < Wd:
                                    j = (c * H + xi) * Wd + yi
                                    new[n] += rho[n, di * kp + dj] * d[j] / kp**2
        d = new
    o = rec["counts"][len(spk)][0] + d
    E = 0.5 * p.sample_weight * np.sum(rec["mask"][0] * (o - rec["targets"][0]) ** 2)
    return E + (reg_value(Ws, p.lambda_reg, p.beta_reg, p.w_limit) if p.lambda_reg else 0.0)


@settings(deadline=None, max_examples=15)
@given(seed=st.integers(0, 2**32 - 1), spsp=st.sampled_from(["discrete", "code"]),
       arch=st.sampled_from(["7x7x1-2c3-a2-4-3", "6x6x2-2c3p1-a2-3", "8x8x1-2c3s2-a2-3-3",
                             "5x5x1-3c2-a2-2c2-3"]),
       side=st.booleans(), ratio=st.booleans(), w_lat=st.sampled_from([0.0, 1.0]),
       reg=st.booleans())
def test_C3_tangent_surrogate_conv_and_pool(seed, spsp, arch, side, ratio, w_lat, reg):
    rng = np.random.default_rng(seed)
    from refsnn.network import parse_arch
    n_sp = len(parse_arch(arch)[1])
    params = dict(spsp=spsp, tau_m=12.0, tau_s=3.0, t_ref=1, w_lat=w_lat, window=15,
                  v_th=[float(v) for v in rng.uniform(0.6, 1.4, n_sp)], desired_count=6.0,
                  undesired_count=1.0, margin=0.0, side_effect=side, effect_ratio=ratio,
                  th_eps=1e-6)
    if reg:
        params.update(lambda_reg=1.5, beta_reg=0.3, w_limit=3.0)
    net, x = conv_net(rng, params, arch)
    label = np.array([int(rng.integers(3))])
    trace = net.forward(x)
    rec = {}
    grads = net.method._backward(net.p, net.layers, trace, label, rec)
    W0s = [a.copy() for a in net.params()]
    Ws = [a.copy() for a in net.params()]
    f = lambda: tangent_net(Ws, W0s, rec, net.layers, net.p)             # noqa: E731
    assert f() == pytest.approx(trace.loss, rel=1e-12, abs=1e-12)
    fd = central_fd(f, Ws, h=1e-4)
    rep = compare([g for gl in grads for g in gl], fd, rtol=1e-6, scale="global")
    assert rep.passed, rep


@settings(deadline=None, max_examples=10)
@given(seed=st.integers(0, 2**32 - 1), spsp=st.sampled_from(["discrete", "code"]),
       arch=st.sampled_from(["7x7x1-2c3-a2-4-3", "6x6x2-2c3p1-a2-3", "5-4-3"]),
       w_lat=st.sampled_from([0.0, 1.0]), reg=st.booleans())
def test_fd_objective_is_the_C3_surrogate(seed, spsp, arch, w_lat, reg):
    """Method.fd_objective (`refsnn gradcheck`): its F equals the reference surrogate above at
    perturbed weights, equals the loss at W0, and its grads are the method's gradient."""
    rng = np.random.default_rng(seed)
    from refsnn.network import parse_arch
    n_sp = len(parse_arch(arch)[1])
    params = dict(spsp=spsp, tau_m=12.0, tau_s=3.0, t_ref=1, w_lat=w_lat, window=15,
                  v_th=[float(v) for v in rng.uniform(0.6, 1.4, n_sp)], desired_count=6.0,
                  undesired_count=1.0, margin=0.0, sample_weight=float(rng.uniform(0.5, 2)))
    if reg:
        params.update(lambda_reg=1.5, beta_reg=0.3, w_limit=3.0)
    net, x = conv_net(rng, params, arch, B=2)
    labels = rng.integers(0, 3, 2)
    chk = net.method.fd_objective(net.p, net.layers, x, labels)
    trace = net.forward(x)
    grads = net.method.backward(net.p, net.layers, trace, labels)
    assert chk.F() == pytest.approx(trace.loss, rel=1e-12, abs=1e-12)
    for a, b in zip(chk.grads, [g for gl in grads for g in gl]):
        np.testing.assert_array_equal(a, b)
    W0s = [a.copy() for a in net.params()]
    recs = []
    for b in range(2):                         # the reference works on one sample at a time
        recs.append({})
        net.method.backward(net.p, net.layers, net.forward(x[:, b:b + 1]), labels[b:b + 1],
                            record=recs[-1])
    for a in net.params():
        a += rng.normal(0, 0.3, a.shape)
    want = sum(tangent_net(net.params(), W0s, rec, net.layers, net.p) for rec in recs)
    assert chk.F() == pytest.approx(want, rel=1e-12, abs=1e-12)


@settings(deadline=None, max_examples=10)
@given(seed=st.integers(0, 2**32 - 1), arch=st.sampled_from(["7x7x1-2c3-a2-4-3",
                                                             "6x6x2-2c3p1-a3-3"]))
def test_C5_tpsp_identity_in_conv_and_pool_layers(seed, arch):
    rng = np.random.default_rng(seed)
    from refsnn.network import parse_arch
    n_sp = len(parse_arch(arch)[1])
    params = dict(tau_m=12.0, tau_s=3.0, t_ref=1, fix_target=False,
                  v_th=[float(v) for v in rng.uniform(0.6, 1.4, n_sp)])
    net, x = conv_net(rng, params, arch)
    trace = net.forward(x)
    rec = {}
    net.method._backward(net.p, net.layers, trace, np.array([0]), rec)
    spk = [(li, layer) for li, layer in enumerate(net.layers) if layer.kind != "flatten"]
    for pos, (li, layer) in enumerate(spk[:2]):                   # the conv and the pool layer
        e = rec["e"][pos + 1][0]
        pre, widx = net.method._table(layer)
        w = layer.params[0].reshape(-1)[widx] if layer.params else np.ones(widx.shape)
        a = np.where(pre >= 0, w * e, 0.0).sum(axis=1)
        st_ = trace.states[li]
        S = st_.spikes[:, 0].reshape(x.shape[0], -1)
        v_sum = np.where(S > 0, st_.v[:, 0].reshape(S.shape), 0.0).sum(axis=0)
        fires = S.sum(axis=0) > 0
        assert fires.any()
        np.testing.assert_allclose(a[fires], v_sum[fires], rtol=1e-10, atol=1e-10)


def test_conv_layers_ignore_th_eps():
    rng = np.random.default_rng(1)
    params = dict(tau_m=12.0, tau_s=3.0, t_ref=1, v_th=[1.0, 1.0, 1.0, 1.0])
    net, x = conv_net(rng, params)
    a = net.forward(x)
    net.p = net.p.replace(th_eps=0.3)
    b = net.forward(x)
    np.testing.assert_array_equal(a.states[0].spikes, b.states[0].spikes)        # conv: v > ν
    assert b.states[1].spikes.sum() > a.states[1].spikes.sum()                    # pool: ν - ε


# ------------------------------------------------------------------------------------------------
# the batch engine: B > 1 equals run_case per sample; float32 agrees with float64
# ------------------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=15)
@given(case=dense_case(), B=st.integers(2, 4), seed=st.integers(0, 2**32 - 1))
def test_batch_engine_equals_run_case_per_sample(case, B, seed):
    from refsnn.layers import Dense
    from refsnn.network import Network
    weights, inputs, label, params = case
    rng = np.random.default_rng(seed)
    T, n0 = inputs.shape
    xs = [inputs] + [(rng.random((T, n0)) < 0.4).astype(float) for _ in range(B - 1)]
    labels = np.array([label] + [int(rng.integers(weights[-1].shape[0])) for _ in range(B - 1)])
    net = Network([Dense(W.copy()) for W in weights], "hm2bp", params)
    x = np.stack(xs, axis=1)
    loss, grads, trace = net.loss_and_grads(x, net.make_target(labels, T))
    outs = [oracle.run_case("hm2bp", weights, xs[b], label=labels[b], params=params)
            for b in range(B)]
    assert loss == pytest.approx(sum(o["loss"] for o in outs), rel=1e-12, abs=1e-12)
    for l, g in enumerate(grads):
        want = sum(o["grads"][l] for o in outs)
        np.testing.assert_allclose(g, want, rtol=1e-11, atol=1e-11 * max(1, np.abs(want).max()))
    for b in range(B):
        for st_, s in zip(trace.spiking_states, outs[b]["spikes"]):
            np.testing.assert_array_equal(st_.spikes[:, b], s)
    np.testing.assert_array_equal(net.method.scores(net.p, trace.states[-1]),
                                  np.stack([o["spikes"][-1].sum(0) for o in outs]))


def test_conv_batch_equals_single_samples():
    rng = np.random.default_rng(7)
    params = dict(tau_m=12.0, tau_s=3.0, t_ref=1, v_th=[1.0, 1.2, 0.9, 1.0], spsp="code",
                  w_lat=1.0, desired_count=8.0, undesired_count=1.0, margin=0.0)
    net, x = conv_net(rng, params, B=3)
    labels = np.array([0, 2, 1])
    loss, grads, _ = net.loss_and_grads(x, labels)
    parts = [net.loss_and_grads(x[:, b:b + 1], labels[b:b + 1]) for b in range(3)]
    assert loss == pytest.approx(sum(q[0] for q in parts), rel=1e-12)
    for l, g in enumerate(grads):
        want = sum(q[1][l] for q in parts)
        np.testing.assert_allclose(g, want, rtol=1e-11, atol=1e-11 * np.abs(want).max())
        assert np.abs(g).max() > 0


@pytest.mark.parametrize("spsp", ["discrete", "code"])
def test_float32_agrees_with_float64(spsp):
    from refsnn.network import Network
    params = dict(tau_m=20.0, tau_s=4.0, t_ref=1, v_th=[1.0, 1.0], spsp=spsp, w_lat=1.0,
                  desired_count=10.0, undesired_count=2.0, margin=1.0, window=25,
                  lambda_reg=1.0, beta_reg=0.2, w_limit=4.0)
    compared = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        net64 = Network.build("12-8-4", "hm2bp", params, seed=seed)
        for a in net64.params():
            a[...] = rng.uniform(-0.3, 0.9, a.shape)
        net32 = Network.build("12-8-4", "hm2bp", params, seed=seed, dtype=np.float32)
        for a, b in zip(net32.params(), net64.params()):
            a[...] = b
        x = (rng.random((40, 3, 12)) < 0.4).astype(np.float64)
        labels = np.array([0, 1, 3])
        l64, g64, t64 = net64.loss_and_grads(x, labels)
        l32, g32, t32 = net32.loss_and_grads(x.astype(np.float32), labels)
        if not all(np.array_equal(a.spikes, b.spikes)
                   for a, b in zip(t64.spiking_states, t32.spiking_states)):
            continue                                     # a spike flipped by float32 rounding
        compared += 1
        assert g32[0].dtype == np.float32
        assert l32 == pytest.approx(l64, rel=1e-5)
        for a, b in zip(g32, g64):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    assert compared >= 3


def test_presets_and_defaults_are_valid_training_configs():
    from refsnn.config import TrainConfig
    from refsnn.network import parse_arch
    m = HM2BP()
    for name, cfg in dict(m.presets, default=m.defaults).items():
        tc = TrainConfig().merged(cfg)
        p = HM2BPParams.from_dict(tc.params)
        n_sp = len(parse_arch(tc.arch)[1])
        if np.ndim(p.v_th):
            assert len(p.v_th) == n_sp, name
    mlp = m.presets["mnist-mlp"]
    assert (mlp["arch"], mlp["T"], mlp["params"]["v_th"]) == ("784-800-10", 400, (20.0, 8.0))
    assert mlp["params"]["lambda_reg"] == 10.0 and mlp["params"]["beta_reg"] == 0.04


def test_init_is_uniform_without_fan_in_scaling():
    from refsnn.network import Network
    net = Network.build("28x28x1-15c5-a2-300-10", "hm2bp", seed=0)
    conv, pool, dense = net.layers[0], net.layers[1], net.layers[3]
    assert pool.kind == "spikepool" and pool.params == []
    assert 0.45 < np.abs(conv.params[0]).max() <= 0.5
    assert 0.95 < np.abs(dense.params[0]).max() <= 1.0
    assert abs(dense.params[0].mean()) < 0.01 and abs(dense.params[0].std() - 1 / np.sqrt(3)) < 0.01


@pytest.mark.slow
def test_default_run_learns_on_a_subset_of_mnist10k(tmp_path):
    """The default of `refsnn train --method hm2bp`, shortened: 1500 digits, 1 epoch."""
    from refsnn.config import TrainConfig
    from refsnn.train import train
    cfg = TrainConfig().merged(dict(HM2BP.defaults)).merged(dict(n_train=1500, n_test=400,
                                                                 epochs=1))
    report = train(cfg, "hm2bp", tmp_path / "run", quiet=True)
    assert report["test_acc"] > 0.75                            # chance is 0.10


# ------------------------------------------------------------------------------------------------
# spec 6.4: the official code's golden vectors (needs a checkout of jinyyy666/mm-bp-snn; the repo
# carries no licence, so its data are not copied here: set REFSNN_MMBP_ROOT to the checkout)
# ------------------------------------------------------------------------------------------------

def _mmbp_root():
    import os
    root = os.environ.get("REFSNN_MMBP_ROOT", "")
    path = Path(root) / "test" / "golden" / "speech" / "ti_alpha"
    if not root or not path.is_dir():
        pytest.skip("set REFSNN_MMBP_ROOT to a checkout of jinyyy666/mm-bp-snn (spec 6.4)")
    return path


def _golden_spikes(path, T, n):
    S = np.zeros((T, n))
    for line in path.read_text().split("\n"):
        if line.strip():
            i, t = (int(v) for v in line.split())
            if i >= 0 and t < T:                    # "-1 -1" frames the list; t >= T is outside
                S[t, i] = 1
    return S


def _golden_weights(path, n_post, n_pre):
    W = np.full((n_post, n_pre), np.nan)
    for line in path.read_text().split("\n"):
        if line.strip():
            _, pre, post, w = line.split()
            W[int(post.rsplit("_", 1)[1]), int(pre.rsplit("_", 1)[1])] = float(w)
    assert not np.isnan(W).any()
    return W


def test_spec_6_4_official_golden_update():
    root = _mmbp_root()
    T = 658
    X = _golden_spikes(root / "spikes/Reservoir_Response/0/reservoir_spikes_0_0.dat", T, 135)
    H = _golden_spikes(root / "spikes/Hidden_Response_Supv/train/0/hidden_0_spikes_0_0.dat", T, 64)
    O = _golden_spikes(root / "spikes/Readout_Response_Supv/train/0/readout_spikes_0_0.dat", T, 26)
    W = [_golden_weights(root / "weights/h_weights_info.txt", 64, 135),
         _golden_weights(root / "weights/o_weights_info.txt", 26, 64)]
    W1 = [_golden_weights(root / "weights/h_weights_info_trained.txt", 64, 135),
          _golden_weights(root / "weights/o_weights_info_trained.txt", 26, 64)]
    assert (X.sum(), H.sum(), O.sum()) == (4900, 344, 38)
    misses = {}
    for spsp, side in (("code", True), ("discrete", True), ("code", False)):
        out = oracle.run_case("hm2bp", W, X, label=0, params=dict(
            spsp=spsp, side_effect=side, effect_ratio=False, th_eps=1e-6, v_th=[20.0, 5.0]))
        np.testing.assert_array_equal(out["spikes"][0], H)
        np.testing.assert_array_equal(out["spikes"][1], O)
        fixed = np.flatnonzero(out["S_post_out_fixed"][:, 0])
        assert fixed.tolist() == list(range(18, T, 18))                 # 36 spikes at 18, 36, ...
        misses[spsp, side] = max(np.abs(w - 1e-5 * g - w1).max()        # one SGD step, lr 1e-5
                                 for w, g, w1 in zip(W, out["grads"], W1))
    assert misses["code", True] < 1.5e-6                                # printing precision
    assert misses["discrete", True] > 1e-5 and misses["code", False] > 1e-4


# ------------------------------------------------------------------------------------------------
# boosting (spec 7): per-sample weights β_n and their epoch update
# ------------------------------------------------------------------------------------------------

def test_boost_weights_by_hand():
    from refsnn.methods.hm2bp import boost_weights
    labels = np.array([0, 0, 1, 1, 1])
    beta = np.array([1.0, 3.0, 1.0, 1.0, 2.0])
    wrong = np.array([True, False, True, True, False])
    # err_0 = 1/(1+3) = 0.25, err_1 = (1+1)/(1+1+2) = 0.5; only wrong samples grow
    want = [math.exp(0.25 / 20), 3.0, math.exp(0.5 / 20), math.exp(0.5 / 20), 2.0]
    np.testing.assert_allclose(boost_weights(beta, labels, wrong, 3), want, rtol=1e-15)
    np.testing.assert_array_equal(boost_weights(beta, labels, np.zeros(5, bool), 3), beta)
    with pytest.raises(ShapeError, match="one value per training sample"):
        boost_weights(beta, labels[:4], wrong, 3)


@settings(deadline=None, max_examples=10)
@given(case=dense_case(reg=False), B=st.integers(2, 4), seed=st.integers(0, 2**32 - 1))
def test_per_sample_boosting_weights_scale_each_sample(case, B, seed):
    """4.2-4.3 with β_s = sample_weight·β_n per sample: the batch loss and gradient are the sums
    of the single-sample ones run with sample_weight·β_n; the surrogate check still holds."""
    from refsnn import gradcheck
    from refsnn.layers import Dense
    from refsnn.methods.hm2bp import BoostedLabels
    weights, _, _, params = case
    rng = np.random.default_rng(seed)
    T = 30
    x = (rng.random((T, B, weights[0].shape[1])) < 0.4).astype(np.float64)
    labels = rng.integers(0, weights[-1].shape[0], B)
    beta = rng.uniform(0.0, 3.0, B)
    p = HM2BPParams.from_dict(params)
    layers = [Dense(w.copy()) for w in weights]
    trace = METHOD.forward(p, layers, x)
    grads = METHOD.backward(p, layers, trace, BoostedLabels(labels, beta))
    loss, want = 0.0, [np.zeros_like(w) for w in weights]
    for b in range(B):
        out = oracle.run_case("hm2bp", weights, x[:, b], label=int(labels[b]),
                              params=dict(params, sample_weight=p.sample_weight * beta[b]))
        loss += out["loss"]
        want = [a + g for a, g in zip(want, out["grads"])]
    assert trace.loss == pytest.approx(loss, rel=1e-12, abs=1e-12)
    for g, w in zip(grads, want):
        np.testing.assert_allclose(g[0], w, rtol=1e-11, atol=1e-11 * max(1.0, np.abs(w).max()))
    chk = METHOD.fd_objective(p, layers, x, BoostedLabels(labels, beta))
    assert chk.F() == pytest.approx(trace.loss, rel=1e-12, abs=1e-12)
    rep = gradcheck.check(chk.F, [l.params[0] for l in layers], chk.grads, h=chk.h,
                          rtol=chk.rtol, scale="global")
    assert rep.passed, rep
    with pytest.raises(ConfigError, match="one per sample"):
        METHOD.backward(p, layers, trace, BoostedLabels(labels, beta[:1]))
