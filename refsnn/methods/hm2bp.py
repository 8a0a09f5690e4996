"""HM2-BP (Jin, Zhang & Li, NeurIPS 2018, arXiv 1805.07866), as specified in spec/hm2bp.md.

Hybrid macro/micro backpropagation never unrolls time: the forward pass records spike trains, and
the backward pass works on spike-train-level scalars computed from the spike TIMES of one sample,
layer by layer from the top (spec 5.10).

Symbols (spec 1, 2.1): membrane ``v``, synaptic trace ``ep`` (= τ_s·I), refractory counter ``ref``;
τ_m ``tau_m``, τ_s ``tau_s``, t_ref ``t_ref`` (whole steps), ν ``v_th``, ε_th ``th_eps``, w0
``w_lat``. o = firing counts, e_{i|j} the S-PSP (``e``), ρ the effect ratio (``rho``), s the side
term (``side``), Λ the lateral factor (``lat_factor``), g = ∂E/∂o (``dE_do``), δ = g/ν (``delta``).
Arrays are time-major (T, B, N); W[i, j] maps pre j to post i (conv: (C_out, C_in, k, k)).

Exact (spec 5.11): the count loss (4.3), the regulariser (7.1), the ``discrete`` S-PSP (5.1, with
the T-PSP identity 5.1b). Approximations: o ≈ a/ν (5.4), ρ = e/o_pre (5.2), the (1 + s) side term
(5.6), Λ (5.7), the ``code`` S-PSP and the silent-neuron heuristics; tests/test_hm2bp.py checks them
by the properties of spec 6.3 and the whole backward wiring by the tangent surrogate of 6.1 (C3).

How the S-PSP is computed (spec 5.1, here in closed form over spike times). For one post spike f
at τ = τ_f with reset reference r = r_{f-1} and s = τ - r > 0, the sum over the pre spikes g of
κ(s, u_fg) collapses to two reads of one pre-synaptic trace:

    Σ_g κ(s, u_fg) = c·[F_j(τ) - A^s·F_j(r)],   F_j(t) = Σ_{σ'_g <= t} (A^{t-σ'_g} - B^{t-σ'_g}),

with c = 1/(1 - τ_s/τ_m), σ' the pre spike time shifted as the variant says (``discrete``: σ' = σ,
A = 1 - 1/τ_m, B = 1 - 1/τ_s; ``code``: σ' = σ + t_ref, A = exp(-1/τ_m), B = exp(-1/τ_s)). The
``code`` look-back window only removes the pre spikes before L_f = max(1, trunc(τ_f - W)), which is
a correction read of the two traces E^A, E^B (F = E^A - E^B) at time L_f + t_ref - 1. So e_{i|j} is
a short sum of "terms" (a time t and coefficients) that depend on post i only, applied to the rows
F[t, j] (or E^A, E^B) of the pre layer's traces. Cost per sample and layer: O(T·n_pre) for the
traces plus O(K·n_pre) for the reads, K = 2-3 terms per post spike; it grows linearly with T and
with the number of POST spikes, and does not depend on the pre spike counts. No (t, t') pair and no
(post spike, pre spike) pair is ever visited.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from ..errors import ConfigError, ShapeError
from .base import Method, Params, Trace, check_range, param, per_layer

# ============================================================================================
# 1. Parameters (spec 5.12; refsnn names of docs/spec/README.md)
# ============================================================================================


@dataclass(frozen=True)
class HM2BPParams(Params):
    METHOD = "hm2bp"
    tau_m: float = param(64.0, "membrane time constant, in steps", "2.1")
    tau_s: float = param(8.0, "synaptic time constant, in steps", "2.1")
    t_ref: int = param(2, "refractory steps (int() of the value: 1.7 acts as 1)", "2.1")
    v_th: float = param(20.0, "threshold ν: one value, or one per spiking layer (pooling "
                        "layers included)", "2.1, 8")
    th_eps: float = param(0.0, "fire when v > ν - th_eps (dense and pooling layers; conv "
                          "layers always use 0)", "2.1")
    w_lat: float = param(0.0, "lateral inhibition w0 between output neurons (0 = off)",
                         "2.2, 5.7")
    desired_count: float = param(35.0, "target count of the label neuron", "4.1")
    undesired_count: float = param(5.0, "target count of every other output neuron", "4.1")
    margin: float = param(5.0, "dead zone: an output counts only if |o - y| > margin", "4.2")
    sample_weight: float = param(1.0, "boosting weight β_s of the sample (multiplies E and g)",
                                 "4.2, 4.3")
    spsp: str = param("discrete", "S-PSP: 'discrete' (exact for the forward) or 'code' "
                      "(official CUDA formula)", "5.1", choices=("discrete", "code"))
    window: float | None = param(None, "look-back of the 'code' S-PSP in steps (None = 4·tau_m)",
                                 "5.1")
    e_silent: float = param(0.1, "S-PSP of a silent post and an active pre", "5.1")
    side_effect: bool = param(True, "use the side term (1 + s); False sets s = 0", "5.6",
                              choices=(True, False))
    side_silent: float = param(0.5, "φ of a silent post in the side term", "5.6")
    fix_target: bool = param(True, "silent-target fix of the label neuron", "5.3",
                             choices=(True, False))
    effect_ratio: bool = param(True, "ρ = e/o_pre; False sets ρ = 1", "5.2",
                               choices=(True, False))
    lambda_reg: float = param(0.0, "regulariser weight λ (0 = off)", "7.1")
    beta_reg: float = param(0.0, "regulariser exponent β", "7.1")
    w_limit: float = param(8.0, "regulariser scale L_w", "7.1")
    boost: bool = param(False, "boosting in training: per-sample weights β_n (start 1) multiply "
                        "E and g^L, updated per class after each epoch (no effect on one "
                        "run_case sample, where β_n = 1)", "7", choices=(True, False))

    def validate(self):
        super().validate()
        m = self.METHOD
        for name in ("tau_m", "tau_s"):
            check_range(m, name, getattr(self, name), lo=1.0)
        if self.tau_m == self.tau_s:
            raise ConfigError(f"{m}: tau_m and tau_s are both {self.tau_m}; the PSP kernel "
                              "divides by 1 - tau_s/tau_m, so give them different values")
        check_range(m, "t_ref", self.t_ref, lo=0.0)
        check_range(m, "v_th", self.v_th, lo=0.0, lo_open=True)
        for name in ("th_eps", "w_lat", "desired_count", "undesired_count", "margin",
                     "sample_weight", "lambda_reg"):
            check_range(m, name, getattr(self, name), lo=0.0)
        for name in ("e_silent", "side_silent", "beta_reg"):
            check_range(m, name, getattr(self, name))
        check_range(m, "w_limit", self.w_limit, lo=0.0, lo_open=True)
        if self.window is not None:
            check_range(m, "window", self.window, lo=0.0, lo_open=True)
        for name in ("side_effect", "fix_target", "effect_ratio", "boost"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ConfigError(f"{m}: {name}={getattr(self, name)!r} must be true or false")

    # derived values -----------------------------------------------------------------------------
    @property
    def n_ref(self) -> int:
        """t_ref in whole steps, truncated toward 0 as the oracle's int() (2.1)."""
        return int(self.t_ref)

    @property
    def look_back(self) -> float:
        """W of the ``code`` S-PSP (5.1): ``window``, or 4·τ_m when it is None."""
        return 4.0 * self.tau_m if self.window is None else float(self.window)


# ============================================================================================
# 2. Forward: discrete LIF with synaptic current, refractory clamp, one-step delay (2.1, 2.2)
# ============================================================================================


@njit(cache=True, parallel=True)
def lif_forward(I, tau_m, tau_s, t_ref, thr, w_lat):
    """2.1 steps (1)-(6) and the lateral term of 2.2, for every sample b and neuron i.

    I : (T, B, N) feed-forward current of each INPUT step, I[t] = W·S^{l-1}[t]; step t reads I[t-1]
    (the one-step delay of every layer). thr = ν - ε_th (fire on v > thr, strict). w_lat > 0 adds
    -w_lat·Σ_{k≠i} S[t-1, k] at step (3) (output layer). Returns S (0/1), v (after the clamp,
    before the reset: the potential at a spike is v_fire) and ep (after step (3)), each (T, B, N).
    """
    T, B, N = I.shape
    S = np.zeros_like(I)
    v_rec = np.zeros_like(I)
    ep_rec = np.zeros_like(I)
    for b in prange(B):
        v = np.zeros(N, I.dtype)
        ep = np.zeros(N, I.dtype)
        ref = np.zeros(N, np.int64)
        for t in range(T):
            for i in range(N):
                v[i] = v[i] - v[i] / tau_m                    # (1) leak of the membrane
                ep[i] = ep[i] - ep[i] / tau_s                 # (2) leak of the synaptic current
            if t == 0:                                        # nothing is read at t = 0
                for i in range(N):
                    v_rec[0, b, i] = v[i]
                continue
            n_prev = 0.0
            if w_lat != 0.0:
                for k in range(N):
                    n_prev += S[t - 1, b, k]
            for i in range(N):
                ep[i] = ep[i] + I[t - 1, b, i]                # (3) inputs of step t-1 arrive at t
                if w_lat != 0.0:                              # 2.2: -w0 Σ_{k≠i} S[t-1, k]
                    ep[i] = ep[i] - w_lat * (n_prev - S[t - 1, b, i])
                v[i] = v[i] + ep[i] / tau_s                   # (4) integrate
                if ref[i] > 0:                                # (5) refractory clamp
                    v[i] = 0.0
                    ref[i] -= 1
                v_rec[t, b, i] = v[i]
                ep_rec[t, b, i] = ep[i]
                if v[i] > thr:                                # (6) fire, reset v only
                    S[t, b, i] = 1.0
                    ref[i] = t_ref
                    v[i] = 0.0
    return S, v_rec, ep_rec


# ============================================================================================
# 3. Loss, targets, silent-target fix (4, 5.3)
# ============================================================================================


@njit(cache=True)
def count_loss(o, labels, desired, undesired, margin, beta):
    """4.1-4.3: y, the dead-zone mask m, E_b = ½ β_b Σ_i m_i (o_i - y_i)², g = β_b m (o - y).

    o : (B, N) output counts; labels : (B,) class indices; beta : (B,) the boosting weight β_s
    of each sample (4.2, 7). Returns E (B,), y, m, g (B, N).
    """
    B, N = o.shape
    y = np.empty((B, N))
    m = np.zeros((B, N))
    g = np.zeros((B, N))
    E = np.zeros(B)
    for b in range(B):
        for i in range(N):
            y[b, i] = desired if i == labels[b] else undesired          # 4.1
            d = o[b, i] - y[b, i]
            if abs(d) > margin:                                         # 4.2 dead zone
                m[b, i] = 1.0
                E[b] += 0.5 * beta[b] * d * d
                g[b, i] = beta[b] * d                                   # 4.3
    return E, y, m, g


@njit(cache=True)
def fix_silent_target(S, o, labels, n_desired):
    """5.3: copy of the output spikes with spikes at t = kΔ (k >= 1, t < T) for a silent label.

    Δ = T // int(desired) (n_desired = int(desired) > 0, checked by the caller); only samples whose
    label neuron has o = 0 are changed. Returns Ŝ (T, B, N).
    """
    T, B, N = S.shape
    S_hat = S.copy()
    step = T // n_desired
    for b in range(B):
        lab = labels[b]
        if o[b, lab] == 0:
            t = step
            while t < T:
                S_hat[t, b, lab] = 1.0
                t += step
    return S_hat


class BoostedLabels(NamedTuple):
    """A batch target of class labels with each sample's boosting weight β_n (7), which
    multiplies E and g^L of that sample (4.2, 4.3) on top of ``sample_weight``."""
    labels: np.ndarray    # (B,) class indices
    beta: np.ndarray      # (B,) β_n >= 0


def boost_weights(beta, labels, wrong, n_classes: int):
    """7 (``BOOST_METHOD``), after an epoch: per class c, err_c = Σ_{n∈c} β_n [wrong_n] /
    Σ_{n∈c} β_n, then β_n <- β_n · exp(err_c/20 · [wrong_n]); never renormalised.

    beta (N,) the weights of the training samples (start at 1), labels (N,), wrong (N,) bool:
    the training-pass prediction of sample n was not its label. Returns the new β (N,).
    """
    beta = np.asarray(beta, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    wrong = np.asarray(wrong, dtype=bool)
    if not beta.shape == labels.shape == wrong.shape or beta.ndim != 1:
        raise ShapeError(f"boost_weights: beta {beta.shape}, labels {labels.shape} and wrong "
                         f"{wrong.shape} must be one value per training sample")
    tot = np.bincount(labels, weights=beta, minlength=n_classes)
    bad = np.bincount(labels, weights=beta * wrong, minlength=n_classes)
    err = np.divide(bad, tot, out=np.zeros_like(bad), where=tot > 0)
    return beta * np.exp(err[labels] / 20.0 * wrong)


# ============================================================================================
# 4. S-PSP e_{i|j} (5.1): pre traces, post terms, and e itself
# ============================================================================================


@njit(cache=True, parallel=True)
def spsp_traces(S, dA, dB, shift, lo, need_ab):
    """5.1, pre side: E^A_j(t) = Σ_{σ' <= t} dA^{t-σ'}, E^B_j likewise, F = E^A - E^B.

    S : (T, B, M) pre spikes; σ' = σ + shift for every pre spike at σ >= lo (``discrete``: shift 0,
    lo 0, dA = 1 - 1/τ_m, dB = 1 - 1/τ_s; ``code``: shift t_ref, lo 1, dA = e^{-1/τ_m},
    dB = e^{-1/τ_s}). Traces are evaluated on t = 0..T-1 (every read of 5.1 falls there).
    Returns F, E^A, E^B in S's dtype: F (T, B, M); E^A and E^B (T, B, M) when ``need_ab`` (some
    term reads them), else empty.
    """
    T, B, M = S.shape
    F = np.empty_like(S)
    if need_ab:
        EA = np.empty_like(S)
        EB = np.empty_like(S)
    else:
        EA = np.empty((0, B, M), S.dtype)
        EB = np.empty((0, B, M), S.dtype)
    for b in prange(B):                                   # samples apart: the same bits
        xa = np.zeros(M)
        xb = np.zeros(M)
        for t in range(T):
            src = t - shift
            fire = src >= lo
            for j in range(M):
                xa[j] *= dA
                xb[j] *= dB
                if fire and S[src, b, j] != 0.0:
                    xa[j] += 1.0
                    xb[j] += 1.0
                F[t, b, j] = xa[j] - xb[j]
            if need_ab:
                for j in range(M):
                    EA[t, b, j] = xa[j]
                    EB[t, b, j] = xb[j]
    return F, EA, EB


@njit(cache=True)
def spsp_terms(S, tau_m, tau_s, t_ref, code, window):
    """5.1, post side: e_{i|j} = Σ_k term_k(F_j, E^A_j, E^B_j) over the spikes τ_f of post i.

    S : (T, B, N) post spikes (Ŝ for the output layer). Per spike f, r = r_{f-1} (r_0 = 0
    ``discrete``, 1 ``code``; r_f = τ_f + t_ref), s = τ_f - r:
    - ``discrete``: s <= 0 gives κ = 0; else c·F(τ) - c·a^s·F(r).
    - ``code`` (window W, L = max(1, trunc(τ - W)), q = L + t_ref - 1): s > 0 gives
      c·F_L(τ) - c·A^s·F_L(r), with F_L(t) = F(t) - A^{t-q} E^A(q) + B^{t-q} E^B(q) for t > q,
      0 for t <= q (no correction when L = 1); s = 0 gives 0; s < 0 (only after a target fix
      with Δ <= t_ref) gives c(A^s - B^s) B^{-s} Σ_{g∈G_f} B^{τ-σ'}, evaluated as written.
    A term is (t, kind, c1, c2): kind 0 reads c1·F[t]; kind 1 reads c1·E^A[t] + c2·E^B[t].
    Returns ptr (B·N + 1) into the term arrays tt, kind, c1, c2 (post n = b·N + i), and the
    counts n (B, N) of S.
    """
    T, B, N = S.shape
    c = 1.0 / (1.0 - tau_s / tau_m)
    if code:
        dA = math.exp(-1.0 / tau_m)
        dB = math.exp(-1.0 / tau_s)
    else:
        dA = 1.0 - 1.0 / tau_m
        dB = 1.0 - 1.0 / tau_s
    n = np.zeros((B, N), np.int64)
    total = 0
    for t in range(T):
        for b in range(B):
            for i in range(N):
                if S[t, b, i] != 0.0:
                    n[b, i] += 1
                    total += 1
    cap = 4 * total
    ptr = np.zeros(B * N + 1, np.int64)
    tt = np.zeros(cap, np.int64)
    kind = np.zeros(cap, np.int64)
    c1 = np.zeros(cap)
    c2 = np.zeros(cap)
    k = 0
    for b in range(B):
        for i in range(N):
            ptr[b * N + i] = k
            if n[b, i] == 0:
                continue
            r = 1 if code else 0
            for tau in range(T):
                if S[tau, b, i] == 0.0:
                    continue
                s = tau - r
                if not code:
                    if s > 0:
                        tt[k] = tau
                        c1[k] = c
                        k += 1
                        if r > 0:                             # F(0) = 0: skip the empty read
                            tt[k] = r
                            c1[k] = -c * dA ** s
                            k += 1
                else:
                    L = max(1, int(tau - window))             # int() truncates toward 0
                    q = L + t_ref - 1
                    corr = L > 1
                    if s > 0:
                        As = math.exp(-s / tau_m)
                        ca = 0.0                              # kind-1 correction at q
                        cb = 0.0
                        if (not corr) or tau > q:
                            tt[k] = tau
                            c1[k] = c
                            k += 1
                            if corr:
                                ca -= c * math.exp(-(tau - q) / tau_m)
                                cb += c * math.exp(-(tau - q) / tau_s)
                        if (not corr) or r > q:
                            tt[k] = r
                            c1[k] = -c * As
                            k += 1
                            if corr:
                                ca += c * As * math.exp(-(r - q) / tau_m)
                                cb -= c * As * math.exp(-(r - q) / tau_s)
                        if corr and (ca != 0.0 or cb != 0.0):
                            tt[k] = q
                            kind[k] = 1
                            c1[k] = ca
                            c2[k] = cb
                            k += 1
                    elif s < 0:
                        kk = c * (math.exp(-s / tau_m) - math.exp(-s / tau_s)) * math.exp(s / tau_s)
                        if (not corr) or tau > q:
                            tt[k] = tau
                            kind[k] = 1
                            c2[k] = kk
                            k += 1
                            if corr:
                                tt[k] = q
                                kind[k] = 1
                                c2[k] = -kk * math.exp(-(tau - q) / tau_s)
                                k += 1
                r = tau + t_ref
    ptr[B * N] = k
    return ptr, tt[:k], kind[:k], c1[:k], c2[:k], n


@njit(cache=True)
def spsp_dense(ptr, tt, kind, c1, c2, n_post, o_pre, F, EA, EB, e_silent):
    """5.1 for every (post i, pre j) of a dense layer: e (B, N, M), silent rules included.

    n_post (B, N) counts of the post trains the terms came from; o_pre (B, M) full pre counts.
    Silent post and active pre: e = e_silent; silent pre: e = 0 (its traces are 0).
    """
    T, B, M = F.shape
    N = n_post.shape[1]
    e = np.zeros((B, N, M))
    for b in range(B):
        for i in range(N):
            if n_post[b, i] == 0:
                for j in range(M):
                    if o_pre[b, j] > 0:
                        e[b, i, j] = e_silent
                continue
            for k in range(ptr[b * N + i], ptr[b * N + i + 1]):
                t = tt[k]
                if kind[k] == 0:
                    for j in range(M):
                        e[b, i, j] += c1[k] * F[t, b, j]
                else:
                    for j in range(M):
                        e[b, i, j] += c1[k] * EA[t, b, j] + c2[k] * EB[t, b, j]
    return e


# ============================================================================================
# 5. Backward of a dense layer: side term, error to the layer below, weight gradient
# ============================================================================================


#: rows of W per block of the dense backward; the blocks' partial sums of g are added in block
#: order, so the result does not depend on the number of threads.
ROW_BLOCK = 32


@njit(cache=True, parallel=True)
def dense_backward(ptr, tt, kind, c1, c2, n_post, o_pre, F, EA, EB, W, delta, lam, v_th,
                   side_effect, side_silent, effect_ratio, e_silent, need_down, every, dW):
    """5.5, 5.6 and 5.2 of one dense layer, per sample b, with the S-PSP row e_{i|.} built once.

    For post i with δ_i ≠ 0 (every post when ``every``): e_i = Σ_k term_k (5.1; e_silent for
    each active pre when ô_i = 0), s_i = (1/ν) Σ_j w_ij e_ij / ô_i or side_silent·Σ_j w_ij/ν
    (5.6; 0 without side_effect), α_i = δ_i (1 + s_i) Λ_i and dW[i, :] += α_i e_i (5.5). Error to
    the layer below (5.2), with ρ_ij = e_ij/o_j if o_j > 0 and ô_i > 0 else 1 (1 without
    effect_ratio): g_j = (1/o_j) Σ_{ô_i>0} δ_i w_ij e_ij + Σ_{ô_i=0} δ_i w_ij if o_j > 0, else
    Σ_i δ_i w_ij. Rows are split in blocks of ROW_BLOCK (prange; each block owns its rows of dW
    and its partial sums of g). Returns side (B, N), g (B, M); dW (N, M) is accumulated in place.
    """
    T, B, M = F.shape
    N = W.shape[0]
    n_blk = (N + ROW_BLOCK - 1) // ROW_BLOCK
    side = np.zeros((B, N))
    g = np.zeros((B, M))
    for b in range(B):
        G1 = np.zeros((n_blk, M))     # Σ over firing posts of δ w e
        G0 = np.zeros((n_blk, M))     # Σ over silent posts of δ w
        Gf = np.zeros((n_blk, M))     # Σ over firing posts of δ w
        for blk in prange(n_blk):
            e = np.empty(M, F.dtype)
            for i in range(blk * ROW_BLOCK, min(N, (blk + 1) * ROW_BLOCK)):
                d = delta[b, i]
                if d == 0.0 and not every:
                    continue
                firing = n_post[b, i] > 0
                if firing:                                    # 5.1 from the terms
                    e[:] = 0.0
                    for k in range(ptr[b * N + i], ptr[b * N + i + 1]):
                        t = tt[k]
                        if kind[k] == 0:
                            ck = c1[k]
                            for j in range(M):
                                e[j] += ck * F[t, b, j]
                        else:
                            ca = c1[k]
                            cb = c2[k]
                            for j in range(M):
                                e[j] += ca * EA[t, b, j] + cb * EB[t, b, j]
                else:                                         # silent post (5.1)
                    for j in range(M):
                        e[j] = e_silent if o_pre[b, j] > 0 else 0.0
                s = 0.0
                if side_effect:                               # 5.6
                    acc = 0.0
                    if firing:
                        for j in range(M):
                            acc += W[i, j] * e[j]
                        s = acc / (v_th * n_post[b, i])
                    else:
                        for j in range(M):
                            acc += W[i, j]
                        s = side_silent * acc / v_th
                side[b, i] = s
                a = d * (1.0 + s) * lam[b, i]                 # 5.5
                if a != 0.0:
                    for j in range(M):
                        dW[i, j] += a * e[j]
                if need_down and d != 0.0:                    # 5.2
                    if firing:
                        for j in range(M):
                            dw = d * W[i, j]
                            G1[blk, j] += dw * e[j]
                            Gf[blk, j] += dw
                    else:
                        for j in range(M):
                            G0[blk, j] += d * W[i, j]
        if need_down:
            for j in range(M):
                s1 = 0.0
                s0 = 0.0
                sf = 0.0
                for blk in range(n_blk):
                    s1 += G1[blk, j]
                    s0 += G0[blk, j]
                    sf += Gf[blk, j]
                if effect_ratio and o_pre[b, j] > 0:
                    g[b, j] = s1 / o_pre[b, j] + s0
                else:
                    g[b, j] = sf + s0
    return side, g


# ============================================================================================
# 6. Backward of conv (5.8) and spiking pooling (5.9) layers: the same equations over a
#    receptive-field table pre[n, tap] (-1 outside the map), widx[n, tap] into the flat weights
# ============================================================================================


@njit(cache=True, parallel=True)
def mapped_side_down(ptr, tt, kind, c1, c2, n_post, o_pre, F, EA, EB, w, pre, widx, delta,
                     v_th, side_effect, side_silent, effect_ratio, need_down, every):
    """5.6 and 5.2 of a conv (5.8) or pooling (5.9) layer, over its receptive-field table.

    Post n reads the pre neurons pre[n, :] (taps outside the map are -1 and left out of every
    sum) through the weights w[widx[n, :]] (widx = -1: unit weight, the pooling layer). For a
    pooling layer pass delta = g_pool/p² and side_effect=False: g_conv = Σ (g_pool/p²)·ρ.
    Returns side (B, Npost), g (B, Npre).
    """
    T, B, M = F.shape
    N, K = pre.shape
    side = np.zeros((B, N))
    g = np.zeros((B, M))
    for b in prange(B):
        G1 = np.zeros(M)
        G0 = np.zeros(M)
        Gall = np.zeros(M)
        for n in range(N):
            d = delta[b, n]
            if d == 0.0 and not every:
                continue
            if n_post[b, n] > 0:
                if side_effect or (need_down and effect_ratio and d != 0.0):
                    dot = 0.0
                    for k in range(ptr[b * N + n], ptr[b * N + n + 1]):
                        t = tt[k]
                        for q in range(K):
                            j = pre[n, q]
                            if j < 0:
                                continue
                            wq = w[widx[n, q]] if widx[n, q] >= 0 else 1.0
                            if kind[k] == 0:
                                wx = wq * c1[k] * F[t, b, j]
                            else:
                                wx = wq * (c1[k] * EA[t, b, j] + c2[k] * EB[t, b, j])
                            dot += wx
                            G1[j] += d * wx
                    if side_effect:
                        side[b, n] = dot / (v_th * n_post[b, n])
            else:
                if side_effect:
                    sw = 0.0
                    for q in range(K):
                        if pre[n, q] >= 0:
                            sw += w[widx[n, q]] if widx[n, q] >= 0 else 1.0
                    side[b, n] = side_silent * sw / v_th
                if need_down:
                    for q in range(K):
                        j = pre[n, q]
                        if j >= 0:
                            G0[j] += d * (w[widx[n, q]] if widx[n, q] >= 0 else 1.0)
            if need_down:
                for q in range(K):
                    j = pre[n, q]
                    if j >= 0:
                        Gall[j] += d * (w[widx[n, q]] if widx[n, q] >= 0 else 1.0)
        if need_down:
            for j in range(M):
                if effect_ratio and o_pre[b, j] > 0:
                    g[b, j] = G1[j] / o_pre[b, j] + G0[j]
                else:
                    g[b, j] = Gall[j]
    return side, g


@njit(cache=True, parallel=True)
def mapped_weight_grad(ptr, tt, kind, c1, c2, n_post, o_pre, F, EA, EB, pre, widx, alpha,
                       e_silent, group, dW):
    """5.8: dW[widx[n, q]] += Σ_b α_bn e_{n|pre[n, q]}, the conv form of 5.5.

    Posts n in [g·group, (g+1)·group) write only the weights of group g (a conv output channel),
    so the prange over groups has disjoint writes.
    """
    T, B, M = F.shape
    N, K = pre.shape
    n_groups = N // group
    for gi in prange(n_groups):
        for b in range(B):
            for n in range(gi * group, (gi + 1) * group):
                a = alpha[b, n]
                if a == 0.0:
                    continue
                if n_post[b, n] > 0:
                    for k in range(ptr[b * N + n], ptr[b * N + n + 1]):
                        t = tt[k]
                        ca = a * c1[k]
                        cb = a * c2[k]
                        for q in range(K):
                            j = pre[n, q]
                            if j < 0:
                                continue
                            if kind[k] == 0:
                                dW[widx[n, q]] += ca * F[t, b, j]
                            else:
                                dW[widx[n, q]] += ca * EA[t, b, j] + cb * EB[t, b, j]
                else:
                    for q in range(K):
                        j = pre[n, q]
                        if j >= 0 and o_pre[b, j] > 0:
                            dW[widx[n, q]] += a * e_silent


@njit(cache=True)
def spsp_mapped(ptr, tt, kind, c1, c2, n_post, o_pre, F, EA, EB, pre, e_silent):
    """5.1 over a receptive-field table: e[b, n, q] = e_{n|pre[n, q]} (0 for a tap outside)."""
    T, B, M = F.shape
    N, K = pre.shape
    e = np.zeros((B, N, K))
    for b in range(B):
        for n in range(N):
            for q in range(K):
                j = pre[n, q]
                if j < 0:
                    continue
                if n_post[b, n] == 0:
                    if o_pre[b, j] > 0:
                        e[b, n, q] = e_silent
                    continue
                acc = 0.0
                for k in range(ptr[b * N + n], ptr[b * N + n + 1]):
                    t = tt[k]
                    if kind[k] == 0:
                        acc += c1[k] * F[t, b, j]
                    else:
                        acc += c1[k] * EA[t, b, j] + c2[k] * EB[t, b, j]
                e[b, n, q] = acc
    return e


@njit(cache=True)
def effect_ratio_table(e, n_post, o_pre, pre, effect_ratio):
    """5.2: ρ[b, n, q] = e/o_pre when o_pre > 0 and ô_post > 0, else 1 (always 1 when off)."""
    B, N, K = e.shape
    rho = np.ones((B, N, K))
    if not effect_ratio:
        return rho
    for b in range(B):
        for n in range(N):
            if n_post[b, n] == 0:
                continue
            for q in range(K):
                j = pre[n, q]
                if j >= 0 and o_pre[b, j] > 0:
                    rho[b, n, q] = e[b, n, q] / o_pre[b, j]
    return rho


# ============================================================================================
# 7. Lateral factor of the output layer (5.7) and the regulariser (7.1)
# ============================================================================================


@njit(cache=True)
def lateral_factor(e_lat, o, labels, w_lat, v_th):
    """5.7: Λ_j = 1 / (1 - w0² Σ_{l≠j} ρ_lj d_l ρ_jl d_j), from the ORIGINAL output spikes.

    e_lat (B, N, N): S-PSP with post l and pre j, both output neurons. ρ_lj = e_lat[l, j]/o_j if
    o_l > 0 and o_j > 0, else 1. d_k = 1/ν if o_k > 0 or k = label, else 0. Returns Λ (B, N).
    """
    B, N = o.shape
    lam = np.ones((B, N))
    for b in range(B):
        for j in range(N):
            dj = 1.0 / v_th if (o[b, j] > 0 or j == labels[b]) else 0.0
            acc = 0.0
            for l in range(N):
                if l == j:
                    continue
                dl = 1.0 / v_th if (o[b, l] > 0 or l == labels[b]) else 0.0
                r_lj = e_lat[b, l, j] / o[b, j] if (o[b, l] > 0 and o[b, j] > 0) else 1.0
                r_jl = e_lat[b, j, l] / o[b, l] if (o[b, l] > 0 and o[b, j] > 0) else 1.0
                acc += r_lj * dl * r_jl * dj
            lam[b, j] = 1.0 / (1.0 - w_lat * w_lat * acc)
    return lam


@njit(cache=True)
def regulariser(W2, lam, beta, w_limit, grad):
    """7.1 per row i of W2 (n_rows, N_in): R_i = (λ N_in L_w / 2) exp(β (Q_i - 1)),
    Q_i = (1/N_in) Σ_j (w_ij/L_w)²; adds ∂R/∂w_ij = λ β (w_ij/L_w) exp(β (Q_i - 1)) to grad.
    Returns R = Σ_i R_i.
    """
    n_rows, n_in = W2.shape
    R = 0.0
    for i in range(n_rows):
        Q = 0.0
        for j in range(n_in):
            x = W2[i, j] / w_limit
            Q += x * x
        Q /= n_in
        ex = math.exp(beta * (Q - 1.0))
        R += lam * n_in * w_limit / 2.0 * ex
        for j in range(n_in):
            grad[i, j] += lam * beta * (W2[i, j] / w_limit) * ex
    return R


# ============================================================================================
# 8. The spiking pooling layer's linear map (5.9): unit weights, channel-wise window sums
# ============================================================================================


@njit(cache=True)
def window_sum_forward(x, p, stride, Ho, Wo):
    """5.9 input current of pool neuron (c, X, Y) = Σ of x over its window (unit weights).

    x : (R, C, H, W) -> (R, C, Ho, Wo); the window of X covers rows X·stride ..
    min(H, X·stride + p) - 1 (a border window may be cut short), the same for columns.
    """
    R, C, H, W = x.shape
    y = np.zeros((R, C, Ho, Wo), x.dtype)
    for r in range(R):
        for c in range(C):
            for X in range(Ho):
                for Y in range(Wo):
                    acc = 0.0
                    for xi in range(X * stride, min(H, X * stride + p)):
                        for yi in range(Y * stride, min(W, Y * stride + p)):
                            acc += x[r, c, xi, yi]
                    y[r, c, X, Y] = acc
    return y


@njit(cache=True)
def window_sum_backward(g, p, stride, H, W):
    """Adjoint of :func:`window_sum_forward` (exact): g_x[c, xi, yi] = Σ_{windows ∋ (xi, yi)} g."""
    R, C, Ho, Wo = g.shape
    gx = np.zeros((R, C, H, W), g.dtype)
    for r in range(R):
        for c in range(C):
            for X in range(Ho):
                for Y in range(Wo):
                    for xi in range(X * stride, min(H, X * stride + p)):
                        for yi in range(Y * stride, min(W, Y * stride + p)):
                            gx[r, c, xi, yi] += g[r, c, X, Y]
    return gx


def _layer_base():
    try:
        from ..layers import Layer
        return Layer
    except ImportError:                     # layers.py not importable: a plain base
        return object


class SpikingPool2d(_layer_base()):
    """5.9: the linear map of HM2-BP's spiking pooling layer (its neurons are the method's).

    Input current of pool neuron (c, X, Y) = the number of spikes of channel c inside its p x p
    window (stride ``stride``, D_out = ceil(D_in/stride), border windows cut short). No trainable
    weight. ``backward`` is the exact adjoint of this map; HM2-BP's own error rule for pooling
    (g_pool/p² · ρ) lives in :meth:`HM2BP.backward`.
    """

    kind = "spikepool"

    def __init__(self, in_shape, k: int = 2, stride: int | None = None):
        super().__init__()
        C, H, W = (int(v) for v in in_shape)
        k = int(k)
        stride = k if stride is None else int(stride)
        if k < 1 or stride < 1:
            raise ShapeError(f"spiking pooling needs a window and a stride >= 1, got {k}, {stride}")
        self.in_shape = (C, H, W)
        self.out_shape = (C, -(-H // stride), -(-W // stride))
        self.k = k
        self.stride = stride
        self.params = []
        self.param_names = []

    def forward(self, x):
        lead = x.shape[:-3]
        y = window_sum_forward(np.ascontiguousarray(x).reshape((-1,) + self.in_shape), self.k,
                               self.stride, self.out_shape[1], self.out_shape[2])
        return y.reshape(lead + self.out_shape)

    def backward(self, g, x=None, need_input_grad=True):
        if not need_input_grad:
            return None, []
        lead = g.shape[:-3]
        gx = window_sum_backward(np.ascontiguousarray(g).reshape((-1,) + self.out_shape),
                                 self.k, self.stride, self.in_shape[1], self.in_shape[2])
        return gx.reshape(lead + self.in_shape), []

    def describe(self) -> str:
        return (f"SpikingPool2d({self.k}x{self.k}, stride {self.stride}) "
                f"{self.in_shape}->{self.out_shape}")


def pool_table(in_shape, out_shape, p, stride):
    """Receptive fields of a pooling layer: pre[n, q] (-1 outside the map), widx = -1 (w = 1)."""
    C, H, W = in_shape
    _, Ho, Wo = out_shape
    pre = -np.ones((C * Ho * Wo, p * p), np.int64)
    for c in range(C):
        for X in range(Ho):
            for Y in range(Wo):
                n = (c * Ho + X) * Wo + Y
                for di in range(p):
                    for dj in range(p):
                        xi, yi = X * stride + di, Y * stride + dj
                        if xi < H and yi < W:
                            pre[n, di * p + dj] = (c * H + xi) * W + yi
    return pre, -np.ones_like(pre)


def conv_table(in_shape, out_shape, k, stride, padding):
    """Receptive fields of a conv layer (5.8): tap q = (c, ki, kj) of post (oc, x, y) reads pre
    (c, x·stride + ki - P, y·stride + kj - P) through w[oc, c, ki, kj]; -1 outside the map."""
    C, H, W = in_shape
    Co, Ho, Wo = out_shape
    K = C * k * k
    pre = -np.ones((Co * Ho * Wo, K), np.int64)
    widx = -np.ones((Co * Ho * Wo, K), np.int64)
    for oc in range(Co):
        for x in range(Ho):
            for y in range(Wo):
                n = (oc * Ho + x) * Wo + y
                for c in range(C):
                    for ki in range(k):
                        for kj in range(k):
                            xi, yi = x * stride + ki - padding, y * stride + kj - padding
                            if 0 <= xi < H and 0 <= yi < W:
                                q = (c * k + ki) * k + kj
                                pre[n, q] = (c * H + xi) * W + yi
                                widx[n, q] = oc * K + q
    return pre, widx


def spsp_constants(p: HM2BPParams):
    """(code, dA, dB, shift, lo) of :func:`spsp_traces` for the variant ``p.spsp`` (5.1)."""
    if p.spsp == "code":
        return True, math.exp(-1.0 / p.tau_m), math.exp(-1.0 / p.tau_s), p.n_ref, 1
    return False, 1.0 - 1.0 / p.tau_m, 1.0 - 1.0 / p.tau_s, 0, 0


def spsp_matrix(p: HM2BPParams, S_post, S_pre):
    """5.1 for every (post i, pre j) pair of two spike arrays (T, B, N) and (T, B, M): e (B, N, M).

    The variant, τ's, t_ref, window and e_silent come from ``p``. Used for e^lat (5.7), the
    oracle's quantities and the walkthrough.
    """
    S_post = np.ascontiguousarray(S_post, dtype=np.float64)
    S_pre = np.ascontiguousarray(S_pre, dtype=np.float64)
    code, dA, dB, shift, lo = spsp_constants(p)
    ptr, tt, kind, c1, c2, n_post = spsp_terms(S_post, float(p.tau_m), float(p.tau_s), p.n_ref,
                                               code, p.look_back)
    F, EA, EB = spsp_traces(S_pre, dA, dB, shift, lo, bool(np.any(kind == 1)))
    o_pre = S_pre.sum(axis=0)
    return spsp_dense(ptr, tt, kind, c1, c2, n_post, o_pre, F, EA, EB, float(p.e_silent))


# ============================================================================================
# 9. The method: forward chain, backward in the order of 5.10, the oracle
# ============================================================================================


class HM2BPState(NamedTuple):
    """One spiking layer after the forward pass (2.1)."""
    out: np.ndarray       # S, what the next layer reads (T, B, N)
    spikes: np.ndarray    # S
    v: np.ndarray         # potential after the clamp, before the reset (v_fire at spikes)
    ep: np.ndarray        # synaptic trace after step (3)


_MNIST_ENC = dict(encoding="poisson", encoding_kw={"rate": 1.0 / 5.5, "first_step_silent": True})
_PAPER = dict(tau_m=64.0, tau_s=8.0, t_ref=2, desired_count=35.0, undesired_count=5.0,
              margin=5.0, w_lat=1.0, spsp="code", th_eps=1e-6, boost=True)
_PAPER_TRAIN = dict(optimizer="adam", lr=1e-3, lr_schedule="inv_sqrt", batch_size=1, epochs=200,
                    init="", **_MNIST_ENC)


class HM2BP(Method):
    """HM2-BP on the refsnn protocol (spec/hm2bp.md)."""

    name = "hm2bp"
    title = ("Hybrid Macro/Micro Level Backpropagation for Training Deep Spiking Neural "
             "Networks (Jin, Zhang & Li, NeurIPS 2018)")
    spec = "hm2bp.md"
    Params = HM2BPParams
    spiking_pool = True             # 5.9: pooling layers are spiking layers

    #: spec 8 (Config/*.txt of the official code), boosting (7) on in each. Not reproduced: the
    #: MLP runs there draw the Poisson trains once and reuse them (refsnn's trainer draws them per
    #: batch), the CNN run's augmentation, and the 5000-swap shuffle (refsnn permutes).
    presets = {
        "mnist-mlp": dict(_PAPER_TRAIN, dataset="mnist", arch="784-800-10", T=400,
                          params=dict(_PAPER, v_th=(20.0, 8.0), lambda_reg=10.0, beta_reg=0.04,
                                      w_limit=8.0)),
        "nmnist-mlp": dict(_PAPER_TRAIN, dataset="nmnist", arch="2312-800-10", T=540,
                           binning="hm2bp", encoding="bernoulli", encoding_kw={},   # events: 3
                           params=dict(_PAPER, v_th=(15.0, 15.0), lambda_reg=10.0,
                                       beta_reg=0.01, w_limit=8.0)),
        "mnist-cnn": dict(_PAPER_TRAIN, dataset="mnist", arch="28x28x1-15c5-a2-40c5-a2-300-10",
                          T=400, params=dict(_PAPER, v_th=(5.0, 2.0, 12.0, 4.0, 10.0, 10.0),
                                             lambda_reg=0.0, w_limit=8.0)),
        # not a spec-8 row: the MNIST MLP settings on Fashion-MNIST 784-400-400-10, the network
        # for which TSSL-BP's paper quotes HM2-BP at 88.99%.
        "fashion-mnist-mlp": dict(_PAPER_TRAIN, dataset="fashion-mnist", arch="784-400-400-10",
                                  T=400, params=dict(_PAPER, v_th=(20.0, 20.0, 8.0),
                                                     lambda_reg=10.0, beta_reg=0.04,
                                                     w_limit=8.0)),
    }
    #: The run of plain `refsnn train --method hm2bp`: the MNIST MLP setup with the time axis
    #: compressed 4x (T 400 -> 100, tau_m 64 -> 16, tau_s 8 -> 2, t_ref 2 -> 0 (int(0.5)), input
    #: rate x4: q = 4·pixel/5.5), so a sample carries the paper's input spike count in a quarter of
    #: the steps; the paper's thresholds, targets, margin, lateral inhibition and boosting (7, on
    #: in every run of spec 8); 784-400-10; Adam with batches of 10 at lr 1e-2 and the spec-7
    #: per-epoch decay. Measured on mnist10k: 96.7% test after 5 epochs without boosting, about
    #: 3 CPU-minutes (benchmarks/runs/hm2bp.md); 97.0% with it (one run, 3.7 min wall; β_n stay
    #: below 1.014 in 5 epochs, so boosting hardly matters in so short a run).
    defaults = dict(dataset="mnist10k", arch="784-400-10", T=100, epochs=5, batch_size=10,
                    optimizer="adam", lr=1e-2, lr_schedule="inv_sqrt", encoding="poisson",
                    encoding_kw={"rate": 4.0 / 5.5, "first_step_silent": True},
                    params=dict(tau_m=16.0, tau_s=2.0, t_ref=0, v_th=(20.0, 8.0), w_lat=1.0,
                                boost=True))

    #: `refsnn gradcheck` draws a few steps (T = 6) of a small network at HM2-BP's init: short
    #: time constants, a low threshold and small target counts make every layer fire there (the
    #: silent-target fix of 5.3 needs int(desired_count) <= T).
    gradcheck_params = dict(tau_m=8.0, tau_s=2.0, t_ref=1, v_th=0.3, desired_count=3.0,
                            undesired_count=1.0, margin=0.0)

    # ---- layers -------------------------------------------------------------------------------
    def make_pool(self, p, in_shape, k):
        return SpikingPool2d(in_shape, k)

    def init_layer(self, p, layer, rng, dtype):
        """7: U(-initW, initW) per weight, no fan-in scaling; initW = 1 dense, 0.5 conv."""
        scale = {"dense": 1.0, "conv": 0.5}.get(layer.kind)
        for arr in layer.params:
            arr[...] = rng.uniform(-scale, scale, arr.shape).astype(dtype)

    def uses_bias(self, p):
        return False                 # 2.1: no layer has a bias

    # ---- targets, loss, decoding ----------------------------------------------------------------
    def make_target(self, p, labels, n_out, T):
        """The labels themselves (4.1 builds y from them); checked against n_out."""
        lab = np.asarray(labels)
        if lab.ndim != 1 or not np.all(np.equal(np.mod(lab, 1), 0)):
            raise ConfigError(f"hm2bp targets are class indices, one per sample; got {lab!r}")
        lab = lab.astype(np.int64)
        if lab.size and (lab.min() < 0 or lab.max() >= n_out):
            raise ConfigError(f"label {int(lab.max()) if lab.max() >= n_out else int(lab.min())}"
                              f" is not a class of the {n_out} output neurons; labels must lie "
                              f"in 0..{n_out - 1}")
        return lab

    def case_target(self, p, target, n_out, T):
        raise ConfigError("hm2bp takes a class label (label=...), not a target: its targets are "
                          "the counts desired_count/undesired_count of spec 4.1")

    def labels_and_weights(self, p, target, n_out, B):
        """(labels, β) of a batch: ``target`` is the labels, or :class:`BoostedLabels` carrying
        each sample's boosting weight β_n (7); β_s = sample_weight·β_n (4.2)."""
        beta = None
        if isinstance(target, BoostedLabels):
            target, beta = target
        labels = self.make_target(p, target, n_out, 0)
        if labels.shape[0] != B:
            raise ShapeError(f"{labels.shape[0]} labels for a batch of {B} samples")
        if beta is None:
            return labels, np.full(B, float(p.sample_weight))
        beta = np.asarray(beta, dtype=np.float64)
        if beta.shape != (B,) or not np.all(np.isfinite(beta)) or np.any(beta < 0):
            raise ConfigError(f"hm2bp boosting weights must be {B} finite numbers >= 0, one per "
                              f"sample; got {beta!r}")
        return labels, float(p.sample_weight) * beta

    # ---- boosting (7): the trainer's per-sample state is β_n ------------------------------------
    def init_sample_state(self, p, labels):
        """7: β_n = 1 for every training sample when ``boost`` is on; otherwise no state."""
        return np.ones(len(labels)) if p.boost else None

    def batch_target(self, p, target, beta, idx):
        """The batch's labels with their samples' β_n (:class:`BoostedLabels`)."""
        return BoostedLabels(np.asarray(target), beta[idx])

    def update_sample_state(self, p, beta, labels, pred):
        """7, after each epoch: :func:`boost_weights`, "wrong" judged by the training pass."""
        labels = np.asarray(labels, dtype=np.int64)
        return boost_weights(beta, labels, np.asarray(pred) != labels, int(labels.max()) + 1)

    def loss(self, p, state, target):
        """4.2-4.3 on the batch: Σ_b E_b and g = ∂E/∂o (B, N) (no regulariser here)."""
        o = np.asarray(state.spikes).sum(axis=0).astype(np.float64)
        labels, beta = self.labels_and_weights(p, target, o.shape[1], o.shape[0])
        E, _, _, g = count_loss(o, labels, float(p.desired_count), float(p.undesired_count),
                                float(p.margin), beta)
        return float(E.sum()), g

    def scores(self, p, state):
        """3: the output counts; argmax takes the lowest index on ties (class 0 when silent)."""
        return np.asarray(state.spikes).sum(axis=0)

    # ---- forward ------------------------------------------------------------------------------
    def _threshold(self, p, layer, k, n_spiking):
        nu = per_layer(p.v_th, k, n_spiking, "v_th", self.name)
        return nu, (nu if layer.kind == "conv" else nu - float(p.th_eps))     # 2.1 ε_th

    def neuron_forward(self, p, k, n_spiking, I, is_output):
        """2.1 for a dense or pooling layer (th_eps applies); :meth:`forward` handles conv."""
        nu = per_layer(p.v_th, k, n_spiking, "v_th", self.name)
        S, v, ep = lif_forward(I, float(p.tau_m), float(p.tau_s), p.n_ref, nu - float(p.th_eps),
                               float(p.w_lat) if is_output else 0.0)
        return HM2BPState(S, S, v, ep)

    def forward(self, p, layers, x, *, train=False, rng=None):
        """I_l = layer_l(S_{l-1}) on all T·B rows, then 2.1 (one-step delay inside lif_forward)."""
        T, B = x.shape[:2]
        n_spiking = sum(self.has_neurons(layer) for layer in layers)
        h = x
        inputs, states, k = [], [], 0
        for layer in layers:
            inputs.append(h)
            I = layer.forward(h)
            if self.has_neurons(layer):
                is_output = k == n_spiking - 1
                _, thr = self._threshold(p, layer, k, n_spiking)
                S, v, ep = lif_forward(np.ascontiguousarray(I.reshape(T, B, -1)), float(p.tau_m),
                                       float(p.tau_s), p.n_ref, thr,
                                       float(p.w_lat) if is_output else 0.0)
                states.append(HM2BPState(S, S, v, ep))
                h = S.reshape((T, B) + tuple(layer.out_shape))
                k += 1
            else:
                states.append(None)
                h = I
        if n_spiking == 0 or layers[-1].kind != "dense":
            raise ConfigError("an hm2bp network must end with a dense output layer")
        return Trace(inputs=inputs, states=states, out=h)

    # ---- backward -----------------------------------------------------------------------------
    def backward(self, p, layers, trace, target, record=None):
        """5.10 over the whole chain; ``record`` (a dict), if given, receives the spec's "aux"
        quantities (e, ρ, s, Λ, counts, mask, ...), batch-major."""
        return self._backward(p, layers, trace, target, record)

    def neuron_backward(self, p, k, n_spiking, state, g, is_output):
        raise NotImplementedError("HM2-BP's backward works on spike-train-level quantities; "
                                  "HM2BP.backward does the whole chain (spec 5.10)")

    def _terms(self, p, S_post):
        return spsp_terms(np.ascontiguousarray(S_post), float(p.tau_m), float(p.tau_s), p.n_ref,
                          p.spsp == "code", p.look_back)

    def _traces(self, p, S_pre, need_ab):
        _, dA, dB, shift, lo = spsp_constants(p)
        return spsp_traces(np.ascontiguousarray(S_pre), dA, dB, shift, lo, need_ab)

    def _table(self, layer):
        """Receptive-field table of a conv or pooling layer, cached on the layer object."""
        tab = getattr(layer, "_hm2bp_table", None)
        if tab is None:
            if layer.kind == "conv":
                W = layer.params[0]
                tab = conv_table(tuple(layer.in_shape), tuple(layer.out_shape), W.shape[-1],
                                 int(getattr(layer, "stride", 1)),
                                 int(getattr(layer, "padding", 0)))
            else:
                tab = pool_table(tuple(layer.in_shape), tuple(layer.out_shape), layer.k,
                                 layer.stride)
            layer._hm2bp_table = tab
        return tab

    def _backward(self, p, layers, trace, target, record=None):
        """5.10: for l = L..1, (output) g, Λ, fix; e and ρ; δ = g/ν; g^{l-1}; s; dW (+ 7.1)."""
        T, B = trace.inputs[0].shape[:2]
        spk = [li for li, layer in enumerate(layers) if self.has_neurons(layer)]
        nL = len(spk)
        S_L = trace.states[spk[-1]].spikes.reshape(T, B, -1)
        n_out = S_L.shape[2]
        labels, beta = self.labels_and_weights(p, target, n_out, B)
        o_L = S_L.sum(axis=0).astype(np.float64)
        E, y, m, g = count_loss(o_L, labels, float(p.desired_count), float(p.undesired_count),
                                float(p.margin), beta)                           # 4.2, 4.3
        nu_L = per_layer(p.v_th, nL - 1, nL, "v_th", self.name)
        lam = np.ones((B, n_out))
        if p.w_lat != 0.0:                                                       # 5.7
            e_lat = spsp_matrix(p, S_L, S_L)
            lam = lateral_factor(e_lat, o_L, labels, float(p.w_lat), nu_L)
        S_hat = S_L
        if p.fix_target and np.any(o_L[np.arange(B), labels] == 0):             # 5.3
            n_des = int(p.desired_count)
            if n_des <= 0 or T // n_des == 0:
                raise ConfigError(f"the silent-target fix needs 1 <= int(desired_count) <= T; "
                                  f"got desired_count={p.desired_count} with T={T}: raise T, "
                                  "lower desired_count, or set fix_target=false")
            S_hat = fix_silent_target(S_L, o_L, labels, n_des)
        if record is not None:
            record.update(targets=y, mask=m, lat_factor=lam, S_post_out_fixed=S_hat, beta=beta)
            for key in ("counts", "dE_do", "delta", "e", "rho", "side"):
                record[key] = [None] * (nL + 1)
            record["counts"][nL] = o_L
            record["dE_do"][nL] = g

        grads = [[] for _ in layers]
        R_total = 0.0
        g_cur = g
        for pos in range(nL - 1, -1, -1):
            li = spk[pos]
            layer = layers[li]
            post = S_hat if pos == nL - 1 else trace.states[li].spikes.reshape(T, B, -1)
            pre = np.ascontiguousarray(trace.inputs[li].reshape(T, B, -1))
            o_pre = pre.sum(axis=0).astype(np.float64)
            need_down = pos > 0
            every = record is not None
            ptr, tt, kind, c1, c2, n_post = self._terms(p, post)
            F, EA, EB = self._traces(p, pre, bool(np.any(kind == 1)))
            terms = (ptr, tt, kind, c1, c2, n_post, o_pre, F, EA, EB)
            if layer.kind == "dense":
                W = np.ascontiguousarray(layer.params[0])      # rows W[i, :] (Network stores Wᵀ)
                nu = per_layer(p.v_th, pos, nL, "v_th", self.name)
                delta = g_cur / nu                                               # 5.4
                lam_l = lam if pos == nL - 1 else np.ones_like(delta)
                dW = np.zeros_like(W)
                side, g_down = dense_backward(*terms, W, delta, lam_l, nu, p.side_effect,
                                              float(p.side_silent), p.effect_ratio,
                                              float(p.e_silent), need_down, every, dW)
                grads[li] = [dW]
                if record is not None:
                    pre_tab = np.broadcast_to(np.arange(W.shape[1]), W.shape)
                    e = spsp_dense(*terms, float(p.e_silent))
                    rho = effect_ratio_table(e, n_post, o_pre, np.ascontiguousarray(pre_tab),
                                             p.effect_ratio)
            else:
                pre_tab, widx = self._table(layer)
                if layer.kind == "conv":
                    W = layer.params[0]
                    nu = per_layer(p.v_th, pos, nL, "v_th", self.name)
                    delta = g_cur / nu                                           # 5.8
                    side, g_down = mapped_side_down(*terms, W.reshape(-1), pre_tab, widx,
                                                    delta, nu, p.side_effect,
                                                    float(p.side_silent), p.effect_ratio,
                                                    need_down, every)
                    alpha = delta * (1.0 + side)
                    dW = np.zeros_like(W)
                    mapped_weight_grad(*terms, pre_tab, widx, alpha, float(p.e_silent),
                                       int(np.prod(layer.out_shape[1:])), dW.reshape(-1))
                    grads[li] = [dW]
                else:                                                            # 5.9 pooling
                    delta = g_cur / float(layer.k * layer.k)
                    side, g_down = mapped_side_down(*terms, np.zeros(1, pre.dtype), pre_tab,
                                                    widx, delta, 1.0, False, 0.0,
                                                    p.effect_ratio, need_down, every)
                    side = None
                if record is not None:
                    e = spsp_mapped(*terms, pre_tab, float(p.e_silent))
                    rho = effect_ratio_table(e, n_post, o_pre, pre_tab, p.effect_ratio)
            if layer.params and p.lambda_reg != 0.0:                             # 7.1
                W = layer.params[0]
                gR = np.zeros((W.shape[0], W[0].size))
                R_total += regulariser(np.ascontiguousarray(W.reshape(W.shape[0], -1),
                                                            dtype=np.float64),
                                       float(p.lambda_reg), float(p.beta_reg), float(p.w_limit),
                                       gR)
                grads[li][0] += (B * gR).reshape(W.shape).astype(W.dtype)
            if record is not None:
                record["counts"][pos] = o_pre
                record["delta"][pos + 1] = None if side is None else delta    # pooling: no δ
                record["e"][pos + 1] = e
                record["rho"][pos + 1] = rho
                record["side"][pos + 1] = side
                if need_down:
                    record["dE_do"][pos] = g_down
            g_cur = g_down
        trace.loss = float(E.sum()) + B * R_total
        return grads

    # ---- the spec's finite-difference check ----------------------------------------------------
    def fd_objective(self, p, layers, x, target):
        """6.1 C3: F = the tangent surrogate Ẽ at the current weights (:func:`tangent_loss`),
        grads = HM2-BP's gradient at the reference; Ẽ is quadratic in W, so central differences
        are exact up to rounding (rule 1e-6 relative, h = 1e-4). It checks the exact pieces the
        spec names, C1 (4.3) through õ^L and C2 (7.1), and the wiring of the backward recursion
        (5.2, 5.5, 5.8, 5.9: indices, transposes, which count goes where), not the
        approximations, which have no finite-difference meaning (5.11)."""
        from .base import FDCheck
        trace = self.forward(p, layers, x)
        record = {}
        grads = [g for per_layer in self.backward(p, layers, trace, target, record=record)
                 for g in per_layer]
        return FDCheck(F=tangent_loss(self, p, layers, record), grads=grads, h=1e-4, rtol=1e-6,
                       rule="hm2bp 6.1 C3, tangent surrogate",
                       note="hm2bp: the full gradient has no finite-difference check (counts "
                       "are piecewise constant in W; 1/ν, ρ, (1+s) and Λ are approximations, spec "
                       "5.11); F is the tangent surrogate of spec 6.1 C3 (e, ρ, s, Λ, mask "
                       "frozen), which checks (4.3), (7.1) and the backward's wiring")

    # ---- the oracle ---------------------------------------------------------------------------
    def run_case(self, weights, inputs, *, label=None, target=None, biases=None, p=None):
        """One sample, float64, dense (5.12): spikes, loss = E + R, grads, and the quantities
        the spec lists under "aux", here as keys of the result itself: per layer l = 0..L (0 is
        the input; None where a quantity does not exist) counts, dE_do, delta, e, rho, side,
        v_fire; and targets, mask, lat_factor, S_post_out_fixed (Ŝ^L of 5.3)."""
        from ..layers import Dense
        if biases is not None:
            raise ConfigError("hm2bp has no biases (spec 2.1); leave biases out")
        if target is not None:
            self.case_target(p, target, weights[-1].shape[0], inputs.shape[0])
        layers = [Dense(np.array(W, dtype=np.float64)) for W in weights]
        x = np.ascontiguousarray(inputs, dtype=np.float64)[:, None, :]
        if not np.all((x == 0) | (x == 1)):
            raise ShapeError("hm2bp inputs are spikes: every entry of inputs must be 0 or 1")
        trace = self.forward(p, layers, x)
        record = {}
        grads = self._backward(p, layers, trace, np.array([label]), record)
        states = trace.spiking_states
        spikes = [st.spikes[:, 0, :] for st in states]
        out = {"spikes": spikes, "loss": float(trace.loss), "grads": [g[0] for g in grads]}
        for key in ("counts", "dE_do", "delta", "e", "rho", "side"):       # index 0 = the input
            out[key] = [None if a is None else np.asarray(a)[0] for a in record[key]]
        out.update(targets=record["targets"][0], mask=record["mask"][0],
                   lat_factor=record["lat_factor"][0],
                   v_fire=[None] + [np.where(st.spikes[:, 0, :] > 0, st.v[:, 0, :], 0.0)
                                    for st in states],
                   S_post_out_fixed=record["S_post_out_fixed"][:, 0, :])
        return out

    def random_case(self, rng, sizes=None, T=None) -> dict:
        """A random oracle case in the ranges where HM2-BP's layers fire (T 15-60, ν 0.5-1.5,
        weights U(-0.6, 1.6)), drawing every parameter of 5.12."""
        T = int(T or rng.integers(15, 61))
        if sizes is None:
            sizes = [int(v) for v in rng.integers(2, 9, size=int(rng.integers(1, 4)) + 1)]
        weights = [rng.uniform(-0.6, 1.6, (n_out, n_in)) for n_in, n_out in zip(sizes, sizes[1:])]
        inputs = (rng.random((T, sizes[0])) < rng.uniform(0.2, 0.6)).astype(np.float64)
        tau_m = float(rng.uniform(8.0, 64.0))
        n_sp = len(sizes) - 1
        params = dict(
            tau_m=tau_m, tau_s=float(rng.uniform(2.0, min(8.0, tau_m - 1.0))),
            t_ref=int(rng.integers(0, 3)),
            v_th=(float(rng.uniform(0.5, 1.5)) if rng.random() < 0.5
                  else [float(v) for v in rng.uniform(0.5, 1.5, n_sp)]),
            spsp=str(rng.choice(["discrete", "code"])),
            w_lat=float(rng.choice([0.0, 1.0, rng.uniform(0.1, 1.5)])),
            desired_count=float(rng.integers(4, 10)), undesired_count=float(rng.integers(0, 3)),
            margin=float(rng.integers(0, 3)), side_effect=bool(rng.random() < 0.7),
            fix_target=bool(rng.random() < 0.7), effect_ratio=bool(rng.random() < 0.7))
        if rng.random() < 0.5:
            params.update(th_eps=float(rng.choice([1e-6, 0.05])),
                          window=int(rng.integers(5, 80)),
                          sample_weight=float(rng.uniform(0.5, 2.0)),
                          e_silent=float(rng.uniform(0.0, 0.5)),
                          side_silent=float(rng.uniform(0.0, 1.0)))
        if rng.random() < 0.3:
            params.update(lambda_reg=float(rng.uniform(1.0, 5.0)),
                          beta_reg=float(rng.uniform(0.01, 0.5)),
                          w_limit=float(rng.uniform(3.0, 8.0)))
        return {"weights": weights, "inputs": inputs, "label": int(rng.integers(sizes[-1])),
                "params": params}


# ============================================================================================
# 10. The tangent surrogate of spec 6.1 (C3), for Method.fd_objective
# ============================================================================================


def tangent_loss(method: HM2BP, p: HM2BPParams, layers, record):
    """6.1 C3: Ẽ(W) with e, ρ, s, Λ and the mask frozen at the reference weights W₀.

    õ^0 = o^0 and õ^l = o^l + (1/ν_l)[((W^l - W₀^l)∘e^l)·1 ⊙ (1 + s^l) ⊙ Λ^l
    + (W₀^l∘ρ^l)(õ^{l-1} - o^{l-1})] (Λ^l = 1 below the output; conv layers over their
    receptive fields, 5.8; a pooling layer passes Σ ρ·(õ - o)/p² up, 5.9, with no ν), then
    Ẽ = Σ_b ½ β_b Σ_i m_i (õ^L_i - y_i)² + B·R(W) (7.1). ``record`` is what
    :meth:`HM2BP.backward` filled at W₀. Returns F(): Ẽ at the CURRENT values of the layers'
    weights, equal to the loss at W₀.
    """
    spk = [layer for layer in layers if method.has_neurons(layer)]
    nL = len(spk)
    W0s = [layer.params[0].copy() if layer.params else None for layer in spk]
    tables = [None if layer.kind == "dense" else method._table(layer) for layer in spk]
    B = record["counts"][0].shape[0]

    def F():
        d = np.zeros_like(record["counts"][0])                      # õ^0 - o^0 = 0
        R = 0.0
        for pos, layer in enumerate(spk):
            e, rho = record["e"][pos + 1], record["rho"][pos + 1]
            if layer.kind not in ("dense", "conv"):                  # 5.9 pooling: no W, no ν
                pre, _ = tables[pos]
                d_pre = np.where(pre >= 0, d[:, pre], 0.0)           # (B, N, K)
                d = (rho * d_pre).sum(axis=2) / float(layer.k * layer.k)
                continue
            W, W0 = layer.params[0], W0s[pos]
            nu = per_layer(p.v_th, pos, nL, "v_th", method.name)
            if layer.kind == "dense":
                dw, w0, d_pre = (W - W0)[None], W0[None], d[:, None, :]
            else:                                                     # 5.8: taps of the table
                pre, widx = tables[pos]
                inside = widx >= 0
                dw = np.where(inside, (W - W0).reshape(-1)[widx], 0.0)[None]
                w0 = np.where(inside, W0.reshape(-1)[widx], 0.0)[None]
                d_pre = np.where(pre >= 0, d[:, pre], 0.0)
            lam = record["lat_factor"] if pos == nL - 1 else 1.0
            d = ((dw * e).sum(axis=2) * (1.0 + record["side"][pos + 1]) * lam
                 + (w0 * rho * d_pre).sum(axis=2)) / nu
            if p.lambda_reg != 0.0:
                W2 = np.ascontiguousarray(W.reshape(W.shape[0], -1), dtype=np.float64)
                R += regulariser(W2, float(p.lambda_reg), float(p.beta_reg), float(p.w_limit),
                                 np.zeros(W2.shape))
        o = record["counts"][nL] + d
        E = 0.5 * np.sum(record["beta"][:, None] * record["mask"] * (o - record["targets"]) ** 2)
        return float(E + B * R)

    return F
