"""Input codes: rates match the specs' probabilities (statistical bounds), seeding, shapes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refsnn.encoding import ENCODINGS, METHOD_ENCODING, bernoulli, direct, encode, poisson
from refsnn.errors import ConfigError, DataError


def check_rates(spikes, prob):
    """Counts of a Bernoulli(prob) per element over T steps: chi-square and worst z within bounds.

    sum_i (k_i - T p_i)^2 / (T p_i (1 - p_i)) over n elements is about chi2(n): mean n, sd sqrt(2n).
    """
    T = spikes.shape[0]
    k = spikes.sum(axis=0).ravel()
    p = np.broadcast_to(prob, spikes.shape[1:]).ravel()
    sure = (p == 0) | (p == 1)
    np.testing.assert_array_equal(k[sure], T * p[sure])  # p = 0 never fires, p = 1 always
    var = T * p[~sure] * (1 - p[~sure])
    z = (k[~sure] - T * p[~sure]) / np.sqrt(var)
    n = z.size
    assert abs((z ** 2).sum() - n) < 6 * np.sqrt(2 * n), "rates do not match the probabilities"
    assert np.abs(z).max() < 5.5


def pixels(rng, shape):
    x = rng.random(shape)
    x.flat[:3] = [0.0, 1.0, 0.5]  # the edge values of S20
    return x


def test_bernoulli_rate_equals_pixel():
    rng = np.random.default_rng(1)
    x = pixels(rng, (40, 5, 5))
    s = bernoulli(x, 2000, rng)
    assert s.shape == (2000, 40, 5, 5) and s.dtype == np.float64
    assert set(np.unique(s)) <= {0.0, 1.0}
    check_rates(s, x)


def test_bernoulli_is_fresh_per_step_and_pixel():
    """Independent draws: P(x[t] = x[t+1] = 1) = p^2, and two equal pixels do not spike together."""
    x = np.full((1, 200), 0.5)
    s = bernoulli(x, 4000, np.random.default_rng(2))
    both = (s[1:] * s[:-1]).mean()
    assert abs(both - 0.25) < 6 * np.sqrt(0.25 * 0.75 / (3999 * 200))  # ignores the weak overlap
    same = (s[:, 0, 0] == s[:, 0, 1]).mean()  # equal pixels agree half the time, not always
    assert abs(same - 0.5) < 6 * np.sqrt(0.25 / 4000)


def test_bernoulli_follows_the_documented_stream():
    """x[t] = 1[p > U[t]] with U = rng.random((B, *shape)) per step, in float64."""
    x = np.random.default_rng(3).random((3, 2, 4))
    s = bernoulli(x, 7, np.random.default_rng(11), dtype=np.float32)
    U = np.random.default_rng(11).random((7, 3, 2, 4))
    np.testing.assert_array_equal(s, (x > U).astype(np.float32))
    assert s.dtype == np.float32


@settings(deadline=None, max_examples=30)
@given(T=st.integers(1, 6), shape=st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple),
       seed=st.integers(0, 2**32 - 1), name=st.sampled_from(["bernoulli", "poisson"]))
def test_seeded_and_shaped(T, shape, seed, name):
    x = np.random.default_rng(seed).random(shape)
    a = encode(name, x, T, np.random.default_rng(seed))
    b = encode(name, x, T, np.random.default_rng(seed))
    assert a.shape == (T,) + shape
    np.testing.assert_array_equal(a, b)


def test_different_seeds_differ():
    x = np.full((8, 100), 0.5)
    a = bernoulli(x, 5, np.random.default_rng(0))
    b = bernoulli(x, 5, np.random.default_rng(1))
    assert not np.array_equal(a, b)


def test_hm2bp_poisson_rate_and_silent_first_step():
    rng = np.random.default_rng(4)
    x = pixels(rng, (30, 30))
    kw = METHOD_ENCODING["hm2bp"][1]
    s = encode("poisson", x, 3001, rng, **kw)
    assert not s[0].any()  # t = 0 never spikes (hm2bp 3)
    check_rates(s[1:], x / 5.5)
    assert s[1:].mean() < 1 / 5.5


def test_signed_poisson():
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (20, 40))
    s = poisson(x, 2000, rng, rate=0.8, signed=True)
    assert set(np.unique(s)) <= {-1.0, 0.0, 1.0}
    assert np.all(s * np.sign(x) >= 0)  # a spike carries the sign of its pixel
    check_rates(np.abs(s), 0.8 * np.abs(x))


def test_spikebp_mnist_rate_is_half_the_pixel():
    rng = np.random.default_rng(6)
    x = pixels(rng, (25, 25))
    name, kw = METHOD_ENCODING["spikebp"]
    check_rates(encode(name, x, 2000, rng, **kw), x / 2)


def test_direct_repeats_the_current():
    x = np.random.default_rng(7).random((3, 1, 2, 2))
    d = direct(x, 4)
    assert d.shape == (4, 3, 1, 2, 2)
    for t in range(4):
        np.testing.assert_array_equal(d[t], x)
    d[0, 0, 0, 0, 0] = 9.0  # a real copy per step, not a broadcast view
    assert d[1, 0, 0, 0, 0] == x[0, 0, 0, 0]
    name, kw = METHOD_ENCODING["tsslbp"]
    n = encode(name, x, 2, None, np.float32, **kw)  # direct needs no rng
    assert n.dtype == np.float32
    np.testing.assert_allclose(n[1], (x - 0.1307) / 0.3081, rtol=1e-6)
    m = encode("direct", x, 2, dtype=np.float64, mean=0.5, std=2.0)
    assert m[0, 1, 0, 1, 1] == (x[1, 0, 1, 1] - 0.5) / 2


def test_every_method_has_a_valid_encoding():
    assert set(METHOD_ENCODING) == {"stbp", "hm2bp", "tsslbp", "spikebp", "bpsta"}
    x = np.full((2, 3), 0.25)
    for method, (name, kw) in METHOD_ENCODING.items():
        assert name in ENCODINGS
        assert encode(name, x, 3, np.random.default_rng(0), **kw).shape == (3, 2, 3)


def test_errors():
    x = np.full((2, 3), 0.5)
    with pytest.raises(ConfigError) as err:
        encode("latency", x, 3, np.random.default_rng(0))
    assert all(name in str(err.value) for name in ENCODINGS)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        bernoulli(x * 3, 3, np.random.default_rng(0))  # no silent clipping
    with pytest.raises(DataError, match="negative"):
        poisson(-x, 3, np.random.default_rng(0))
    with pytest.raises(DataError, match="not a probability"):
        poisson(x * 4, 3, np.random.default_rng(0), signed=True)
    with pytest.raises(DataError, match="NaN"):
        bernoulli(np.array([[np.nan]]), 3, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="T"):
        bernoulli(x, 0, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="Generator"):
        encode("bernoulli", x, 3)
    with pytest.raises(ConfigError, match="rate"):
        poisson(x, 3, np.random.default_rng(0), rate=1.5)
    with pytest.raises(ConfigError, match="dtype"):
        bernoulli(x, 3, np.random.default_rng(0), dtype=np.int32)
    with pytest.raises(ConfigError, match="std"):
        direct(x, 3, std=0.0)
    with pytest.raises(ConfigError, match="encoding 'direct'"):
        encode("direct", x, 3, rate=0.5)
