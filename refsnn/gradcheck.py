"""Central finite differences in float64, and a report that says what failed and where.

``central_fd(f, arrays)`` perturbs every entry of every array in place (restoring it after) and
returns the numerical gradient of the scalar ``f()``. ``compare(analytic, numeric)`` gives a
:class:`GradReport` with the max abs and relative error and the worst entry per array. The pass
rule is the specs' (e.g. stbp 6.2): max|fd - an| / max|an| <= rtol, with the step ``h`` and
``rtol`` given by the caller from the method's spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np


def central_fd(f: Callable[[], float], arrays: Sequence[np.ndarray], h: float = 1e-6,
               mask: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
    """(f(w + h e_i) - f(w - h e_i)) / 2h for every entry i of every array (float64 arrays).

    ``f`` reads the arrays themselves, which are perturbed in place and restored bit-exactly.
    ``mask`` (optional, one boolean array per array) limits the entries checked; others get NaN.
    """
    out = []
    for ai, a in enumerate(arrays):
        if a.dtype != np.float64:
            raise TypeError(f"central differences need float64 arrays, got {a.dtype}")
        g = np.full(a.shape, np.nan)
        sel = zip(*np.nonzero(mask[ai])) if mask is not None else np.ndindex(a.shape)
        for i in sel:                       # by index: a may be C- or F-ordered (never a copy)
            w = a[i]
            a[i] = w + h
            fp = f()
            a[i] = w - h
            fm = f()
            a[i] = w
            g[i] = (fp - fm) / (2 * h)
        out.append(g)
    return out


@dataclass
class ArrayReport:
    name: str
    shape: tuple
    max_abs: float          # max |fd - an|
    scale: float            # max(1e-300, max |an|, max |fd|)
    worst: tuple            # index of the worst entry
    an: float
    fd: float

    @property
    def rel(self) -> float:
        return self.max_abs / self.scale if self.scale > 0 else 0.0


@dataclass
class GradReport:
    arrays: list = field(default_factory=list)
    rtol: float = 1e-6

    @property
    def max_rel(self) -> float:
        return max((a.rel for a in self.arrays), default=0.0)

    @property
    def passed(self) -> bool:
        return self.max_rel <= self.rtol

    def __str__(self) -> str:
        head = f"gradcheck {'passed' if self.passed else 'FAILED'}: rule max|fd-an|/max|an| <= {self.rtol:g}"
        rows = [f"  {a.name:<10} {str(a.shape):<14} max|diff| {a.max_abs:.3e}  rel {a.rel:.3e}  "
                f"worst {a.worst}: an={a.an:.6e} fd={a.fd:.6e}" for a in self.arrays]
        return "\n".join([head] + rows)


def compare(analytic: Sequence[np.ndarray], numeric: Sequence[np.ndarray], names=None,
            rtol: float = 1e-6, scale: str = "array") -> GradReport:
    """Compare hand and FD gradients entry by entry (NaN entries of ``numeric`` are skipped).

    ``scale="array"``: each array's error relative to its own largest |an| (or |fd|);
    ``scale="global"``: relative to the largest over all arrays, the rule of the specs' FD checks
    (e.g. stbp 6.2: max|FD - grad| / max|grad|).
    """
    names = names or [f"grad[{i}]" for i in range(len(analytic))]
    rep = GradReport(rtol=rtol)
    glob = max([float(np.nanmax(np.abs(a))) if np.size(a) else 0.0 for a in analytic]
               + [float(np.nanmax(np.abs(n))) if np.size(n) and np.any(np.isfinite(n)) else 0.0
                  for n in numeric] + [1e-300])
    for name, an, fd in zip(names, analytic, numeric):
        an = np.asarray(an, dtype=np.float64)
        fd = np.asarray(fd, dtype=np.float64)
        if an.shape != fd.shape:
            raise ValueError(f"{name}: analytic shape {an.shape} != numeric shape {fd.shape}")
        diff = np.where(np.isfinite(fd), np.abs(fd - an), 0.0)
        if diff.size == 0:
            continue
        wi = np.unravel_index(int(np.argmax(diff)), diff.shape)
        own = max(float(np.max(np.abs(an))), float(np.nanmax(np.abs(fd))) if np.any(np.isfinite(fd)) else 0.0, 1e-300)
        rep.arrays.append(ArrayReport(name, an.shape, float(diff[wi]),
                                      glob if scale == "global" else own,
                                      tuple(int(i) for i in wi), float(an[wi]), float(fd[wi])))
    return rep


def richardson_fd(f: Callable[[], float], arrays: Sequence[np.ndarray], h: float = 1e-6,
                  mask: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
    """Central differences at h and h/2 combined, (4 D(h/2) - D(h)) / 3: the h² truncation term
    cancels (error O(h⁴)), for sharply curved smooth objectives (e.g. a narrow Gaussian
    relaxation) where D(h)'s own truncation error would exceed the rule."""
    d1 = central_fd(f, arrays, h=h, mask=mask)
    d2 = central_fd(f, arrays, h=h / 2, mask=mask)
    return [(4.0 * b - a) / 3.0 for a, b in zip(d1, d2)]


def check(f: Callable[[], float], arrays, analytic, h: float = 1e-6, rtol: float = 1e-6,
          names=None, scale: str = "global", richardson: bool = False) -> GradReport:
    """central_fd (or richardson_fd) + compare in one call."""
    fd = (richardson_fd if richardson else central_fd)(f, arrays, h=h)
    return compare(analytic, fd, names=names, rtol=rtol, scale=scale)


def side_by_side(f: Callable[[], float], arrays, analytic, names, h: float = 1e-6,
                 rtol: float = 1e-6, scale: str = "global", show=print) -> GradReport:
    """central_fd of ``f``, shown beside the hand gradient array by array, then the report.

    What the walkthroughs print in their "hand gradient vs finite differences" step; returns the
    :class:`GradReport` (its ``passed`` is the spec's rule with ``h`` and ``rtol``).
    """
    numeric = central_fd(f, arrays, h=h)
    for name, an, fd in zip(names, analytic, numeric):
        show(f"  {name} hand:\n{np.asarray(an)}\n  {name} central differences (h = {h:g}):\n{fd}")
    rep = compare(analytic, numeric, names=names, rtol=rtol, scale=scale)
    show("  " + str(rep).replace("\n", "\n  "))
    return rep
