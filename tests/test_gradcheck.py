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


# ---- `refsnn gradcheck` end to end, every method ------------------------------------------------

def _gradcheck_cli(method, *extra):
    from click.testing import CliRunner

    from refsnn.cli import main
    return CliRunner().invoke(main, ["gradcheck", "--method", method, "--cases", "1", *extra],
                              catch_exceptions=False)


def _method_names():
    from refsnn.methods import METHODS
    return sorted(METHODS)


@pytest.mark.parametrize("method", _method_names())
def test_cli_gradcheck_passes_for_every_method(method):
    res = _gradcheck_cli(method)
    assert res.exit_code == 0, res.output
    assert "1 of 1 cases passed" in res.output and "nothing was checked" not in res.output


@pytest.mark.parametrize("method", _method_names())
def test_cli_gradcheck_fails_when_the_backward_is_scaled(method, monkeypatch):
    """A hand gradient off by 1% (far above every spec's rule) must fail the check."""
    from refsnn.methods import get_method
    cls = type(get_method(method))
    hand = cls.backward

    def scaled(self, *args, **kwargs):
        return [[1.01 * g for g in (per or [])] for per in hand(self, *args, **kwargs)]

    monkeypatch.setattr(cls, "backward", scaled)
    res = _gradcheck_cli(method)
    assert res.exit_code == 1, res.output
    assert "FAILED" in res.output and "0 of 1 cases passed" in res.output


def test_cli_gradcheck_says_in_one_line_what_hm2bp_checks():
    """HM2-BP's gradient is not a derivative (spec 5.11): the CLI says what F is instead."""
    res = _gradcheck_cli("hm2bp", "--arch", "7x7x1-2c3-a2-4-3", "--param", "w_lat=1",
                         "--param", "lambda_reg=1.5", "--param", "beta_reg=0.3")
    assert res.exit_code == 0, res.output
    notes = [ln for ln in res.output.splitlines() if ln.startswith("hm2bp:")]
    assert len(notes) == 1
    assert "no finite-difference check" in notes[0] and "6.1 C3" in notes[0]
    assert "W0" in res.output and "(2, 1, 3, 3)" in res.output           # the conv kernel


def test_side_by_side_prints_both_gradients_and_returns_the_report():
    w = np.linspace(-1, 1, 6).reshape(2, 3)
    lines = []
    rep = gradcheck.side_by_side(lambda: float(np.sum(w ** 3)), [w], [3 * w ** 2], ["dW"],
                                 h=1e-5, rtol=1e-8, show=lines.append)
    assert rep.passed and "dW hand" in lines[0] and "central differences (h = 1e-05)" in lines[0]
    assert "passed" in lines[-1]
    rep = gradcheck.side_by_side(lambda: float(np.sum(w ** 3)), [w], [3.01 * w ** 2], ["dW"],
                                 h=1e-5, rtol=1e-8, show=lines.append)
    assert not rep.passed and "FAILED" in lines[-1]


def test_richardson_cancels_the_h2_term_of_central_differences():
    # f(w) = sin(k w): D(h) has error ~ k^3 h^2 / 6 |cos|, the extrapolation ~ k^5 h^4 / 120
    k, w0, h = 40.0, np.array([0.3]), 1e-3
    f = lambda: float(np.sin(k * w0[0]))
    exact = k * np.cos(k * 0.3)
    plain = gradcheck.central_fd(f, [w0], h=h)[0][0]
    rich = gradcheck.richardson_fd(f, [w0], h=h)[0][0]
    assert abs(plain - exact) == pytest.approx(k ** 3 * h ** 2 / 6 * abs(np.cos(k * 0.3)), rel=0.01)
    assert abs(rich - exact) < 1e-3 * abs(plain - exact)
    assert w0[0] == 0.3                                  # restored bit-exactly
