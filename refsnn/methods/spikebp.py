"""Spike-based BP with the leak-corrected approximate derivative (Lee et al., Front. Neurosci. 2020).

Chankyu Lee, Syed Shakib Sarwar, Priyadarshini Panda, Gopalakrishnan Srinivasan, Kaushik Roy,
"Enabling Spike-Based Backpropagation for Training Deep Neural Network Architectures", Frontiers in
Neuroscience 14:119 (2020), arXiv 1903.06379; as specified in spec/spikebp.md (tags F0-F6, B1-B9).

Symbols (spec 2, 5.1): λ `decay` (or exp(-dt/τ_m) when `tau_m` is given), V_th `v_th` (one per
hidden LIF layer or one for all), V_out `v_th_out`, θ_p `v_th_pool`, c `loss_scale`, ε `lf_eps`.
Per neuron: u membrane before the reset, s spike, m dropout mask, a = m ⊙ s the forwarded activity,
Λ leaky spike trace `Lam`, γ spike count `gamma`, D leak-correction factor, δ membrane error.
Arrays are time-major (T, B, N); a conv layer's units (c, y, x) are flattened into N.

Exact: F0-F6 (forward), B1, B6, B7 (chain-rule steps), B2 with out_grad="exact" (or λ = 1).
Approximations: B3 (D, a heuristic), B4 (spike derivative D/V_th at spike times), B5 (leak ignored);
variant "code" is the exact gradient of the frozen-pattern linearisation of spec 6.2
(:func:`frozen_pattern_loss`), variant "paper" (B8) that of the linearised count model of 6.3
(:func:`count_model_loss`); both are used by the tests and the walkthrough.

Kernels are serial numba loops, t outer and the unit index innermost (contiguous): the GEMMs of
the layers dominate a step, and numba threads beside BLAS threads slow a 2-core machine down
(research/perf_notes.md, technique 1).

Layout: 1. parameters; 2. forward kernels (F1-F5, B3 after the forward, B9's pooling neurons);
3. loss F6/B1; 4. backward kernels (B2, B4-B5, B8, B9); 5. the spiking average-pool layer (B9);
6. the Method; 7. the linearisations of spec 6.2 and 6.3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from ..errors import ConfigError, ShapeError
from ..layers import Layer
from .base import FDCheck, Method, Params, Trace, check_finite, check_range, param

METHOD = "spikebp"

# --------------------------------------------------------------------------------------------
# 1. Parameters (spec 5.5, with refsnn's names; 7.2-7.4 for the training-only ones)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpikeBPParams(Params):
    """Hyper-parameters of spike-based BP (spec 5.5; names per docs/spec/README.md)."""

    METHOD = METHOD
    decay: float = param(0.99, "λ, per-step membrane decay of the hidden and output layers "
                               "(ignored when tau_m is given)", "F1, F5")
    tau_m: float | None = param(None, "membrane time constant in units of dt; if given, "
                                      "decay = exp(-dt/tau_m)", "2.1, 5.5")
    dt: float = param(1.0, "time step, used only with tau_m", "5.5")
    v_th: float | tuple = param(1.0, "V_th of the hidden LIF layers: one value, or one per hidden "
                                     "LIF layer (pooling layers not counted)", "F2, B4")
    v_th_out: float = param(1.0, "V_out, divisor of the non-spiking output accumulator", "F5")
    v_th_pool: float = param(0.75, "θ_p, threshold of the spiking average-pooling neurons", "B9")
    lf_eps: float = param(1e-3, "ε >= 0, cut-off of the leak-correction factor D "
                                "(0 = the first published code)", "B3")
    loss_scale: float = param(1.0, "c of L = c·Σ(y - ŷ)² (1 = code, 0.5 = paper)", "F6")
    variant: str = param("code", "'code': per-step routing of the official code (B2-B7); "
                                 "'paper': aggregated per-neuron rule (B8)", "5.1",
                         choices=("code", "paper"))
    out_grad: str = param("code", "output-layer gradient: 'code' passes the decay with unit gain "
                                  "(c_t = 1), 'exact' uses c_t = λ^(T-t)", "B2",
                          choices=("code", "exact"))
    dropout: float = param(0.0, "dropout probability p of every hidden LIF layer in training; one "
                                "mask per sample kept for all T steps, scaled 1/(1-p)", "7.4")
    dropout_masks: tuple | None = param(None, "fixed masks, one per hidden LIF layer (values 0 or "
                                              "1/(1-p); None entry = all ones), for the oracle",
                                        "5.5, 7.4")
    init_gain: float = param(2.0, "κ of the weight init W ~ N(0, sqrt(κ/n)), n = fan-in "
                                  "(2 LeNet/VGG9, 1 ResNet11)", "7.2")

    def __post_init__(self):
        # normalise numbers and lists given as ints or lists (JSON, CLI) before the checks
        for name in ("decay", "dt", "v_th_out", "v_th_pool", "lf_eps", "loss_scale", "dropout",
                     "init_gain"):
            value = getattr(self, name)
            if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))
        if isinstance(self.tau_m, (int, np.integer)) and not isinstance(self.tau_m, bool):
            object.__setattr__(self, "tau_m", float(self.tau_m))
        if isinstance(self.v_th, (list, tuple, np.ndarray)):
            object.__setattr__(self, "v_th", tuple(float(v) for v in self.v_th))
        if self.dropout_masks is not None:
            if isinstance(self.dropout_masks, np.ndarray) or not isinstance(
                    self.dropout_masks, (list, tuple)):
                raise ConfigError("spikebp: dropout_masks must be a list with one mask (or None) "
                                  "per hidden LIF layer")
            masks = tuple(None if m is None else tuple(float(v) for v in np.ravel(m))
                          for m in self.dropout_masks)
            object.__setattr__(self, "dropout_masks", masks)
        super().__post_init__()

    def validate(self):
        super().validate()
        for name in ("decay", "dt", "v_th_out", "v_th_pool", "lf_eps", "loss_scale", "dropout",
                     "init_gain"):
            if not isinstance(getattr(self, name), float):
                raise ConfigError(f"spikebp: {name}={getattr(self, name)!r} must be a number")
        check_finite(METHOD, decay=self.decay, dt=self.dt, v_th=self.v_th,
                     v_th_out=self.v_th_out, v_th_pool=self.v_th_pool, lf_eps=self.lf_eps,
                     loss_scale=self.loss_scale, dropout=self.dropout, init_gain=self.init_gain)
        check_range(METHOD, "decay", self.decay, 0.0, 1.0, lo_open=True)
        if self.tau_m is not None:
            if not isinstance(self.tau_m, float):
                raise ConfigError(f"spikebp: tau_m={self.tau_m!r} must be a number or None")
            check_range(METHOD, "tau_m", self.tau_m, 0.0, None, lo_open=True)
        check_range(METHOD, "dt", self.dt, 0.0, None, lo_open=True)
        if isinstance(self.v_th, tuple) and len(self.v_th) == 0:
            raise ConfigError("spikebp: v_th is an empty list; give one value, or one per hidden "
                              "LIF layer")
        if not isinstance(self.v_th, (float, int, tuple)) or isinstance(self.v_th, bool):
            raise ConfigError(f"spikebp: v_th={self.v_th!r} must be a number or a list of numbers")
        check_range(METHOD, "v_th", self.v_th, 0.0, None, lo_open=True)
        check_range(METHOD, "v_th_out", self.v_th_out, 0.0, None, lo_open=True)
        check_range(METHOD, "v_th_pool", self.v_th_pool, 0.0, None, lo_open=True)
        check_range(METHOD, "lf_eps", self.lf_eps, 0.0, None)
        check_range(METHOD, "loss_scale", self.loss_scale, 0.0, None, lo_open=True)
        check_range(METHOD, "dropout", self.dropout, 0.0, 1.0, hi_open=True)
        check_range(METHOD, "init_gain", self.init_gain, 0.0, None, lo_open=True)
        if self.variant == "paper" and self.out_grad == "exact":
            raise ConfigError("spikebp: out_grad='exact' is defined for variant='code' only "
                              "(spec 5.4); use out_grad='code' with variant='paper'")
        if self.dropout_masks is not None:
            for l, m in enumerate(self.dropout_masks):
                if m is not None and not all(math.isfinite(v) and v >= 0.0 for v in m):
                    raise ConfigError(f"spikebp: dropout_masks[{l}] must hold finite values >= 0 "
                                      "(0 for a dropped unit, 1/(1-p) for a kept one)")

    # ---- derived values ---------------------------------------------------------------------
    @property
    def lam(self) -> float:
        """λ (spec 2.1): exp(-dt/τ_m) when tau_m is given, else `decay`."""
        return math.exp(-self.dt / self.tau_m) if self.tau_m is not None else self.decay

    @property
    def ln_lam(self) -> float:
        """ln λ of B3: -dt/τ_m exactly when tau_m is given."""
        return -self.dt / self.tau_m if self.tau_m is not None else math.log(self.decay)

    def v_th_of(self, k: int, n_lif: int) -> float:
        """V_th of hidden LIF layer k (0-based) of n_lif (spec 5.5: entry l-1 for layer l)."""
        if isinstance(self.v_th, tuple):
            if len(self.v_th) != n_lif:
                raise ConfigError(f"spikebp: v_th has {len(self.v_th)} values but the network has "
                                  f"{n_lif} hidden LIF layers (pooling layers not counted); give "
                                  "one value, or one per hidden LIF layer")
            return self.v_th[k]
        return float(self.v_th)


# --------------------------------------------------------------------------------------------
# 2. Forward kernels
# --------------------------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def lif_forward(I, m, decay, v_th):
    """F1-F3 and F4's forwarded activity, one hidden LIF layer.

    F1 u[t] = λ·v[t-1] + I[t], v[-1] = 0;  F2 s[t] = 1[u[t] > V_th] (strict);
    F3 v[t] = u[t]·(1 - s[t]) (hard reset to 0);  F4 a[t] = m ⊙ s[t] (dropout mask, 7.4).
    I : (T, B, N) input current; m : (B, N) mask (ones without dropout).
    Returns u (pre-reset), s, a, each (T, B, N).
    """
    T, B, N = I.shape
    u = np.empty_like(I)
    s = np.zeros_like(I)
    a = np.zeros_like(I)
    v = np.zeros((B, N), dtype=I.dtype)                        # v[-1] = 0
    for b in prange(B):                                        # samples apart: the same bits
        for t in range(T):
            for i in range(N):
                u[t, b, i] = decay * v[b, i] + I[t, b, i]      # F1 (code: decay after the reset)
                if u[t, b, i] > v_th:                          # F2
                    s[t, b, i] = 1.0
                    a[t, b, i] = m[b, i]                       # F4: a = m·s
                    v[b, i] = 0.0                              # F3: hard reset
                else:
                    v[b, i] = u[t, b, i]
    return u, s, a


@njit(cache=True, parallel=True)
def leak_factor(s, decay, ln_decay, lf_eps):
    """B3, after the forward: Λ = Σ_t λ^(T-1-t) s[t] (as LF <- λ·LF + s), γ = Σ_t s[t],
    γ' = γ + 1[γ < ε] (ε > 0) or γ + 1[γ = 0] (ε = 0), D = 1[Λ > ε] + ln(λ)·Λ/γ'.

    s : (T, B, N) UNMASKED spikes. Returns Λ, γ, D, each (B, N). D is a HEURISTIC (spec 5.2).
    """
    T, B, N = s.shape
    Lam = np.zeros((B, N), dtype=s.dtype)
    gamma = np.zeros((B, N), dtype=s.dtype)
    D = np.zeros((B, N), dtype=s.dtype)
    for b in prange(B):
        for t in range(T):
            for i in range(N):
                Lam[b, i] = decay * Lam[b, i] + s[t, b, i]     # leaky spike trace LF
                gamma[b, i] += s[t, b, i]                      # spike count
        for i in range(N):
            if lf_eps > 0.0:
                g1 = gamma[b, i] + (1.0 if gamma[b, i] < lf_eps else 0.0)
            else:
                g1 = gamma[b, i] + (1.0 if gamma[b, i] == 0.0 else 0.0)
            D[b, i] = (1.0 if Lam[b, i] > lf_eps else 0.0) + ln_decay * Lam[b, i] / g1
    return Lam, gamma, D


@njit(cache=True, parallel=True)
def pool_neuron_forward(P, v_th_pool):
    """B9 forward, the IF neurons of a spiking average pool (no leak, hard reset, no mask).

    u_p[t] = v_p[t-1] + P[t], v_p[-1] = 0;  s_p[t] = 1[u_p[t] > θ_p];  v_p[t] = u_p[t](1 - s_p[t]).
    P : (T, B, N) pooled activity (window mean of the pooled layer's a). Returns u_p, s_p.
    """
    T, B, N = P.shape
    u = np.empty_like(P)
    s = np.zeros_like(P)
    v = np.zeros((B, N), dtype=P.dtype)                        # v_p[-1] = 0
    for b in prange(B):
        for t in range(T):
            for i in range(N):
                u[t, b, i] = v[b, i] + P[t, b, i]
                if u[t, b, i] > v_th_pool:
                    s[t, b, i] = 1.0
                    v[b, i] = 0.0
                else:
                    v[b, i] = u[t, b, i]
    return u, s


@njit(cache=True)
def accumulator_forward(I, decay):
    """F5: the non-spiking output layer, U[t] = λ·(U[t-1] + I[t]), U[-1] = 0.

    I : (T, B, N) output current W^L a^(L-1)[t]. Returns U (T, B, N), after each step's decay.
    """
    T, B, N = I.shape
    U = np.empty_like(I)
    prev = np.zeros((B, N), dtype=I.dtype)                     # U[-1] = 0
    for t in range(T):
        for b in range(B):
            for k in range(N):
                U[t, b, k] = decay * (prev[b, k] + I[t, b, k])
                prev[b, k] = U[t, b, k]
    return U


@njit(cache=True)
def readout(U_last, v_th_out, T):
    """F5 output: y = U[T-1] / (V_out·T). U_last : (B, N). Returns y (B, N)."""
    B, N = U_last.shape
    y = np.empty_like(U_last)
    div = v_th_out * T
    for b in range(B):
        for k in range(N):
            y[b, k] = U_last[b, k] / div
    return y


# --------------------------------------------------------------------------------------------
# 3. Loss
# --------------------------------------------------------------------------------------------


@njit(cache=True)
def mse_loss(y, y_hat, c):
    """F6 and B1: L = c·Σ_b Σ_k (y_k - ŷ_k)² (summed over the batch, no mean), e = 2c(y - ŷ).

    y, y_hat : (B, N). Returns L (float) and e = ∂L/∂y (B, N), EXACT.
    """
    B, N = y.shape
    e = np.empty_like(y)
    L = 0.0
    for b in range(B):
        for k in range(N):
            d = y[b, k] - y_hat[b, k]
            L += c * d * d
            e[b, k] = 2.0 * c * d
    return L, e


# --------------------------------------------------------------------------------------------
# 4. Backward kernels
# --------------------------------------------------------------------------------------------


@njit(cache=True)
def accumulator_backward(gU, c_decay):
    """B2 through F5, reverse in t: r[t] = gU[t] + c·r[t+1], r[T] = 0; ∂L/∂I^L[t] = c·r[t].

    gU = ∂L/∂U (T, B, N); c = λ for out_grad "exact" (then ∂L/∂I[t] = λ^(T-t)·gU[T-1], EXACT) and
    c = 1 for "code" (the detach trick passes the decay with unit gain: an APPROXIMATION unless
    λ = 1). Returns ∂L/∂I^L (T, B, N).
    """
    T, B, N = gU.shape
    gI = np.empty_like(gU)
    r = np.zeros((B, N), dtype=gU.dtype)                       # r[T] = 0
    for t in range(T - 1, -1, -1):
        for b in range(B):
            for k in range(N):
                r[b, k] = gU[t, b, k] + c_decay * r[b, k]
                gI[t, b, k] = c_decay * r[b, k]
    return gI


@njit(cache=True, parallel=True)
def lif_backward_code(g, s, m, D, v_th):
    """B4-B5 (variant "code"), reverse in t, one hidden LIF layer.

    B4 h[t] = m·g[t]·D/V_th;  B5 δ[t] = s[t]·h[t] + (1 - s[t])·δ[t+1], δ[T] = 0, i.e. δ[t] = h at
    the neuron's next spike at or after t, 0 after its last spike. g = ∂L/∂a (T, B, N); s (T, B, N)
    spikes; m, D (B, N). APPROXIMATION (leak ignored, spike derivative D/V_th at spikes); the exact
    gradient of spec 6.2's frozen-pattern linearisation. Returns δ (T, B, N).
    """
    T, B, N = g.shape
    delta = np.empty_like(g)
    d = np.zeros((B, N), dtype=g.dtype)                        # δ[T] = 0
    for b in prange(B):
        for t in range(T - 1, -1, -1):
            for i in range(N):
                if s[t, b, i] != 0.0:
                    d[b, i] = m[b, i] * g[t, b, i] * D[b, i] / v_th    # B4 at a spike
                delta[t, b, i] = d[b, i]                               # B5: else δ[t+1]
    return delta


@njit(cache=True, parallel=True)
def pool_neuron_backward_code(g, s):
    """B9 backward (variant "code"): δ_p[t] = s_p[t]·g_p[t] + (1 - s_p[t])·δ_p[t+1], δ_p[T] = 0.

    No 1/θ_p, no D, no mask. g = ∂L/∂s_p (T, B, N). Returns δ_p (T, B, N); the window spread
    (δ_p/k² to each input) is the pooling layer's adjoint.
    """
    T, B, N = g.shape
    delta = np.empty_like(g)
    d = np.zeros((B, N), dtype=g.dtype)                        # δ_p[T] = 0
    for b in prange(B):
        for t in range(T - 1, -1, -1):
            for i in range(N):
                if s[t, b, i] != 0.0:
                    d[b, i] = g[t, b, i]
                delta[t, b, i] = d[b, i]
    return delta


@njit(cache=True)
def lif_backward_paper(g, m, D, v_th):
    """B8 (variant "paper"): δ = m ⊙ G ⊙ D / V_th, one error per neuron for the whole window.

    G = ∂L/∂N, the count error, which reaches this layer as g[t] equal at every t (G = g[0]).
    Returns δ repeated over t, (T, B, N), so that the layers' adjoints give ∂L/∂W = δ (N^(l-1))ᵀ
    and G^(l-1) = Wᵀδ (spec 5.4). The exact gradient of spec 6.3's count model.
    """
    T, B, N = g.shape
    delta = np.empty_like(g)
    for b in range(B):
        for i in range(N):
            delta[0, b, i] = m[b, i] * g[0, b, i] * D[b, i] / v_th
    for t in range(1, T):
        delta[t] = delta[0]
    return delta


@njit(cache=True)
def pool_neuron_backward_paper(g, gamma_p):
    """Spec 5.3, variant "paper" with pooling [refsnn choice]: δ_p = 1[γ_p > 0]·G_p (unit gain
    where the pooling neuron fired), repeated over t; the window spread /k² is the layer's adjoint.
    """
    T, B, N = g.shape
    delta = np.empty_like(g)
    for b in range(B):
        for i in range(N):
            delta[0, b, i] = g[0, b, i] if gamma_p[b, i] > 0.0 else 0.0
    for t in range(1, T):
        delta[t] = delta[0]
    return delta


@njit(cache=True, parallel=True)
def spike_count(s):
    """γ = Σ_t s[t] (B3, also the pooling neurons' count of spec 5.3). s (T, B, N) -> (B, N)."""
    T, B, N = s.shape
    out = np.zeros(s.shape[1:], dtype=s.dtype)
    for b in prange(B):
        for t in range(T):
            for i in range(N):
                out[b, i] += s[t, b, i]
    return out


# --------------------------------------------------------------------------------------------
# 5. The spiking average pool (B9): its linear map as a layer; its IF neurons are the method's
# --------------------------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def window_mean_forward(x, k):
    """B9: P[c, y, x] = (1/k²) Σ_{dy, dx < k} a[c, k·y + dy, k·x + dx]; stride k, no padding.

    x : (R, C, H, W) rows (T·B) of the pooled layer's forwarded activity. Leftover rows/columns
    (H or W not a multiple of k) are ignored. Returns (R, C, H//k, W//k).
    """
    R, C, H, W = x.shape
    Ho, Wo = H // k, W // k
    out = np.empty((R, C, Ho, Wo), dtype=x.dtype)
    inv = 1.0 / (k * k)
    for r in prange(R):
        for c in range(C):
            for yo in range(Ho):
                for xo in range(Wo):
                    acc = 0.0
                    for dy in range(k):
                        for dx in range(k):
                            acc += x[r, c, k * yo + dy, k * xo + dx]
                    out[r, c, yo, xo] = acc * inv
    return out


@njit(cache=True, parallel=True)
def window_mean_backward(g, k, H, W):
    """Adjoint of :func:`window_mean_forward` (EXACT): each input of a window gets g/k²;
    leftover rows/columns get 0. g : (R, C, H//k, W//k). Returns (R, C, H, W)."""
    R, C, Ho, Wo = g.shape
    out = np.zeros((R, C, H, W), dtype=g.dtype)
    inv = 1.0 / (k * k)
    for r in prange(R):
        for c in range(C):
            for yo in range(Ho):
                for xo in range(Wo):
                    v = g[r, c, yo, xo] * inv
                    for dy in range(k):
                        for dx in range(k):
                            out[r, c, k * yo + dy, k * xo + dx] = v
    return out


class SpikingAvgPool2d(Layer):
    """The linear part of spike-based BP's pooling (B9): a k×k window mean, stride k, no padding.

    Its IF neurons (threshold θ_p = `v_th_pool`, no leak, hard reset) are run by the method, which
    declares pooling spiking (``SpikeBP.spiking_pool``). No parameters; the backward is the exact
    adjoint of the window mean.
    """

    kind = "spikepool"

    def __init__(self, in_shape, k: int = 2):
        super().__init__()
        in_shape = tuple(int(v) for v in in_shape)
        if len(in_shape) != 3:
            raise ShapeError(f"spiking pooling reads (C, H, W) maps, got in_shape {in_shape}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"pooling window k={k!r} must be a positive integer")
        c, h, w = in_shape
        if h < k or w < k:
            raise ShapeError(f"a {k}x{k} pooling window does not fit the {h}x{w} map")
        self.in_shape = in_shape
        self.k = int(k)
        self.out_shape = (c, h // k, w // k)

    def describe(self) -> str:
        return f"spikepool{self.k} (θ_p) {self.in_shape}->{self.out_shape}"

    def forward(self, x):
        T, B = x.shape[:2]
        rows = np.ascontiguousarray(self._rows(x, self.in_shape))
        return window_mean_forward(rows, self.k).reshape((T, B) + self.out_shape)

    def backward(self, g, x=None, need_input_grad=True):
        if not need_input_grad:
            return None, []
        T, B = g.shape[:2]
        rows = np.ascontiguousarray(self._rows(g, self.out_shape, "gradient"))
        g_x = window_mean_backward(rows, self.k, self.in_shape[1], self.in_shape[2])
        return g_x.reshape((T, B) + self.in_shape), []


# --------------------------------------------------------------------------------------------
# 6. The method
# --------------------------------------------------------------------------------------------


class LIFState(NamedTuple):
    """A hidden LIF layer (F1-F4, B3): u, spikes, out = a = m ⊙ s (T, B, N); m, Lam, gamma, D
    (B, N); v_th the layer's threshold."""
    u: np.ndarray
    spikes: np.ndarray
    out: np.ndarray
    m: np.ndarray
    Lam: np.ndarray
    gamma: np.ndarray
    D: np.ndarray
    v_th: float


class PoolState(NamedTuple):
    """The IF neurons of a spiking pool (B9): u_p, spikes s_p, out = s_p (T, B, N); gamma (B, N)."""
    u: np.ndarray
    spikes: np.ndarray
    out: np.ndarray
    gamma: np.ndarray


class OutputState(NamedTuple):
    """The output accumulator (F5): U (T, B, N) = out, y (B, N). It never fires."""
    U: np.ndarray
    out: np.ndarray
    y: np.ndarray


class SpikeBP(Method):
    """Spike-based BP with the leak-corrected approximate derivative (spec/spikebp.md)."""

    name = METHOD
    title = ("Lee, Sarwar, Panda, Srinivasan, Roy: Enabling Spike-Based Backpropagation for "
             "Training Deep Neural Network Architectures, Front. Neurosci. 14:119 (2020)")
    spec = "spikebp.md"
    Params = SpikeBPParams
    spiking_pool = True          # B9: pooling layers are IF neurons with threshold θ_p

    # MNIST LeNet of spec 7.1, optimiser and schedule of 7.3, row "LeNet / MNIST" of spec 8
    _LENET = "28x28x1-20c5p2-a2-50c5p2-a2-200-10"
    _SGD = {"optimizer": "sgd", "momentum": 0.0, "weight_decay": 5e-4, "lr_schedule": "step",
            "lr_gamma": 0.2, "encoding": "poisson", "encoding_kw": {"rate": 0.5}}     # F0, MNIST
    presets = {
        "mnist-lenet": {
            **_SGD, "dataset": "mnist", "arch": _LENET, "T": 100, "batch_size": 64,
            "epochs": 125, "lr": 0.0085, "lr_milestones": (75,),
            "params": {"decay": 0.99, "v_th": 1.0, "v_th_pool": 0.75, "v_th_out": 1.0,
                       "init_gain": 2.0, "dropout": 0.0},
        },
        # the same network and schedule on Fashion-MNIST (not a row of spec 8: refsnn's choice)
        "fashion-mnist-lenet": {
            **_SGD, "dataset": "fashion-mnist", "arch": _LENET, "T": 100, "batch_size": 64,
            "epochs": 125, "lr": 0.0085, "lr_milestones": (75,),
            "params": {"decay": 0.99, "v_th": 1.0, "v_th_pool": 0.75, "v_th_out": 1.0,
                       "init_gain": 2.0, "dropout": 0.0},
        },
    }
    # the default run: an MLP on mnist10k in about 5 minutes on 2 cores (float32 for speed),
    # with the neuron, loss, input code and optimiser of the LeNet row
    defaults = {
        **_SGD, "dataset": "mnist10k", "arch": "784-400-10", "T": 25, "batch_size": 32,
        "epochs": 12, "lr": 0.0085, "lr_milestones": (8,), "dtype": "float32",
        "params": {"decay": 0.99, "v_th": 1.0, "init_gain": 2.0},
    }

    # ---- pieces of the protocol -----------------------------------------------------------------
    def init_layer(self, p, layer, rng, dtype):
        """Spec 7.2: W ~ N(0, sqrt(κ/n)), n = k·k·C_in (conv) or fan-in (dense); no biases."""
        for arr in layer.params:
            n = int(np.prod(arr.shape[1:]))
            arr[...] = (rng.standard_normal(arr.shape) * math.sqrt(p.init_gain / n)).astype(dtype)

    def make_pool(self, p, in_shape, k):
        return SpikingAvgPool2d(in_shape, k)

    def make_target(self, p, labels, n_out, T):
        """ŷ = one-hot(label) (spec 4), (B, n_out)."""
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size and (labels.min() < 0 or labels.max() >= n_out):
            raise ConfigError(f"spikebp: labels must be class indices in [0, {n_out}), "
                              f"got shape {labels.shape}")
        Y = np.zeros((labels.size, n_out))
        Y[np.arange(labels.size), labels.astype(int)] = 1.0
        return Y

    def case_target(self, p, target, n_out, T):
        t = np.asarray(target, dtype=np.float64)
        if t.shape != (n_out,):
            raise ShapeError(f"spikebp: target has shape {t.shape}; it is ŷ, one value per "
                             f"output neuron: shape ({n_out},)")
        return t[None]

    def scores(self, p, state):
        return state.y

    def layer_summary(self, state):
        if isinstance(state, OutputState):
            return {"y_mean": float(np.mean(state.y)) if state.y.size else 0.0}
        return super().layer_summary(state)

    # ---- forward (F0-F5, B3), with the dropout masks of 7.4 -----------------------------------
    def _masks(self, p, layers, lif_idx, B, dtype, train, rng):
        """One (B, N) mask per hidden LIF layer, constant over T (spec 7.4)."""
        sizes = [int(np.prod(layers[li].out_shape)) for li in lif_idx]
        if p.dropout_masks is not None:
            if train and p.dropout > 0.0:
                raise ConfigError("spikebp: give dropout (random masks in training) or "
                                  "dropout_masks (fixed masks), not both")
            if len(p.dropout_masks) != len(sizes):
                raise ShapeError(f"spikebp: dropout_masks has {len(p.dropout_masks)} entries but "
                                 f"the network has {len(sizes)} hidden LIF layers; give one mask "
                                 "(or None) per hidden LIF layer")
            out = []
            for l, (m, n) in enumerate(zip(p.dropout_masks, sizes)):
                if m is None:
                    out.append(np.ones((B, n), dtype=dtype))
                    continue
                if len(m) != n:
                    raise ShapeError(f"spikebp: dropout_masks[{l}] has {len(m)} values but "
                                     f"hidden LIF layer {l} has {n} units")
                out.append(np.ascontiguousarray(
                    np.broadcast_to(np.asarray(m, dtype=dtype), (B, n))))
            return out
        if train and p.dropout > 0.0:
            if rng is None:
                raise ConfigError("spikebp: dropout > 0 in training needs a random generator "
                                  "(forward(..., train=True, rng=np.random.default_rng(seed)))")
            keep = 1.0 - p.dropout
            return [((rng.random((B, n)) < keep) / keep).astype(dtype) for n in sizes]
        return [np.ones((B, n), dtype=dtype) for n in sizes]

    def forward(self, p, layers, x, *, train=False, rng=None) -> Trace:
        """F4 per layer on all T·B rows, then the neuron recursion: F1-F3 (+B3) for hidden LIF
        layers, B9 for spiking pools, F5 for the output accumulator (the last dense layer)."""
        T, B = x.shape[:2]
        spiking = [li for li, layer in enumerate(layers) if self.has_neurons(layer)]
        if not spiking or layers[spiking[-1]].kind != "dense":
            raise ConfigError("spikebp: the network must end with a dense layer, the output "
                              "accumulator of F5")
        out_li = spiking[-1]
        lif_idx = [li for li in spiking[:-1] if not layers[li].kind.endswith("pool")]
        masks = self._masks(p, layers, lif_idx, B, x.dtype, train, rng)
        lam = p.lam
        h = x
        inputs, states = [], []
        for li, layer in enumerate(layers):
            inputs.append(h)
            I = layer.forward(h)
            if not self.has_neurons(layer):
                states.append(None)
                h = I
                continue
            I3 = np.ascontiguousarray(I.reshape(T, B, -1))
            if li == out_li:
                U = accumulator_forward(I3, lam)                                    # F5
                st = OutputState(U=U, out=U, y=readout(U[T - 1], p.v_th_out, T))
                h = U
            elif layer.kind.endswith("pool"):
                u, s = pool_neuron_forward(I3, p.v_th_pool)                         # B9
                st = PoolState(u=u, spikes=s, out=s, gamma=spike_count(s))
                h = s.reshape((T, B) + tuple(layer.out_shape))
            else:
                k = lif_idx.index(li)
                v_th = p.v_th_of(k, len(lif_idx))
                u, s, a = lif_forward(I3, masks[k], lam, v_th)                      # F1-F4
                Lam, gamma, D = leak_factor(s, lam, p.ln_lam, p.lf_eps)             # B3
                st = LIFState(u=u, spikes=s, out=a, m=masks[k], Lam=Lam, gamma=gamma, D=D,
                              v_th=v_th)
                h = a.reshape((T, B) + tuple(layer.out_shape))
            states.append(st)
        return Trace(inputs=inputs, states=states, out=h)

    # ---- loss (F6, B1) and the temporal backward (B2, B4-B5, B8, B9) --------------------------
    def loss(self, p, state, target):
        """F6/B1: L summed over the batch; returns L and ∂L/∂U (T, B, N), nonzero at T-1 only."""
        y = state.y
        target = np.asarray(target, dtype=y.dtype)
        if target.shape != y.shape:
            raise ShapeError(f"spikebp: target has shape {target.shape}; the output y has shape "
                             f"{y.shape} (B, n_out); use make_target(labels) for one-hot targets")
        L, e = mse_loss(y, target, p.loss_scale)
        T = state.U.shape[0]
        gU = np.zeros_like(state.U)
        gU[T - 1] = e / (p.v_th_out * T)           # y = U[T-1]/(V_out·T)
        return L, gU

    def neuron_backward(self, p, k, n_spiking, state, g, is_output):
        g = np.ascontiguousarray(g)
        if isinstance(state, OutputState):                                     # B2
            c = p.lam if p.out_grad == "exact" else 1.0
            gI = accumulator_backward(g, c)
            return gI, gI
        if isinstance(state, PoolState):                                       # B9 / 5.3
            if p.variant == "code":
                d = pool_neuron_backward_code(g, state.spikes)
            else:
                d = pool_neuron_backward_paper(g, state.gamma)
            return d, d
        if p.variant == "code":                                                # B4-B5
            d = lif_backward_code(g, state.spikes, state.m, state.D, state.v_th)
            return d, d, {"delta": d}
        d = lif_backward_paper(g, state.m, state.D, state.v_th)                # B8
        return d, d, {"delta": d[0]}

    def fd_objective(self, p, layers, x, target) -> FDCheck:
        """Spec 6.2 (variant "code": frozen-pattern linearisation) or 6.3 (variant "paper":
        linearised count model), at the current weights, with the spec's rule (1e-7 relative).
        The masks are ``dropout_masks`` (or none): the check runs the deterministic forward."""
        trace = self.forward(p, layers, x)
        grads = [g for per_layer in self.backward(p, layers, trace, target)
                 for g in (per_layer or [])]
        if p.variant == "code":
            return FDCheck(frozen_pattern_loss(p, layers, trace, target), grads, h=1e-4,
                           rtol=1e-7, rule="spikebp 6.2")
        return FDCheck(count_model_loss(p, layers, trace, target), grads, h=1e-4, rtol=1e-7,
                       rule="spikebp 6.3")

    def random_case(self, rng, sizes=None, T=None) -> dict:
        """A random oracle case drawing every parameter of spec 5.5: λ or (τ_m, dt), V_th (one or
        per layer), V_out, ε, c, the variant and out_grad, dropout masks, signed inputs, target."""
        case = super().random_case(rng, sizes, T)
        n = [case["weights"][0].shape[1]] + [w.shape[0] for w in case["weights"]]
        n_hidden = len(n) - 2
        params = case["params"]
        if rng.random() < 0.2:
            params.update(tau_m=float(rng.uniform(5.0, 100.0)), dt=float(rng.choice([0.5, 1.0])))
        else:
            params["decay"] = float(rng.uniform(0.9, 1.0))
        params["v_th"] = (float(rng.uniform(0.5, 1.5)) if n_hidden == 0 or rng.random() < 0.7
                          else [float(v) for v in rng.uniform(0.5, 1.5, n_hidden)])
        params["v_th_out"] = float(rng.choice([1.0, rng.uniform(0.5, 2.0)]))
        params["loss_scale"] = float(rng.choice([0.5, 1.0]))
        params["lf_eps"] = float(rng.choice([0.0, 1e-3, 0.5]))
        if n_hidden and rng.random() < 0.3:
            keep = float(rng.uniform(0.5, 0.9))
            params["dropout_masks"] = [[float(v) for v in (rng.random(k) < keep) / keep]
                                       for k in n[1:-1]]
        if rng.random() < 0.3:
            case["inputs"] = case["inputs"] * rng.choice([-1.0, 1.0], size=case["inputs"].shape)
        if rng.random() < 0.2:
            case["target"] = rng.uniform(0.0, 1.0, n[-1])
        return case

    # ---- the oracle (spec 5.6) ----------------------------------------------------------------
    def run_case(self, weights, inputs, *, label=None, target=None, biases=None, p=None) -> dict:
        """One sample, float64, dense: the keys of spec 5.6 (spikes, loss, grads, y, e, u, U_out,
        D, counts, delta)."""
        from ..layers import Dense
        if biases is not None:
            raise ConfigError("spikebp has no biases (spec 2.3: every layer has bias=False); "
                              "leave biases out")
        layers = [Dense(np.array(W, dtype=np.float64)) for W in weights]
        x = np.ascontiguousarray(inputs, dtype=np.float64)[:, None, :]
        T = x.shape[0]
        n_out = weights[-1].shape[0]
        tgt = (self.case_target(p, target, n_out, T) if target is not None
               else self.make_target(p, np.array([label]), n_out, T))
        trace = self.forward(p, layers, x)
        grads = self.backward(p, layers, trace, tgt)
        hidden = trace.states[:-1]
        out_st = trace.states[-1]
        n_hidden = len(hidden)
        deltas = trace.extra.get("delta", [None] * (n_hidden + 1))[:n_hidden]
        return {
            "spikes": [st.spikes[:, 0, :].copy() for st in hidden]
                      + [np.zeros((T, n_out))],
            "loss": float(trace.loss),
            "grads": [g[0] for g in grads],
            "y": out_st.y[0].copy(),
            "e": mse_loss(out_st.y, tgt, p.loss_scale)[1][0],                  # B1
            "u": [st.u[:, 0, :].copy() for st in hidden],
            "U_out": out_st.U[:, 0, :].copy(),
            "D": [st.D[0].copy() for st in hidden],
            "counts": [st.gamma[0].copy() for st in hidden],
            "delta": [d[:, 0, :].copy() if d.ndim == 3 else d[0].copy() for d in deltas],
        }


# --------------------------------------------------------------------------------------------
# 7. The relaxations whose exact gradients the two variants are (spec 6.2, 6.3)
# --------------------------------------------------------------------------------------------


def frozen_pattern_loss(p, layers, trace: Trace, target):
    """Spec 6.2: the frozen-pattern linearisation at the weights of ``trace``, as a function.

    Freezes s*, D, masks and the pooling neurons' spikes of the true forward; then, reading the
    layers' CURRENT parameters, for every neuron layer:
    ũ[t] = I[t] + (1 - s*[t-1])·ũ[t-1] (no leak, frozen reset), o[t] = s*[t]·(1 + f·(ũ[t] - ũ*[t]))
    with f = D/V_th for a hidden LIF layer and f = 1 for a pooling layer (B9), a = m ⊙ o; the
    output y = y* + Σ_t c_t (I^L[t] - I^L*[t])/(V_out·T), c_t = 1 ("code") or λ^(T-t) ("exact").
    Returns F() -> L; F(W*) equals the true loss, and variant "code"'s gradients are ∇F(W*).
    """
    T, B = trace.inputs[0].shape[:2]
    lam = p.lam
    c_t = (lam ** (T - np.arange(T)) if p.out_grad == "exact" else np.ones(T))

    def tilde_u(I, s):                       # ũ[t] = I[t] + (1 - s*[t-1])·ũ[t-1]
        ut = np.empty_like(I)
        prev = np.zeros_like(I[0])
        for t in range(T):
            ut[t] = I[t] + prev
            prev = (1.0 - s[t]) * ut[t]
        return ut

    def run(reference=None):
        h = trace.inputs[0]
        record = []
        for li, (layer, st) in enumerate(zip(layers, trace.states)):
            I = layer.forward(h)
            if st is None:
                h = I
                record.append(None)
                continue
            I3 = I.reshape(T, B, -1)
            if isinstance(st, OutputState):
                I_ref = I3 if reference is None else reference[li]
                y = st.y + np.tensordot(c_t, I3 - I_ref, axes=1) / (p.v_th_out * T)
                record.append(I3)
                return y, record
            ut = tilde_u(I3, st.spikes)
            ut_ref = ut if reference is None else reference[li]
            f = st.D / st.v_th if isinstance(st, LIFState) else 1.0
            o = st.spikes * (1.0 + f * (ut - ut_ref))
            a = st.m * o if isinstance(st, LIFState) else o
            record.append(ut)
            h = a.reshape((T, B) + tuple(layer.out_shape))
        raise ConfigError("frozen_pattern_loss: the trace has no output layer")

    return _frozen_loss(p, run, target)


def count_model_loss(p, layers, trace: Trace, target):
    """Spec 6.3: the layer-wise linearised count model at the weights of ``trace``, as a function.

    N^0 = Σ_t x[t]; hidden LIF: N^l = m ⊙ (γ* + (D/V_th)(W^l N^(l-1) - W*^l N*^(l-1)));
    spiking pool (spec 5.3, refsnn choice): N_p = γ_p* + 1[γ_p* > 0]·(P N - P* N*);
    y = y* + (W^L N^(L-1) - W*^L N*^(L-1))/(V_out·T). Returns F() -> L; variant "paper"'s
    gradients are ∇F(W*).
    """
    T, B = trace.inputs[0].shape[:2]

    def run(reference=None):
        h = trace.inputs[0].sum(axis=0, keepdims=True)          # N^0, shape (1, B, ...)
        record = []
        for li, (layer, st) in enumerate(zip(layers, trace.states)):
            I = layer.forward(h)
            if st is None:
                h = I
                record.append(None)
                continue
            I2 = I.reshape(B, -1)
            I_ref = I2 if reference is None else reference[li]
            record.append(I2)
            if isinstance(st, OutputState):
                return st.y + (I2 - I_ref) / (p.v_th_out * T), record
            if isinstance(st, LIFState):
                N = st.m * (st.gamma + st.D / st.v_th * (I2 - I_ref))
            else:
                N = st.gamma + (st.gamma > 0) * (I2 - I_ref)
            h = N.reshape((1, B) + tuple(layer.out_shape))
        raise ConfigError("count_model_loss: the trace has no output layer")

    return _frozen_loss(p, run, target)


def _frozen_loss(p, run, target):
    """F() = F6's loss of ``run(reference)``, the reference taken at the trace's weights.

    ``run(reference)`` evaluates a linearisation at the layers' current parameters and returns
    (y, record); run() records the reference quantities the linearisation is taken around.
    """
    _, reference = run()
    y_hat = np.asarray(target, dtype=np.float64)

    def F() -> float:
        y, _ = run(reference)
        return float(p.loss_scale * np.sum((y - y_hat) ** 2))

    return F
