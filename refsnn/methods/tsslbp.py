"""TSSL-BP (Zhang & Li, NeurIPS 2020, arXiv 2002.10085), as specified in spec/tsslbp.md.

Temporal Spike Sequence Learning via Backpropagation: LIF neurons with a hard reset whose output is
the synaptic trace (PSP) of their spikes; the backward sends the error of each PSP back to the
membrane potential at the spike times through an inter-neuron term (the spike-time shift, E7) and an
intra-neuron term (the reset coupling one spike to the next, E8), with a surrogate "warm-up" where a
neuron is quiet (E12-E14).

Symbols (spec 2.2): u membrane before reset ``u``, Δu the step increment ``du``, s spike ``s``,
û after reset ``u_hat``, a synaptic trace ``a``, θ_m = 1/τ_m ``theta_m``, θ_s = 1/τ_s ``theta_s``,
V_th ``v_th``. Arrays are time-major (T, B, N); conv positions are flattened into N.

Exact: E1-E6, E9-E11 (∂L/∂a), E15, E16, dropout, λ of E8. Approximations: c (E7), ρ (E8), the
surrogate (E12, E14) and where δ = 0 (E13). The whole gradient is the exact gradient of the tangent
model of spec 6.2 (:func:`tangent_model_loss`), which the tests check by finite differences.

Kernels are serial numba loops: they are linear in T·B·N and cheap beside the layers' GEMMs, and
a prange launch costs more than it saves at these sizes on a shared 2-core machine.

Module order (STYLE.md 2.1): parameters; forward kernels E1-E4; backward kernels E6-E8, E12-E14;
losses E9-E11 and their targets; pooling E16; the Method; the tangent model of 6.2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from ..errors import ConfigError, ShapeError
from ..layers import Dense, Layer
from .base import Method, Params, Trace, check_finite, check_range, param, per_layer

# --------------------------------------------------------------------------------------------
# 1. Parameters (spec 2.5, 5.4, 7)
# --------------------------------------------------------------------------------------------

VARIANTS = ("code", "paper")
WARMUPS = ("code", "none", "all", "layer_rate")
LOSSES = ("kernel", "count", "softmax")


@dataclass(frozen=True)
class TSSLBPParams(Params):
    """Hyper-parameters of TSSL-BP with refsnn names; defaults are the official HEAD code's."""

    METHOD = "tsslbp"
    tau_m: float = param(5.0, "membrane time constant, in time steps (> 1); θ_m = 1/τ_m", "2.1, E2")
    tau_s: float = param(3.0, "synaptic time constant, in time steps (>= 1); θ_s = 1/τ_s", "2.1, E1, E4")
    v_th: float | tuple = param(1.0, "firing threshold; one value, or one per spiking layer", "E3")
    variant: str = param("code", "'code': δ = D (HEAD); 'paper': δ = s·D, all-or-none", "E13",
                         choices=VARIANTS)
    warmup: str = param("code", "surrogate override: 'code' where a < 1/(4τ_s); 'none'; 'all'; "
                        "'layer_rate' where the layer's rate <= warm_rate", "E14", choices=WARMUPS)
    warm_rate: float = param(0.05, "rate threshold of warmup='layer_rate'", "E14")
    loss: str = param("kernel", "output loss: 'kernel' (PSP distance to a desired train), "
                      "'count' (PSP sum), 'softmax' (cross-entropy of the PSP sums)", "E9-E11",
                      choices=LOSSES)
    target_passes: int = param(2, "times the desired train is filtered by E4 (HEAD 2, paper 1)", "E9")
    desired_pattern: tuple | None = param(None, "desired 0/1 train of the label neuron, tiled to T; "
                                          "None: (0,1,1,1,1) if T < 10 else (0,1,0,1,...)", "4.1")
    desired_count: float = param(4.0, "count-loss target PSP sum of the label neuron", "E10")
    undesired_count: float = param(1.0, "count-loss target PSP sum of the other neurons", "E10")
    c_max: float = param(8.0, "clip of the inter-neuron factor 1/Δu", "E7")
    surrogate_width: float = param(0.2, "width α of the warm-up sigmoid (spec 'alpha')", "E12")
    x_clip: float = param(8.0, "clip of the sigmoid argument (V_th - u)/α", "E12")
    input_psp: bool = param(True, "filter the raw input by E1 (False: the input is a^0 itself)", "E1")
    theta_pool: float = param(1.1, "scale of the sum pooling", "E16")
    dropout: float = param(0.0, "dropout rate on the input of every conv/dense layer but the first "
                           "(training only, one mask per unit over all T)", "7")
    w_clamp: float | None = param(4.0, "clamp every conv/dense weight to [-w_clamp, w_clamp] after "
                                  "each step (None: no clamp)", "7")
    conv_weight_scale: float = param(1.0, "factor on the conv init U(±1/sqrt(fan_in)) (CIFAR10: 5)", "7")

    def validate(self):
        super().validate()
        m = self.METHOD
        check_finite(m, tau_m=self.tau_m, tau_s=self.tau_s, v_th=self.v_th)
        check_range(m, "tau_m", self.tau_m, lo=1.0, lo_open=True)
        check_range(m, "tau_s", self.tau_s, lo=1.0)
        if np.ndim(self.v_th) > 1 or (np.ndim(self.v_th) == 1 and len(self.v_th) == 0):
            raise ConfigError(f"{m}: v_th={self.v_th!r} must be one number or a list with one "
                              "number per spiking layer")
        check_range(m, "warm_rate", self.warm_rate, lo=0.0, hi=1.0)
        if (not isinstance(self.target_passes, (int, np.integer)) or isinstance(self.target_passes, bool)
                or self.target_passes < 0):
            raise ConfigError(f"{m}: target_passes={self.target_passes!r} must be an integer >= 0")
        if self.desired_pattern is not None:
            pat = np.atleast_1d(np.asarray(self.desired_pattern, dtype=float))
            if pat.ndim != 1 or pat.size == 0 or not np.all((pat == 0) | (pat == 1)):
                raise ConfigError(f"{m}: desired_pattern={self.desired_pattern!r} must be a "
                                  "non-empty sequence of 0/1 values, e.g. 0,1,0,1,1")
        check_finite(m, desired_count=self.desired_count, undesired_count=self.undesired_count)
        check_range(m, "c_max", self.c_max, lo=0.0)
        check_range(m, "surrogate_width", self.surrogate_width, lo=0.0, lo_open=True)
        check_range(m, "x_clip", self.x_clip, lo=0.0, lo_open=True)
        if not isinstance(self.input_psp, (bool, np.bool_)):
            raise ConfigError(f"{m}: input_psp={self.input_psp!r} must be true or false")
        check_range(m, "theta_pool", self.theta_pool, lo=0.0, lo_open=True)
        check_range(m, "dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True)
        if self.w_clamp is not None:
            check_range(m, "w_clamp", self.w_clamp, lo=0.0, lo_open=True)
        check_range(m, "conv_weight_scale", self.conv_weight_scale, lo=0.0, lo_open=True)

    @property
    def theta_m(self) -> float:
        return 1.0 / self.tau_m

    @property
    def theta_s(self) -> float:
        return 1.0 / self.tau_s


# --------------------------------------------------------------------------------------------
# 2. Forward kernels: E1/E4 synaptic filter, E2-E3 LIF with hard reset
# --------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True)
def psp_forward(x, theta_s):
    """E1 / E4: a[t] = (1 - θ_s)·a[t-1] + θ_s·x[t], a[-1] = 0 (spec 2.3, this exact order).

    x : (T, B, N) raw input (E1) or spikes (E4). Returns a, (T, B, N). ``prange`` over b; the
    state a[t-1] of a row is carried in float64 (as a float64 scalar would be).
    """
    T, B, N = x.shape
    a = np.empty_like(x)
    keep = 1.0 - theta_s
    for b in prange(B):
        prev = np.zeros(N)                                        # a[-1] = 0
        for t in range(T):
            for i in range(N):
                prev[i] = keep * prev[i] + theta_s * x[t, b, i]
                a[t, b, i] = prev[i]
    return a


@njit(cache=True, parallel=True)
def lif_forward(I, theta_m, v_th):
    """E2-E3: integrate, fire on u > V_th (strict), hard reset to 0.

    I : (T, B, N) input current (E5). Returns u (before reset), du (Δu), s, each (T, B, N).
    ``prange`` over b; û carried in float64.
    """
    T, B, N = I.shape
    u = np.empty_like(I)
    du = np.empty_like(I)
    s = np.empty_like(I)
    for b in prange(B):
        u_hat = np.zeros(N)                                       # û[-1] = 0
        for t in range(T):
            for i in range(N):
                d = (-theta_m) * u_hat[i] + I[t, b, i]            # E2: Δu[t]
                du[t, b, i] = d
                v = u_hat[i] + d                                  # u[t] = û[t-1] + Δu[t]
                u[t, b, i] = v
                fire = v > v_th                                   # E3, strict
                s[t, b, i] = 1.0 if fire else 0.0
                u_hat[i] = 0.0 if fire else v                     # hard reset
    return u, du, s


# --------------------------------------------------------------------------------------------
# 3. Backward kernels: E6 PSP adjoint, E7-E8 temporal recursion, E12-E14 warm-up
# --------------------------------------------------------------------------------------------

@njit(cache=True, parallel=True)
def psp_backward(g, theta_s):
    """E6: G[t] = θ_s·g[t] + (1 - θ_s)·G[t+1], G[T] = 0 — the exact adjoint of E4.

    g : (T, B, N) = ∂L/∂a. Returns G = ∂L/∂s with a seen as a linear function of s.
    ``prange`` over b; G[t+1] carried in float64.
    """
    T, B, N = g.shape
    G = np.empty_like(g)
    keep = 1.0 - theta_s
    for b in prange(B):
        nxt = np.zeros(N)                                         # G[T] = 0
        for t in range(T - 1, -1, -1):
            for i in range(N):
                nxt[i] = theta_s * g[t, b, i] + keep * nxt[i]
                G[t, b, i] = nxt[i]
    return G


@njit(cache=True)
def inter_factor(s, du, c_max):
    """E7 (APPROXIMATION): c = s·min(1/Δu, c_max), code convention c = -s·clip(-1/Δu, -c_max, 0).

    Δu < 0 and Δu = -0.0 give 0, Δu = +0.0 gives c_max (spec 5.2).
    """
    if s == 0.0:
        return 0.0
    if du > 0.0:
        inv = 1.0 / du
        return inv if inv < c_max else c_max
    if du == 0.0 and math.copysign(1.0, du) > 0.0:
        return c_max
    return 0.0


@njit(cache=True, parallel=True)
def lif_backward(G, u, du, s, theta_m, c_max):
    """E7-E8, reverse in t: D[t] = c[t]·G[t] + (ρ[t] + λ[t])·D[t+1], D[T] = 0.

    ρ = c·u·θ_m (intra-neuron, APPROXIMATION, pre-reset u), λ = (1 - s)·(1 - θ_m) (leak, exact).
    G = ∂L/∂s (E6); u, du, s from lif_forward. Returns D and c, each (T, B, N). ``prange`` over
    b; D[t+1] carried in float64.
    """
    T, B, N = G.shape
    D = np.empty_like(G)
    c_out = np.empty_like(G)
    leak = 1.0 - theta_m                                          # θ'
    for b in prange(B):
        nxt = np.zeros(N)                                         # D[T] = 0
        for t in range(T - 1, -1, -1):
            for i in range(N):
                c = inter_factor(s[t, b, i], du[t, b, i], c_max)  # E7
                rho = c * u[t, b, i] * theta_m                    # E8 intra-neuron
                lam = (1.0 - s[t, b, i]) * leak                   # E8 leak
                nxt[i] = c * G[t, b, i] + (rho + lam) * nxt[i]
                D[t, b, i] = nxt[i]
                c_out[t, b, i] = c
    return D, c_out


@njit(cache=True)
def surrogate_slope(u, v_th, alpha, x_clip):
    """E12 (APPROXIMATION): σ'(u) = (1/α)·e^z/(1 + e^z)², z = clip((V_th - u)/α, ±x_clip)."""
    z = (v_th - u) / alpha
    if z > x_clip:
        z = x_clip
    elif z < -x_clip:
        z = -x_clip
    e = math.exp(z)
    return (1.0 / alpha) * e / ((1.0 + e) * (1.0 + e))


@njit(cache=True, parallel=True)
def tsslbp_delta(D, G, u, s, warm, paper, v_th, alpha, x_clip):
    """E13-E14: δ = D ("code") or s·D ("paper"); then δ = σ'(u)·G where warm (E12 slope).

    warm : (T, B, N) boolean mask of E14. Returns δ = ∂L/∂I, (T, B, N). ``prange`` over b.
    """
    T, B, N = D.shape
    delta = np.empty_like(D)
    for b in prange(B):
        for t in range(T):
            for i in range(N):
                if warm[t, b, i]:                                           # E14 override
                    delta[t, b, i] = surrogate_slope(u[t, b, i], v_th, alpha, x_clip) * G[t, b, i]
                elif paper:                                                 # E13 all-or-none
                    delta[t, b, i] = s[t, b, i] * D[t, b, i]
                else:                                                       # E13 HEAD
                    delta[t, b, i] = D[t, b, i]
    return delta


def warm_mask(p: TSSLBPParams, a, s) -> np.ndarray:
    """E14 mask, (T, B, N) bool: 'code' a < θ_s/4 (strict, per position); 'none'; 'all';
    'layer_rate' everywhere iff the layer's mean rate over (T, B, N) is <= warm_rate."""
    if p.warmup == "code":
        return a < p.theta_s / 4.0
    if p.warmup == "none":
        return np.zeros(a.shape, dtype=np.bool_)
    if p.warmup == "all":
        return np.ones(a.shape, dtype=np.bool_)
    rate = float(np.mean(s, dtype=np.float64)) if s.size else 0.0
    return np.full(a.shape, rate <= p.warm_rate, dtype=np.bool_)


# --------------------------------------------------------------------------------------------
# 4. Losses E9-E11, their targets, decoding
# --------------------------------------------------------------------------------------------

@njit(cache=True)
def kernel_loss(a, a_hat):
    """E9: L = ½ Σ (a - â)², summed over the batch; g = ∂L/∂a = a - â."""
    g = np.empty_like(a)
    loss = 0.0
    T, B, N = a.shape
    for t in range(T):
        for b in range(B):
            for i in range(N):
                d = a[t, b, i] - a_hat[t, b, i]
                g[t, b, i] = d
                loss += d * d
    return 0.5 * loss, g


@njit(cache=True)
def count_loss(a, labels, desired, undesired):
    """E10: n = Σ_t a, e = (n - c)/T, clipped to 0 on the harmless side; L = ½·T·Σ e², g[t] = e."""
    T, B, N = a.shape
    g = np.empty_like(a)
    loss = 0.0
    for b in range(B):
        for i in range(N):
            n = 0.0
            for t in range(T):
                n += a[t, b, i]
            is_label = i == labels[b]
            e = (n - (desired if is_label else undesired)) / T
            if (is_label and e >= 0.0) or ((not is_label) and e <= 0.0):
                e = 0.0
            loss += e * e
            for t in range(T):
                g[t, b, i] = e
    return 0.5 * T * loss, g


@njit(cache=True)
def softmax_loss(a, labels):
    """E11: z = Σ_t a, p = softmax(z), L = mean_b -ln p_label; g[t] = (p - onehot)/B."""
    T, B, N = a.shape
    g = np.empty_like(a)
    loss = 0.0
    z = np.empty(N)
    for b in range(B):
        for i in range(N):
            acc = 0.0
            for t in range(T):
                acc += a[t, b, i]
            z[i] = acc
        zmax = z.max()
        tot = 0.0
        for i in range(N):
            z[i] = math.exp(z[i] - zmax)
            tot += z[i]
        lab = labels[b]
        loss += -math.log(z[lab] / tot)
        for i in range(N):
            pi = z[i] / tot
            gi = (pi - (1.0 if i == lab else 0.0)) / B
            for t in range(T):
                g[t, b, i] = gi
    return loss / B, g


def desired_train(p: TSSLBPParams, T: int) -> np.ndarray:
    """4.1: the label neuron's desired 0/1 train, pattern[t mod len] (numpy resize)."""
    if p.desired_pattern is not None:
        pattern = np.atleast_1d(np.asarray(p.desired_pattern, dtype=np.float64))
    elif T < 10:
        pattern = np.array([0.0, 1.0, 1.0, 1.0, 1.0])
    else:
        pattern = np.array([0.0, 1.0] * 5)
    return np.resize(pattern, T)


class TSSLTarget(NamedTuple):
    """Target of a batch: integer labels (B,) and the desired 0/1 trains d (T, B, N) of E9."""
    labels: np.ndarray
    d: np.ndarray


# --------------------------------------------------------------------------------------------
# 5. Pooling E16: scaled sum pooling on PSPs (no neuron), and its exact adjoint
# --------------------------------------------------------------------------------------------

@njit(cache=True)
def sum_pool_forward(x, k, theta_pool):
    """E16: out[c,Y,X] = θ_pool·Σ_{i,j<k} x[c, kY+i, kX+j], stride k, no padding.

    x : (R, C, H, W) with R = T·B rows. An odd last row/column is dropped.
    """
    R, C, H, W = x.shape
    Ho, Wo = H // k, W // k
    out = np.empty((R, C, Ho, Wo), dtype=x.dtype)
    for r in range(R):
        for c in range(C):
            for Y in range(Ho):
                for X in range(Wo):
                    acc = 0.0
                    for i in range(k):
                        for j in range(k):
                            acc += x[r, c, k * Y + i, k * X + j]
                    out[r, c, Y, X] = theta_pool * acc
    return out


@njit(cache=True)
def sum_pool_backward(g, k, theta_pool, H, W):
    """E16 adjoint: g_in[c,y,x] = θ_pool·g_out[c, y//k, x//k]; 0 outside every window."""
    R, C, Ho, Wo = g.shape
    gx = np.zeros((R, C, H, W), dtype=g.dtype)
    for r in range(R):
        for c in range(C):
            for Y in range(Ho):
                for X in range(Wo):
                    v = theta_pool * g[r, c, Y, X]
                    for i in range(k):
                        for j in range(k):
                            gx[r, c, k * Y + i, k * X + j] = v
    return gx


class SumPool2d(Layer):
    """E16 as a layer: θ_pool times the sum over k x k windows, stride k; no neuron, no weight.

    The output is a scaled PSP sum, read as the input PSP of the next layer (spec 5.3).
    """

    kind = "sumpool"

    def __init__(self, in_shape, k: int = 2, theta_pool: float = 1.1):
        super().__init__()
        C, H, W = (int(v) for v in in_shape)
        self.k = int(k)
        if self.k < 1 or H < self.k or W < self.k:
            raise ShapeError(f"sum pooling a{k} does not fit a {H}x{W} map; use a window no "
                             "larger than the map")
        self.in_shape, self.out_shape = (C, H, W), (C, H // self.k, W // self.k)
        self.theta_pool = float(theta_pool)

    def describe(self):
        return (f"sumpool{self.k} x{self.theta_pool:g} {'x'.join(map(str, self.in_shape))} -> "
                f"{'x'.join(map(str, self.out_shape))}")

    def forward(self, x):
        T, B = x.shape[:2]
        xs = np.ascontiguousarray(self._rows(x, self.in_shape))
        return sum_pool_forward(xs, self.k, self.theta_pool).reshape((T, B) + self.out_shape)

    def backward(self, g, x, need_input_grad=True):
        if not need_input_grad:
            return None, []
        T, B = g.shape[:2]
        gs = np.ascontiguousarray(self._rows(g, self.out_shape, "gradient"))
        gx = sum_pool_backward(gs, self.k, self.theta_pool, self.in_shape[1], self.in_shape[2])
        return gx.reshape((T, B) + self.in_shape), []


# --------------------------------------------------------------------------------------------
# 6. The method
# --------------------------------------------------------------------------------------------

class TSSLBPState(NamedTuple):
    """One spiking layer after the forward: ``out`` = a (E4) is what the next layer reads."""
    out: np.ndarray       # a, (T, B, N)
    spikes: np.ndarray    # s
    u: np.ndarray         # u before reset
    du: np.ndarray        # Δu


class TSSLBP(Method):
    """TSSL-BP on the refsnn protocol (spec/tsslbp.md)."""

    name = "tsslbp"
    title = "Temporal Spike Sequence Learning via Backpropagation (Zhang & Li, NeurIPS 2020)"
    spec = "tsslbp.md"
    Params = TSSLBPParams
    spiking_pool = False            # E16: pooling has no neuron

    _common = dict(optimizer="adamw", weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8,
                   grad_clip_norm=1.0, lr_schedule="constant", encoding="direct",
                   encoding_kw=dict(mean=0.1307, std=0.3081))         # spec 3: MNIST statistics
    #: spec 8 (HEAD yaml values); encoding per spec 3.
    presets = {
        "mnist-cnn": dict(_common, dataset="mnist", arch="28x28x1-15c5-a2-40c5-a2-300-10", T=5,
                          lr=5e-4, batch_size=50, epochs=200, params=dict(tau_m=5.0, tau_s=3.0)),
        "fashion-mnist-mlp": dict(_common, dataset="fashion-mnist", arch="784-400-400-10", T=5,
                                  lr=5e-4, batch_size=100, epochs=100,
                                  params=dict(tau_m=5.0, tau_s=3.0)),
        "fashion-mnist-cnn": dict(_common, dataset="fashion-mnist",
                                  arch="28x28x1-32c5p2-a2-64c5p2-a2-1024-10", T=5, lr=5e-4,
                                  batch_size=50, epochs=100, params=dict(tau_m=5.0, tau_s=3.0)),
        "nmnist-cnn": dict(_common, dataset="nmnist", arch="34x34x2-12c5p1-a2-64c5-a2-10", T=30,
                           lr=5e-4, batch_size=50, epochs=100, encoding="direct", encoding_kw={},
                           params=dict(tau_m=8.0, tau_s=4.0, loss="count", desired_count=15.0,
                                       undesired_count=3.0)),
        "cifar10-cnn": dict(_common, dataset="cifar10",
                            arch="32x32x3-96c3p1-256c3p1-a2-384c3p1-a2-384c3p1-256c3p1-1024-1024-10",
                            T=5, lr=2e-4, batch_size=50, epochs=150, encoding_kw={},
                            norm_mean=(0.4914, 0.4822, 0.4465),      # spec 3: crop 4 + flip
                            norm_std=(0.2023, 0.1994, 0.2010), augment="crop4,flip",
                            params=dict(tau_m=5.0, tau_s=3.0, dropout=0.2, conv_weight_scale=5.0)),
    }
    #: mnist10k, about 95.5% (benchmarks/runs/tsslbp.md): the HEAD method and training tricks,
    #: with a higher rate then a tenth of it for the last 4 epochs (the run reports its last epoch).
    defaults = dict(_common, dataset="mnist10k", arch="784-400-10", T=5, lr=1e-3, batch_size=50,
                    epochs=15, lr_schedule="step", lr_milestones=(11,), lr_gamma=0.1,
                    dtype="float32", params=dict())

    # ---- pieces of the protocol ------------------------------------------------------------
    def encode_input(self, p, x):
        """E1: a^0 = P(x), or x itself with input_psp = False (spec 2.4)."""
        if not p.input_psp:
            return x
        T, B = x.shape[:2]
        return psp_forward(np.ascontiguousarray(x).reshape(T, B, -1), p.theta_s).reshape(x.shape)

    def neuron_forward(self, p, k, n_spiking, I, is_output):
        """E2-E4 for spiking layer k on its input current I (T, B, N) (E5 / E15 conv)."""
        v_th = per_layer(p.v_th, k, n_spiking, "v_th", self.name)
        u, du, s = lif_forward(np.ascontiguousarray(I), p.theta_m, v_th)
        a = psp_forward(s, p.theta_s)
        return TSSLBPState(out=a, spikes=s, u=u, du=du)

    def neuron_backward(self, p, k, n_spiking, state, g, is_output):
        """E6-E8, E12-E14: δ = ∂L/∂I of layer k from g = ∂L/∂a (T, B, N)."""
        v_th = per_layer(p.v_th, k, n_spiking, "v_th", self.name)
        G = psp_backward(np.ascontiguousarray(g), p.theta_s)                 # E6
        D, c = lif_backward(G, state.u, state.du, state.spikes, p.theta_m, p.c_max)  # E7-E8
        warm = warm_mask(p, state.out, state.spikes)                          # E14 mask
        delta = tsslbp_delta(D, G, state.u, state.spikes, warm, p.variant == "paper",
                             v_th, p.surrogate_width, p.x_clip)              # E12-E14
        extras = {"D": D, "delta": delta, "warm": warm, "G": G, "c": c}
        if is_output:
            extras["g_out"] = g                                   # ∂L/∂a^L, for the oracle
        return delta, delta, extras

    def make_target(self, p, labels, n_out, T):
        """4.1: d = the desired train on the label neuron, zeros elsewhere; labels for E10/E11."""
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.all((labels >= 0) & (labels < n_out)) \
                or not np.all(np.equal(np.mod(labels, 1), 0)):
            raise ConfigError(f"{self.name}: labels must be class indices in 0..{n_out - 1}")
        labels = labels.astype(np.int64)
        d = np.zeros((T, labels.size, n_out))
        d[:, np.arange(labels.size), labels] = desired_train(p, T)[:, None]
        return TSSLTarget(labels=labels, d=d)

    def case_target(self, p, target, n_out, T, label=None):
        """The oracle's ``target``: the (T, n_L) 0/1 desired trains d (kernel loss only, 5.6)."""
        d = np.asarray(target, dtype=np.float64)
        if d.shape != (T, n_out):
            raise ShapeError(f"{self.name}: target has shape {d.shape}; it is the desired 0/1 "
                             f"trains of the output layer, shape (T, n_L) = ({T}, {n_out})")
        if not np.all((d == 0) | (d == 1)):
            raise ShapeError(f"{self.name}: target must hold 0/1 desired spikes only")
        if p.loss != "kernel" and label is None:
            raise ConfigError(f"{self.name}: loss={p.loss!r} needs a label (class index); "
                              "the explicit target is used by the kernel loss only")
        labels = np.array([label if label is not None else 0], dtype=np.int64)
        return TSSLTarget(labels=labels, d=d[:, None, :])

    def loss(self, p, state, target):
        """E9 (kernel, batch sum), E10 (count, batch sum) or E11 (softmax, batch mean)."""
        a = state.out
        if not isinstance(target, TSSLTarget):
            raise ConfigError(f"{self.name}: the target must come from make_target(labels)")
        if p.loss == "kernel":
            if target.d.shape != a.shape:
                raise ShapeError(f"{self.name}: desired trains have shape {target.d.shape}, "
                                 f"the output layer {a.shape}")
            a_hat = np.ascontiguousarray(target.d, dtype=a.dtype)
            for _ in range(p.target_passes):                 # â = P^p(d), same recursion as E4
                a_hat = psp_forward(a_hat, p.theta_s)
            loss, g = kernel_loss(a, a_hat)
        elif p.loss == "count":
            loss, g = count_loss(a, target.labels, float(p.desired_count),
                                 float(p.undesired_count))
        else:
            loss, g = softmax_loss(a, target.labels)
        return float(loss), g

    def scores(self, p, state):
        """Decoding (spec 3): class score = Σ_t a^L[t], the time sum of the output PSP."""
        return state.out.sum(axis=0)

    def make_pool(self, p, in_shape, k):
        return SumPool2d(in_shape, k=k, theta_pool=p.theta_pool)

    def init_layer(self, p, layer, rng, dtype):
        """Spec 7: dense N(0, 2/fan_in) (kaiming normal); conv U(±1/sqrt(fan_in))·conv_weight_scale."""
        if not layer.params:
            return
        W = layer.params[0]
        fan_in = int(np.prod(W.shape[1:]))
        if layer.kind == "conv":
            bound = 1.0 / math.sqrt(fan_in)
            W[...] = (rng.uniform(-bound, bound, size=W.shape) * p.conv_weight_scale).astype(dtype)
        else:
            W[...] = (rng.standard_normal(W.shape) * math.sqrt(2.0 / fan_in)).astype(dtype)
        for extra in layer.params[1:]:
            extra[...] = 0.0

    def post_update(self, p, layers):
        """Spec 7 step 6: clamp every conv and dense weight to [-w_clamp, w_clamp]."""
        if p.w_clamp is None:
            return
        for layer in layers:
            if layer.kind in ("dense", "conv"):
                for arr in layer.params:
                    np.clip(arr, -p.w_clamp, p.w_clamp, out=arr)

    # ---- the driver: the base chain with E1 on the input (encode_input) and dropout (spec 7) -----
    def input_mask(self, p, li, k, n_spiking, layer, h, rng):
        """Spec 7 dropout (training only) on the input of every conv and dense layer but the
        first: one mask per unit and sample, fixed over all T steps, scaled by 1/(1 - p)."""
        if p.dropout <= 0 or not self.has_neurons(layer) or k == 0:
            return None
        if rng is None:
            raise ConfigError(f"{self.name}: dropout={p.dropout} needs an rng in training")
        keep = (rng.random(h.shape[1:]) >= p.dropout).astype(h.dtype)
        return (keep / h.dtype.type(1.0 - p.dropout))[None]          # (1, B, ...): all T

    def forward(self, p, layers, x, *, train=False, rng=None, masks=None):
        """The base chain; ``trace.extra["psp"]`` keeps a^0 (E1) and every layer's a (E4)."""
        trace = super().forward(p, layers, x, train=train, rng=rng, masks=masks)
        T, B = x.shape[:2]
        trace.extra["psp"] = [trace.inputs[0].reshape(T, B, -1)] + [
            st.out for st in trace.spiking_states]
        return trace

    def fd_objective(self, p, layers, x, target):
        """6.2: F = the tangent model at the current weights, grads = TSSL-BP's at the reference."""
        from .base import FDCheck
        trace = self.forward(p, layers, x)
        grads = self.backward(p, layers, trace, target)
        flat = [g for per_layer in grads for g in (per_layer or [])]
        return FDCheck(F=tangent_model(self, p, layers, x, target, trace), grads=flat, h=1e-6,
                       rtol=1e-6, rule="tsslbp 6.2 (tangent model; the spec divides by "
                       "max(1, max|grad|))")

    # ---- the oracle (spec 5.6) -----------------------------------------------------------------
    def run_case(self, weights, inputs, *, label=None, target=None, biases=None, p=None):
        if biases is not None:
            raise ConfigError("tsslbp has no biases in its spec (7); leave biases out")
        if label is not None and not float(label).is_integer():
            raise ConfigError(f"label={label!r} must be a class index (an integer)")
        layers = [Dense(np.array(W, dtype=np.float64)) for W in weights]
        x = np.asarray(inputs, dtype=np.float64)[:, None, :]
        T, n_out = x.shape[0], weights[-1].shape[0]
        if label is not None and not 0 <= int(label) < n_out:
            raise ConfigError(f"label={label} is not a class of the {n_out} output neurons")
        if target is not None:
            tgt = self.case_target(p, target, n_out, T, None if label is None else int(label))
        else:
            tgt = self.make_target(p, np.array([int(label)]), n_out, T)
        trace = self.forward(p, layers, x)
        grads = self.backward(p, layers, trace, tgt)
        one = lambda a: np.asarray(a)[:, 0, :]                             # noqa: E731
        states = trace.spiking_states
        return {
            "spikes": [one(st.spikes) for st in states],
            "loss": float(trace.loss),
            "grads": [gl[0] for gl in grads],
            "u": [one(st.u) for st in states],
            "du": [one(st.du) for st in states],
            "psp": [one(a) for a in trace.extra["psp"]],
            "delta": [one(v) for v in trace.extra["delta"]],
            "D": [one(v) for v in trace.extra["D"]],
            "warm": [one(v) for v in trace.extra["warm"]],
            "G": [one(v) for v in trace.extra["G"]],
            "c": [one(v) for v in trace.extra["c"]],
            "g_out": one(trace.extra["g_out"][-1]),
        }


# --------------------------------------------------------------------------------------------
# 7. The tangent model of spec 6.2 (shared by the tests and the walkthrough)
# --------------------------------------------------------------------------------------------

def _h_ext(u, v_th, alpha, x_clip):
    """6.2: h(u) = sigmoid((u - V_th)/α), continued linearly beyond |z| = x_clip (h' = E12's σ')."""
    z = (u - v_th) / alpha
    zc = np.clip(z, -x_clip, x_clip)
    sig = 1.0 / (1.0 + np.exp(-zc))
    slope = sig * (1.0 - sig)                         # dσ/dz at the clipped argument
    return sig + slope * (z - zc)


def tangent_model(method: TSSLBP, p: TSSLBPParams, layers, x, target, ref: Trace):
    """Spec 6.2: a function F() of the layers' current weights whose gradient at W_ref is TSSL-BP's.

    ``ref`` is the trace of the hard forward at W_ref after :meth:`TSSLBP.backward` (which adds the
    warm masks); call this at W_ref (it freezes I_ref, u_ref, Δu_ref, s_ref, û_ref, c_ref, warm and
    the dropout masks). F(W_ref) = L(W_ref), and ∇F(W_ref) is the TSSL-BP gradient in every variant
    and warm-up mode. Plain NumPy, independent of the numba kernels.
    """
    T, B = x.shape[:2]
    n_spiking = sum(method.has_neurons(layer) for layer in layers)
    masks = ref.extra.get("dropout_masks", {})
    frozen, k = {}, 0
    for li, layer in enumerate(layers):
        st = ref.states[li]
        if st is None:
            continue
        s, u, du = (np.asarray(v, dtype=np.float64) for v in (st.spikes, st.u, st.du))
        pos = du > 0
        c = np.where(pos, np.minimum(1.0 / np.where(pos, du, 1.0), p.c_max),
                     np.where((du == 0) & (np.copysign(1.0, du) > 0), p.c_max, 0.0)) * s   # E7
        frozen[li] = dict(I=np.array(layer.forward(ref.inputs[li]), dtype=np.float64).reshape(T, B, -1),
                          s=s, u=u, u_hat=u * (1.0 - s), c=c, warm=ref.extra["warm"][k],
                          v_th=per_layer(p.v_th, k, n_spiking, "v_th", method.name))
        k += 1

    def F():
        th_m, leak = p.theta_m, 1.0 - p.theta_m          # θ_m, θ'
        h = x if not p.input_psp else _filter(x.reshape(T, B, -1), p.theta_s).reshape(x.shape)
        last = None
        for li, layer in enumerate(layers):
            if li in masks:
                h = h * masks[li]
            out = layer.forward(h)
            if li not in frozen:                          # pooling, flatten: linear, no neuron
                h = out
                continue
            I = out.reshape(T, B, -1)
            f = frozen[li]
            m = np.zeros_like(I)
            v = np.zeros(I.shape[1:])                     # v[-1] = 0
            for t in range(T):
                s_r, u_r, c_r, w = f["s"][t], f["u"][t], f["c"][t], f["warm"][t]
                spk = s_r == 1
                gain = c_r * u_r * th_m / leak
                u_live = leak * v + I[t]
                u_car = leak * v + f["I"][t]
                # not warm: spike -> amplitude 1 + c(u - u_ref); no spike -> 0, carry u
                m_nw = np.where(spk, 1.0 + c_r * (u_live - u_r), 0.0)
                v_nw = np.where(spk, gain * (u_live - u_r), u_live if p.variant == "code" else u_car)
                # warm: amplitude through the sigmoid on the frozen reset path, carry frozen current
                uh_prev = f["u_hat"][t - 1] if t > 0 else 0.0
                u_spk = leak * uh_prev + I[t]
                m_w = s_r + _h_ext(u_spk, f["v_th"], p.surrogate_width, p.x_clip) \
                    - _h_ext(u_r, f["v_th"], p.surrogate_width, p.x_clip)
                v_w = np.where(spk, gain * (u_car - u_r), u_car)
                m[t] = np.where(w, m_w, m_nw)
                v = np.where(w, v_w, v_nw)
            a = _filter(m, p.theta_s)
            last = ref.states[li]._replace(out=a)
            h = a.reshape((T, B) + tuple(layer.out_shape))
        return method.loss(p, last, target)[0]

    return F


def _filter(x, theta_s):
    """E4 recursion in NumPy over the leading time axis (for the tangent model)."""
    a = np.empty_like(x)
    prev = np.zeros(x.shape[1:])
    for t in range(x.shape[0]):
        prev = (1.0 - theta_s) * prev + theta_s * x[t]
        a[t] = prev
    return a
