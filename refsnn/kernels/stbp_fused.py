"""Fused STBP kernels for a chain of dense layers (spec stbp S1-S4, S9-S16).

The general chain (refsnn/methods/base.py) runs every layer in separate passes: the current
I = W o + b of all T·B rows (S1), then the neuron recursion over t (S2-S4, S9-S12), then, for
the next layer, the event lists of the spikes; backward the recursion (S13/S14/S16), then the
weight gradient (S15), then the error sent down, e W, a GEMM. Here one ``prange``-over-batch
kernel per layer does, per sample and step,

    forward:   I = b + Σ_{j active} Wᵀ[j]  (or a row of a GEMM current)  ->  S2-S4 and h
               ->  the event list of the output spikes (what the next layer gathers);
    backward:  g = e^{l+1} W^{l+1} of the row (over the nonzero entries of e^{l+1} only, or a
               row of one GEMM when e^{l+1} is dense)  ->  S13 / S14 / S16.

(perf_notes' "error only on the surrogate support" computes g by one dot product per
supported neuron. Without fastmath numba does not vectorise a dot product (2.4 GFLOP/s against
40-70 for the GEMM here); with reassociation-only fastmath it does, but each dot still streams
one row of W^{l+1}ᵀ from L2 for 400 multiply-adds: 2.5 ms against 1.1 ms for the GEMM and 1.0
ms for the row sums below (float32, 320 x 400 rows, support 34%, benchmarks/README.md). So
it is not used. The row sums vectorise along the row.)

Rows are r = t·B + b (time-major). The sums run in the same order as the general chain's
(kernels/dense.py event_forward for the gather; the neuron updates are the same expressions in
the same float64 scalar arithmetic as methods/stbp.py's lif_forward and bptt_*), so spikes, u
and h are the same bits as the general chain with the same dense path (events or GEMM), and
the gradients differ only where the error sent down is summed in the kernel instead of by the
GEMM (1e-12 relative in float64; tests/test_stbp_fused.py). The surrogate and the reset are written out in
the loops (no per-element call with run-time switches). No allocation inside the time loop.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

RECT, POLY, SIGMOID, GAUSS = 0, 1, 2, 3             # surrogate codes of methods/stbp.SURROGATES
CODE, PAPER, SD = 0, 1, 2                           # backward variants S13, S14, S16


# --------------------------------------------------------------------------------------------
# Forward: S1 gather (or a GEMM row) -> S2-S4 + S9-S12 -> output events
# --------------------------------------------------------------------------------------------

@njit(cache=True)
def _gather(acc, idx, cnt, r, WT, bias, has_b):
    """S1 on one row: acc = b + Σ_{k < cnt[r]} WT[idx[r, k]], rows summed 8, then 4, then 1 at a
    time: the order of kernels/dense.event_forward, so the same bits."""
    n_out = acc.shape[0]
    for i in range(n_out):
        acc[i] = bias[i] if has_b else 0.0
    c = cnt[r]
    k = 0
    while k + 8 <= c:
        j0, j1, j2, j3 = idx[r, k], idx[r, k + 1], idx[r, k + 2], idx[r, k + 3]
        j4, j5, j6, j7 = idx[r, k + 4], idx[r, k + 5], idx[r, k + 6], idx[r, k + 7]
        for i in range(n_out):
            acc[i] += (((WT[j0, i] + WT[j1, i]) + (WT[j2, i] + WT[j3, i]))
                       + ((WT[j4, i] + WT[j5, i]) + (WT[j6, i] + WT[j7, i])))
        k += 8
    if k + 4 <= c:
        j0, j1, j2, j3 = idx[r, k], idx[r, k + 1], idx[r, k + 2], idx[r, k + 3]
        for i in range(n_out):
            acc[i] += (WT[j0, i] + WT[j1, i]) + (WT[j2, i] + WT[j3, i])
        k += 4
    while k < c:
        j0 = idx[r, k]
        for i in range(n_out):
            acc[i] += WT[j0, i]
        k += 1


@njit(cache=True)
def lif_row(cur, up, op, ur, orow, hr, decay, v_th, reset_exp, strict, kind, a, rect_norm):
    """S2-S4 and h (S9-S12) of one row: u = f(o_prev)·u_prev + I, o = 1[u > V_th] (strict) or
    1[u >= V_th], h = h_kind(u - V_th); the expressions of stbp.lif_forward, surrogate written
    out per kind so that each loop has no call and no switch. cur may be ur itself (each i
    reads cur[i] before it writes ur[i])."""
    N = cur.shape[0]
    for i in range(N):                                  # S3, S2 (float64 scalars)
        if reset_exp:
            f = decay * math.exp(-op[i] / decay)
        else:
            f = decay * (1.0 - op[i])
        ur[i] = f * up[i] + cur[i]
    if strict:                                          # S4
        for i in range(N):
            orow[i] = 1.0 if ur[i] > v_th else 0.0
    else:
        for i in range(N):
            orow[i] = 1.0 if ur[i] >= v_th else 0.0
    if kind == RECT:                                    # S9
        half = a / 2.0
        hv = 1.0 / a if rect_norm else 1.0
        for i in range(N):
            hr[i] = hv if abs(ur[i] - v_th) < half else 0.0
    elif kind == POLY:                                  # S10
        w = 2.0 / math.sqrt(a)
        c0 = math.sqrt(a) / 2.0
        c1 = a / 4.0
        for i in range(N):
            ax = abs(ur[i] - v_th)
            hr[i] = c0 - c1 * ax if ax < w else 0.0
    elif kind == SIGMOID:                               # S11, even form
        for i in range(N):
            z = math.exp(-abs(ur[i] - v_th) / a)
            hr[i] = z / (a * (1.0 + z) * (1.0 + z))
    else:                                               # S12
        s = math.sqrt(2.0 * math.pi * a)
        for i in range(N):
            x = ur[i] - v_th
            hr[i] = math.exp(-x * x / (2.0 * a)) / s


@njit(cache=True, parallel=True)
def lif_dense_forward(T, idx, cnt, WT, bias, I, decay, v_th, reset_exp, strict, kind, a,
                      rect_norm, u, o, h, oidx, ocnt):
    """One dense spiking layer, S1-S4 and S9-S12, fused per sample (``prange`` over b).

    Input current per row r = t·B + b: from the input events (idx, cnt) and WT = Wᵀ (n_in, N)
    when I has no rows, else I[r] (a GEMM's current). Writes u, o, h (T·B, N) and, when ocnt
    has rows, the event list of o per row (oidx[r, :ocnt[r]] = the i with o = 1, ascending).
    u[-1] = o[-1] = 0. Each b writes only its own rows.
    """
    R, N = u.shape
    B = R // T
    from_events = I.shape[0] == 0
    has_b = bias.shape[0] > 0
    want_ev = ocnt.shape[0] > 0
    for b in prange(B):
        zrow = np.zeros(N, u.dtype)                     # u[-1] = o[-1] = 0
        for t in range(T):
            r = t * B + b
            if from_events:                             # I[r] gathered into u[r], then S2 in
                _gather(u[r], idx, cnt, r, WT, bias, has_b)     # place (measured faster than
                cur = u[r]                                      # a scratch row)
            else:
                cur = I[r]
            if t == 0:
                lif_row(cur, zrow, zrow, u[r], o[r], h[r], decay, v_th, reset_exp, strict,
                         kind, a, rect_norm)
            else:
                lif_row(cur, u[r - B], o[r - B], u[r], o[r], h[r], decay, v_th, reset_exp,
                         strict, kind, a, rect_norm)
            if want_ev:                                 # branch-free event list of o[r]
                c = 0
                for i in range(N):
                    oidx[r, c] = i
                    c += o[r, i] != 0.0
                ocnt[r] = c
    return u


# --------------------------------------------------------------------------------------------
# Backward: the error from above (rows of e^{l+1} W^{l+1}) -> S13 / S14 / S16
# --------------------------------------------------------------------------------------------

@njit(cache=True)
def _g_row(gr, nz, er, Wup):
    """The error from above of one row, S13c / S14c of the next layer: gr = Σ_i er[i]·Wup[i, :]
    (= (e^{l+1} W^{l+1})[r]) over the nonzero er[i] only (listed first, branch-free), rows of
    Wup taken 4, then 1 at a time: contiguous, vectorised along gr, no reduction."""
    n_up = er.shape[0]
    N = gr.shape[0]
    c = 0
    for i in range(n_up):
        nz[c] = i
        c += er[i] != 0.0
    for j in range(N):
        gr[j] = 0.0
    k = 0
    while k + 4 <= c:
        i0, i1, i2, i3 = nz[k], nz[k + 1], nz[k + 2], nz[k + 3]
        e0, e1, e2, e3 = er[i0], er[i1], er[i2], er[i3]
        for j in range(N):
            gr[j] += (e0 * Wup[i0, j] + e1 * Wup[i1, j]) + (e2 * Wup[i2, j] + e3 * Wup[i3, j])
        k += 4
    while k < c:
        i0 = nz[k]
        e0 = er[i0]
        for j in range(N):
            gr[j] += e0 * Wup[i0, j]
        k += 1


@njit(cache=True)
def _reset_pair(o, decay, reset_exp):
    """S3's reset factor f(o) and its slope f'(o): τ(1 - o), -τ ("linear") or τ·exp(-o/τ),
    -exp(-o/τ) ("exp")."""
    if reset_exp:
        return decay * math.exp(-o / decay), -math.exp(-o / decay)
    return decay * (1.0 - o), -decay


@njit(cache=True)
def _bptt_row(grow, ur, orow, hr, ewr, edr, e_next, dh_next, decay, reset_exp, reset_grad,
              variant):
    """One row (t, b) of S13 / S14 / S16, given the error from above grow; e_next (ε[t+1]) and
    dh_next (δ[t+1]·h[t+1]) are carried in float64 like stbp.bptt_code / bptt_paper."""
    N = grow.shape[0]
    if variant == SD:                                   # S16
        for i in range(N):
            ewr[i] = grow[i] * hr[i]
        return
    if variant == CODE:                                 # S13
        for i in range(N):
            dt = grow[i]
            f, fs = _reset_pair(orow[i], decay, reset_exp)
            if reset_grad:
                dt += e_next[i] * ur[i] * fs                            # S13a
            et = dt * hr[i] + e_next[i] * f                             # S13b
            ewr[i] = et
            e_next[i] = et
        return
    for i in range(N):                                  # S14
        dt = grow[i]
        f, fs = _reset_pair(orow[i], decay, reset_exp)
        if reset_grad:
            dt += dh_next[i] * ur[i] * fs                               # S14a
        et = dt * hr[i] + e_next[i] * f                                 # S14b
        edr[i] = dt * hr[i]                                             # S14c
        dh_next[i] = edr[i]
        ewr[i] = et
        e_next[i] = et


@njit(cache=True, parallel=True)
def bptt_dense_fused(T, g, eup, Wup, u, o, h, decay, reset_exp, reset_grad, variant, ew, ed,
                     nnz):
    """S13 (code), S14 (paper) or S16 (sd) of one dense spiking layer, ``prange`` over b.

    The error from above, ∂L/∂o through the next layer, is g[r] when g has rows; otherwise it
    is computed here, row by row, from the next layer's error eup (R, N_up) and weights
    Wup = W^{l+1} (N_up, N) over the nonzero entries of eup (:func:`_g_row`). Writes ew
    (the error of the weight gradient S15: e, ε or e) and, for "paper", ed = δ·h (the error
    sent down, S14c); for "code"/"sd" pass ed = ew; nnz[b] = the nonzero entries of ed in
    sample b's rows. Same float64 scalar arithmetic as stbp.bptt_code / bptt_paper / bptt_sd.
    """
    R, N = u.shape
    B = R // T
    full = g.shape[0] > 0
    for b in prange(B):
        gr = np.zeros(N, u.dtype)
        nz = np.empty(eup.shape[1], np.int32)
        e_next = np.zeros(N)                            # e[T] = 0 (ε[T] for paper)
        dh_next = np.zeros(N)                           # δ[T]·h[T] = 0 (paper)
        c = 0
        for t in range(T - 1, -1, -1):
            r = t * B + b
            if full:
                _bptt_row(g[r], u[r], o[r], h[r], ew[r], ed[r], e_next, dh_next, decay,
                          reset_exp, reset_grad, variant)
            else:
                _g_row(gr, nz, eup[r], Wup)
                _bptt_row(gr, u[r], o[r], h[r], ew[r], ed[r], e_next, dh_next, decay,
                          reset_exp, reset_grad, variant)
            for i in range(N):
                c += ed[r, i] != 0.0
        nnz[b] = c
    return ew
