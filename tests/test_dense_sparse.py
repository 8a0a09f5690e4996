"""The event-driven dense kernels (refsnn/kernels/dense.py) against the GEMM they replace.

S1 forward and S15 weight gradient on 0/1 inputs: equal to the GEMM to 1e-12 relative in float64
(another order of the same sum), whatever the shapes and the density; the path choice (0/1 test,
density, size); STBP spikes bit-identical and gradients equal through the whole network; every
method's public golden case with the event path forced.
"""

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from refsnn import layers
from refsnn.kernels import dense
from refsnn.network import Network
from refsnn.oracle import run_case

GOLDEN = Path(__file__).parent / "golden"
FAST = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextmanager
def mode(value):
    """refsnn.kernels.dense.MODE = value inside the block (restored afterwards)."""
    old, dense.MODE = dense.MODE, value
    try:
        yield
    finally:
        dense.MODE = old


def spikes(rng, shape, density, dtype=np.float64):
    return (rng.random(shape) < density).astype(dtype)


def rel_err(got, want):
    """max |got - want| / max |want| (the error relative to the largest entry)."""
    return float(np.max(np.abs(got - want))) / max(float(np.max(np.abs(want))), 1e-300)


case = st.tuples(st.integers(1, 40), st.integers(1, 50), st.integers(1, 40),
                 st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))


# ---------------------------------------------------------------------------------------------
# Event lists
# ---------------------------------------------------------------------------------------------

@settings(max_examples=30, **FAST)
@given(c=case)
def test_event_lists_are_the_nonzeros_by_row_and_by_column(c):
    R, n, _, density, seed = c
    x = spikes(np.random.default_rng(seed), (R, n), density)
    idx = np.empty((R, n), np.int32)
    cnt = np.empty(R, np.int64)
    assert dense.build_events(x, idx, cnt) == 0
    for r in range(R):
        assert np.array_equal(idx[r, :cnt[r]], np.flatnonzero(x[r]))
    ptr, rows = dense.events_by_column(idx, cnt, n)
    assert ptr[0] == 0 and ptr[-1] == np.count_nonzero(x)
    for j in range(n):
        assert np.array_equal(rows[ptr[j]:ptr[j + 1]], np.flatnonzero(x[:, j]))


@pytest.mark.parametrize("value", [0.5, 2.0, -1.0, np.nan, np.inf])
def test_an_entry_other_than_0_or_1_sends_the_layer_to_the_gemm(value):
    rng = np.random.default_rng(1)
    x = spikes(rng, (30, 20), 0.1)
    x[7, 3] = value
    idx, cnt = np.empty((30, 20), np.int32), np.empty(30, np.int64)
    assert dense.build_events(x, idx, cnt) == 1
    W = rng.normal(size=(50, 20))
    layer = layers.Dense(W.copy(), np.zeros(50))
    with mode("events"):
        assert dense.spike_events(x, 50) is None
        I = layer.forward(x[None])[0]
    np.testing.assert_array_equal(I, x @ W.T + 0.0)          # the GEMM, NaN/inf included


def test_path_choice_follows_density_size_and_width():
    rng = np.random.default_rng(2)
    f64, f32 = np.dtype(np.float64), np.dtype(np.float32)
    sparse = spikes(rng, (100, 200), 0.05)
    assert dense.spike_events(sparse, 100) is not None
    assert dense.spike_events(sparse, dense.MIN_OUT - 1) is None            # narrow layer
    assert dense.spike_events(sparse[:2, :20], 100) is None                 # tiny input
    busy = spikes(rng, (100, 200), 0.5 * (dense.MAX_DENSITY[f64] + 1.0))
    assert dense.spike_events(busy, 100) is None
    assert dense.spike_events(busy.astype(f32), 100) is None
    with mode("events"):
        assert dense.spike_events(busy, 100) is not None                    # forced
        assert dense.spike_events(sparse[:2, :20], 3) is not None
    with mode("gemm"):
        assert dense.spike_events(sparse, 100) is None


# ---------------------------------------------------------------------------------------------
# S1 and S15 by events == by GEMM
# ---------------------------------------------------------------------------------------------

@settings(max_examples=40, **FAST)
@given(c=case, bias=st.booleans(), chunk=st.integers(1, 50))
def test_event_forward_and_weight_grad_equal_the_gemm_float64(c, bias, chunk):
    R, n_in, n_out, density, seed = c
    rng = np.random.default_rng(seed)
    x = spikes(rng, (R, n_in), density)
    W = rng.normal(size=(n_out, n_in))
    b = rng.normal(size=n_out) if bias else None
    g = rng.normal(size=(R, n_out))
    old_chunk, dense.ROW_CHUNK = dense.ROW_CHUNK, chunk     # row chunks of the weight gradient
    try:
        with mode("events"):
            ev = dense.spike_events(x, n_out)
            I = dense.forward(x, W, b, ev)
            dW = dense.weight_grad(g, x, ev)
    finally:
        dense.ROW_CHUNK = old_chunk
    want_I = x @ W.T + (b if bias else 0.0)
    want_dW = g.T @ x
    assert I.dtype == dW.dtype == np.float64 and dW.flags.f_contiguous  # Network stores W so
    if np.any(want_I):
        assert rel_err(I, want_I) <= 1e-12
    else:
        assert not np.any(I)
    if np.any(want_dW):
        assert rel_err(dW, want_dW) <= 1e-12
    else:
        assert not np.any(dW)


@settings(max_examples=20, **FAST)
@given(c=case)
def test_event_path_in_float32_is_as_close_to_float64_as_the_gemm(c):
    R, n_in, n_out, density, seed = c
    rng = np.random.default_rng(seed)
    x = spikes(rng, (R, n_in), density)
    W, g = rng.normal(size=(n_out, n_in)), rng.normal(size=(R, n_out))
    ref_I, ref_dW = x @ W.T, g.T @ x
    assume(np.any(ref_I) and np.any(ref_dW))
    with mode("events"):
        x32 = x.astype(np.float32)
        ev = dense.spike_events(x32, n_out)
        I = dense.forward(x32, W.astype(np.float32), None, ev)
        dW = dense.weight_grad(g.astype(np.float32), x32, ev)
    assert I.dtype == dW.dtype == np.float32
    # float32 sums of at most 50 (forward) / 40 (dW) terms of size <= 4-5: a few ulps of 2^-24
    assert rel_err(I, ref_I) <= 64 * n_in * 2.0 ** -24
    assert rel_err(dW, ref_dW) <= 64 * R * 2.0 ** -24


@settings(max_examples=20, **FAST)
@given(c=case, T=st.integers(1, 4))
def test_dense_layer_same_api_same_numbers(c, T):
    R, n_in, n_out, density, seed = c
    rng = np.random.default_rng(seed)
    x = spikes(rng, (T, R, n_in), density)
    W, b = rng.normal(size=(n_out, n_in)), rng.normal(size=n_out)
    g = rng.normal(size=(T, R, n_out))
    out = {}
    for m in ("gemm", "events"):
        layer = layers.Dense(W.copy(), b.copy())
        with mode(m):
            I = layer.forward(x)
            gx, grads = layer.backward(g, x)
        out[m] = (I, gx, grads)
    (I0, gx0, (dW0, db0)), (I1, gx1, (dW1, db1)) = out["gemm"], out["events"]
    assert I1.shape == I0.shape == (T, R, n_out) and dW1.shape == W.shape
    assert rel_err(I1, I0) <= 1e-12
    if np.any(dW0):
        assert rel_err(dW1, dW0) <= 1e-12
    np.testing.assert_array_equal(gx1, gx0)                  # input grad: the same GEMM
    np.testing.assert_array_equal(db1, db0)


def test_backward_never_trusts_the_events_of_a_changed_input():
    rng = np.random.default_rng(3)
    x = spikes(rng, (2, 40, 30), 0.1)
    W, g = rng.normal(size=(50, 30)), rng.normal(size=(2, 40, 50))
    layer = layers.Dense(W.copy())
    with mode("events"):
        layer.forward(x)
        x[1, 5, :] = 1.0 - x[1, 5, :]                       # changed in place after the forward
        x[0, 0, 0] = 0.5                                     # and no longer 0/1
        _, (dW,) = layer.backward(g, x)
        assert rel_err(dW, g.reshape(-1, 50).T @ x.reshape(-1, 30)) <= 1e-12
        x[0, 0, 0] = 1.0
        layer.forward(x)
        ev = layer._events[1]
        assert ev.match(x.reshape(-1, 30))
        y = x.copy()
        y[0, 3, 7] = 1.0 - y[0, 3, 7]
        assert not ev.match(y.reshape(-1, 30))               # one spike more or less
        _, (dW,) = layer.backward(g, y)                      # another array: events rebuilt
        assert rel_err(dW, g.reshape(-1, 50).T @ y.reshape(-1, 30)) <= 1e-12


# ---------------------------------------------------------------------------------------------
# Through STBP: spikes bit-identical, loss and gradients to 1e-12
# ---------------------------------------------------------------------------------------------

@settings(max_examples=15, **FAST)
@given(sizes=st.lists(st.integers(2, 60), min_size=2, max_size=4), T=st.integers(1, 8),
       B=st.integers(1, 6), density=st.floats(0.02, 0.6), gain=st.floats(1.0, 4.0),
       variant=st.sampled_from(["code", "paper", "sd"]), seed=st.integers(0, 2**32 - 1))
def test_stbp_network_events_equal_gemm(sizes, T, B, density, gain, variant, seed):
    rng = np.random.default_rng(seed)
    Ws = [rng.normal(0, gain / np.sqrt(a), (b, a)) for a, b in zip(sizes[:-1], sizes[1:])]
    bs = [rng.normal(0, 0.2, b) for b in sizes[1:]]
    x = spikes(rng, (T, B, sizes[0]), density)
    labels = rng.integers(0, sizes[-1], B)
    res = {}
    for m in ("gemm", "events"):
        net = Network([layers.Dense(W.copy(), b.copy()) for W, b in zip(Ws, bs)], "stbp",
                      {"variant": variant, "v_th": 0.5, "decay": 0.3})
        with mode(m):
            res[m] = net.loss_and_grads(x, net.make_target(labels, T))
    (l0, g0, t0), (l1, g1, t1) = res["gemm"], res["events"]
    margin = min(float(np.min(np.abs(s.u - 0.5))) for s in t0.spiking_states)
    assume(margin > 1e-9)          # a u within rounding of V_th could fire in one path only
    for s0, s1 in zip(t0.spiking_states, t1.spiking_states):
        assert np.array_equal(s0.spikes, s1.spikes)
    assert abs(l1 - l0) <= 1e-12 * max(abs(l0), 1e-300)
    scale = max(float(np.max(np.abs(g))) for g in g0)
    for a, b_ in zip(g1, g0):
        assert float(np.max(np.abs(a - b_))) <= 1e-12 * max(scale, 1e-300)


# ---------------------------------------------------------------------------------------------
# Every method's public golden cases with the event path forced
# ---------------------------------------------------------------------------------------------

METHODS = ["stbp", "tsslbp", "spikebp", "bpsta", "hm2bp"]


def golden(method):
    path = GOLDEN / f"{method}.json"
    return json.loads(path.read_text())["cases"] if path.exists() else []


@pytest.mark.parametrize("method", METHODS)
def test_golden_cases_pass_with_the_event_path_forced(method):
    cases = golden(method)
    if not cases:
        pytest.skip(f"no golden file for {method}")
    for case in cases:
        with mode("events"):
            out = run_case(method, [np.array(w) for w in case["weights"]],
                           np.array(case["inputs"]), label=case.get("label"),
                           target=case.get("target"), biases=case.get("biases"),
                           params=case["params"])
        exp = case["expected"]
        for got, want in zip(out["spikes"], exp["spikes"]):
            assert np.array_equal(got, np.array(want, dtype=float))
        scale = max([abs(exp["loss"])] + [float(np.max(np.abs(g))) for g in exp["grads"]])
        assert abs(out["loss"] - exp["loss"]) <= 1e-9 * scale
        for got, want in zip(out["grads"], exp["grads"]):
            assert np.max(np.abs(got - np.array(want))) <= 1e-9 * scale
