"""Event binning: structured event arrays (refsnn.data.events) -> frames (T, C, H, W).

Two ways to cut time (docs/events.md):

``bin_by_time``   frame k = floor((t - t0) / window_us), or with ``span_us``
                  k = floor((t - t0) * T / span_us): T equal windows over [t0, t0 + span_us).
                  Events with k < 0 or k >= T are outside the window and dropped (not piled into
                  the last frame).
``bin_by_count``  events in time order (ties kept in file order), frame k = floor(r * T / n) for
                  the event of rank r among n (T frames of nearly equal counts), or
                  k = floor(r / events_per_frame) with events beyond T frames dropped.

Common options: ``polarity`` "split" (C = 2, channel = p: 0 OFF, 1 ON) or "merge" (C = 1);
``crop`` = (top, left, height, width) in sensor pixels, applied first (events outside dropped,
coordinates shifted); ``downsample`` = f maps pixel (y, x) to (y // f, x // f), so an output
pixel sums an f x f block and the output is ceil(H / f) x ceil(W / f); ``binary`` gives 0/1
frames (1 where a pixel had at least one event), else event counts.

The specs' N-MNIST binnings are named functions: :func:`nmnist_hm2bp` (spec hm2bp 3),
:func:`nmnist_tsslbp` (spec tsslbp 3) and :func:`nmnist_stbp` (spec stbp 8.1), each after
:func:`stabilize_nmnist` where the spec removes the saccades.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from refsnn.data.events import NMNIST_SENSOR
from refsnn.errors import ConfigError, DataError

__all__ = [
    "bin_by_time", "bin_by_count", "bin_units", "frame_shape", "FrameSpec",
    "stabilize_nmnist", "nmnist_hm2bp", "nmnist_tsslbp", "nmnist_stbp", "NMNIST_BINNINGS",
    "SACCADE_US",
]

SACCADE_US = 105_000   # one N-MNIST saccade (formats.md 1.1)


@njit(cache=True)
def _accumulate(k, b, c, y, x, out):
    """out[k, b, c, y, x] += 1 for every event e with 0 <= k[e] < T (the binning sum)."""
    T = out.shape[0]
    for e in range(k.shape[0]):
        ke = k[e]
        if 0 <= ke < T:
            out[ke, b[e], c[e], y[e], x[e]] += 1


# ---- argument checks -------------------------------------------------------------------------

def _pos_int(v, name) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
    return int(v)


def _fields(events, names, what="events"):
    ev = np.asarray(events)
    if ev.dtype.names is None or not set(names) <= set(ev.dtype.names):
        raise DataError(f"{what} must be a structured array with fields {', '.join(names)} "
                        f"(refsnn.data.events), got dtype {ev.dtype}")
    return ev


def frame_shape(sensor, polarity="split", downsample=1, crop=None) -> tuple:
    """(C, H', W') of the frames :func:`bin_by_time` makes for these options."""
    (h, w), _, f, _ = _geometry(sensor, polarity, downsample, crop)
    c = 2 if polarity == "split" else 1
    return (c, -(-h // f), -(-w // f))


def _geometry(sensor, polarity, downsample, crop):
    try:
        H, W = (int(s) for s in sensor)
    except (TypeError, ValueError):
        raise ConfigError(f"sensor must be (H, W), got {sensor!r}") from None
    if H < 1 or W < 1:
        raise ConfigError(f"sensor must be positive, got {sensor!r}")
    if polarity not in ("split", "merge"):
        raise ConfigError(f"polarity must be 'split' (2 channels) or 'merge' (1), got {polarity!r}")
    f = _pos_int(downsample, "downsample")
    if crop is None:
        box = (0, 0, H, W)
    else:
        try:
            box = tuple(int(v) for v in crop)
        except (TypeError, ValueError):
            raise ConfigError(f"crop must be (top, left, height, width), got {crop!r}") from None
        top, left, ch, cw = box if len(box) == 4 else (-1,) * 4
        if len(box) != 4 or top < 0 or left < 0 or ch < 1 or cw < 1 or top + ch > H or \
                left + cw > W:
            raise ConfigError(f"crop {crop!r} must be (top, left, height, width) inside the "
                              f"{H}x{W} sensor")
    return (box[2], box[3]), (H, W), f, box


def _pixels(ev, sensor, polarity, downsample, crop):
    """(keep mask, c, y, x) after range check, crop, polarity and down-sampling; and the shape."""
    (h, w), (H, W), f, (top, left, _, _) = _geometry(sensor, polarity, downsample, crop)
    x, y, p = (ev[n].astype(np.int64) for n in ("x", "y", "p"))
    bad = (x >= W) | (y >= H) | (x < 0) | (y < 0) | (p < 0) | (p > 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"event {i} (x={x[i]}, y={y[i]}, p={p[i]}) lies outside the {W}x{H} "
                        f"sensor or has a polarity other than 0/1; pass the recording's sensor "
                        f"size")
    y, x = y - top, x - left
    keep = (y >= 0) & (y < h) & (x >= 0) & (x < w)
    c = p if polarity == "split" else np.zeros_like(p)
    return keep, c, y // f, x // f, frame_shape(sensor, polarity, downsample, crop)


def _finish(counts, binary, dtype):
    if dtype is None:
        dtype = np.uint8 if binary else np.int32
    dt = np.dtype(dtype)
    if binary:
        np.minimum(counts, 1, out=counts)
    elif dt.kind in "iu" and counts.size and counts.max() > np.iinfo(dt).max:
        raise ConfigError(f"count frames reach {counts.max()}, which does not fit {dt}; pass a "
                          f"wider dtype (np.int32, np.float64) or binary=True")
    return counts.astype(dt, copy=False)


def _time_index(t, T, window_us, span_us, t0):
    t = t.astype(np.int64) - int(t0)
    if (window_us is None) == (span_us is None):
        raise ConfigError("give exactly one of window_us (width of one frame) and span_us "
                          "(time covered by all T frames), in microseconds")
    if window_us is not None:
        return t // _pos_int(window_us, "window_us")
    return t * T // _pos_int(span_us, "span_us")


# ---- general binning -------------------------------------------------------------------------

def bin_by_time(events, sensor, T, *, window_us=None, span_us=None, t0=0, binary=False,
                polarity="split", downsample=1, crop=None, dtype=None) -> np.ndarray:
    """Frames (T, C, H', W') by time: see the module docstring for k, crop, down-sampling.

    dtype defaults to uint8 for binary frames and int32 for counts; a count that does not fit the
    requested integer dtype raises ConfigError (no silent wrap-around).
    """
    T = _pos_int(T, "T")
    ev = _fields(events, ("x", "y", "p", "t"))
    keep, c, y, x, shape = _pixels(ev, sensor, polarity, downsample, crop)
    k = _time_index(ev["t"], T, window_us, span_us, t0)
    k = np.where(keep, k, -1)
    out = np.zeros((T, 1) + shape, np.int32)
    _accumulate(k, np.zeros_like(k), c, y, x, out)
    return _finish(out[:, 0], binary, dtype)


def bin_by_count(events, sensor, T, *, events_per_frame=None, binary=False, polarity="split",
                 downsample=1, crop=None, dtype=None) -> np.ndarray:
    """Frames (T, C, H', W') holding equal numbers of events (module docstring).

    Ranks are taken after cropping, so every frame counts kept events only.
    """
    T = _pos_int(T, "T")
    ev = _fields(events, ("x", "y", "p", "t"))
    keep, c, y, x, shape = _pixels(ev, sensor, polarity, downsample, crop)
    idx = np.flatnonzero(keep)
    order = idx[np.argsort(ev["t"][idx], kind="stable")]
    n = len(order)
    r = np.arange(n, dtype=np.int64)
    if events_per_frame is None:
        kr = r * T // max(n, 1)
    else:
        kr = r // _pos_int(events_per_frame, "events_per_frame")
    k = np.full(len(ev), -1, np.int64)
    k[order] = kr
    out = np.zeros((T, 1) + shape, np.int32)
    _accumulate(k, np.zeros_like(k), c, y, x, out)
    return _finish(out[:, 0], binary, dtype)


def bin_units(events, n_units, T, *, window_us=None, span_us=None, t0=0, binary=False,
              dtype=None) -> np.ndarray:
    """Audio events (unit, t) -> (T, n_units) counts or 0/1, time cut as :func:`bin_by_time`.

    A unit outside 0 .. n_units-1 raises DataError.
    """
    T = _pos_int(T, "T")
    n_units = _pos_int(n_units, "n_units")
    ev = _fields(events, ("unit", "t"), "audio events")
    u = ev["unit"].astype(np.int64)
    if len(u) and (u.min() < 0 or u.max() >= n_units):
        raise DataError(f"audio events hold units {u.min()}..{u.max()}; expected 0..{n_units - 1}")
    k = _time_index(ev["t"], T, window_us, span_us, t0)
    z = np.zeros_like(k)
    out = np.zeros((T, 1, n_units, 1, 1), np.int32)
    _accumulate(k, z, u, z, z, out)
    return _finish(out[:, 0, :, 0, 0], binary, dtype)


# ---- the specs' N-MNIST binnings -------------------------------------------------------------

def _round_half_away(v):
    """Matlab's round: halves go away from zero."""
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def saccade_offset(t):
    """(dx, dy) in pixels of the N-MNIST image content at time t (us): the three saccades.

    (0, 0) -> (3.5, 7) -> (7, 0) -> (0, 0), linear in time, 105 ms per leg (formats.md 1.1); the
    last leg's line continues past 315 ms.
    """
    s = np.asarray(t, dtype=np.float64) / SACCADE_US
    dx = np.where(s <= 1, 3.5 * s, np.where(s <= 2, 3.5 + 3.5 * (s - 1), 7.0 - 7.0 * (s - 2)))
    dy = np.where(s <= 1, 7.0 * s, np.where(s <= 2, 7.0 - 7.0 * (s - 1), 0.0))
    return dx, dy


def stabilize_nmnist(events, sensor=NMNIST_SENSOR) -> np.ndarray:
    """Remove the saccade motion (stabilize.m as formats.md 1.1 describes it); drop what leaves.

    Each event moves back by the content offset at its time: on 1-based coordinates, as the
    Matlab code works, x1' = round(x1 - dx(t)) with Matlab's rounding, then back to 0-based.
    Events that end outside the sensor are dropped (spec hm2bp 3, tsslbp 3).
    """
    ev = _fields(events, ("x", "y", "p", "t"))
    H, W = (int(s) for s in sensor)
    dx, dy = saccade_offset(ev["t"])
    x = _round_half_away(ev["x"] + 1.0 - dx) - 1
    y = _round_half_away(ev["y"] + 1.0 - dy) - 1
    keep = (x >= 0) & (x < W) & (y >= 0) & (y < H)
    out = ev[keep].copy()
    out["x"], out["y"] = x[keep], y[keep]
    return out


def _binary_frames(k, c, a, b, T, shape):
    out = np.zeros((T, 1) + shape, np.int32)
    _accumulate(k.astype(np.int64), np.zeros(len(k), np.int64), c.astype(np.int64),
                a.astype(np.int64), b.astype(np.int64), out)
    return _finish(out[:, 0], True, np.uint8)


def nmnist_hm2bp(events, T: int = 540, window_us: int = 600, layout: str = "hm2bp") -> np.ndarray:
    """Spec hm2bp 3 (NMNIST_Converter.m, readNMnistData.cpp): 0/1 frames (T, 2, 34, 34).

    Stabilize; step = ceil(t / window_us) + 1 (the reader's +1 shift), steps >= T dropped;
    several events of one channel in one step count once. So step 0 is always empty.

    layout "hm2bp": axes (channel, x, y) with channel 0 = ON, 1 = OFF, so the C-order flattening
    is HM2-BP's input index x*34 + y + 1156*[OFF] (0-based). layout "image": axes (p, y, x) as
    :func:`bin_by_time` (channel 0 = OFF).
    """
    T = _pos_int(T, "T")
    ev = stabilize_nmnist(events)
    t = ev["t"].astype(np.int64)
    k = -(-t // _pos_int(window_us, "window_us")) + 1                 # ceil(t/w) + 1
    p, x, y = ev["p"], ev["x"], ev["y"]
    if layout == "hm2bp":
        return _binary_frames(k, 1 - p.astype(np.int64), x, y, T, (2,) + NMNIST_SENSOR)
    if layout == "image":
        return _binary_frames(k, p, y, x, T, (2,) + NMNIST_SENSOR)
    raise ConfigError(f"layout must be 'hm2bp' or 'image', got {layout!r}")


def nmnist_tsslbp(events, T: int = 30, window_us: int = 3000, k0_to_last: bool = True
                  ) -> np.ndarray:
    """Spec tsslbp 3 (loadNMNIST_Spiking.py): 0/1 frames (T, 2, 34, 34), axes (p, y, x).

    Stabilize; k = ceil(t / window_us), events with k < T kept at step k - 1. The code's quirk:
    k = 0 (t = 0) gives index -1, the LAST step; ``k0_to_last=False`` puts it at step 0 instead.
    """
    T = _pos_int(T, "T")
    ev = stabilize_nmnist(events)
    t = ev["t"].astype(np.int64)
    k = -(-t // _pos_int(window_us, "window_us"))
    step = np.where(k < T, k - 1, -1)
    if k0_to_last:
        step = np.where(k == 0, T - 1, step)
    else:
        step = np.where(k == 0, 0, step)
    return _binary_frames(step, ev["p"], ev["y"], ev["x"], T, (2,) + NMNIST_SENSOR)


def nmnist_stbp(events, T: int = 15, window_us: int = 5000) -> np.ndarray:
    """Spec stbp 8.1 ``nmnist-mlp512`` (T 15, 5 ms; ``nmnist-mlp``: T 30, 1 ms): 0/1 frames.

    No stabilization (the spec names none); step = floor(t / window_us), steps >= T dropped;
    axes (p, y, x), flattened in C order (polarity, y, x) as the spec's refsnn choice.
    """
    return bin_by_time(events, NMNIST_SENSOR, T, window_us=window_us, binary=True)


#: binning name -> function(events, T) for N-MNIST-like sets (EventDataset.frames(binning=...)).
NMNIST_BINNINGS = {
    "hm2bp": nmnist_hm2bp,
    "tsslbp": nmnist_tsslbp,
    "stbp": nmnist_stbp,
}


# ---- the default binning of an event dataset -------------------------------------------------

@dataclass(frozen=True)
class FrameSpec:
    """How an event dataset turns one recording into T frames for training.

    sensor : (H, W) for cameras, (n_units,) for audio
    span_us : the T frames cover [t0, t0 + span_us) in equal windows, t0 = 0; None: each
        recording's own [first event, last event] (t0 = its first time, span = last - first + 1)
    binary, polarity, downsample, crop : as :func:`bin_by_time` (cameras only)
    """

    sensor: tuple
    span_us: int | None = None
    binary: bool = True
    polarity: str = "split"
    downsample: int = 1
    crop: tuple | None = None

    @property
    def audio(self) -> bool:
        return len(self.sensor) == 1

    @property
    def shape(self) -> tuple:
        if self.audio:
            return (int(self.sensor[0]),)
        return frame_shape(self.sensor, self.polarity, self.downsample, self.crop)

    def _window(self, t):
        if self.span_us is not None:
            return 0, int(self.span_us)
        if len(t) == 0:
            return 0, 1
        t0 = int(t.min())
        return t0, int(t.max()) - t0 + 1

    def batch(self, recordings, T: int, dtype=np.float64) -> np.ndarray:
        """Frames of several recordings, time-major: (T, B, *shape)."""
        T = _pos_int(T, "T")
        ks, bs, cs, ys, xs = [], [], [], [], []
        for b, ev in enumerate(recordings):
            t0, span = self._window(ev["t"])
            k = _time_index(ev["t"], T, None, span, t0)
            if self.audio:
                u = ev["unit"].astype(np.int64)
                if len(u) and u.max() >= self.sensor[0]:
                    raise DataError(f"recording {b} holds unit {u.max()} >= {self.sensor[0]}")
                c, y, x = u, np.zeros_like(u), np.zeros_like(u)
            else:
                keep, c, y, x, _ = _pixels(ev, self.sensor, self.polarity, self.downsample,
                                           self.crop)
                k = np.where(keep, k, -1)
            ks.append(k), bs.append(np.full(len(k), b, np.int64))
            cs.append(c), ys.append(y), xs.append(x)
        shape = self.shape if not self.audio else (self.sensor[0], 1, 1)
        out = np.zeros((T, len(recordings)) + shape, np.int32)
        if ks:
            cat = [np.concatenate(a).astype(np.int64) for a in (ks, bs, cs, ys, xs)]
            _accumulate(*cat, out)
        if self.binary:
            np.minimum(out, 1, out=out)
        return out.reshape((T, len(recordings)) + self.shape).astype(dtype)
