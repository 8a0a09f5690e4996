"""STBP: spatio-temporal backpropagation (Wu, Deng, Li, Zhu, Shi, Front. Neurosci. 12:331, 2018,
arXiv 1706.02609), as specified in spec/stbp.md, with the official code's choices as defaults.

Symbols (spec 2.2, 5): ``u`` membrane potential before the reset (compared with V_th), ``o``
spike (0/1, or H_k(u - V_th) in the relaxed forward), ``h`` surrogate slope h(u - V_th),
``d`` = ∂L/∂o (the paper's δ), ``e`` = ∂L/∂u (the paper's ε), ``g`` the part of ∂L/∂o that comes
from above at the same step. refsnn names (spec/README.md): τ -> ``decay``, V_th -> ``v_th``,
a -> ``surrogate_width``. Arrays are time-major: (T, B, N).

Exact: S1-S8 (forward, loss, ∂L/∂o^L), S13 (the exact BPTT of the relaxed forward, 6.2), S15,
S17-S19 adjoints (in refsnn/layers.py and below). The approximation is ∂o/∂u := h (S9-S12). S14
("paper") and S16 ("sd") drop paths: each is the exact gradient of a stop-gradient model (6.2),
built by :func:`tangent_loss` for the finite-difference checks.

Layout, in the paper's order:
1. STBPParams (5.6), with the training switches dropout (S19);
2. surrogate curves S9-S12 and their antiderivatives H_k (5.1);
3. forward kernel S2-S4 (S1/S17 are the layers' linear maps);
4. decoding and loss S5-S8;
5. backward kernels S13 ("code"), S14 ("paper"), S16 ("sd"); S15 is the layers' weight GEMM;
6. S19 dropout (S23 init is refsnn.layers.init_rownorm);
7. the STBP Method: the chain over the layers, the oracle's run_case, presets (8.1);
8. tangent_loss: the functions of spec 6.2 whose exact gradient each variant is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from ..errors import ConfigError, ShapeError
from ..kernels import dense as dense_kernels
from ..kernels import blas, stbp_fused
from ..kernels.stbp_fused import lif_row
from .base import FDCheck, Method, Params, Trace, check_finite, check_range, param, per_layer

# --------------------------------------------------------------------------------------------
# 1. Parameters (spec 5.6; refsnn names of spec/README.md)
# --------------------------------------------------------------------------------------------

SURROGATES = ("rect", "poly", "sigmoid", "gauss")      # S9, S10, S11, S12 (kernel codes 0..3)
RECT, POLY, SIGMOID, GAUSS = 0, 1, 2, 3
VARIANTS = ("code", "paper", "sd")                     # S13, S14, S16 (kernel codes 0..2)

#: The fused path for chains of dense layers (kernels/stbp_fused.py): "auto" takes it whenever
#: it applies (STBP.fused_applies), "off" always runs the general layer-by-layer chain.
FUSED = "auto"
#: How the fused backward sends the error down (S13c / S14c): "rows" (inside the layer below's
#: BPTT kernel, the rows of e W over the nonzero errors only), "gemm" (one BLAS GEMM), or
#: "auto": "rows" when at most G_DOWN_DENSITY[dtype] of the errors are nonzero, else "gemm"
#: (crossover measured in benchmarks/README.md, "Fused STBP path"; computing e W only where the
#: surrogate of the layer below is nonzero, one dot product per entry, measured slower than
#: both: see there).
G_DOWN = "auto"
G_DOWN_DENSITY = {np.dtype(np.float64): 0.4, np.dtype(np.float32): 0.4}


@dataclass(frozen=True)
class STBPParams(Params):
    """Hyper-parameters of STBP (spec 5.6); defaults are the official code's."""

    METHOD = "stbp"
    decay: float = param(0.2, "per-step decay factor τ of the membrane, in [0, 1)", "S2-S3")
    v_th: float = param(0.5, "firing threshold V_th (one value, or one per spiking layer)", "S4")
    surrogate: str = param("rect", "surrogate curve h of ∂o/∂u", "S9-S12", choices=SURROGATES)
    surrogate_width: float = param(1.0, "width a of the surrogate curve (> 0)", "S9-S12")
    rect_norm: bool = param(True, "rect height 1/a (paper); False: height 1 (code ActFun)", "S9")
    reset_form: str = param("linear", "reset factor f(o): τ(1-o) (code) or τ·exp(-o/τ) (paper)",
                            "S3", choices=("linear", "exp"))
    reset_grad: bool = param(True, "backpropagate through the reset path f'(o)", "S13a")
    variant: str = param("code", "backward: exact BPTT (code), the paper's recursion, "
                         "spatial only (sd)", "S13/S14/S16", choices=("code", "paper", "sd"))
    loss: str = param("mse_mean", "MSE of the readout: mean over S·C (code) or 1/(2S) Σ (paper)",
                      "S6/S7", choices=("mse_mean", "paper"))
    S: float = param(0, "batch normalisation 1/S of the loss; 0 = the number of samples in the "
                     "batch (1 in run_case, the spec's default)", "S6/S7")
    vote_k: int = param(1, "output neurons per class of the voting readout", "S5")
    strict: bool = param(True, "fire on u > V_th (code); False: u >= V_th (paper)", "S4")
    relax: bool = param(False, "smooth forward o = H_k(u - V_th) (testing only)", "S4, 6.2")
    dropout: float = param(0.0, "dropout rate p on the input of every spiking layer but the first "
                           "and the last, a new mask per step (training only)", "S19")

    def validate(self):
        super().validate()
        m = self.METHOD
        check_finite(m, decay=self.decay, v_th=self.v_th, surrogate_width=self.surrogate_width,
                     S=self.S, dropout=self.dropout)
        if np.ndim(self.v_th) > 1 or (np.ndim(self.v_th) == 1 and len(self.v_th) == 0):
            raise ConfigError(f"{m}: v_th={self.v_th!r} must be one number or one per spiking layer")
        check_range(m, "decay", self.decay, 0.0, 1.0, hi_open=True)
        check_range(m, "surrogate_width", self.surrogate_width, 0.0, None, lo_open=True)
        check_range(m, "S", self.S, 0.0, None)
        check_range(m, "dropout", self.dropout, 0.0, 1.0, hi_open=True)
        for name in ("rect_norm", "reset_grad", "strict", "relax"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ConfigError(f"{m}: {name}={getattr(self, name)!r} must be true or false")
        if isinstance(self.vote_k, bool) or not float(self.vote_k).is_integer() or self.vote_k < 1:
            raise ConfigError(f"{m}: vote_k={self.vote_k!r} must be a positive integer")
        if self.reset_form == "exp" and self.decay <= 0:
            raise ConfigError(f"{m}: reset_form 'exp' is τ·exp(-o/τ) and needs decay > 0 "
                              f"(got decay={self.decay}); use reset_form 'linear' for decay 0")
        if (self.relax and self.surrogate == "rect" and not self.rect_norm
                and self.surrogate_width != 1.0):
            raise ConfigError(f"{m}: relax with the rect surrogate, rect_norm false and "
                              f"surrogate_width={self.surrogate_width} has no antiderivative H_k "
                              "(a height-1 window of width a != 1 does not rise from 0 to 1); "
                              "set rect_norm true or surrogate_width 1")


# --------------------------------------------------------------------------------------------
# 2. Surrogate curves S9-S12 and their antiderivatives (spec 5.1); x = u - V_th
# --------------------------------------------------------------------------------------------

@njit(cache=True)
def surrogate_h(x, kind, a, rect_norm):
    """S9-S12: the slope h(x) that replaces ∂o/∂u, evaluated at x = u - V_th.

    Supports are strict (|x| < a/2 for S9, |x| < 2/√a for S10). S11 uses the even form
    e^{-|x|/a} / (a (1 + e^{-|x|/a})²), which keeps its relative precision for large |x|.
    """
    if kind == RECT:                                        # S9
        if abs(x) < a / 2.0:
            return 1.0 / a if rect_norm else 1.0            # rect_norm False: the code's height 1
        return 0.0
    if kind == POLY:                                        # S10
        if abs(x) < 2.0 / math.sqrt(a):
            return math.sqrt(a) / 2.0 - (a / 4.0) * abs(x)
        return 0.0
    if kind == SIGMOID:                                     # S11, even form
        z = math.exp(-abs(x) / a)
        return z / (a * (1.0 + z) * (1.0 + z))
    return math.exp(-x * x / (2.0 * a)) / math.sqrt(2.0 * math.pi * a)   # S12


@njit(cache=True)
def surrogate_H(x, kind, a):
    """Antiderivative H_k of S9-S12 with H_k(-inf) = 0: the relaxed spike o = H_k(u - V_th) (S4)."""
    if kind == RECT:                                        # clip(x/a + 1/2, 0, 1)
        return min(max(x / a + 0.5, 0.0), 1.0)
    if kind == POLY:
        w = 2.0 / math.sqrt(a)
        if x <= -w:
            return 0.0
        if x <= 0.0:
            return (a / 8.0) * (x + w) * (x + w)
        if x < w:
            return 1.0 - (a / 8.0) * (w - x) * (w - x)
        return 1.0
    if kind == SIGMOID:                                     # σ(x/a) without overflow
        z = x / a
        if z >= 0.0:
            return 1.0 / (1.0 + math.exp(-z))
        ez = math.exp(z)
        return ez / (1.0 + ez)
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0 * a)))   # S12, C library erf


# --------------------------------------------------------------------------------------------
# 3. Forward: S2-S4 per spiking layer (S1 / S17 are the layer's linear map I = W o^{l-1} + b)
# --------------------------------------------------------------------------------------------

@njit(cache=True)
def reset_factor(o, decay, reset_exp):
    """S3: f(o) = τ(1 - o) ("linear", code) or τ·exp(-o/τ) ("exp", Frontiers)."""
    if reset_exp:
        return decay * math.exp(-o / decay)
    return decay * (1.0 - o)


@njit(cache=True)
def reset_slope(o, decay, reset_exp):
    """S3: f'(o) = -τ ("linear") or -exp(-o/τ) ("exp")."""
    if reset_exp:
        return -math.exp(-o / decay)
    return -decay


@njit(cache=True, parallel=True)
def lif_forward(I, decay, v_th, reset_exp, strict, relax, kind, a, rect_norm):
    """S2-S4 over t = 0..T-1, and the surrogate slope h (S9-S12) at the pre-reset u.

    I : (T, B, N) input current (S1/S17). u[-1] = 0, o[-1] = 0.
    S2: u[t] = (f(o[t-1]) · u[t-1]) + I[t], f from S3 evaluated first.
    S4: o[t] = 1[u[t] > V_th] (strict) or 1[u[t] >= V_th]; relax: o[t] = H_k(u[t] - V_th).
    Returns u, o, h, each (T, B, N).
    """
    T, B, N = I.shape
    u = np.empty_like(I)
    o = np.empty_like(I)
    h = np.empty_like(I)
    if not relax:                   # the same expressions, one row at a time, written out per
        for b in prange(B):         # surrogate (kernels/stbp_fused.lif_row): the same bits
            zrow = np.zeros(N, I.dtype)                     # u[-1] = o[-1] = 0
            for t in range(T):
                if t == 0:
                    lif_row(I[t, b], zrow, zrow, u[t, b], o[t, b], h[t, b], decay, v_th,
                             reset_exp, strict, kind, a, rect_norm)
                else:
                    lif_row(I[t, b], u[t - 1, b], o[t - 1, b], u[t, b], o[t, b], h[t, b],
                             decay, v_th, reset_exp, strict, kind, a, rect_norm)
        return u, o, h
    for b in prange(B):                                     # each b writes only its own slice
        u_prev = np.zeros(N)                                # u[-1] = 0
        o_prev = np.zeros(N)                                # o[-1] = 0
        for t in range(T):
            for i in range(N):                              # inner loop: contiguous in memory
                f = reset_factor(o_prev[i], decay, reset_exp)           # S3
                u[t, b, i] = f * u_prev[i] + I[t, b, i]                 # S2
                ut = u[t, b, i]
                x = ut - v_th
                if relax:
                    o[t, b, i] = surrogate_H(x, kind, a)                # relaxed S4 (6.2)
                elif strict:
                    o[t, b, i] = 1.0 if ut > v_th else 0.0              # S4, code: u > V_th
                else:
                    o[t, b, i] = 1.0 if ut >= v_th else 0.0             # S4, paper: u >= V_th
                h[t, b, i] = surrogate_h(x, kind, a, rect_norm)         # S9-S12
                u_prev[i] = ut
                o_prev[i] = o[t, b, i]
    return u, o, h


# --------------------------------------------------------------------------------------------
# 4. Decoding and loss: S5 (rate, voting), S6 / S7 (MSE), S8 (∂L/∂o^L)
# --------------------------------------------------------------------------------------------

@njit(cache=True)
def rate_readout(o, k):
    """S5: r_i = (1/T) Σ_t o_i[t]; z_c = (1/k) Σ_{i: ⌊i/k⌋ = c} r_i. o (T, B, N) -> r (B, N), z (B, C)."""
    T, B, N = o.shape
    C = N // k
    r = np.zeros((B, N))
    z = np.zeros((B, C))
    for b in range(B):
        for i in range(N):
            s = 0.0
            for t in range(T):
                s += o[t, b, i]
            r[b, i] = s / T
        for c in range(C):
            s = 0.0
            for j in range(k):
                s += r[b, c * k + j]
            z[b, c] = s / k
    return r, z


@njit(cache=True)
def mse_loss(o, y, k, S, paper):
    """S6 / S7 on the readout z of S5, and S8: ∂L/∂o^L_i[t] = G_{⌊i/k⌋} / (k·T) for every t.

    y : (B, C) targets. paper: L = Σ_s Σ_c (z - y)² / (2S), G = (z - y)/S (S6);
    else L = Σ_s Σ_c (z - y)² / (S·C), G = 2(z - y)/(S·C) (S7, nn.MSELoss 'mean').
    Returns L (the batch loss: the sum of the per-sample losses), g (T, B, N), r, z.
    """
    T, B, N = o.shape
    C = N // k
    r, z = rate_readout(o, k)
    g = np.empty_like(o)
    L = 0.0
    for b in range(B):
        for c in range(C):
            diff = z[b, c] - y[b, c]
            if paper:
                L += diff * diff / (2.0 * S)
                G = diff / S
            else:
                L += diff * diff / (S * C)
                G = 2.0 * diff / (S * C)
            for j in range(k):
                for t in range(T):
                    g[t, b, c * k + j] = G / (k * T)                     # S8
    return L, g, r, z


# --------------------------------------------------------------------------------------------
# 5. Backward: S13 (code), S14 (paper), S16 (sd); reversed over t, e[T] = 0
# --------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True)
def bptt_code(g, u, o, h, decay, reset_exp, reset_grad):
    """S13, t = T-1..0 with e[T] = 0: the exact BPTT of the (relaxed) forward.

    S13a: d[t] = g[t] + e[t+1]·u[t]·f'(o[t])   (reset path; only if reset_grad)
    S13b: e[t] = d[t]·h[t] + e[t+1]·f(o[t])      (leak path)
    Returns d = ∂L/∂o and e = ∂L/∂u, (T, B, N). The error to the layer below is W^T e (S13c).
    """
    T, B, N = g.shape
    d = np.empty_like(g)
    e = np.empty_like(g)
    for b in prange(B):
        e_next = np.zeros(N)                                              # e[T] = 0
        for t in range(T - 1, -1, -1):
            for i in range(N):
                dt = g[t, b, i]
                if reset_grad:
                    dt += e_next[i] * u[t, b, i] * reset_slope(o[t, b, i], decay, reset_exp)  # S13a
                et = dt * h[t, b, i] + e_next[i] * reset_factor(o[t, b, i], decay, reset_exp)  # S13b
                d[t, b, i] = dt
                e[t, b, i] = et
                e_next[i] = et
    return d, e


@njit(cache=True, parallel=True)
def bptt_paper(g, u, o, h, decay, reset_exp, reset_grad):
    """S14, the paper's recursion, t = T-1..0 (δ = ∂L/∂o, ε = ∂L/∂u; δ[T] = ε[T] = 0).

    S14a: δ[t] = g_P[t] + δ[t+1]·h[t+1]·u[t]·f'(o[t])   (only if reset_grad)
    S14b: ε[t] = δ[t]·h[t] + ε[t+1]·f(o[t])
    S14c: the error sent down is W^T (δ ⊙ h), returned as q = δ·h.
    Returns δ, ε, q, each (T, B, N). Not the gradient of the forward: of S22 (spec 6.2).
    """
    T, B, N = g.shape
    delta = np.empty_like(g)
    eps = np.empty_like(g)
    q = np.empty_like(g)
    for b in prange(B):
        dh_next = np.zeros(N)                                             # δ[t+1]·h[t+1]
        eps_next = np.zeros(N)                                            # ε[T] = 0
        for t in range(T - 1, -1, -1):
            for i in range(N):
                dt = g[t, b, i]
                if reset_grad:
                    dt += dh_next[i] * u[t, b, i] * reset_slope(o[t, b, i], decay, reset_exp)  # S14a
                et = dt * h[t, b, i] + eps_next[i] * reset_factor(o[t, b, i], decay, reset_exp)  # S14b
                delta[t, b, i] = dt
                eps[t, b, i] = et
                q[t, b, i] = dt * h[t, b, i]                                            # S14c
                dh_next[i] = q[t, b, i]
                eps_next[i] = et
    return delta, eps, q


@njit(cache=True, parallel=True)
def bptt_sd(g, h):
    """S16, spatial domain only: d[t] = g[t], e[t] = g[t]·h[t]; no temporal term."""
    T, B, N = g.shape
    e = np.empty_like(g)
    for b in prange(B):
        for t in range(T):
            for i in range(N):
                e[t, b, i] = g[t, b, i] * h[t, b, i]
    return e


# --------------------------------------------------------------------------------------------
# 6. Training tricks: S19 dropout (S23 init: refsnn.layers.init_rownorm)
# --------------------------------------------------------------------------------------------

def dropout_mask(shape, rate, rng, dtype):
    """S19: inverted dropout with a NEW mask per step, element and sample: m/(1 - p), m ~ B(1 - p).

    Returns the scaled mask; the forward multiplies the layer's input by it and the backward the
    error of that input by the same array (its exact adjoint).
    """
    keep = rng.random(shape) < (1.0 - rate)
    return (keep / (1.0 - rate)).astype(dtype)


# --------------------------------------------------------------------------------------------
# 7. The method
# --------------------------------------------------------------------------------------------

class STBPState(NamedTuple):
    """One spiking layer after the forward: what the next layer reads and what backward needs."""
    out: np.ndarray      # o, read by the next stage
    spikes: np.ndarray   # o: 0/1 (relax: H_k values in [0, 1])
    u: np.ndarray        # u, pre-reset (S2)
    h: np.ndarray        # h(u - V_th) (S9-S12, after rect_norm)


_DEFAULT_TRAIN = dict(
    dataset="mnist10k", arch="784-400-10", T=8, epochs=15, batch_size=50, optimizer="adam",
    lr=1e-3, lr_schedule="step", lr_milestones=(10,), lr_gamma=0.1, encoding="bernoulli",
    init="torch", params={"decay": 0.2, "v_th": 0.5, "surrogate": "rect", "surrogate_width": 1.0},
)

_FRONTIERS = dict(    # spec 8.1 [refsnn choice] fill-ins shared by mnist-mlp, nmnist-mlp, mnist-cnn
    optimizer="adam", lr=1e-3, lr_schedule="step", lr_milestones=(41, 81), lr_gamma=0.1,
    batch_size=100, epochs=100, init="rownorm",
)
_FRONTIERS_PARAMS = {"reset_form": "exp", "variant": "paper", "strict": False,
                     "surrogate": "rect", "surrogate_width": 1.0, "loss": "paper"}


class STBP(Method):
    """STBP (spec/stbp.md): iterative LIF, surrogate slope, exact BPTT or the paper's recursion."""

    name = "stbp"
    title = ("Wu, Deng, Li, Zhu, Shi: Spatio-Temporal Backpropagation for Training "
             "High-Performance Spiking Neural Networks, Front. Neurosci. 12:331 (2018)")
    spec = "stbp.md"
    Params = STBPParams
    spiking_pool = False          # S18: average pooling of spikes, no neuron after it

    # spec 8.1; "after epoch E" (0-based) -> lr_milestones E + 1 (first epoch at the lower rate).
    # cifar10-cifarnet: spec 7 "Code, CIFAR10": crop 4 + flip on the bytes, then per-channel
    # normalisation (refsnn.data.augment); dense layers at 0.1 x the lr (0.01 vs 0.1 for conv).
    # Not expressible in TrainConfig (yet): its drop_last. The N-MNIST frames of the nmnist
    # presets are refsnn.data binning "stbp" (5 ms, T 15) and "stbp:1000" (1 ms, T 30).
    presets = {
        "mnist-cnn32": dict(
            dataset="mnist", arch="28x28x1-32c3p1-a2-32c3p1-a2-128-10", T=20, encoding="bernoulli",
            optimizer="adam", lr=1e-3, lr_schedule="step", lr_milestones=(41, 81), lr_gamma=0.1,
            batch_size=100, epochs=100, init="torch",
            params={"decay": 0.2, "v_th": 0.5, "surrogate": "rect", "surrogate_width": 1.0,
                    "loss": "mse_mean"}),
        "mnist-mlp512": dict(
            dataset="mnist", arch="784-512-10", T=8, encoding="direct",
            optimizer="adam", lr=5e-4, lr_schedule="step", lr_milestones=(41, 81), lr_gamma=0.5,
            batch_size=50, epochs=101, init="torch",
            params={"decay": 0.5, "v_th": 0.3, "surrogate": "rect", "surrogate_width": 1.0,
                    "loss": "mse_mean"}),
        "cifar10-cifarnet": dict(
            dataset="cifar10",
            arch="32x32x3-128c3p1-256c3p1-a2-512c3p1-a2-1024c3p1-512c3p1-1024-512-100", T=5,
            encoding="direct", norm_mean=(0.4914, 0.4822, 0.4465),
            norm_std=(0.2023, 0.1994, 0.2010), augment="crop4,flip", dense_lr_scale=0.1,
            optimizer="sgd", momentum=0.9, lr=0.1, lr_schedule="step",
            lr_milestones=(36, 71, 106), lr_gamma=0.1, batch_size=10, epochs=120, init="torch",
            params={"decay": 0.25, "v_th": 0.75, "surrogate": "rect", "surrogate_width": 1.0,
                    "loss": "mse_mean", "vote_k": 10, "dropout": 0.5}),
        "nmnist-mlp512": dict(
            dataset="nmnist", arch="2312-512-10", T=15, encoding="direct",
            optimizer="adam", lr=1e-4, lr_schedule="step", lr_milestones=(41, 81), lr_gamma=0.1,
            batch_size=40, epochs=100, init="torch",
            params={"decay": 0.3, "v_th": 0.3, "surrogate": "rect", "surrogate_width": 0.5,
                    "rect_norm": True, "loss": "mse_mean"}),
        "mnist-mlp": dict(
            _FRONTIERS, dataset="mnist", arch="784-800-10", T=30, encoding="bernoulli",
            params=dict(_FRONTIERS_PARAMS, decay=0.1, v_th=0.5)),
        "nmnist-mlp": dict(
            _FRONTIERS, dataset="nmnist", arch="2312-800-10", T=30, encoding="direct",
            params=dict(_FRONTIERS_PARAMS, decay=0.2, v_th=0.2)),
        "mnist-cnn": dict(
            _FRONTIERS, dataset="mnist", arch="28x28x1-15c5-a2-40c5-a2-300-10", T=30,
            encoding="bernoulli", params=dict(_FRONTIERS_PARAMS, decay=0.1, v_th=0.5)),
    }
    # acc_notes.md: 784-400-10, T 8, Adam 1e-3 for 10 epochs then 1e-4 for 5 (~97% on mnist10k)
    defaults = _DEFAULT_TRAIN

    def uses_bias(self, p) -> bool:
        return True                                       # S1: nn.Linear / nn.Conv2d bias=True

    def init_layer(self, p, layer, rng, dtype, init: str = "torch"):
        """PyTorch's default U(±1/√fan_in) for W and b (code), or S23 with b = 0 ("rownorm")."""
        if init in ("", "torch") or not layer.params:
            return super().init_layer(p, layer, rng, dtype)
        if init != "rownorm":
            raise ConfigError(f"stbp: init {init!r} is unknown; choose 'torch' (PyTorch default, "
                              "the official code) or 'rownorm' (S23, the paper)")
        from ..layers import init_rownorm
        layer.params[0][...] = init_rownorm(layer.params[0].shape, rng, dtype)          # S23
        for b in layer.params[1:]:
            b[...] = 0.0

    # ---- neurons -----------------------------------------------------------------------------
    def neuron_forward(self, p, k, n_spiking, I, is_output):
        """S2-S4 (and h, S9-S12) on the current I (T, B, N) of spiking layer k."""
        v_th = per_layer(p.v_th, k, n_spiking, "v_th", "stbp")
        u, o, h = lif_forward(np.ascontiguousarray(I), float(p.decay), v_th,
                              p.reset_form == "exp", bool(p.strict), bool(p.relax),
                              SURROGATES.index(p.surrogate), float(p.surrogate_width),
                              bool(p.rect_norm))
        return STBPState(out=o, spikes=o, u=u, h=h)

    def neuron_backward(self, p, k, n_spiking, state, g, is_output):
        """S13 / S14 / S16. Returns (e_w, e_down, extras): the weight gradient uses e_w (S15), the
        layer below receives the adjoint of e_down (S13c / S14c)."""
        g = np.ascontiguousarray(g)
        if p.variant == "sd":                                             # S16
            e = bptt_sd(g, state.h)
            return e, e, {"delta": e, "dL_do": g}
        args = (state.u, state.spikes, state.h, float(p.decay), p.reset_form == "exp",
                bool(p.reset_grad))
        if p.variant == "code":                                           # S13
            d, e = bptt_code(g, *args)
            return e, e, {"delta": e, "dL_do": d}
        delta, eps, q = bptt_paper(g, *args)                              # S14
        return eps, q, {"delta": eps, "dL_do": delta}

    # ---- readout and loss --------------------------------------------------------------------
    def n_classes(self, p, n_out: int) -> int:
        """C = n_L / vote_k (S5)."""
        return self._n_classes(p, n_out)

    def _n_classes(self, p, n_out):
        k = int(p.vote_k)
        if n_out % k:
            raise ConfigError(f"stbp: the output layer has {n_out} neurons, not a multiple of "
                              f"vote_k={k}; give the last layer C·vote_k neurons (S5)")
        return n_out // k

    def loss(self, p, state, target):
        """S5-S8 on the output spikes (T, B, N_L): the batch loss and g^L = ∂L/∂o^L."""
        o = state.spikes
        C = self._n_classes(p, o.shape[2])
        y = np.asarray(target, dtype=np.float64)
        if y.shape != (o.shape[1], C):
            raise ShapeError(f"stbp: target has shape {y.shape}; it must be (B, C) = "
                             f"({o.shape[1]}, {C}), one row of C = n_L / vote_k values per sample")
        S = float(p.S) if p.S > 0 else float(o.shape[1])
        L, g, _, _ = mse_loss(o, np.ascontiguousarray(y), int(p.vote_k), S, p.loss == "paper")
        return float(L), g

    def scores(self, p, state):
        """S5: the class scores z (B, C); the prediction is their argmax."""
        self._n_classes(p, state.spikes.shape[2])
        return rate_readout(state.spikes, int(p.vote_k))[1]

    def make_target(self, p, labels, n_out, T):
        """One-hot y of length C = n_L / vote_k per label (section 4)."""
        C = self._n_classes(p, n_out)
        labels = np.asarray(labels)
        if labels.ndim != 1 or np.any(labels < 0) or np.any(labels >= C):
            raise ConfigError(f"stbp: labels must be class indices in 0..{C - 1} (C = n_L / "
                              f"vote_k = {C}); got {labels.ravel()[:5]}...")
        y = np.zeros((labels.shape[0], C))
        y[np.arange(labels.shape[0]), labels.astype(np.int64)] = 1.0
        return y

    def case_target(self, p, target, n_out, T):
        """The oracle's float target: exactly C = n_L / vote_k entries."""
        C = self._n_classes(p, n_out)
        y = np.asarray(target, dtype=np.float64)
        if y.shape != (C,):
            raise ShapeError(f"stbp: target has shape {y.shape}; give C = n_L / vote_k = {C} "
                             "values (the desired readout z)")
        return y[None]

    # ---- the chain over the layers (S1, S17, S18, flatten, S19) ------------------------------
    def input_mask(self, p, li, k, n_spiking, layer, h, rng):
        """S19: dropout on the input of every spiking layer but the first and the last, a new
        mask per step (training only); the base chain applies it and its adjoint (5.8)."""
        if p.dropout <= 0 or not self.has_neurons(layer) or k == 0 or k == n_spiking - 1:
            return None
        if rng is None:
            raise ConfigError("stbp: dropout in training needs a seeded rng (numpy.random.Generator)")
        return dropout_mask(h.shape, float(p.dropout), rng, h.dtype)

    # ---- the fused path for chains of dense layers (kernels/stbp_fused.py) -------------------
    _fused_off = False            # set by run_case: the oracle records d (dL_do) everywhere

    def fused_applies(self, p, layers, x, train=False, masks=None) -> bool:
        """Does the fused path apply? Every layer Dense with weights in x's dtype, the spiking
        forward (not relax), no dropout mask in play, FUSED on. Otherwise the general chain."""
        from ..layers import Dense
        if FUSED == "off" or self._fused_off or p.relax or masks:
            return False
        if not layers or not all(type(layer) is Dense for layer in layers):
            return False
        if train and p.dropout > 0 and len(layers) > 2:                   # S19 masks
            return False
        dt = getattr(x, "dtype", None)
        return (dt in (np.float64, np.float32) and x.ndim == 3
                and all(layer.W.dtype == dt for layer in layers))

    def forward(self, p, layers, x, *, train: bool = False, rng=None, masks=None) -> Trace:
        """The chain of base.Method.forward; for a chain of dense layers the fused kernels (one
        pass per layer: S1 gather or GEMM, S2-S4, S9-S12, the output's event list)."""
        if not self.fused_applies(p, layers, x, train, masks):
            return super().forward(p, layers, x, train=train, rng=rng, masks=masks)
        T, B = x.shape[:2]
        R = T * B
        n = len(layers)
        h = self.encode_input(p, x)
        xs = h.reshape(R, -1)
        ev = dense_kernels.spike_events(xs, layers[0].out_shape[0])      # the Dense rule
        kind = SURROGATES.index(p.surrogate)
        inputs, states, evs = [], [], []
        for k, layer in enumerate(layers):
            inputs.append(h)
            evs.append(ev)
            N = layer.out_shape[0]
            dt = xs.dtype
            v_th = per_layer(p.v_th, k, n, "v_th", "stbp")
            if ev is not None:                                            # S1 by events
                WT = np.ascontiguousarray(layer.W.T)
                bias = np.zeros(0, dt) if layer.b is None else layer.b
                idx, cnt, I = ev.idx, ev.cnt, np.empty((0, N), dt)
            else:                                                         # S1 by GEMM
                I = dense_kernels.forward(xs, layer.W, layer.b, None)
                WT, bias = np.empty((0, N), dt), np.zeros(0, dt)
                idx, cnt = np.empty((0, 0), np.int32), np.empty(0, np.int64)
            want = k < n - 1 and dense_kernels.MODE != "gemm"
            oidx = np.empty((R, N) if want else (0, 0), np.int32)
            ocnt = np.empty(R if want else 0, np.int64)
            u, o, hh = (np.empty((R, N), dt) for _ in range(3))
            stbp_fused.lif_dense_forward(T, idx, cnt, WT, bias, I, float(p.decay), v_th,
                                         p.reset_form == "exp", bool(p.strict), kind,
                                         float(p.surrogate_width), bool(p.rect_norm),
                                         u, o, hh, oidx, ocnt)
            o3 = o.reshape(T, B, N)
            states.append(STBPState(out=o3, spikes=o3, u=u.reshape(T, B, N),
                                    h=hh.reshape(T, B, N)))
            h, xs = o3, o
            if want:
                ev = dense_kernels.events_from_lists(o, oidx, ocnt, layers[k + 1].out_shape[0])
            else:
                ev = None
        trace = Trace(inputs=inputs, states=states, out=h)
        trace.extra["_fused"] = evs
        return trace

    def backward(self, p, layers, trace: Trace, target) -> list:
        """base.Method.backward; after a fused forward the fused kernels: per layer S13/S14/S16
        with the error from above (S13c/S14c of the layer above) summed inside the kernel over
        the nonzero errors when they are sparse, else one GEMM (G_DOWN); then S15 by events or
        GEMM. Records "delta" (e or ε) like the general chain; "dL_do" only there."""
        evs = trace.extra.pop("_fused", None)
        if evs is None or len(evs) != len(layers):
            return super().backward(p, layers, trace, target)
        T, B = trace.inputs[0].shape[:2]
        R = T * B
        n = len(layers)
        loss, g = self.loss(p, trace.states[-1], target)
        trace.loss = loss
        variant = VARIANTS.index(p.variant)
        grads, deltas = [None] * n, [None] * n
        g_rows = np.ascontiguousarray(g).reshape(R, -1)
        for li in range(n - 1, -1, -1):
            layer, st = layers[li], trace.states[li]
            N = layer.out_shape[0]
            dt = st.u.dtype
            ew = np.empty((R, N), dt)
            ed = np.empty((R, N), dt) if variant == 1 else ew
            if g_rows is not None:
                gg = g_rows.astype(dt, copy=False)
                eu, wu = np.empty((R, 0), dt), np.empty((0, N), dt)
            else:
                gg = np.empty((0, N), dt)
            nnz = np.empty(B, np.int64)
            stbp_fused.bptt_dense_fused(T, gg, eu, wu, st.u.reshape(R, N),
                                        st.spikes.reshape(R, N), st.h.reshape(R, N),
                                        float(p.decay), p.reset_form == "exp",
                                        bool(p.reset_grad), variant, ew, ed, nnz)
            deltas[li] = ew.reshape(T, B, N)
            xs = trace.inputs[li].reshape(R, -1)
            grads[li] = [dense_kernels.weight_grad(ew, xs, evs[li])]      # S15: Σ e oᵀ
            if layer.b is not None:
                grads[li].append(ew.sum(axis=0))                           # S15: Σ e
            if li > 0:                                 # S13c / S14c for the layer below
                mode = self._g_down_mode(int(nnz.sum()) / max(ed.size, 1), dt)
                g_rows = None
                if mode == "rows":                     # its kernel, over the nonzero errors
                    eu, wu = ed, np.ascontiguousarray(layer.W)
                else:                                  # one GEMM, Wᵀ e
                    g_rows = blas.matmul(ed, layer.W)
        trace.extra["delta"] = deltas
        return grads

    @staticmethod
    def _g_down_mode(density, dtype) -> str:
        """G_DOWN resolved for one layer whose errors are nonzero at ``density``."""
        if G_DOWN != "auto":
            return G_DOWN
        return "rows" if density <= G_DOWN_DENSITY.get(np.dtype(dtype), 0.0) else "gemm"

    # ---- checks ------------------------------------------------------------------------------
    def fd_objective(self, p, layers, x, target) -> FDCheck:
        """Spec 6.2: the relaxed forward (relax=True) and the tangent model of p's variant.

        F = :func:`tangent_loss` at the current parameters, grads = the hand gradient at the
        reference; pass if max|FD - grad| / max|grad| <= 1e-6 with h = 1e-5. For rect and poly
        the spec redraws a case with any u within 1e-4 of a kink of H_k; a failure there means
        the FD straddled a kink, not a wrong gradient.
        """
        p = p if p.relax else p.replace(relax=True)
        ref = self.forward(p, layers, x)
        grads = [g for per in self.backward(p, layers, ref, target) for g in (per or [])]
        return FDCheck(F=lambda: tangent_loss(p, layers, x, target, ref), grads=grads,
                       h=1e-5, rtol=1e-6, rule="stbp 6.2, relaxed forward and the tangent "
                       f"model of variant {p.variant!r}")

    def random_case(self, rng, sizes=None, T=None) -> dict:
        """A random oracle case: the base draw, plus decay, v_th, width and the on/off switches."""
        case = super().random_case(rng, sizes=sizes, T=T)
        for _ in range(100):
            params = dict(case["params"], decay=float(rng.uniform(0.1, 0.9)),
                          v_th=float(rng.uniform(0.3, 1.2)),
                          surrogate_width=float(rng.uniform(0.5, 1.8)),
                          **{k: bool(rng.integers(2)) for k in
                             ("rect_norm", "reset_grad", "strict")})
            try:
                STBPParams.from_dict(params)
                break
            except ConfigError:
                continue
        case["params"] = params
        return case

    # ---- the oracle (spec 5.9) ---------------------------------------------------------------
    def run_case(self, weights, inputs, *, label=None, target=None, biases=None, p=None) -> dict:
        """One sample, dense, float64 (spec 5.9): "spikes", "loss", "grads", "grads_b", "u",
        "delta" (∂L/∂u: e or ε), "dL_do" (d, δ or g), "h", "rate" (n_L,), "readout" (C,)."""
        p = p if p is not None else STBPParams()
        self._n_classes(p, weights[-1].shape[0])
        per_layer(p.v_th, 0, len(weights), "v_th", "stbp")
        if label is not None and target is None:
            C = weights[-1].shape[0] // int(p.vote_k)
            if not 0 <= label < C:
                raise ConfigError(f"stbp: label={label} is not a class index in 0..{C - 1} "
                                  f"(C = n_L / vote_k = {C})")
        self._fused_off = True                            # the oracle records dL_do everywhere
        try:
            out = super().run_case(weights, inputs, label=label, target=target, biases=biases, p=p)
        finally:
            self._fused_off = False
        r, z = rate_readout(out["spikes"][-1][:, None, :], int(p.vote_k))
        out["rate"], out["readout"] = r[0], z[0]
        return out


# --------------------------------------------------------------------------------------------
# 8. Spec 6.2: the functions whose exact gradients the variants are (finite-difference checks)
# --------------------------------------------------------------------------------------------

@njit(cache=True)
def relaxed_spikes(x, kind, a):
    """o = H_k(x) elementwise (the relaxed S4) for the tangent models below."""
    o = np.empty_like(x)
    flat_x, flat_o = x.reshape(-1), o.reshape(-1)
    for n in range(flat_x.size):
        flat_o[n] = surrogate_H(flat_x[n], kind, a)
    return o


def tangent_loss(p, layers, x, target, ref: Trace) -> float:
    """F(W, b) of spec 6.2 for ``p.variant``/``p.reset_grad``, on the relaxed forward (relax=True).

    ``ref`` is the trace of the unperturbed relaxed run (``STBP().forward``); "frozen" values are
    read from it while the layers' W and b (perturbed by the caller) are live. Written
    independently of the kernels above (plain NumPy, step by step); F(W_ref) equals the loss.

    - code, reset_grad on: the relaxed network itself;
    - code, reset_grad off: u[t] = f(o_ref[t-1])·u[t-1] + I[t];
    - sd: u[t] = f(o_ref[t-1])·u_ref[t-1] + I[t] (only I[t] live);
    - paper (S22), per layer two membranes: u_B[t] = f(o[t-1])·u_A[t-1] + W o^{l-1}[t] + b fires
      (f(o_ref[t-1]) with reset_grad off); u_A[t] = f(o_ref[t-1])·u_A[t-1] + W o_ref^{l-1}[t] + b.
    """
    if not p.relax:
        raise ConfigError("tangent_loss is defined on the relaxed forward; set relax=True")
    kind = SURROGATES.index(p.surrogate)
    a = float(p.surrogate_width)
    tau = float(p.decay)

    def f(o):                                                             # S3, elementwise
        return tau * np.exp(-o / tau) if p.reset_form == "exp" else tau * (1.0 - o)

    masks = ref.extra.get("dropout_masks", {})
    spiking = [li for li, s in enumerate(ref.states) if s is not None]
    n = len(spiking)
    T, B = x.shape[:2]
    h = x
    for li, layer in enumerate(layers):
        if li in masks:
            h = h * masks[li]
        I = layer.forward(h).reshape(T, B, -1)
        if li not in spiking:
            h = I.reshape((T, B) + tuple(layer.out_shape))
            continue
        k = spiking.index(li)
        v_th = per_layer(p.v_th, k, n, "v_th", "stbp")
        st = ref.states[li]
        o_ref, u_ref = st.spikes, st.u
        if p.variant == "paper":
            I_A = layer.forward(ref.inputs[li]).reshape(T, B, -1)         # frozen o_ref^{l-1}
        o = np.zeros_like(I)
        u = np.zeros_like(I)
        u_prev = np.zeros(I.shape[1:])
        uA_prev = np.zeros(I.shape[1:])
        o_prev = np.zeros(I.shape[1:])
        o_ref_prev = np.zeros(I.shape[1:])
        u_ref_prev = np.zeros(I.shape[1:])
        for t in range(T):
            if p.variant == "code":
                fac = f(o_prev) if p.reset_grad else f(o_ref_prev)
                u[t] = fac * u_prev + I[t]
            elif p.variant == "sd":
                u[t] = f(o_ref_prev) * u_ref_prev + I[t]
            else:                                                         # S22 two copies
                fac = f(o_prev) if p.reset_grad else f(o_ref_prev)
                u[t] = fac * uA_prev + I[t]                                # u_B, fires
                uA_prev = f(o_ref_prev) * uA_prev + I_A[t]                 # u_A, carried
            o[t] = relaxed_spikes(np.ascontiguousarray(u[t] - v_th), kind, a)
            u_prev, o_prev = u[t], o[t]
            o_ref_prev, u_ref_prev = o_ref[t], u_ref[t]
        h = o.reshape((T, B) + tuple(layer.out_shape))
    # S5-S7 in plain NumPy
    o = h.reshape(T, B, -1)
    kv = int(p.vote_k)
    C = o.shape[2] // kv
    r = o.mean(axis=0)
    z = r.reshape(B, C, kv).mean(axis=2)
    y = np.asarray(target, dtype=np.float64)
    S = float(p.S) if p.S > 0 else float(B)
    if p.loss == "paper":
        return float(np.sum((z - y) ** 2) / (2.0 * S))
    return float(np.sum((z - y) ** 2) / (S * C))
