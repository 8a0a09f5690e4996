"""Input coding: turn a batch of static samples into the time-major input x of a network.

Every function returns an array of shape (T, B, *shape) for input of shape (B, *shape). The random
codes draw from the ``numpy.random.Generator`` they are given, one uniform number U ~ U[0, 1) per
element and step, in C order of (T, B, *shape) (step by step, each step a block ``rng.random((B,
*shape))`` in float64 whatever ``dtype`` is): the same generator state gives the same spikes, and
another implementation can reproduce them from the same stream.

Codes and the specs that define them (spec/<method>.md, section 3):

``bernoulli``  STBP S20 (also stbp's default): x[t] = 1 if p > U[t], else 0, with p in [0, 1], so
               P(spike) = p; a pixel of 0 never fires, a pixel of 1 always does.
``poisson``    the general rate code the other specs vary: x[t] = sign(p) * 1[rate * |p| > U[t]],
               optionally with step 0 silent. Settings:
               - HM2-BP MNIST (hm2bp 3): rate = 1/5.5 (q = byte / (5.5*255) <= 0.1818),
                 first_step_silent=True (t = 0 never spikes);
               - spike-based BP F0 (spikebp 3): MNIST rate = 1/2 with p in [0, 1]; CIFAR-10
                 rate = 1 on normalised p, signed spikes in {-1, 0, +1} (signed=True).
``direct``     analog current repeated every step: x[t] = (p - mean) / std for every t.
               - STBP `code_mnist` analog input (stbp 3), BPSTA "direct" encoding (bpsta 3):
                 mean 0, std 1 (the pixel itself);
               - TSSL-BP MNIST/Fashion-MNIST (tsslbp 3): mean 0.1307, std 0.3081; TSSL-BP's
                 synaptic filter E1 is then applied by the method, not here.

:data:`METHOD_ENCODING` gives each method's MNIST coding as ``(name, keyword arguments)``.
Method-specific schedules are left to the caller: HM2-BP's MLP runs draw the trains once at load
time and reuse them every epoch (hm2bp 3).
"""

from __future__ import annotations

import numpy as np

from refsnn.errors import ConfigError, DataError

__all__ = ["bernoulli", "poisson", "direct", "encode", "ENCODINGS", "METHOD_ENCODING"]


def _check_T(T) -> int:
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ConfigError(f"the number of time steps T must be an int >= 1, got {T!r}")
    return int(T)


def _check_rng(rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(
            f"rng must be a numpy.random.Generator, got {type(rng).__name__}; "
            f"use numpy.random.default_rng(seed)"
        )
    return rng


def _check_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.kind != "f":
        raise ConfigError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _as_float(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim < 1:
        raise DataError(f"{name} must have a batch axis, shape (B, ...), got a scalar")
    if x.dtype.kind not in "fiu":
        raise DataError(f"{name} must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise DataError(f"{name} holds NaN or infinite values")
    return x


def _rate_spikes(p, T, rng, dtype, rate, signed, first_step_silent):
    """x[t] = sign(p) * 1[rate*|p| > U[t]] (sign when signed); x[0] = 0 if first_step_silent."""
    T = _check_T(T)
    rng = _check_rng(rng)
    dt = _check_dtype(dtype)
    q = rate * np.abs(p) if signed else rate * p  # firing probability per step
    sign = np.sign(p).astype(dt) if signed else None
    out = np.empty((T,) + p.shape, dtype=dt)
    for t in range(T):
        U = rng.random(p.shape)  # drawn at every step, also at t = 0 when it is silent
        out[t] = q > U
        if signed:
            out[t] *= sign
    if first_step_silent:
        out[0] = 0.0
    return out


def bernoulli(x01, T, rng, dtype=np.float64) -> np.ndarray:
    """STBP S20: x[t] = 1 if p > U[t] else 0, U[t] ~ U[0, 1) fresh per pixel and step.

    Parameters
    ----------
    x01 : array (B, *shape) of pixels in [0, 1]
    T : int, number of steps
    rng : numpy.random.Generator
    dtype : float32 or float64 (spikes are exactly 0.0 or 1.0 in both)

    Returns
    -------
    (T, B, *shape) array of 0/1 spikes with P(x[t] = 1) = p.
    """
    p = _as_float(x01, "x01")
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise DataError(
            f"bernoulli coding reads pixels in [0, 1], got values in [{p.min():g}, {p.max():g}]; "
            f"divide bytes by 255 (Dataset.x01) or use the 'poisson' code with signed=True"
        )
    return _rate_spikes(p, T, rng, dtype, 1.0, False, False)


def poisson(x, T, rng, dtype=np.float64, *, rate=1.0, signed=False, first_step_silent=False):
    """Rate code with a maximum rate: x[t] = sign(p) * 1[rate * |p| > U[t]], U[t] ~ U[0, 1).

    Parameters
    ----------
    x : array (B, *shape); in [0, 1] unless ``signed``
    T : int
    rng : numpy.random.Generator
    dtype : float32 or float64
    rate : float in (0, 1]
        Spike probability per step of a pixel of 1 (hm2bp: 1/5.5; spikebp MNIST: 1/2).
    signed : bool
        Spikes carry the sign of p (spikebp CIFAR-10: normalised pixels, spikes in {-1, 0, +1});
        then rate * |p| must stay <= 1.
    first_step_silent : bool
        x[0] = 0 for every pixel (hm2bp: t = 0 never spikes). U[0] is drawn all the same.

    "Poisson" is the papers' word; per step it is a Bernoulli draw, at most one spike per step.
    """
    p = _as_float(x, "x")
    if not (isinstance(rate, (int, float, np.floating)) and 0.0 < rate <= 1.0):
        raise ConfigError(f"rate must be a probability in (0, 1], got {rate!r}")
    if p.size:
        lo, hi = float(p.min()), float(p.max())
        if not signed and lo < 0.0:
            raise DataError(
                f"poisson coding got negative values (min {lo:g}); pass signed=True for signed "
                f"spikes, or pixels in [0, 1]"
            )
        if rate * max(abs(lo), abs(hi)) > 1.0:
            raise DataError(
                f"poisson coding: rate * |x| reaches {rate * max(abs(lo), abs(hi)):g} > 1, "
                f"which is not a probability; lower rate or rescale x"
            )
    return _rate_spikes(p, T, rng, dtype, float(rate), bool(signed), bool(first_step_silent))


def direct(x, T, dtype=np.float64, *, mean=0.0, std=1.0) -> np.ndarray:
    """Direct (analog current) coding: x[t] = (p - mean) / std at every step t (no randomness).

    STBP analog input and BPSTA direct encoding use mean 0, std 1; TSSL-BP MNIST and
    Fashion-MNIST use mean 0.1307, std 0.3081. ``mean``/``std`` may be scalars or arrays that
    broadcast against one sample (e.g. per-channel (C, 1, 1)).

    Returns a (T, B, *shape) array (a fresh copy, not a broadcast view).
    """
    T = _check_T(T)
    dt = _check_dtype(dtype)
    p = _as_float(x, "x")
    std = np.asarray(std, dtype=np.float64)
    if not np.all(np.isfinite(std)) or np.any(std <= 0):
        raise ConfigError(f"std must be positive and finite, got {std!r}")
    v = ((p - np.asarray(mean, dtype=np.float64)) / std).astype(dt)
    return np.repeat(v[np.newaxis], T, axis=0)


#: name -> coding function: random ones take (x, T, rng, dtype, **kw), direct (x, T, dtype, **kw).
ENCODINGS = {"bernoulli": bernoulli, "poisson": poisson, "direct": direct}
_RANDOM = {"bernoulli", "poisson"}

#: method -> (encoding name, keyword arguments) for MNIST-like images, as each spec's section 3.
METHOD_ENCODING = {
    "stbp": ("bernoulli", {}),                                         # S20
    "hm2bp": ("poisson", {"rate": 1.0 / 5.5, "first_step_silent": True}),
    "spikebp": ("poisson", {"rate": 0.5}),                             # F0, MNIST
    "tsslbp": ("direct", {"mean": 0.1307, "std": 0.3081}),
    "bpsta": ("direct", {}),
}


def encode(name, x01, T, rng=None, dtype=np.float64, **kw) -> np.ndarray:
    """Apply the coding ``name`` of :data:`ENCODINGS` to ``x01`` (B, *shape): (T, B, *shape).

    ``rng`` is required by the random codes and ignored by ``direct``. Extra keywords go to the
    coding function (e.g. ``rate=``, ``mean=``).
    """
    if name not in ENCODINGS:
        raise ConfigError(f"unknown encoding {name!r}; valid encodings: {', '.join(ENCODINGS)}")
    fn = ENCODINGS[name]
    try:
        if name in _RANDOM:
            return fn(x01, T, rng, dtype, **kw)
        return fn(x01, T, dtype, **kw)
    except TypeError as err:
        if "unexpected keyword" not in str(err):
            raise
        raise ConfigError(f"encoding {name!r}: {err}") from None
