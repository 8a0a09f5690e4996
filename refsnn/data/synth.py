"""``nmnist-synth``: N-MNIST-like recordings made from static images by an event-camera model.

The model (docs/events.md; formats.md 7.2-7.3 sketches it, after the v2e/ESIM pixel model):

1. Scene. A 28x28 image with pixels in [0, 1] lies at the top-left of a 34x34 canvas (zeros
   elsewhere). Its content moves along the N-MNIST saccade path (0, 0) -> (3.5, 7) -> (7, 0) ->
   (0, 0) px (x, y), linearly, ``saccade_us`` = 105 ms per leg, so 315 ms in all. The intensity
   of sensor pixel (r, c) at time t is the image sampled bilinearly at (r - dy(t), c - dx(t)),
   0 outside the image; it is evaluated on frames every ``frame_us`` (1 ms) and taken linear in
   between.
2. Pixel. L = ln(I + eps). Each pixel keeps a reference level L_ref, first set to L at t = 0.
   When L crosses L_ref + C_on (rising) or L_ref - C_off (falling), the pixel emits an ON or OFF
   event at the crossing time (found by linear interpolation inside the frame interval) and
   L_ref moves by +C_on or -C_off; several crossings in one interval give several events.
   Thresholds are drawn once per pixel for the whole set ("one sensor"): C ~ N(contrast,
   sigma_contrast), floored at 0.01.
3. Refractory period. A crossing less than ``refractory_us`` after the pixel's last emitted
   event is not emitted; L_ref still moves (the pixel is held in reset while refractory).
4. Timestamp jitter. Each emitted time gets N(0, jitter_us) noise, is rounded to whole
   microseconds and floored at 0; events are sorted by time (stable, ties in pixel order).

Every random draw comes from one numpy Generator seeded by the caller, so a seed gives the same
bytes. :func:`write_nmnist_synth` writes the N-MNIST tree (``Train/<digit>/<id>.bin``,
``Test/...``, id = 1-based index of the image in its split, 5 digits) with the real writer, so
the real reader is what reads it back, plus ``nmnist-synth.json`` recording the parameters.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from numba import njit

from refsnn.data.binning import SACCADE_US, saccade_offset
from refsnn.data.events import CAMERA_DTYPE, NMNIST_SENSOR, NMNIST_T_MAX, write_nmnist
from refsnn.errors import ConfigError, DataError

__all__ = ["SynthParams", "synth_events", "synth_recordings", "write_nmnist_synth",
           "MARKER", "SYNTH_VERSION"]

MARKER = "nmnist-synth.json"
SYNTH_VERSION = 1


@dataclass(frozen=True)
class SynthParams:
    """Parameters of the event-camera model (module docstring); defaults give N-MNIST density.

    contrast 0.5 (ln units) gives about as many events per digit as a real N-MNIST recording
    (formats.md 7.3 calibration; docs/events.md has the measured counts).
    """

    contrast: float = 0.5          # mean contrast threshold C (ln intensity)
    sigma_contrast: float = 0.03   # per-pixel spread of C_on, C_off
    eps: float = 0.1               # L = ln(I + eps)
    frame_us: int = 1000           # scene sampling interval
    saccade_us: int = SACCADE_US   # one leg of the triangle
    amplitude: float = 1.0         # scales the saccade path (0: no motion)
    refractory_us: float = 1000.0
    jitter_us: float = 100.0

    def __post_init__(self):
        def bad(msg):
            raise ConfigError(f"SynthParams: {msg}")
        for name in ("contrast", "eps"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                bad(f"{name}={v!r} must be a finite number > 0")
        for name in ("sigma_contrast", "amplitude", "refractory_us", "jitter_us"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                bad(f"{name}={v!r} must be a finite number >= 0")
        for name in ("frame_us", "saccade_us"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(f"{name}={v!r} must be an int >= 1")
        if self.saccade_us % self.frame_us:
            bad(f"saccade_us={self.saccade_us} must be a multiple of frame_us={self.frame_us}")
        if 3 * self.saccade_us + 10 * self.jitter_us > NMNIST_T_MAX:
            bad("the recording would not fit the 23-bit N-MNIST timestamps")


@njit(cache=True)
def _intensity(img, r, c, r0, c0, fr, fc):
    """Image value at (r + r0 + fr, c + c0 + fc), bilinear, 0 outside the image (step 1)."""
    H, W = img.shape
    v = 0.0
    for dr in range(2):
        rr = r + r0 + dr
        if rr < 0 or rr >= H:
            continue
        wr = fr if dr else 1.0 - fr
        for dc in range(2):
            cc = c + c0 + dc
            if cc < 0 or cc >= W:
                continue
            wc = fc if dc else 1.0 - fc
            v += wr * wc * img[rr, cc]
    return v


@njit(cache=True)
def _pixel_events(img, dy, dx, c_on, c_off, eps, frame_us, refractory_us, ox, oy, op, ot):
    """Steps 1-3 of the model for every pixel; writes events into ox..ot, returns their count.

    dy[k], dx[k]: content offset at frame k (time k * frame_us); pixel (r, c) sees the image at
    (r - dy[k], c - dx[k]). Returns -1 if the buffers are too small (the caller retries).
    """
    H, W = c_on.shape
    K = dy.shape[0]
    cap = ox.shape[0]
    r0 = np.empty(K, np.int64)                   # the sample position's integer and fractional
    c0 = np.empty(K, np.int64)                   # parts are the same for every pixel
    fr = np.empty(K)
    fc = np.empty(K)
    for k in range(K):
        r0[k] = math.floor(-dy[k])
        c0[k] = math.floor(-dx[k])
        fr[k] = -dy[k] - r0[k]
        fc[k] = -dx[k] - c0[k]
    n = 0
    for r in range(H):
        for c in range(W):
            I_prev = _intensity(img, r, c, r0[0], c0[0], fr[0], fc[0])
            L_prev = math.log(I_prev + eps)
            L_ref = L_prev                                       # no events at t = 0
            last = -1e300
            for k in range(1, K):
                I = _intensity(img, r, c, r0[k], c0[k], fr[k], fc[k])
                if I == I_prev:
                    continue
                I_prev = I
                L = math.log(I + eps)
                while True:
                    if L >= L_ref + c_on[r, c]:                  # ON crossing
                        level = L_ref + c_on[r, c]
                        pol = 1
                    elif L <= L_ref - c_off[r, c]:               # OFF crossing
                        level = L_ref - c_off[r, c]
                        pol = 0
                    else:
                        break
                    frac = (level - L_prev) / (L - L_prev)       # linear in the interval
                    frac = min(max(frac, 0.0), 1.0)
                    t = (k - 1 + frac) * frame_us
                    L_ref = level                                # moves also when refractory
                    if t - last >= refractory_us:
                        if n >= cap:
                            return -1
                        ox[n], oy[n], op[n], ot[n] = c, r, pol, t
                        n += 1
                        last = t
                L_prev = L
    return n


def _thresholds(p: SynthParams, rng):
    shape = NMNIST_SENSOR
    c_on = np.maximum(rng.normal(p.contrast, p.sigma_contrast, shape), 0.01)
    c_off = np.maximum(rng.normal(p.contrast, p.sigma_contrast, shape), 0.01)
    return c_on, c_off


def _path(p: SynthParams):
    K = 3 * p.saccade_us // p.frame_us + 1
    t = np.arange(K, dtype=np.float64) * p.frame_us * (SACCADE_US / p.saccade_us)
    dx, dy = saccade_offset(t)
    dx, dy = p.amplitude * dx, p.amplitude * dy
    dx[-1] = dy[-1] = 0.0                                        # closed path: back at (0, 0)
    return np.ascontiguousarray(dy), np.ascontiguousarray(dx)


def synth_events(image, rng, params: SynthParams | None = None, thresholds=None) -> np.ndarray:
    """One recording (CAMERA_DTYPE, sorted by t) of ``image`` (28x28, floats in [0, 1] or uint8).

    ``thresholds`` = (C_on, C_off), each (34, 34); drawn from ``rng`` when not given.
    """
    p = params or SynthParams()
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[0] == 1:
        img = img[0]
    if img.ndim != 2 or img.shape[0] > NMNIST_SENSOR[0] or img.shape[1] > NMNIST_SENSOR[1]:
        raise DataError(f"synth_events reads one grey image of at most 34x34, got shape "
                        f"{img.shape}")
    img = img.astype(np.float64) / 255.0 if img.dtype == np.uint8 else img.astype(np.float64)
    if img.size and (not np.isfinite(img).all() or img.min() < 0 or img.max() > 1):
        raise DataError("synth_events reads intensities in [0, 1] (or uint8 bytes)")
    c_on, c_off = thresholds if thresholds is not None else _thresholds(p, rng)
    dy, dx = _path(p)
    cap = 8192
    while True:
        bufs = (np.empty(cap, np.int64), np.empty(cap, np.int64), np.empty(cap, np.int64),
                np.empty(cap, np.float64))
        n = _pixel_events(img, dy, dx, c_on, c_off, float(p.eps), float(p.frame_us),
                          float(p.refractory_us), *bufs)
        if n >= 0:
            break
        cap *= 4
    x, y, pol, t = (b[:n] for b in bufs)
    if p.jitter_us > 0:
        t = t + rng.normal(0.0, p.jitter_us, n)
    t = np.maximum(np.rint(t), 0).astype(np.int64)
    order = np.argsort(t, kind="stable")
    ev = np.empty(n, CAMERA_DTYPE)
    ev["x"], ev["y"], ev["p"], ev["t"] = x[order], y[order], pol[order], t[order]
    return ev


def synth_recordings(images, rng, params: SynthParams | None = None) -> list:
    """Recordings of many images with one sensor (one draw of per-pixel thresholds)."""
    p = params or SynthParams()
    th = _thresholds(p, rng)
    return [synth_events(img, rng, p, th) for img in images]


def write_nmnist_synth(out, train, test, seed: int = 0, params: SynthParams | None = None,
                       progress=None) -> Path:
    """Write the N-MNIST tree of ``train`` = (images, labels) and ``test`` into folder ``out``.

    The tree is built in a temporary folder beside ``out`` and renamed into place, so ``out`` is
    either absent or complete. ``out`` must not exist yet, or be an empty folder.
    ``progress(done, total)`` is called after each recording when given.
    Returns ``out``.
    """
    p = params or SynthParams()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not an empty folder; choose a new folder")
    rng = np.random.default_rng(seed)
    th = _thresholds(p, rng)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    total = sum(len(s[1]) for s in (train, test))
    done = 0
    try:
        counts = {}
        for split, (images, labels) in (("Train", train), ("Test", test)):
            labels = np.asarray(labels)
            if len(images) != len(labels):
                raise DataError(f"{split}: {len(images)} images but {len(labels)} labels")
            if len(labels) and (labels.min() < 0 or labels.max() > 9):
                raise DataError(f"{split}: N-MNIST labels are digits 0..9")
            for d in range(10):
                (tmp / split / str(d)).mkdir(parents=True, exist_ok=True)
            n_ev = []
            for i, (img, label) in enumerate(zip(images, labels)):
                ev = synth_events(img, rng, p, th)
                write_nmnist(tmp / split / str(int(label)) / f"{i + 1:05d}.bin", ev)
                n_ev.append(len(ev))
                done += 1
                if progress is not None:
                    progress(done, total)
            counts[split] = {"n": len(labels), "events_mean": float(np.mean(n_ev)) if n_ev
                             else 0.0}
        meta = {"format": "nmnist", "generator": "refsnn.data.synth", "version": SYNTH_VERSION,
                "seed": int(seed), "params": asdict(p), "splits": counts}
        (tmp / MARKER).write_text(json.dumps(meta, indent=1) + "\n")
        if out.exists():
            out.rmdir()                                        # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
