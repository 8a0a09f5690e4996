"""refsnn.optim: each optimizer against an independent hand computation; state; schedules."""

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from refsnn.config import TrainConfig
from refsnn.errors import CheckpointError
from refsnn.optim import SGD, Adam, AdamW, clip_grad_norm, grad_norm, lr_at, make_optimizer

vec = arrays(np.float64, st.integers(1, 6), elements=st.floats(-2, 2))


def quad_grads(a, params):
    """f(w) = Σ a·w²/2 per array: ∇f = a·w."""
    return [ai * w for ai, w in zip(a, params)]


# ---- SGD -------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=20)
@given(w0=vec, data=st.data(), lr=st.floats(0.001, 0.5), mu=st.sampled_from([0.0, 0.5, 0.9]),
       wd=st.sampled_from([0.0, 1e-3, 0.1]), n=st.integers(1, 6))
def test_sgd_on_a_quadratic_follows_the_linear_recurrence(w0, data, lr, mu, wd, n):
    # per entry, (w, B) evolves by the matrix [[1 - lr·c·μ... ]]: B' = μB + c·w, w' = w - lr·B',
    # with c = a + wd (coupled decay): (w', B') = M (w, B), M = [[1 - lr c, -lr μ], [c, μ]]
    a = data.draw(arrays(np.float64, w0.shape, elements=st.floats(0.0, 3.0)))
    w = w0.copy()
    opt = SGD([w], momentum=mu, weight_decay=wd)
    for _ in range(n):
        opt.step([w], quad_grads([a], [w]), lr)
    for i in range(w0.size):
        c = a[i] + wd
        M = np.array([[1 - lr * c, -lr * mu], [c, mu]])
        want = np.linalg.matrix_power(M, n) @ np.array([w0[i], 0.0])
        assert w[i] == pytest.approx(want[0], rel=1e-12, abs=1e-14)
        if mu:
            assert opt.buffers["momentum_buffer"][0][i] == pytest.approx(want[1], rel=1e-12,
                                                                          abs=1e-14)


def test_sgd_hand_numbers():
    # w0 = 1, f = w²/2, lr 0.1, μ 0.9: B1 = 1, w1 = 0.9; B2 = 0.9 + 0.9 = 1.8, w2 = 0.72
    w = np.array([1.0])
    opt = SGD([w], momentum=0.9)
    opt.step([w], [w.copy()], 0.1)
    assert w[0] == pytest.approx(0.9, rel=1e-15)
    opt.step([w], [w.copy()], 0.1)
    assert w[0] == pytest.approx(0.72, rel=1e-15)


# ---- Adam / AdamW ----------------------------------------------------------------------------

def adam_reference(w0, grad_fn, lr, b1, b2, eps, n, wd=0.0, decoupled=False):
    """Adam in the hm2bp 7 / tsslbp 7 form: w ← w − lr·(m/(1−β1^k)) / (√(v/(1−β2^k)) + ε)."""
    w = w0.copy()
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for k in range(1, n + 1):
        g = grad_fn(w)
        if decoupled:
            w = w - lr * wd * w
        else:
            g = g + wd * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        w = w - lr * (m / (1 - b1 ** k)) / (np.sqrt(v / (1 - b2 ** k)) + eps)
    return w


@settings(deadline=None, max_examples=25)
@given(w0=vec, data=st.data(), lr=st.floats(1e-4, 0.1), b1=st.sampled_from([0.0, 0.5, 0.9]),
       b2=st.sampled_from([0.9, 0.999]), eps=st.sampled_from([1e-8, 1e-3]),
       wd=st.sampled_from([0.0, 0.01, 0.1]), decoupled=st.booleans(), n=st.integers(1, 8))
def test_adam_and_adamw_match_the_spec_form_on_a_quadratic(w0, data, lr, b1, b2, eps, wd,
                                                          decoupled, n):
    a = data.draw(arrays(np.float64, w0.shape, elements=st.floats(0.1, 3.0)))
    w = w0.copy()
    cls = AdamW if decoupled else Adam
    opt = cls([w], betas=(b1, b2), eps=eps, weight_decay=wd)
    for _ in range(n):
        opt.step([w], [a * w], lr)
    want = adam_reference(w0, lambda x: a * x, lr, b1, b2, eps, n, wd, decoupled)
    np.testing.assert_allclose(w, want, rtol=1e-12, atol=1e-15)
    assert opt.k == n


def test_adam_two_steps_by_hand_in_exact_arithmetic():
    # f = w²/2 from w0 = 1; lr 1/10, β = (9/10, 999/1000), ε = 0. Step 1: m̂ = g, √v̂ = |g|,
    # so w1 = 1 - 1/10 = 9/10. Step 2 in fractions, the one square root in float at the end.
    w = np.array([1.0])
    opt = Adam([w], betas=(0.9, 0.999), eps=0.0)
    opt.step([w], [w.copy()], 0.1)
    assert w[0] == pytest.approx(0.9, rel=1e-15)
    opt.step([w], [w.copy()], 0.1)
    b1, b2, g1, g2 = Fraction(9, 10), Fraction(999, 1000), Fraction(1), Fraction(9, 10)
    m = b1 * (1 - b1) * g1 + (1 - b1) * g2            # 0.18
    v = b2 * (1 - b2) * g1 ** 2 + (1 - b2) * g2 ** 2  # 0.001809
    mhat, vhat = m / (1 - b1 ** 2), v / (1 - b2 ** 2)
    want = 0.9 - 0.1 * float(mhat) / math.sqrt(float(vhat))
    assert w[0] == pytest.approx(want, rel=1e-14)
    assert want == pytest.approx(0.800412, abs=1e-6)


def test_adamw_decay_is_decoupled_and_adam_decay_is_coupled():
    # zero loss gradient: AdamW only shrinks w by (1 - lr·wd) per step (m = v = 0 -> no Adam
    # move); Adam sees g = wd·w, so its first step moves w by about lr (m̂/√v̂ = sign(w)).
    w0 = np.array([2.0, -0.5])
    w = w0.copy()
    opt = AdamW([w], weight_decay=0.1)
    for _ in range(5):
        opt.step([w], [np.zeros(2)], 0.01)
    np.testing.assert_allclose(w, w0 * (1 - 0.01 * 0.1) ** 5, rtol=1e-15)
    w = w0.copy()
    Adam([w], weight_decay=0.1).step([w], [np.zeros(2)], 0.01)
    np.testing.assert_allclose(w, w0 - 0.01 * np.sign(w0), rtol=1e-6)


def test_adamw_without_decay_is_adam_bit_for_bit():
    rng = np.random.default_rng(1)
    w1, w2 = rng.normal(size=(3, 4)), None
    w2 = w1.copy()
    o1, o2 = Adam([w1]), AdamW([w2])
    for _ in range(4):
        g = rng.normal(size=(3, 4))
        o1.step([w1], [g], 1e-2)
        o2.step([w2], [g], 1e-2)
    assert np.array_equal(w1, w2)


def test_float32_parameters_keep_their_dtype_and_state():
    w = np.ones((2, 3), np.float32)
    opt = Adam([w])
    opt.step([w], [np.full((2, 3), 0.5)], 1e-3)
    assert w.dtype == np.float32 and opt.buffers["m"][0].dtype == np.float32
    np.testing.assert_allclose(w, 1 - 1e-3, rtol=1e-6)


# ---- state -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_state_save_and_restore_continues_bit_for_bit(name):
    cfg = TrainConfig(optimizer=name, momentum=0.9 if name == "sgd" else 0.0, weight_decay=0.01)
    rng = np.random.default_rng(0)
    params = [rng.normal(size=(4, 5)), rng.normal(size=(4,))]
    grads = [[rng.normal(size=p.shape) for p in params] for _ in range(6)]
    opt = make_optimizer(cfg, params)
    for g in grads[:3]:
        opt.step(params, g, 1e-2)
    saved_w = [p.copy() for p in params]
    saved = opt.state_dict()
    for g in grads[3:]:
        opt.step(params, g, 1e-2)
    # a fresh optimizer restored from the saved state and weights
    params2 = [w.copy() for w in saved_w]
    opt2 = make_optimizer(cfg, params2)
    opt2.load_state_dict(saved)
    for g in grads[3:]:
        opt2.step(params2, g, 1e-2)
    assert opt2.k == opt.k == 6
    for a, b in zip(params, params2):
        assert np.array_equal(a, b)
    # the saved state is a copy, not a view of the live buffers
    assert saved["k"] == 3


def test_restoring_a_foreign_state_is_a_checkpoint_error():
    w = [np.zeros(3)]
    with pytest.raises(CheckpointError, match="adam"):
        SGD(w).load_state_dict(Adam(w).state_dict())
    bad = Adam([np.zeros(4)]).state_dict()
    with pytest.raises(CheckpointError, match="shapes"):
        Adam(w).load_state_dict(bad)


def test_step_refuses_mismatched_gradients():
    w = np.zeros((2, 2))
    with pytest.raises(ValueError, match="shape"):
        SGD([w]).step([w], [np.zeros(3)], 0.1)


# ---- clipping --------------------------------------------------------------------------------

def test_clip_grad_norm_scales_to_max_norm_only_when_above():
    g = [np.array([3.0, 0.0]), np.array([[4.0]])]          # global norm 5
    out, n = clip_grad_norm(g, 1.0)
    assert n == pytest.approx(5.0)
    assert grad_norm(out) == pytest.approx(1.0 * 5 / (5 + 1e-6), rel=1e-12)
    np.testing.assert_allclose(out[0], [3 / (5 + 1e-6), 0.0], rtol=1e-14)
    assert g[0][0] == 3.0                                   # inputs untouched
    out, n = clip_grad_norm(g, 10.0)
    assert out[0] is g[0] and out[1] is g[1]


# ---- schedules -------------------------------------------------------------------------------

def test_constant_and_step_schedules_at_their_boundaries():
    c = TrainConfig(lr=1e-3)
    assert [lr_at(c, e) for e in (0, 5, 99)] == [1e-3] * 3
    s = TrainConfig(lr=1e-3, lr_schedule="step", lr_milestones=(41, 81), lr_gamma=0.1)
    assert lr_at(s, 40) == 1e-3
    assert lr_at(s, 41) == pytest.approx(1e-4, rel=1e-15)
    assert lr_at(s, 80) == lr_at(s, 41)
    assert lr_at(s, 81) == pytest.approx(1e-5, rel=1e-15)
    assert lr_at(s, 81) == 1e-3 * 0.1 * 0.1                # cumulative product, as the codes do


def test_inv_sqrt_schedule_is_hm2bp_section_7():
    c = TrainConfig(lr=1e-3, lr_schedule="inv_sqrt", epochs=200)
    assert lr_at(c, 0) == 1e-3 and lr_at(c, 1) == 1e-3
    assert lr_at(c, 4) == pytest.approx(5e-4, rel=1e-15)
    assert lr_at(c, 199) == pytest.approx(7.089e-5, rel=1e-3)   # the MLP log's last epoch


def test_warmup_cosine_schedule_is_bpsta_section_7():
    c = TrainConfig(lr=1e-3, lr_schedule="warmup_cosine", warmup_epochs=5, epochs=300)
    got = [lr_at(c, e) for e in range(6)]
    want = [2e-4, 2.5e-4, 1e-3 / 3, 5e-4, 1e-3, 1e-3]
    np.testing.assert_allclose(got, want, rtol=1e-15)
    assert lr_at(c, 5 + 295 // 2) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 147 / 295)))
    assert lr_at(c, 299) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 294 / 295)))
    assert 0 < lr_at(c, 299) < 1e-6


def test_lr_at_rejects_a_negative_epoch():
    with pytest.raises(Exception, match="epoch"):
        lr_at(TrainConfig(), -1)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_fortran_ordered_parameters_are_updated_in_place_like_c_ordered_ones(name):
    # Network stores dense W in Fortran order (Wᵀ contiguous); gradients may come in either
    # order, a resumed state is restored into that layout, and every update is the same bits
    cfg = TrainConfig(optimizer=name, momentum=0.9 if name == "sgd" else 0.0, weight_decay=0.01)
    rng = np.random.default_rng(1)
    w_c = rng.normal(size=(5, 3))
    w_f = np.asfortranarray(w_c)
    grads = [rng.normal(size=(5, 3)) for _ in range(4)]
    opt_c, opt_f = make_optimizer(cfg, [w_c]), make_optimizer(cfg, [w_f])
    for k, g in enumerate(grads[:2]):
        opt_c.step([w_c], [g], 1e-2)
        opt_f.step([w_f], [g if k % 2 else np.asfortranarray(g)], 1e-2)
    assert w_f.flags.f_contiguous and not w_f.flags.c_contiguous
    assert np.array_equal(w_c, w_f)
    opt_r = make_optimizer(cfg, [w_f])
    opt_r.load_state_dict(opt_f.state_dict())
    w_r = w_f.copy(order="F")
    for g in grads[2:]:
        opt_c.step([w_c], [g], 1e-2)
        opt_r.step([w_r], [g], 1e-2)
    assert np.array_equal(w_c, w_r)
    for bufs_c, bufs_r in zip(opt_c.buffers.values(), opt_r.buffers.values()):
        assert np.array_equal(bufs_c[0], bufs_r[0]) and bufs_r[0].flags.f_contiguous


def test_a_parameter_that_is_not_contiguous_is_refused():
    w = np.zeros((4, 6))[:, ::2]
    opt = SGD([w])
    with pytest.raises(ValueError, match="contiguous"):
        opt.step([w], [np.ones_like(w)], 0.1)
