"""Event binning: conservation, window edges, down-sampling, cropping, the specs' N-MNIST rules."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refsnn.data.binning import (
    FrameSpec, bin_by_count, bin_by_time, bin_units, frame_shape, nmnist_hm2bp, nmnist_stbp,
    nmnist_tsslbp, saccade_offset, stabilize_nmnist,
)
from refsnn.data.events import audio_events, camera_events
from refsnn.errors import ConfigError, DataError


def naive_counts(ev, sensor, T, k_of):
    """Reference: a Python loop over events, frame index from k_of(t)."""
    H, W = sensor
    out = np.zeros((T, 2, H, W), np.int64)
    for x, y, p, t in ev.tolist():
        k = k_of(t)
        if 0 <= k < T:
            out[k, p, y, x] += 1
    return out


@st.composite
def recordings(draw, max_n=300, max_hw=12, max_t=10_000):
    H, W = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    n = draw(st.integers(0, max_n))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    ev = camera_events(rng.integers(0, W, n), rng.integers(0, H, n), rng.integers(0, 2, n),
                       rng.integers(0, max_t, n))
    return ev, (H, W)


@settings(deadline=None, max_examples=30)
@given(rec=recordings(), T=st.integers(1, 9), window=st.integers(1, 3000))
def test_time_window_bins_match_a_python_loop(rec, T, window):
    ev, sensor = rec
    got = bin_by_time(ev, sensor, T, window_us=window)
    np.testing.assert_array_equal(got, naive_counts(ev, sensor, T, lambda t: t // window))
    assert got.dtype == np.int32


@settings(deadline=None, max_examples=30)
@given(rec=recordings(), T=st.integers(1, 9))
def test_count_frames_conserve_every_event_over_the_span(rec, T):
    ev, sensor = rec
    frames = bin_by_time(ev, sensor, T, span_us=10_000)       # every t < 10,000
    assert frames.sum() == len(ev)
    np.testing.assert_array_equal(frames.sum(axis=0)[1], np.histogram2d(
        ev["y"][ev["p"] == 1], ev["x"][ev["p"] == 1], bins=sensor,
        range=[[0, sensor[0]], [0, sensor[1]]])[0])
    np.testing.assert_array_equal(bin_by_time(ev, sensor, T, span_us=10_000, binary=True),
                                  np.minimum(frames, 1))
    merged = bin_by_time(ev, sensor, T, span_us=10_000, polarity="merge")
    np.testing.assert_array_equal(merged[:, 0], frames.sum(axis=1))


def test_window_edges_and_t0():
    ev = camera_events([0] * 6, [0] * 6, [1] * 6, [99, 100, 199, 200, 299, 300])
    f = bin_by_time(ev, (1, 1), 3, window_us=100)[:, 1, 0, 0]
    assert f.tolist() == [1, 2, 2]                          # t = 300 = T*w is outside: dropped
    f = bin_by_time(ev, (1, 1), 3, window_us=100, t0=100)[:, 1, 0, 0]
    assert f.tolist() == [2, 2, 1]                          # t = 99 < t0 dropped
    # span: k = floor(t * T / span); T = 3, span 301 -> edges at 100.33 and 200.67
    f = bin_by_time(ev, (1, 1), 3, span_us=301)[:, 1, 0, 0]
    assert f.tolist() == [2, 2, 2]


@settings(deadline=None, max_examples=30)
@given(rec=recordings(max_hw=13), f=st.integers(1, 5), T=st.integers(1, 4))
def test_downsampling_sums_f_by_f_blocks(rec, f, T):
    ev, (H, W) = rec
    full = bin_by_time(ev, (H, W), T, span_us=10_000)
    small = bin_by_time(ev, (H, W), T, span_us=10_000, downsample=f)
    Hs, Ws = -(-H // f), -(-W // f)
    assert small.shape == (T, 2, Hs, Ws) == (T,) + frame_shape((H, W), downsample=f)
    padded = np.zeros((T, 2, Hs * f, Ws * f), np.int64)
    padded[:, :, :H, :W] = full
    np.testing.assert_array_equal(small, padded.reshape(T, 2, Hs, f, Ws, f).sum(axis=(3, 5)))


def test_crop_equals_slicing_and_checks_its_box():
    rng = np.random.default_rng(3)
    n = 400
    ev = camera_events(rng.integers(0, 10, n), rng.integers(0, 8, n), rng.integers(0, 2, n),
                       rng.integers(0, 1000, n))
    full = bin_by_time(ev, (8, 10), 2, span_us=1000)
    crop = bin_by_time(ev, (8, 10), 2, span_us=1000, crop=(2, 3, 4, 5))
    np.testing.assert_array_equal(crop, full[:, :, 2:6, 3:8])
    both = bin_by_time(ev, (8, 10), 2, span_us=1000, crop=(2, 3, 4, 5), downsample=2)
    np.testing.assert_array_equal(both[:, :, :, :2],
                                  crop[:, :, :, :4].reshape(2, 2, 2, 2, 2, 2).sum(axis=(3, 5)))
    with pytest.raises(ConfigError, match="inside the 8x10"):
        bin_by_time(ev, (8, 10), 2, span_us=1000, crop=(5, 0, 4, 5))


@settings(deadline=None, max_examples=30)
@given(rec=recordings(), T=st.integers(1, 12), per=st.one_of(st.none(), st.integers(1, 50)))
def test_count_binning_keeps_time_order_and_equal_counts(rec, T, per):
    ev, sensor = rec
    frames = bin_by_count(ev, sensor, T, events_per_frame=per)
    counts = frames.sum(axis=(1, 2, 3))
    n = len(ev)
    if per is None:
        assert counts.sum() == n and counts.max() - counts.min() <= (1 if n else 0)
    else:
        assert counts.sum() == min(n, T * per) and counts.max(initial=0) <= per
    # frame k holds ranks [k n / T, (k+1) n / T): compare with a sort-based reference
    order = np.argsort(ev["t"], kind="stable")
    ref = np.zeros_like(frames, dtype=np.int64)
    for r, i in enumerate(order):
        k = r * T // n if per is None else r // per
        if k < T:
            ref[k, ev["p"][i], ev["y"][i], ev["x"][i]] += 1
    np.testing.assert_array_equal(frames, ref)


def test_units_binning_and_errors():
    ev = audio_events([0, 699, 699, 5], [0, 10, 11, 1_000_000])
    f = bin_units(ev, 700, 4, window_us=250_000)
    assert f.shape == (4, 700) and f.sum() == 3 and f[0, 699] == 2   # t = 1e6 is beyond T bins
    assert bin_units(ev, 700, 4, window_us=250_000, binary=True)[0, 699] == 1
    with pytest.raises(DataError, match="0..9"):
        bin_units(ev, 10, 4, window_us=10)


def test_errors_no_silent_clipping():
    ev = camera_events([0] * 300, [0] * 300, [0] * 300, [0] * 300)
    with pytest.raises(ConfigError, match="does not fit uint8"):
        bin_by_time(ev, (1, 1), 1, window_us=10, dtype=np.uint8)
    assert bin_by_time(ev, (1, 1), 1, window_us=10, dtype=np.float64)[0, 0, 0, 0] == 300
    with pytest.raises(DataError, match="outside the 1x1 sensor"):
        bin_by_time(camera_events([1], [0], [0], [0]), (1, 1), 1, window_us=10)
    with pytest.raises(ConfigError, match="exactly one of"):
        bin_by_time(ev, (1, 1), 1)
    with pytest.raises(ConfigError, match="T must be an int"):
        bin_by_time(ev, (1, 1), 0, window_us=1)


# ---- the specs' N-MNIST binnings ---------------------------------------------------------------

def test_saccade_path_and_stabilize_by_hand():
    dx, dy = saccade_offset([0, 52_500, 105_000, 210_000, 315_000])
    assert dx.tolist() == [0, 1.75, 3.5, 7.0, 0.0] and dy.tolist() == [0, 3.5, 7.0, 0.0, 0.0]
    ev = camera_events([10, 10, 0, 33], [10, 3, 0, 33], [1, 0, 1, 1], [105_000, 0, 105_000, 0])
    st_ev = stabilize_nmnist(ev)
    # (10, 10) at 105 ms: 1-based 11 - 3.5 = 7.5 -> round 8 -> x 7; 11 - 7 = 4 -> y 3.
    # (0, 0) at 105 ms leaves the sensor; the others are at t = 0 (no offset).
    assert st_ev["x"].tolist() == [7, 10, 33] and st_ev["y"].tolist() == [3, 3, 33]
    assert st_ev["t"].tolist() == [105_000, 0, 0]


def test_hm2bp_binning_by_hand():
    # spec hm2bp 3: step = ceil(t / 600) + 1, once per channel and step, steps >= T dropped
    ev = camera_events([3, 3, 3, 3, 4, 5], [5, 5, 5, 5, 6, 7], [1, 1, 1, 1, 0, 1],
                       [0, 600, 601, 1200, 601, 600 * 8])
    f = nmnist_hm2bp(ev, T=8)
    assert f.shape == (8, 2, 34, 34) and f.dtype == np.uint8
    assert f[:, 0, 3, 5].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]   # t=0 -> 1, 600 -> 2, 601/1200 -> 3
    assert f[3, 1, 4, 6] == 1                                  # OFF is channel 1, axes (x, y)
    assert f.sum() == 4                                        # t = 4800 -> step 9 >= T
    flat = f.reshape(8, -1)
    assert flat[3, 1156 + 4 * 34 + 6] == 1                     # x*34 + y + 1156 for OFF
    img = nmnist_hm2bp(ev, T=8, layout="image")
    assert img[3, 0, 6, 4] == 1 and img[1, 1, 5, 3] == 1       # (p, y, x), channel = p


def test_tsslbp_binning_by_hand():
    # spec tsslbp 3: k = ceil(t / 3000), step k - 1, kept if k < T; k = 0 -> last step (quirk)
    ev = camera_events([1] * 5, [2] * 5, [1, 1, 1, 1, 0], [0, 1, 3000, 3001, 3 * 3000 + 1])
    f = nmnist_tsslbp(ev, T=4)
    assert f[:, 1, 2, 1].tolist() == [1, 1, 0, 1]
    assert f.sum() == 3                                        # k = 4 = T dropped
    g = nmnist_tsslbp(ev, T=4, k0_to_last=False)
    assert g[:, 1, 2, 1].tolist() == [1, 1, 0, 0]


def test_stbp_binning_is_plain_floor_without_stabilization():
    ev = camera_events([33, 33, 0], [0, 0, 9], [0, 0, 1], [4999, 5000, 75_000])
    f = nmnist_stbp(ev)
    assert f.shape == (15, 2, 34, 34)
    assert f[0, 0, 0, 33] == 1 and f[1, 0, 0, 33] == 1 and f.sum() == 2


def test_framespec_batch_is_time_major_stack_of_single_recordings():
    rng = np.random.default_rng(5)
    recs = []
    for n in (50, 0, 80):
        recs.append(camera_events(rng.integers(0, 34, n), rng.integers(0, 34, n),
                                  rng.integers(0, 2, n), 1000 + rng.integers(0, 5000, n)))
    fixed = FrameSpec((34, 34), span_us=6000, binary=False)
    out = fixed.batch(recs, 5)
    assert out.shape == (5, 3, 2, 34, 34) and out.dtype == np.float64
    for b, ev in enumerate(recs):
        np.testing.assert_array_equal(out[:, b], bin_by_time(ev, (34, 34), 5, span_us=6000))
    own = FrameSpec((34, 34), span_us=None, downsample=2)      # each recording's own span
    out = own.batch(recs, 4, np.float32)
    ev = recs[2]
    t0, span = int(ev["t"].min()), int(ev["t"].max() - ev["t"].min()) + 1
    ref = bin_by_time(ev, (34, 34), 4, span_us=span, t0=t0, downsample=2, binary=True)
    np.testing.assert_array_equal(out[:, 2], ref)
    assert out[:, 2].sum(axis=(1, 2, 3)).min() > 0 and out[:, 1].sum() == 0
    audio = FrameSpec((700,), span_us=1000, binary=False)
    a = audio.batch([audio_events([1, 1, 699], [0, 10, 999])], 2)
    assert a.shape == (2, 1, 700) and a[0, 0, 1] == 2 and a[1, 0, 699] == 1
