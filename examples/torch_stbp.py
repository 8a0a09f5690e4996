"""STBP in plain PyTorch autograd (float64): an independent implementation to check refsnn against.

    refsnn oracle export --method stbp --cases 50 --param variant=code stbp.h5
    refsnn oracle compare stbp.h5 --impl examples.torch_stbp:run_case

This is how a PyTorch user would write the official STBP code (spec stbp.md 2.3, 5.2): the
membrane update ``u = decay·u·(1 - o) + W o_prev + b`` with the spike ``o`` NOT detached inside
the reset factor, a custom autograd Function whose backward is the surrogate slope, and an MSE on
the output rate. Autograd then computes the exact BPTT of spec S13 ("code" variant). The paper's
recursion (S14) and the spatial-only variant (S16) are not gradients of this forward, so they are
refused here; ``reset_grad=False`` detaches the spike inside the reset factor.

Only torch is needed (the optional extra `torch`). The function has refsnn.oracle.run_case's
signature and returns numpy arrays.
"""

from __future__ import annotations

import math

import numpy as np
import torch

DEFAULTS = dict(decay=0.2, v_th=0.5, surrogate="rect", surrogate_width=1.0, rect_norm=True,
                reset_form="linear", reset_grad=True, variant="code", loss="mse_mean", S=0,
                vote_k=1, strict=True, relax=False, dropout=0.0)


def slope(x, kind, a, rect_norm):
    """The surrogate h(x) of S9-S12, as torch expressions."""
    if kind == "rect":
        return (x.abs() < a / 2).to(x.dtype) * (1 / a if rect_norm else 1.0)
    if kind == "poly":
        return (math.sqrt(a) / 2 - a / 4 * x.abs()).clamp(min=0) * (x.abs() < 2 / math.sqrt(a))
    if kind == "sigmoid":
        z = torch.exp(-x.abs() / a)
        return z / (a * (1 + z) ** 2)
    return torch.exp(-x * x / (2 * a)) / math.sqrt(2 * math.pi * a)


def antiderivative(x, kind, a):
    """H_k, the relaxed spike (spec 6.2)."""
    if kind == "rect":
        return (x / a + 0.5).clamp(0, 1)
    if kind == "poly":
        w = 2 / math.sqrt(a)
        left = a / 8 * (x + w) ** 2
        right = 1 - a / 8 * (w - x) ** 2
        return torch.where(x <= -w, 0 * x, torch.where(x <= 0, left, torch.where(x < w, right, 0 * x + 1)))
    if kind == "sigmoid":
        return torch.sigmoid(x / a)
    return 0.5 * (1 + torch.erf(x / math.sqrt(2 * a)))


class Spike(torch.autograd.Function):
    """Forward: the Heaviside step (or H_k when relaxed); backward: the surrogate slope."""

    @staticmethod
    def forward(ctx, x, kind, a, rect_norm, strict, relax):
        ctx.save_for_backward(x)
        ctx.cfg = (kind, a, rect_norm)
        if relax:
            return antiderivative(x, kind, a)
        return (x > 0).to(x.dtype) if strict else (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * slope(x, *ctx.cfg), None, None, None, None, None


def run_case(method, weights, inputs, *, label=None, target=None, biases=None, params=None):
    if method != "stbp":
        raise NotImplementedError(f"this example implements stbp only, not {method}")
    p = {**DEFAULTS, **(params or {})}
    if p["variant"] != "code":
        raise NotImplementedError(f"variant {p['variant']!r} is not the gradient of the forward "
                                  "model, so autograd cannot produce it (spec stbp 5.3-5.4)")
    if p["dropout"]:
        raise NotImplementedError("dropout is a training-time option; run_case has none")
    W = [torch.tensor(np.asarray(w), dtype=torch.float64, requires_grad=True) for w in weights]
    b = [torch.tensor(np.asarray(v) if biases is not None else np.zeros(w.shape[0]),
                      dtype=torch.float64, requires_grad=True) for v, w in
         zip(biases if biases is not None else [None] * len(weights), weights)]
    x = torch.tensor(np.asarray(inputs), dtype=torch.float64)
    T = x.shape[0]
    v_th = p["v_th"] if isinstance(p["v_th"], (list, tuple)) else [p["v_th"]] * len(W)
    tau = p["decay"]

    def reset(o):                                   # S3 on the (not detached) spike
        o = o if p["reset_grad"] else o.detach()
        return tau * torch.exp(-o / tau) if p["reset_form"] == "exp" else tau * (1 - o)

    u = [torch.zeros(w.shape[0], dtype=torch.float64) for w in W]
    o = [torch.zeros(w.shape[0], dtype=torch.float64) for w in W]
    spikes = [[] for _ in W]
    for t in range(T):                              # the code's loop: every layer once per step
        prev = x[t]
        for l in range(len(W)):
            u[l] = reset(o[l]) * u[l] + W[l] @ prev + b[l]                  # S1-S3
            o[l] = Spike.apply(u[l] - v_th[l], p["surrogate"], p["surrogate_width"],
                               p["rect_norm"], p["strict"], p["relax"])    # S4
            spikes[l].append(o[l])
            prev = o[l]
    rate = torch.stack(spikes[-1]).mean(0)                                  # S5
    k = int(p["vote_k"])
    z = rate.reshape(-1, k).mean(1)
    C = z.shape[0]
    y = torch.tensor(np.asarray(target), dtype=torch.float64) if target is not None \
        else torch.nn.functional.one_hot(torch.tensor(int(label)), C).to(torch.float64)
    S = p["S"] or 1
    sq = ((z - y) ** 2).sum()
    loss = sq / (S * C) if p["loss"] == "mse_mean" else sq / (2 * S)       # S7 / S6
    loss.backward()
    return {"spikes": [torch.stack(s).detach().numpy() for s in spikes],
            "loss": float(loss.detach()), "grads": [w.grad.numpy() for w in W],
            "grads_b": [v.grad.numpy() for v in b]}
