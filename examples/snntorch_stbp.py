"""STBP built from snnTorch's ``Leaky`` neurons (float64): a second implementation to check refsnn.

    pip install --no-deps snntorch                       (after the CPU build of torch)
    refsnn oracle export --method stbp --cases 40 --param variant=code --param reset_form=linear \\
        --param strict=true stbp.h5
    refsnn oracle compare stbp.h5 --impl examples.snntorch_stbp:run_case

What snnTorch can express of spec stbp.md (sections 2 and 5), and with which Leaky settings:

=============================  ===========================================================
refsnn STBP switches           snnTorch ``Leaky``
=============================  ===========================================================
decay τ, v_th                  ``beta=τ``, ``threshold=V_th`` (as float64 tensors: a Python
                               float becomes a float32 buffer, e.g. 0.3 -> 0.30000001192)
reset_form "linear" (S3)       ``reset_mechanism="zero"``: mem <- (1 - reset)·mem, then
                               β·mem + I, i.e. u[t] = τ(1 - o[t-1])·u[t-1] + I[t] (S2)
reset_grad False               ``reset_delay=True``: the reset is the previous step's spike
                               recomputed by ``mem_reset`` and ``.detach()``-ed; the
                               returned mem is the spec's pre-reset u
reset_grad True, variant code  ``reset_delay=False``: mem <- mem - spk·mem in the same step,
(S13)                          with spk NOT detached, so autograd follows the reset path
                               ∂u[t+1]/∂o[t] = -τ·u[t] (S13a); forward bits are the same
variant "sd" (S16)             ``reset_delay=True`` and the membrane passed in detached at
                               every step (one-step truncated BPTT): no temporal term
strict True (S4, u > V_th)     snnTorch fires on mem - threshold > 0, as the code does
surrogate S9-S12, rect_norm    ``spike_grad``: a float64 Heaviside whose backward is h
=============================  ===========================================================

What it cannot express (run_case raises NotImplementedError, so `oracle compare` lists the case as
an error):

- reset_form "exp" (S3): f(o) = τ·exp(-o/τ) leaves τe^{-1/τ}·u after a spike; snnTorch's resets
  are "zero" (u -> 0, the linear S3), "subtract" (u - V_th) and "none". :func:`run_case_nearest`
  runs the nearest model (zero reset) on such cases so the compare table shows the difference
  (u and every gradient differ, spikes from the first reset on).
- variant "paper" (S14): not the gradient of any forward, so no autograd library produces it.
- strict False (S4, u >= V_th): every snnTorch firing function compares mem - threshold > 0.
- relax (smooth forward H_k, testing only) and dropout (training only).

snnTorch's own ``surrogate.custom_surrogate`` returns ``(x > 0).float()``: float32 spikes, so the
gradient arriving at the surrogate is float32 too and agreement is near 1e-8, not 1e-12.
:func:`run_case` therefore passes its own float64 Heaviside as ``spike_grad`` (a documented
snnTorch hook); :func:`run_case_custom_surrogate` uses ``custom_surrogate`` to show the difference.
"""

from __future__ import annotations

import numpy as np
import snntorch as snn
import torch
from snntorch import surrogate as snn_surrogate

from examples.torch_stbp import DEFAULTS, Spike, slope

F64 = torch.float64


def leaky_config(p: dict) -> dict:
    """The snnTorch Leaky settings (and the per-step detach) for the STBP switches ``p``.

    Raises NotImplementedError naming the spec equation snnTorch cannot express.
    """
    if p["reset_form"] != "linear":
        raise NotImplementedError(
            "reset_form 'exp' (spec stbp S3: f(o) = τ·exp(-o/τ)) has no snnTorch reset "
            "mechanism ('zero' is τ(1-o), 'subtract' removes V_th); see run_case_nearest")
    return _config(p)


def _config(p):
    if p["variant"] == "paper":
        raise NotImplementedError("variant 'paper' (S14) drops paths of the forward's gradient; "
                                  "autograd over snnTorch neurons computes S13 or S16 only")
    if not p["strict"]:
        raise NotImplementedError("strict false (S4: fire on u >= V_th): snnTorch fires on "
                                  "mem - threshold > 0 (u > V_th) only")
    if p["relax"]:
        raise NotImplementedError("relax (S4 with o = H_k(u - V_th)): snnTorch neurons emit "
                                  "0/1 spikes")
    if p["dropout"]:
        raise NotImplementedError("dropout is a training-time option; run_case has none")
    if p["variant"] == "sd":                         # S16: mem detached between steps
        return dict(reset_delay=True, detach_mem=True)
    return dict(reset_delay=not p["reset_grad"], detach_mem=False)


def float64_spike(p):
    """spike_grad for snnTorch: Heaviside(x > 0) in the input's dtype, backward the spec's h."""
    kind, a, norm = p["surrogate"], float(p["surrogate_width"]), bool(p["rect_norm"])
    return lambda x: Spike.apply(x, kind, a, norm, True, False)


def snntorch_custom_surrogate(p):
    """The same h through snnTorch's own wrapper (its forward returns float32 spikes)."""
    kind, a, norm = p["surrogate"], float(p["surrogate_width"]), bool(p["rect_norm"])
    return snn_surrogate.custom_surrogate(lambda x, grad, out: grad * slope(x, kind, a, norm))


def run_case(method, weights, inputs, *, label=None, target=None, biases=None, params=None):
    """refsnn.oracle.run_case's signature, on snnTorch Leaky neurons (STBP only)."""
    p = _params(method, params)
    return _run(p, leaky_config(p), float64_spike(p), weights, inputs, label, target, biases)


def run_case_nearest(method, weights, inputs, *, label=None, target=None, biases=None,
                     params=None):
    """Like run_case, but a reset_form 'exp' case runs snnTorch's zero reset instead (nearest)."""
    p = _params(method, params)
    return _run(p, _config(p), float64_spike(p), weights, inputs, label, target, biases)


def run_case_custom_surrogate(method, weights, inputs, *, label=None, target=None, biases=None,
                              params=None):
    """Like run_case, with snnTorch's ``surrogate.custom_surrogate`` (float32 spikes)."""
    p = _params(method, params)
    return _run(p, leaky_config(p), snntorch_custom_surrogate(p), weights, inputs, label, target,
                biases)


def _params(method, params):
    if method != "stbp":
        raise NotImplementedError(f"this example implements stbp only, not {method}")
    return {**DEFAULTS, **(params or {})}


def _run(p, cfg, spike_grad, weights, inputs, label, target, biases):
    W = [torch.tensor(np.asarray(w), dtype=F64, requires_grad=True) for w in weights]
    b = [torch.tensor(np.asarray(biases[l]) if biases is not None else np.zeros(w.shape[0]),
                      dtype=F64, requires_grad=True) for l, w in enumerate(weights)]
    x = torch.tensor(np.asarray(inputs), dtype=F64)
    v_th = p["v_th"] if isinstance(p["v_th"], (list, tuple)) else [p["v_th"]] * len(W)
    lifs = [snn.Leaky(beta=torch.tensor(float(p["decay"]), dtype=F64),
                      threshold=torch.tensor(float(v_th[l]), dtype=F64), spike_grad=spike_grad,
                      reset_mechanism="zero", reset_delay=cfg["reset_delay"])
            for l in range(len(W))]
    mem = [torch.zeros(w.shape[0], dtype=F64) for w in W]
    spikes = [[] for _ in W]
    u = [[] for _ in W]
    for t in range(x.shape[0]):                      # every layer once per step, bottom-up
        prev = x[t]
        for l, lif in enumerate(lifs):
            cur = W[l] @ prev + b[l]                                        # S1
            m_in = mem[l].detach() if cfg["detach_mem"] else mem[l]
            spk, mem[l] = lif(cur, m_in)                                    # S2-S4
            spk = spk.to(F64)              # custom_surrogate's spikes are float32 (exact 0/1)
            spikes[l].append(spk)
            u[l].append(mem[l])
            prev = spk
    rate = torch.stack(spikes[-1]).mean(0)                                  # S5
    k = int(p["vote_k"])
    z = rate.reshape(-1, k).mean(1)
    C = z.shape[0]
    y = torch.tensor(np.asarray(target), dtype=F64) if target is not None \
        else torch.nn.functional.one_hot(torch.tensor(int(label)), C).to(F64)
    S = p["S"] or 1
    sq = ((z - y) ** 2).sum()
    loss = sq / (S * C) if p["loss"] == "mse_mean" else sq / (2 * S)       # S7 / S6
    loss.backward()
    for lif in lifs:                                # snnTorch lists every neuron it builds
        snn.SpikingNeuron.instances.remove(lif)
    out = {"spikes": [torch.stack(s).detach().numpy() for s in spikes],
           "loss": float(loss.detach()), "grads": [w.grad.numpy() for w in W],
           "grads_b": [v.grad.numpy() for v in b]}
    if cfg["reset_delay"]:                           # Leaky returns the pre-reset u of S2 here
        out["u"] = [torch.stack(m).detach().numpy() for m in u]
    return out
