"""refsnn.layers: Dense (S1/S15), Conv2d (S17), AvgPool2d (S18), Flatten (stbp spec 5.7).

Each forward is checked against a reference that takes another road (einsum over explicit padded
windows, scipy's correlate2d, explicit window sums, the flatten index formula); each backward
against central finite differences in float64 and by the adjoint identity <g, L x> = <Lᵀ g, x>.
"""

import numba
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.signal import correlate2d

from refsnn import gradcheck
from refsnn.errors import ShapeError
from refsnn.layers import AvgPool2d, Conv2d, Dense, Flatten, init_rownorm, init_torch

H_FD = 1e-6            # central-difference step
RTOL_FD = 1e-6         # pass rule of the specs' FD checks: max|fd - an| / max|an|
RTOL_EXACT = 1e-12     # forward vs reference, adjoint identity


# ------------------------------------------------------------------------------ references
def conv_reference(x, W, b, stride, padding):
    """S17 by explicit windows of the zero-padded input, contracted with einsum."""
    T, B, C, H, Wd = x.shape
    Co, _, k, _ = W.shape
    xp = np.pad(x, ((0, 0),) * 3 + ((padding, padding),) * 2)
    Ho = (H + 2 * padding - k) // stride + 1
    Wo = (Wd + 2 * padding - k) // stride + 1
    win = np.empty((T, B, C, Ho, Wo, k, k))
    for y in range(Ho):
        for xo in range(Wo):
            win[:, :, :, y, xo] = xp[:, :, :, stride * y:stride * y + k, stride * xo:stride * xo + k]
    out = np.einsum("tbcyxij,ocij->tboyx", win, W)
    return out if b is None else out + b[:, None, None]


def pool_reference(x, k):
    """S18 by summing the k² strided sub-grids of the cropped map."""
    Ho, Wo = x.shape[-2] // k, x.shape[-1] // k
    acc = np.zeros(x.shape[:-2] + (Ho, Wo))
    for i in range(k):
        for j in range(k):
            acc += x[..., i:Ho * k:k, j:Wo * k:k]
    return acc / (k * k)


def fd_check(layer, x, G, rng, n_max=60):
    """Hand gradients (input and every parameter) of f = <G, layer(x)> vs central differences,
    on every entry of an array, or on n_max entries drawn at random from a larger one."""
    f = lambda: float(np.vdot(G, layer.forward(x)))
    gx, grads = layer.backward(G, x)
    arrays = [x] + list(layer.params)
    mask = []
    for a in arrays:
        m = np.zeros(a.size, dtype=bool)
        m[rng.permutation(a.size)[:n_max]] = True
        mask.append(m.reshape(a.shape))
    fd = gradcheck.central_fd(f, arrays, h=H_FD, mask=mask)
    return gradcheck.compare([gx] + grads, fd, names=["x"] + layer.param_names, rtol=RTOL_FD)


def adjoint_gap(lhs_terms, rhs):
    """|<g, L x> - <Lᵀ g, x>| relative to the sum of |terms| (the rounding scale)."""
    lhs = float(np.sum(lhs_terms))
    return abs(lhs - rhs) / max(float(np.sum(np.abs(lhs_terms))), 1e-300)


# ------------------------------------------------------------------------------ strategies
@st.composite
def conv_cases(draw, max_hw=9, max_tb=3):
    k = draw(st.integers(1, 4))
    stride = draw(st.integers(1, 3))
    padding = draw(st.integers(0, 2))
    H = draw(st.integers(max(1, k - 2 * padding), max_hw))
    Wd = draw(st.integers(max(1, k - 2 * padding), max_hw))
    C, Co = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    T, B = draw(st.integers(1, max_tb)), draw(st.integers(1, max_tb))
    bias = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    wscale = draw(st.floats(0.1, 3.0))
    W = rng.uniform(-wscale, wscale, (Co, C, k, k))
    b = rng.standard_normal(Co) if bias else None
    if draw(st.booleans()):
        x = (rng.random((T, B, C, H, Wd)) < 0.3).astype(np.float64)     # spikes
    else:
        x = rng.standard_normal((T, B, C, H, Wd))                      # analog
    return Conv2d(W, b, in_hw=(H, Wd), stride=stride, padding=padding), x, rng


@st.composite
def dense_cases(draw):
    n_in, n_out = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    T, B = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    W = rng.uniform(-1, 1, (n_out, n_in)) * draw(st.floats(0.1, 3.0))
    b = rng.standard_normal(n_out) if draw(st.booleans()) else None
    return Dense(W, b), rng.standard_normal((T, B, n_in)), rng


@st.composite
def pool_cases(draw):
    k = draw(st.integers(1, 3))
    C, H, Wd = draw(st.integers(1, 3)), draw(st.integers(k, 9)), draw(st.integers(k, 9))
    T, B = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    return AvgPool2d((C, H, Wd), k=k), rng.standard_normal((T, B, C, H, Wd)), rng


# ------------------------------------------------------------------------------ conv
@settings(deadline=None, max_examples=40)
@given(case=conv_cases())
def test_conv_forward_matches_explicit_windows(case):
    layer, x, _ = case
    y = layer.forward(x)
    ref = conv_reference(x, layer.W, layer.b, layer.stride, layer.padding)
    assert y.shape == ref.shape == x.shape[:2] + layer.out_shape
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, ref, rtol=0, atol=RTOL_EXACT * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("C, H, Co, k, p", [(1, 28, 15, 5, 0), (15, 12, 40, 5, 0),
                                            (1, 28, 32, 3, 1), (32, 14, 32, 3, 1)])
def test_conv_preset_shapes_match_scipy_correlate(C, H, Co, k, p):
    # the presets' shapes, with T·B = 45 > the kernels' 32 chunks (several samples per chunk)
    rng = np.random.default_rng(C * 100 + Co)
    T, B = 5, 9
    W, b = rng.uniform(-0.3, 0.3, (Co, C, k, k)), rng.standard_normal(Co)
    x = (rng.random((T, B, C, H, H)) < 0.2).astype(np.float64)
    layer = Conv2d(W, b, in_hw=(H, H), padding=p)
    y = layer.forward(x)
    xs = x.reshape(-1, C, H, H)
    ys = y.reshape(-1, *layer.out_shape)
    for n in (0, 17, T * B - 1):
        for o in range(Co):
            ref = b[o] + sum(correlate2d(np.pad(xs[n, c], p), W[o, c], mode="valid")
                             for c in range(C))
            np.testing.assert_allclose(ys[n, o], ref, rtol=0, atol=1e-12 * max(1, np.abs(ref).max()))
    g = rng.standard_normal(y.shape)
    gx, (dW, db) = layer.backward(g, x)
    # <g, conv(x, W)> = <dW, W> = <g_x, x>: exact identities of the bilinear map
    lhs = g * (y - b[:, None, None])
    assert adjoint_gap(lhs, float(np.vdot(dW, W))) < RTOL_EXACT
    assert adjoint_gap(lhs, float(np.vdot(gx, x))) < RTOL_EXACT
    np.testing.assert_allclose(db, g.sum(axis=(0, 1, 3, 4)), rtol=1e-13)


def test_conv_hand_example():
    # x = 0..15 on a 4x4 map, W = [[1, 0], [0, -1]], stride 2, padding 1, b = 0.5:
    # windows at rows/cols {-1, 0}, {1, 2}, {3, 4}; out[y, x] = x[2y-1, 2x-1] - x[2y, 2x] + 0.5
    x = np.arange(16.0).reshape(1, 1, 1, 4, 4)
    layer = Conv2d(np.array([[[[1.0, 0.0], [0.0, -1.0]]]]), np.array([0.5]), in_hw=(4, 4),
                   stride=2, padding=1)
    assert layer.out_shape == (1, 3, 3)
    want = [[0 - 0 + 0.5, 0 - 2 + 0.5, 0 + 0.5],
            [0 - 8 + 0.5, 5 - 10 + 0.5, 7 + 0.5],
            [0 + 0.5, 13 + 0.5, 15 + 0.5]]
    np.testing.assert_array_equal(layer.forward(x)[0, 0, 0], want)
    # the input gradient of g = 1 everywhere: +1 where a window's (0,0) tap lands, -1 for (1,1)
    gx, (dW, db) = layer.backward(np.ones((1, 1, 1, 3, 3)), x)
    want_gx = np.zeros((4, 4))
    want_gx[1::2, 1::2] += 1           # tap (0, 0) reads rows/cols 1, 3 (and the padding -1)
    want_gx[0::2, 0::2] -= 1           # tap (1, 1) reads rows/cols 0, 2, 4 (4 is padding)
    np.testing.assert_array_equal(gx[0, 0, 0], want_gx)
    # dW[i, j] = sum of the inputs tap (i, j) reads
    np.testing.assert_array_equal(dW[0, 0], [[5 + 7 + 13 + 15, 4 + 6 + 12 + 14],
                                             [1 + 3 + 9 + 11, 0 + 2 + 8 + 10]])
    assert db.tolist() == [9.0]


@settings(deadline=None, max_examples=20)
@given(case=conv_cases(max_hw=7, max_tb=2))
def test_conv_backward_matches_central_differences(case):
    layer, x, rng = case
    G = rng.standard_normal(x.shape[:2] + layer.out_shape)
    rep = fd_check(layer, x, G, rng)
    assert rep.passed, rep


@settings(deadline=None, max_examples=40)
@given(case=conv_cases())
def test_conv_adjoint_identity(case):
    layer, x, rng = case
    y = layer.forward(x)
    g = rng.standard_normal(y.shape)
    gx, grads = layer.backward(g, x)
    b = layer.b if layer.b is not None else np.zeros(layer.out_shape[0])
    lhs = g * (y - b[:, None, None])                               # <g, conv(x; W)>
    assert adjoint_gap(lhs, float(np.vdot(gx, x))) < RTOL_EXACT   # input adjoint
    assert adjoint_gap(lhs, float(np.vdot(grads[0], layer.W))) < RTOL_EXACT   # weight adjoint
    if layer.b is not None:
        assert adjoint_gap(g * b[:, None, None], float(np.vdot(grads[1], b))) < RTOL_EXACT
    gx2, grads2 = layer.backward(g, x, need_input_grad=False)
    assert gx2 is None and all(np.array_equal(a, c) for a, c in zip(grads, grads2))


def test_conv_with_a_full_size_kernel_is_a_dense_layer():
    rng = np.random.default_rng(3)
    W, b = rng.standard_normal((4, 2, 5, 5)), rng.standard_normal(4)
    x = rng.standard_normal((3, 2, 2, 5, 5))
    conv, dense = Conv2d(W, b, in_hw=(5, 5)), Dense(W.reshape(4, -1), b)
    y = conv.forward(x)
    np.testing.assert_allclose(y[..., 0, 0], dense.forward(x.reshape(3, 2, -1)), rtol=1e-13)
    g = rng.standard_normal(y.shape)
    gx, (dW, db) = conv.backward(g, x)
    gx_d, (dW_d, db_d) = dense.backward(g[..., 0, 0], x.reshape(3, 2, -1))
    np.testing.assert_allclose(gx.reshape(gx_d.shape), gx_d, rtol=1e-12)
    np.testing.assert_allclose(dW.reshape(dW_d.shape), dW_d, rtol=1e-12)
    np.testing.assert_allclose(db, db_d, rtol=1e-13)


def test_conv_weight_grad_does_not_depend_on_the_thread_count():
    rng = np.random.default_rng(5)
    layer = Conv2d(rng.standard_normal((6, 3, 3, 3)), in_hw=(10, 10), padding=1)
    x = rng.standard_normal((7, 11, 3, 10, 10))
    g = rng.standard_normal((7, 11) + layer.out_shape)
    n0 = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = layer.backward(g, x)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = layer.backward(g, x)
    finally:
        numba.set_num_threads(n0)
    assert np.array_equal(one[0], many[0]) and np.array_equal(one[1][0], many[1][0])


# ------------------------------------------------------------------------------ dense
@settings(deadline=None, max_examples=30)
@given(case=dense_cases())
def test_dense_forward_backward(case):
    layer, x, rng = case
    y = layer.forward(x)
    ref = np.einsum("tbj,ij->tbi", x, layer.W) + (0 if layer.b is None else layer.b)
    np.testing.assert_allclose(y, ref, rtol=0, atol=RTOL_EXACT * max(1.0, np.abs(ref).max()))
    g = rng.standard_normal(y.shape)
    gx, grads = layer.backward(g, x)
    lhs = g * np.einsum("tbj,ij->tbi", x, layer.W)
    assert adjoint_gap(lhs, float(np.vdot(gx, x))) < RTOL_EXACT
    assert adjoint_gap(lhs, float(np.vdot(grads[0], layer.W))) < RTOL_EXACT
    rep = fd_check(layer, x, g, rng)
    assert rep.passed, rep


# ------------------------------------------------------------------------------ pooling
@settings(deadline=None, max_examples=30)
@given(case=pool_cases())
def test_avgpool_forward_backward(case):
    layer, x, rng = case
    k = layer.k
    y = layer.forward(x)
    np.testing.assert_allclose(y, pool_reference(x, k), rtol=0,
                               atol=RTOL_EXACT * max(1.0, np.abs(x).max()))
    g = rng.standard_normal(y.shape)
    gx, params = layer.backward(g, x)
    assert params == []
    assert adjoint_gap(g * y, float(np.vdot(gx, x))) < RTOL_EXACT
    H, Wd = layer.in_shape[1:]
    assert not gx[..., (H // k) * k:, :].any() and not gx[..., (Wd // k) * k:].any()   # S18
    rep = fd_check(layer, x, g, rng)
    assert rep.passed, rep


def test_avgpool_hand_example():
    # S18 on a 3x5 map, k = 2: the last row and column are read by no window
    x = np.arange(15.0).reshape(1, 1, 1, 3, 5)
    layer = AvgPool2d((1, 3, 5), k=2)
    np.testing.assert_array_equal(layer.forward(x)[0, 0, 0], [[(0 + 1 + 5 + 6) / 4, (2 + 3 + 7 + 8) / 4]])
    gx, _ = layer.backward(np.array([[[[[4.0, 8.0]]]]]), x)
    np.testing.assert_array_equal(gx[0, 0, 0], [[1, 1, 2, 2, 0], [1, 1, 2, 2, 0], [0, 0, 0, 0, 0]])


# ------------------------------------------------------------------------------ flatten
def test_flatten_is_c_order_and_backward_inverts_it():
    C, H, W = 3, 4, 5
    x = np.random.default_rng(1).standard_normal((2, 3, C, H, W))
    layer = Flatten((C, H, W))
    y = layer.forward(x)
    assert y.shape == (2, 3, C * H * W)
    for c, yy, xx in [(0, 0, 0), (2, 3, 4), (1, 2, 0), (2, 0, 3)]:
        assert y[1, 2, c * H * W + yy * W + xx] == x[1, 2, c, yy, xx]
    gx, params = layer.backward(y, x)
    assert params == [] and np.array_equal(gx, x)


# ------------------------------------------------------------------------------ precision
def _all_layers(rng, dtype):
    W = rng.uniform(-0.5, 0.5, (4, 2, 3, 3))
    Wd = rng.uniform(-0.5, 0.5, (5, 2 * 6 * 6))
    return [Conv2d(W.astype(dtype), rng.standard_normal(4).astype(dtype), in_hw=(7, 6),
                   stride=1, padding=1),
            Conv2d(W.astype(dtype), None, in_hw=(8, 9), stride=2, padding=0),
            Dense(Wd.astype(dtype), rng.standard_normal(5).astype(dtype)),
            AvgPool2d((2, 7, 6), k=2), Flatten((2, 7, 6))]


def test_float32_agrees_with_float64_and_stays_float32():
    rng = np.random.default_rng(7)
    L64, L32 = _all_layers(np.random.default_rng(8), np.float64), _all_layers(
        np.random.default_rng(8), np.float32)
    for l64, l32 in zip(L64, L32):
        x = rng.standard_normal((3, 4) + l64.in_shape)
        g = rng.standard_normal((3, 4) + l64.out_shape)
        y64, y32 = l64.forward(x), l32.forward(x.astype(np.float32))
        assert y32.dtype == np.float32, l32.describe()
        (gx64, p64), (gx32, p32) = l64.backward(g, x), l32.backward(g.astype(np.float32),
                                                                   x.astype(np.float32))
        for a64, a32 in zip([y64, gx64] + p64, [y32, gx32] + p32):
            assert a32.dtype == np.float32, l32.describe()
            np.testing.assert_allclose(a32, a64, rtol=0, atol=1e-5 * max(1, np.abs(a64).max()),
                                       err_msg=l32.describe())
        # float64 weights read by a float32 input: cast down, output float32
        y_mixed = l64.forward(x.astype(np.float32))
        assert y_mixed.dtype == np.float32
        np.testing.assert_allclose(y_mixed, y64, rtol=0, atol=1e-5 * max(1, np.abs(y64).max()))


# ------------------------------------------------------------------------------ errors
def test_shape_errors_say_what_and_how():
    conv = Conv2d(np.zeros((15, 1, 5, 5)), np.zeros(15), in_hw=(28, 28))
    with pytest.raises(ShapeError, match=r"\(T, B, 1, 28, 28\).*time-major"):
        conv.forward(np.zeros((64, 1, 28, 28)))                 # no time axis
    with pytest.raises(ShapeError, match="dtype int64"):
        conv.forward(np.zeros((2, 3, 1, 28, 28), dtype=np.int64))
    y = conv.forward(np.zeros((2, 3, 1, 28, 28)))
    with pytest.raises(ShapeError, match=r"\(T, B\)"):
        conv.backward(y, np.zeros((3, 2, 1, 28, 28)))          # T and B swapped
    with pytest.raises(ShapeError, match="forward input x"):
        conv.backward(y, None)
    dense = Dense(np.zeros((10, 784)))
    with pytest.raises(ShapeError, match=r"expected \(T, B, 784\).*swapaxes"):
        dense.forward(np.zeros((5, 784)))
    with pytest.raises(ShapeError, match="n_out, n_in"):
        Dense(np.zeros(5))
    with pytest.raises(ShapeError, match=r"shape \(10,\)"):
        Dense(np.zeros((10, 784)), np.zeros(11))
    with pytest.raises(ShapeError, match="square"):
        Conv2d(np.zeros((2, 1, 3, 5)), in_hw=(9, 9))
    with pytest.raises(ShapeError, match="does not fit"):
        Conv2d(np.zeros((2, 1, 5, 5)), in_hw=(3, 3), padding=0)
    with pytest.raises(ShapeError, match="stride"):
        Conv2d(np.zeros((2, 1, 3, 3)), in_hw=(9, 9), stride=0)
    with pytest.raises(ShapeError, match="padding"):
        Conv2d(np.zeros((2, 1, 3, 3)), in_hw=(9, 9), padding=-1)
    with pytest.raises(ShapeError, match="does not fit"):
        AvgPool2d((3, 1, 8), k=2)
    with pytest.raises(ShapeError, match="dtype int64"):
        Dense(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ShapeError, match=r"\(T, B, 2, 3, 4\)"):
        Flatten((2, 3, 4)).forward(np.zeros((1, 1, 24)))


def test_describe():
    assert Dense(np.zeros((400, 784))).describe() == "dense 784->400"
    assert (Conv2d(np.zeros((15, 1, 5, 5)), in_hw=(28, 28)).describe()
            == "conv 1x28x28 -> 15c5 s1 p0 -> 15x24x24")
    assert AvgPool2d((15, 24, 24)).describe() == "avgpool2 15x24x24 -> 15x12x12"
    assert Flatten((40, 4, 4)).describe() == "flatten 40x4x4 -> 640"
    assert [L.kind for L in (Dense(np.zeros((1, 1))), Conv2d(np.zeros((1, 1, 1, 1)), in_hw=(1, 1)),
                             AvgPool2d((1, 2, 2)), Flatten((1, 2)))] == ["dense", "conv", "avgpool",
                                                                          "flatten"]


# ------------------------------------------------------------------------------ init
@settings(deadline=None, max_examples=20)
@given(shape=st.one_of(st.tuples(st.integers(1, 30), st.integers(1, 30)),
                       st.tuples(st.integers(1, 8), st.integers(1, 4), st.integers(1, 5),
                                 st.integers(1, 5))),
       seed=st.integers(0, 2 ** 32 - 1), dtype=st.sampled_from([np.float64, np.float32]))
def test_init_rules(shape, seed, dtype):
    fan_in = int(np.prod(shape[1:]))
    W = init_torch(fan_in, shape, np.random.default_rng(seed), dtype)
    assert W.shape == shape and W.dtype == dtype
    assert np.abs(W).max() <= np.float32(1 / np.sqrt(fan_in))       # U(-1/√fan_in, 1/√fan_in)
    if W.size >= 200:
        assert np.abs(W).max() > 0.8 / np.sqrt(fan_in)              # fills the interval
    R = init_rownorm(shape, np.random.default_rng(seed), dtype)
    assert R.shape == shape and R.dtype == dtype
    np.testing.assert_allclose(np.linalg.norm(R.reshape(shape[0], -1).astype(np.float64), axis=1),
                               1.0, rtol=1e-6 if dtype == np.float32 else 1e-14)   # S23


def test_init_is_seeded():
    a = init_rownorm((5, 3, 2, 2), np.random.default_rng(11))
    b = init_rownorm((5, 3, 2, 2), np.random.default_rng(11))
    assert np.array_equal(a, b)
    with pytest.raises(ShapeError, match="fan_in"):
        init_torch(0, (3, 0), np.random.default_rng(0))
