"""STBP, one equation at a time, on the 3-2-2 network of spec/stbp.md section 11.

Run:  python docs/walkthroughs/stbp.py [picture.png]

Wu, Deng, Li, Zhu and Shi (Front. Neurosci. 2018) train a spiking network by backpropagating
through BOTH space (layer to layer) and time (step to step): "spatio-temporal backpropagation".
The spike is a step function of the membrane potential, so its derivative is replaced by a
smooth bump h (the "surrogate"). Everything else is the exact chain rule.

We follow the paper's order: the neuron (S1-S4), the readout and loss (S5-S8), the surrogate
(S9), the backward recursion (S13, and the paper's own S14), the weight gradient (S15), and last
a finite-difference check of the hand gradient. Every number is computed here by plain Python,
step by step, and then compared with refsnn's engine (`refsnn.oracle.run_case`).
"""

import sys
import tempfile
from pathlib import Path

import numpy as np

try:
    import refsnn  # noqa: F401
except ImportError:                                       # run from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from refsnn import gradcheck
from refsnn.layers import Dense
from refsnn.methods.stbp import STBP, STBPParams, tangent_loss
from refsnn.oracle import run_case

np.set_printoptions(precision=6, suppress=True)


def show(label, value):
    text = np.array2string(np.asarray(value), separator=", ", prefix=" " * 31)
    print(f"  {label:<28} {text}")


# -----------------------------------------------------------------------------------------------
# 0. The network: 3 inputs -> 2 hidden LIF neurons -> 2 output LIF neurons, T = 6 steps.
#    The official code's constants: decay τ = 0.2, threshold V_th = 0.5, rectangular surrogate
#    of width a = 1. Weights W[i, j] go from pre-neuron j to post-neuron i; there are biases.
# -----------------------------------------------------------------------------------------------
T, tau, v_th, a = 6, 0.2, 0.5, 1.0
x = np.array([(1, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 0), (1, 1, 1), (0, 1, 0)], float)
W = [np.array([[0.7, 0.3, -0.2], [0.1, 0.45, 0.35]]), np.array([[0.9, -0.3], [0.2, 0.6]])]
b = [np.array([0.05, -0.1]), np.array([0.0, 0.1])]
label, C = 0, 2
y = np.eye(C)[label]                                       # one-hot target (section 4)

print("STBP walkthrough: network 3-2-2, T = 6, tau = 0.2, V_th = 0.5, rect surrogate a = 1")
show("input spikes x[t] (rows t)", x)

# -----------------------------------------------------------------------------------------------
# 1. Forward (S1-S4). At every step t, each layer l:
#    S1  I[t] = W o^{l-1}[t] + b                   input current (spikes of the layer below)
#    S2  u[t] = f(o[t-1]) · u[t-1] + I[t]          leaky integration, u[-1] = 0, o[-1] = 0
#    S3  f(o) = τ (1 - o)                          the "linear" reset of the code: after a
#                                                  spike, the old potential is forgotten
#    S4  o[t] = 1 if u[t] > V_th else 0            fire (strict ">" as in the code)
#    S9  h[t] = (1/a) 1[|u[t] - V_th| < a/2]       the surrogate slope ∂o/∂u, kept for backward
# -----------------------------------------------------------------------------------------------
print("\n1. Forward pass (S1-S4), layer by layer")
u_all, o_all, h_all, pre = [], [], [], x
for l in range(2):
    I = pre @ W[l].T + b[l]                                                # S1, all t at once
    u, o, h = np.zeros((T, 2)), np.zeros((T, 2)), np.zeros((T, 2))
    u_prev, o_prev = np.zeros(2), np.zeros(2)
    for t in range(T):
        f = tau * (1.0 - o_prev)                                           # S3
        u[t] = f * u_prev + I[t]                                           # S2
        o[t] = (u[t] > v_th).astype(float)                                 # S4
        h[t] = (np.abs(u[t] - v_th) < a / 2) / a                           # S9
        u_prev, o_prev = u[t], o[t]
    print(f" layer {l + 1}:")
    for t in range(T):
        print(f"  t={t}  I={I[t]}  u={u[t]}  o={o[t]}  h={h[t]}")
    u_all.append(u), o_all.append(o), h_all.append(h)
    pre = o
print("  e.g. hidden neuron 1 at t=1: u = 0.2·0.35·(1 - 0) + 0.45 =", 0.2 * 0.35 + 0.45)

# -----------------------------------------------------------------------------------------------
# 2. Readout and loss (S5-S8). The output rate r = (1/T) Σ_t o^L[t] is the class score z
#    (vote_k = 1). The code's loss is nn.MSELoss: L = (1/C) Σ_c (z_c - y_c)² (S7). Its derivative
#    with respect to every output spike is the same at every step (S8):
#    g^L[t] = ∂L/∂o^L[t] = 2 (z - y) / (C · T).
# -----------------------------------------------------------------------------------------------
print("\n2. Readout and loss (S5-S8)")
r = o_all[1].mean(axis=0)                                                  # S5
L = float(np.sum((r - y) ** 2) / C)                                        # S7
g_top = np.tile(2 * (r - y) / (C * T), (T, 1))                             # S8
show("rate r = z", r)
show("loss L", L)
show("g^2[t] (every t)", g_top[0])

# -----------------------------------------------------------------------------------------------
# 3. Backward through time (S13, the official code's exact BPTT). Going from t = T-1 down to 0,
#    with e[T] = 0, per layer:
#    S13a d[t] = g[t] + e[t+1] · u[t] · f'(o[t])    ∂L/∂o: from above, plus the reset path
#                                                   (o[t] switches off the leak of u[t+1]);
#                                                   f'(o) = -τ for the linear reset
#    S13b e[t] = d[t] · h[t] + e[t+1] · f(o[t])     ∂L/∂u: through the spike (surrogate) and
#                                                   through the leak into u[t+1]
#    S13c g^{l-1}[t] = W^T e[t]                     the error sent to the layer below
# -----------------------------------------------------------------------------------------------
print("\n3. Backward pass, variant 'code' (S13)")


def backward(variant):
    """S13 ('code') or S14 ('paper') by hand; returns per layer (d, e) and (dW, db)."""
    g, out = g_top, []
    for l in (1, 0):
        u, o, h = u_all[l], o_all[l], h_all[l]
        d, e = np.zeros((T, 2)), np.zeros((T, 2))
        e_next, dh_next = np.zeros(2), np.zeros(2)
        for t in range(T - 1, -1, -1):
            if variant == "code":
                d[t] = g[t] + e_next * u[t] * (-tau)                          # S13a
            else:
                d[t] = g[t] + dh_next * u[t] * (-tau)                         # S14a: δ[t+1]h[t+1]
            e[t] = d[t] * h[t] + e_next * tau * (1 - o[t])                    # S13b / S14b
            e_next, dh_next = e[t], d[t] * h[t]
        below = x if l == 0 else o_all[0]
        dW, db = e.T @ below, e.sum(axis=0)                                   # S15
        out.insert(0, (d, e, dW, db))
        g = e @ W[l] if variant == "code" else (d * h) @ W[l]                 # S13c / S14c
    return out


code = backward("code")
for l in (1, 0):
    d, e = code[l][:2]
    print(f" layer {l + 1}:   t   dL/do (d)                 dL/du (e)")
    for t in range(T):
        print(f"            {t}   {d[t]}   {e[t]}")

# -----------------------------------------------------------------------------------------------
# 4. Weight gradients (S15): dW = Σ_t e[t] (o^{l-1}[t])^T and db = Σ_t e[t].
# -----------------------------------------------------------------------------------------------
print("\n4. Gradients (S15)")
for l in range(2):
    show(f"dW{l + 1}", code[l][2])
    show(f"db{l + 1}", code[l][3])

engine = run_case("stbp", W, x, label=label, biases=b)
for l in range(2):
    assert np.array_equal(engine["spikes"][l], o_all[l])
    assert np.allclose(engine["grads"][l], code[l][2], rtol=1e-12, atol=1e-15)
    assert np.allclose(engine["grads_b"][l], code[l][3], rtol=1e-12, atol=1e-15)
    assert np.allclose(engine["delta"][l], code[l][1], rtol=1e-12, atol=1e-15)
assert abs(engine["loss"] - L) < 1e-15
print("  refsnn's engine (run_case) gives the same spikes, loss and gradients.")

# -----------------------------------------------------------------------------------------------
# 5. The paper's printed recursion (S14) differs in two places: the reset path uses
#    δ[t+1]·h[t+1] instead of the full e[t+1], and the error sent down is W^T(δ ⊙ h) instead of
#    W^T e. It is not the gradient of the forward model above, and the hidden layer's dW moves
#    by up to 40% in single entries.
# -----------------------------------------------------------------------------------------------
print("\n5. Variant 'paper' (S14) against 'code' (S13)")
paper = backward("paper")
show("dW1, code", code[0][2])
show("dW1, paper", paper[0][2])
eng_p = run_case("stbp", W, x, label=label, biases=b, params={"variant": "paper"})
assert np.allclose(eng_p["grads"][0], paper[0][2], rtol=1e-12, atol=1e-15)

# -----------------------------------------------------------------------------------------------
# 6. Is the hand gradient right? The spike is a step, so the loss of the real network is flat
#    almost everywhere and finite differences say nothing. Replace the step by the smooth
#    H(u - V_th) whose slope IS the surrogate (sigmoid, a = 0.25; spec 6.2, relax=True): then
#    S13 is the exact gradient of that smooth network, and central differences must agree.
# -----------------------------------------------------------------------------------------------
print("\n6. Hand gradient vs central finite differences (relaxed forward, sigmoid a = 0.25)")
m = STBP()
p = STBPParams(relax=True, surrogate="sigmoid", surrogate_width=0.25)
layers = [Dense(W[l].copy(), b[l].copy()) for l in range(2)]
target = y[None]
ref = m.forward(p, layers, x[:, None, :])
hand = [g for per in m.backward(p, layers, ref, target) for g in per]
F = lambda: tangent_loss(p, layers, x[:, None, :], target, ref)
show("relaxed loss", F())
rep = gradcheck.side_by_side(F, [a_ for layer in layers for a_ in layer.params], hand,
                             ["dW1", "db1", "dW2", "db2"], h=1e-5, rtol=1e-6)   # spec 6.2 rule
assert rep.passed

# -----------------------------------------------------------------------------------------------
# 7. A picture: membrane potentials against the threshold, and the spike rasters.
# -----------------------------------------------------------------------------------------------
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("\n(matplotlib is not installed: no picture)")
else:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "stbp.png"
    fig, ax = plt.subplots(2, 2, figsize=(9, 5), sharex=True)
    for l in range(2):
        ax[0, l].plot(range(T), u_all[l], marker="o")
        ax[0, l].axhline(v_th, color="k", ls="--", lw=1)
        ax[0, l].set_title(f"layer {l + 1}: u[t] (dashed: V_th)")
        tt, ii = np.nonzero(o_all[l])
        ax[1, l].scatter(tt, ii, marker="|", s=300)
        ax[1, l].set_yticks([0, 1])
        ax[1, l].set_title(f"layer {l + 1}: spikes")
        ax[1, l].set_xlabel("t")
    fig.tight_layout()
    fig.savefig(out)
    print(f"\npicture saved to {out}")
print("\ndone: every hand-computed number matches the engine.")
