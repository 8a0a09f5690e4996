"""refsnn.gradcheck: central differences and the report, on functions with known gradients."""

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from refsnn import gradcheck


@settings(deadline=None, max_examples=30)
@given(a=arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 4)),
                elements=st.floats(-2, 2)),
       b=arrays(np.float64, st.integers(1, 5), elements=st.floats(-2, 2)))
def test_central_fd_matches_the_gradient_of_a_smooth_function(a, b):
    # f = sum(sin(A)) * sum(b^3) + sum(A^2): gradient known in closed form
    f = lambda: float(np.sum(np.sin(a)) * np.sum(b ** 3) + np.sum(a ** 2))
    ga = np.cos(a) * np.sum(b ** 3) + 2 * a
    gb = np.sum(np.sin(a)) * 3 * b ** 2
    # the rule is relative to the largest gradient: a vanishing one leaves only round-off
    assume(max(np.max(np.abs(ga)), np.max(np.abs(gb))) > 1e-2)
    a0, b0 = a.copy(), b.copy()
    rep = gradcheck.check(f, [a, b], [ga, gb], h=1e-5, rtol=1e-7)
    assert rep.passed, rep
    assert np.array_equal(a, a0) and np.array_equal(b, b0)      # restored bit-exactly


def test_report_names_the_worst_entry_of_a_wrong_gradient():
    w = np.linspace(-1, 1, 6).reshape(2, 3)
    good = 2 * w
    bad = good.copy()
    bad[1, 2] += 0.5
    rep = gradcheck.check(lambda: float(np.sum(w ** 2)), [w], [bad], h=1e-6, rtol=1e-6,
                          names=["W1"])
    assert not rep.passed
    assert rep.arrays[0].worst == (1, 2)
    assert rep.arrays[0].max_abs == pytest.approx(0.5, rel=1e-6)
    assert "FAILED" in str(rep) and "W1" in str(rep)


def test_mask_limits_the_entries_and_float32_is_refused():
    w = np.arange(4.0)
    fd = gradcheck.central_fd(lambda: float(np.sum(w ** 2)), [w], mask=[np.array([1, 0, 0, 1], bool)])[0]
    assert np.isnan(fd[1]) and np.isnan(fd[2])
    assert fd[3] == pytest.approx(6.0, rel=1e-8)
    with pytest.raises(TypeError):
        gradcheck.central_fd(lambda: 0.0, [np.zeros(2, np.float32)])
