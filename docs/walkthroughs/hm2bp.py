"""HM2-BP, one equation at a time (Jin, Zhang & Li, NeurIPS 2018; refsnn spec/hm2bp.md).

Run:  python docs/walkthroughs/hm2bp.py [PNG_PATH]

A 3-2-2 network, T = 12 steps, one sample: the worked example of spec section 11. Every quantity
of the forward pass and of the spike-train-level backward pass is computed with refsnn's own
kernels and printed, in the order of the paper; at the end the hand gradient is set beside
central finite differences of the "tangent surrogate" (spec 6.1, C3), the smooth function whose
exact gradient HM2-BP's rule is. If matplotlib is installed, membrane traces and spike rasters go
to a PNG (the path given, or a temporary folder; never the repository).
"""

import math
import os
import sys
import tempfile

import numpy as np

from refsnn import gradcheck
from refsnn.methods.hm2bp import HM2BPParams, count_loss, lif_forward, spsp_matrix
from refsnn.oracle import run_case

np.set_printoptions(precision=6, suppress=True, linewidth=110)

# ---------------------------------------------------------------------------------------------
# The neuron (spec 2.1). Time is counted in steps. Each neuron keeps a membrane v, a synaptic
# trace ep and a refractory counter. At every step: leak v by 1/τ_m, leak ep by 1/τ_s; at t >= 1
# add the input spikes of step t-1 (every layer adds a one-step delay), integrate v += ep/τ_s,
# clamp v to 0 during the refractory steps, and fire when v > ν (then v = 0; ep is kept).
# ---------------------------------------------------------------------------------------------
params = dict(tau_m=8.0, tau_s=2.0, t_ref=1, v_th=[1.0, 1.0], desired_count=3.0,
              undesired_count=1.0, margin=0.0)
p = HM2BPParams.from_dict(params)
print("HM2-BP, spec 11: tau_m=8, tau_s=2, t_ref=1, thresholds 1 and 1, targets 3/1, margin 0")

T = 12
x = np.zeros((T, 3))
x[[0, 2, 4, 6, 8], 0] = 1
x[[1, 4, 7], 1] = 1
x[[3, 9], 2] = 1
W1 = np.array([[1.6, 0.9, -0.5], [0.4, 1.3, 1.1]])
W2 = np.array([[1.5, 0.6], [-0.7, 2.4]])
label = 0
print("input spike times:", [np.flatnonzero(x[:, j]).tolist() for j in range(3)], " label 0")

layers = []
h = x
for l, W in enumerate((W1, W2), start=1):
    I = h @ W.T                                  # the layer's linear map, read one step later
    S, v, ep = lif_forward(I[:, None, :], p.tau_m, p.tau_s, p.n_ref, 1.0, 0.0)
    print(f"\nlayer {l}:  t | ep after the input | v after the clamp (before reset) | S")
    for t in range(T):
        print(f"  {t:2d} | {ep[t, 0]} | {v[t, 0]} | {S[t, 0].astype(int)}")
    layers.append(dict(S=S[:, 0], v=v[:, 0], pre=h))
    h = S[:, 0]

# ---------------------------------------------------------------------------------------------
# The loss (spec 4): o = firing counts over the whole window; y = desired for the label, undesired
# otherwise; E = ½ Σ m (o - y)² with the dead zone m = [|o - y| > margin]; g = ∂E/∂o = m (o - y).
# ---------------------------------------------------------------------------------------------
o1, o2 = layers[0]["S"].sum(0), layers[1]["S"].sum(0)
E, y, m, g2 = count_loss(o2[None], np.array([label]), 3.0, 1.0, 0.0, np.ones(1))
print(f"\ncounts o1 = {o1}, o2 = {o2}; targets y = {y[0]}; E = {E[0]}; g2 = dE/do2 = {g2[0]}")

# ---------------------------------------------------------------------------------------------
# The S-PSP e_{i|j} (spec 5.1): the total potential that pre j's spikes leave on post i at post
# i's firing times, with i's own resets. For post spike f at τ_f, after the reset reference
# r_{f-1} (r_0 = 0, r_f = τ_f + t_ref), s = τ_f - r_{f-1}; each earlier pre spike σ (u = τ_f - σ)
# gives κ(s, u) = b^max(u-s,0) (a^min(s,u) - b^min(s,u)) / (1 - τ_s/τ_m), a = 1-1/τ_m,
# b = 1-1/τ_s. Here e²_{0|0} by hand, pair by pair:
# ---------------------------------------------------------------------------------------------
a, b, c = 1 - 1 / p.tau_m, 1 - 1 / p.tau_s, 1 / (1 - p.tau_s / p.tau_m)
post, pre = layers[1]["S"][:, 0], layers[0]["S"][:, 0]
r, total = 0, 0.0
print("\nS-PSP e2[0|0] (post: output 0, pre: hidden 0), one post spike at a time")
for tau in np.flatnonzero(post):
    s = tau - r
    part = sum(c * b ** max(tau - sg - s, 0) * (a ** min(s, tau - sg) - b ** min(s, tau - sg))
               for sg in np.flatnonzero(pre) if sg < tau)
    print(f"  post spike {tau}: s = {s}, pre spikes before it {np.flatnonzero(pre[:tau]).tolist()}"
          f" -> {part:.8f}")
    total += part
    r = tau + p.n_ref
e2 = spsp_matrix(p, layers[1]["S"][:, None], layers[0]["S"][:, None])[0]
e1 = spsp_matrix(p, layers[0]["S"][:, None], x[:, None])[0]
print(f"  sum = {total:.8f};  the kernel gives e2 =\n{e2}\n  and e1 =\n{e1}")
assert math.isclose(total, e2[0, 0], rel_tol=1e-13)

# The T-PSP identity (5.1b): Σ_j w_ij e_{i|j} equals the sum of the potentials at i's spikes.
a2 = (W2 * e2).sum(1)
vf = np.where(layers[1]["S"] > 0, layers[1]["v"], 0).sum(0)
print(f"\n(5.1b) a2 = Σ_j w_ij e_ij = {a2};  Σ v at the spikes = {vf}  (a >= ν·o: {a2 >= o2})")

# ---------------------------------------------------------------------------------------------
# The backward pass (spec 5.2-5.6), from the top, on spike-train-level numbers only:
#   δ = g/ν (5.4, the macro model o ≈ a/ν);
#   ρ_ij = e_ij / o_j (5.2, effect ratio: the S-PSP per pre spike);
#   s_i = (1/ν) Σ_j w_ij e_ij / o_i (5.6, the side term);
#   ∂E/∂w_ij = δ_i e_ij (1 + s_i) (5.5);   g_j (layer below) = Σ_i δ_i w_ij ρ_ij (5.2).
# ---------------------------------------------------------------------------------------------
grads, g = [None, None], g2[0]
for l, (W, e, o_pre, o_post) in reversed(list(enumerate([(W1, e1, x.sum(0), o1),
                                                          (W2, e2, o1, o2)]))):
    delta = g / 1.0
    rho = e / o_pre[None, :]
    side = (W * e).sum(1) / (1.0 * o_post)
    grads[l] = delta[:, None] * e * (1 + side)[:, None]
    print(f"\nlayer {l + 1}: delta = {delta}, side s = {side}\n  rho =\n{rho}\n"
          f"  dE/dW{l + 1} = delta·e·(1+s) =\n{grads[l]}")
    g = (delta[:, None] * W * rho).sum(0)
    if l > 0:
        print(f"  g{l} = dE/do{l} = Σ_i δ_i w_ij ρ_ij = {g}")

# The oracle runs the same pieces (batch engine, layers, target fix...) and must agree.
out = run_case("hm2bp", [W1, W2], x, label=label, params=params)
for mine, orc in zip(grads, out["grads"]):
    assert np.allclose(mine, orc, rtol=1e-13, atol=1e-15)
print(f"\nrun_case agrees: loss {out['loss']}, dW2 =\n{out['grads'][1]}")
code = run_case("hm2bp", [W1, W2], x, label=label, params=dict(params, spsp="code"))
print(f"the official 'code' S-PSP (pre spike shifted by t_ref, r_0 = 1) gives dW2 =\n"
      f"{code['grads'][1]}")

# ---------------------------------------------------------------------------------------------
# Why this is a gradient: the counts are piecewise constant in W, so E has no useful derivative.
# Spec 6.1 (C3) freezes e, ρ, s and the mask at W0 and defines the smooth tangent surrogate
#   õ^l = o^l + (1/ν)[((W^l - W0^l)∘e^l)·1 ⊙ (1+s^l) + (W0^l∘ρ^l)(õ^{l-1} - o^{l-1})],
#   Ẽ = ½ Σ m (õ^L - y)².  HM2-BP's rule is exactly ∇Ẽ(W0).
# ---------------------------------------------------------------------------------------------
aux = out
Ws = [W1.copy(), W2.copy()]


def tangent():
    d = np.zeros(3)
    for l in (1, 2):
        W0 = (W1, W2)[l - 1]
        d = ((Ws[l - 1] - W0) * aux["e"][l]).sum(1) * (1 + aux["side"][l]) \
            + (W0 * aux["rho"][l]) @ d
    return 0.5 * np.sum(aux["mask"] * (aux["counts"][2] + d - aux["targets"]) ** 2)


print(f"\nTangent surrogate: Ẽ(W0) = {tangent():.12f}, E = {out['loss']:.12f}")
rep = gradcheck.side_by_side(tangent, Ws, out["grads"], ["dE/dW1", "dE/dW2"], h=1e-6,
                             rtol=1e-6)                              # spec 6.1: 1e-6 relative
assert rep.passed

# Membrane traces and spike rasters, if matplotlib is there.
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("\n(matplotlib not installed: no plot)")
    sys.exit(0)
path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.mkdtemp(), "hm2bp.png")
fig, axes = plt.subplots(2, 2, figsize=(9, 5), sharex=True)
for l, st in enumerate(layers):
    ax = axes[0, l]
    for i in range(2):
        ax.plot(st["v"][:, i], marker="o", label=f"v neuron {i}")
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_title(f"layer {l + 1}: v (after clamp, before reset)")
    ax.legend(fontsize=7)
    ts, ns = np.nonzero(st["S"])
    axes[1, l].scatter(ts, ns, marker="|", s=300)
    axes[1, l].set_yticks([0, 1])
    axes[1, l].set_xlabel("t")
    axes[1, l].set_title(f"layer {l + 1} spikes")
fig.tight_layout()
fig.savefig(path)
print(f"\nplot saved to {path}")
