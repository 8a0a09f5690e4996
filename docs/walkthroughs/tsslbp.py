"""TSSL-BP, one equation at a time (Zhang & Li, NeurIPS 2020; refsnn spec/tsslbp.md).

Run:  python docs/walkthroughs/tsslbp.py [PNG_PATH]

A 3-2-2 network, T = 6 steps, one sample: the worked example of spec section 11. Every quantity
of the forward and the backward pass is computed with refsnn's own kernels and printed, in the
order of the paper; at the end the hand gradient is set beside central finite differences of the
"tangent model" (spec 6.2), the smooth function whose exact gradient TSSL-BP's rule is. If
matplotlib is installed, membrane traces and spike rasters go to a PNG (the path given, or a
temporary folder; never the repository).
"""

import os
import sys
import tempfile

import numpy as np

from refsnn import gradcheck
from refsnn.methods.tsslbp import (TSSLBP, TSSLBPParams, desired_train, kernel_loss, lif_backward,
                                   lif_forward, psp_backward, psp_forward, tangent_model,
                                   tsslbp_delta, warm_mask)
from refsnn.network import Network
from refsnn.oracle import run_case

np.set_printoptions(precision=6, suppress=True, linewidth=110)


def show(name, arr):
    """Print a (T, 1, N) or (T, N) array as one row per time step."""
    arr = np.asarray(arr).reshape(arr.shape[0], -1)
    print(f"  {name}:")
    for t, row in enumerate(arr):
        print(f"    t={t}  {row}")


# ---------------------------------------------------------------------------------------------
# The neuron model (spec 2). Time is counted in steps: θ_m = 1/τ_m, θ_s = 1/τ_s, θ' = 1 - θ_m.
# A TSSL-BP neuron integrates its input current, fires when u > V_th, resets to 0, and sends to
# the next layer not its spikes but their synaptic trace (PSP) a[t]. The defaults are those of
# the official code: τ_m = 5, τ_s = 3, V_th = 1.
# ---------------------------------------------------------------------------------------------
p = TSSLBPParams()
print(f"TSSL-BP defaults: tau_m={p.tau_m}, tau_s={p.tau_s}, v_th={p.v_th}, loss={p.loss}, "
      f"target_passes={p.target_passes}, variant={p.variant}, warmup={p.warmup}, c_max={p.c_max}")

x = np.array([(1, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 0), (1, 1, 1), (0, 1, 0)], float)
W1 = np.array([[1.5, 1.2, -0.5], [0.6, -0.4, 2.0]])
W2 = np.array([[1.2, 0.6], [-0.5, 2.0]])
T = x.shape[0]
label = 0
print("\nInput spikes x (T=6, 3 inputs), label 0; W1 (2x3), W2 (2x2) as in spec 11.")

# E1: the raw input is filtered by the same synapse before layer 1:
#     a0[t] = (1 - θ_s)·a0[t-1] + θ_s·x[t], a0[-1] = 0.
print("\nE1  input PSP a0[t] = (1-θ_s) a0[t-1] + θ_s x[t]")
a0 = psp_forward(x.reshape(T, 1, 3), p.theta_s)
show("a0", a0)

# E5, E2-E4 for each layer: I = W a_prev (same step, no delay); Δu = -θ_m û[t-1] + I;
# u = û[t-1] + Δu; s = [u > V_th]; û = u (1 - s) (hard reset); a = (1-θ_s) a[t-1] + θ_s s.
states = []
a_prev = a0
for l, W in enumerate((W1, W2), start=1):
    I = np.einsum("ij,tbj->tbi", W, a_prev)
    u, du, s = lif_forward(I, p.theta_m, 1.0)
    a = psp_forward(s, p.theta_s)
    print(f"\nLayer {l}: E5 current, E2 integrate, E3 fire and reset, E4 synaptic trace")
    show(f"I{l} = W{l} a{l - 1}", I)
    show(f"u{l} (before reset)", u)
    show(f"s{l}", s)
    show(f"a{l}", a)
    states.append(dict(I=I, u=u, du=du, s=s, a=a, a_in=a_prev))
    a_prev = a

# E9, the kernel loss: the label neuron should fire the desired train d (for T < 10 the
# pattern (0,1,1,1,1), tiled and cut to T); the others stay silent. The target PSP is d filtered
# by the same synapse target_passes = 2 times (the official code; the paper filters once).
d = np.zeros((T, 1, 2))
d[:, 0, label] = desired_train(p, T)
a_hat = d
for _ in range(p.target_passes):
    a_hat = psp_forward(a_hat, p.theta_s)
loss, g = kernel_loss(states[-1]["a"], a_hat)
print("\nE9  kernel loss L = ½ Σ_t Σ_i (a2 - â)²")
show("desired train d", d)
show("target PSP â (2 passes)", a_hat)
print(f"  L = {loss:.6f}")

# The backward, layer by layer from the top (spec 5.2-5.3), with g = ∂L/∂a of the layer:
#  E6  G[t] = θ_s g[t] + (1-θ_s) G[t+1]         (∂L/∂s, exact adjoint of E4)
#  E7  c[t] = s[t]·min(1/Δu[t], c_max)          (inter-neuron: a spike moved earlier adds PSP)
#  E8  D[t] = c G + (ρ + λ) D[t+1], ρ = c u θ_m (intra-neuron: the reset ties a spike to the next),
#      λ = (1 - s) θ' (the leak between spikes, exact)
#  E14 where the neuron has been quiet (a < 1/(4τ_s)) the "warm-up" surrogate replaces it:
#      δ = σ'(u) G with σ' the slope of a sigmoid of width α = 0.2 (E12); elsewhere δ = D (E13).
#  E15 ∂L/∂W = Σ_t δ[t] a_prev[t]^T, and the error to the layer below g_prev = W^T δ.
grads = [None, None]
for l in (2, 1):
    st = states[l - 1]
    W = (W1, W2)[l - 1]
    G = psp_backward(g, p.theta_s)
    D, c = lif_backward(G, st["u"], st["du"], st["s"], p.theta_m, p.c_max)
    warm = warm_mask(p, st["a"], st["s"])
    delta = tsslbp_delta(D, G, st["u"], st["s"], warm, False, 1.0, p.surrogate_width, p.x_clip)
    print(f"\nBackward, layer {l}")
    show("g = dL/da", g)
    show("E6  G", G)
    show("E7  c", c)
    show("E8  D", D)
    show("E14 warm", warm.astype(float))
    show("    delta", delta)
    grads[l - 1] = np.einsum("tbi,tbj->ij", delta, st["a_in"])
    print(f"  E15 dL/dW{l} =\n{grads[l - 1]}")
    g = np.einsum("ij,tbi->tbj", W, delta)

# The oracle (refsnn.oracle.run_case) runs the same pieces through the Network; it must agree.
out = run_case("tsslbp", [W1, W2], x, label=label)
assert out["loss"] == loss
for mine, oracle in zip(grads, out["grads"]):
    assert np.allclose(mine, oracle, rtol=1e-13, atol=1e-15)
print("\nrun_case agrees with the hand computation: loss", out["loss"])

# Why this is a gradient at all: the hard network's loss is piecewise constant in W. Spec 6.2
# builds a smooth "tangent model" F(W) that freezes the spike pattern, the factors c and the warm
# mask at W_ref and is exactly differentiable; F(W_ref) = L, and ∇F(W_ref) is TSSL-BP's gradient.
net = Network.build("3-2-2", "tsslbp", seed=0)
net.layers[0].params[0][...] = W1
net.layers[1].params[0][...] = W2
xb = x.reshape(T, 1, 3)
tgt = net.make_target(np.array([label]), T)
trace = net.forward(xb)
hand = TSSLBP().backward(net.p, net.layers, trace, tgt)
F = tangent_model(net.method, net.p, net.layers, xb, tgt, trace)
print(f"\nTangent model (6.2): F(W_ref) = {F():.12f}, L = {trace.loss:.12f}")
rep = gradcheck.side_by_side(F, [layer.params[0] for layer in net.layers],
                             [per[0] for per in hand], ["dL/dW1", "dL/dW2"], h=1e-6, rtol=1e-6)
assert rep.passed                                                   # spec 6.2

# Membrane traces and spike rasters, if matplotlib is there.
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("\n(matplotlib not installed: no plot)")
    sys.exit(0)
path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.mkdtemp(), "tsslbp.png")
fig, axes = plt.subplots(2, 2, figsize=(9, 5), sharex=True)
for l, st in enumerate(states):
    ax = axes[0, l]
    for i in range(2):
        ax.plot(st["u"][:, 0, i], marker="o", label=f"u neuron {i}")
        ax.plot(st["a"][:, 0, i], ls="--", label=f"a neuron {i}")
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_title(f"layer {l + 1}: u (before reset) and PSP a")
    ax.legend(fontsize=7)
    ts, ns = np.nonzero(st["s"][:, 0, :])
    axes[1, l].scatter(ts, ns, marker="|", s=300)
    axes[1, l].set_yticks([0, 1])
    axes[1, l].set_xlabel("t")
    axes[1, l].set_title(f"layer {l + 1} spikes")
fig.tight_layout()
fig.savefig(path)
print(f"\nplot saved to {path}")
