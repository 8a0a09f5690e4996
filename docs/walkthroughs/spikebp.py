"""Spike-based BP, step by step: Lee, Sarwar, Panda, Srinivasan & Roy, Front. Neurosci. 14:119
(2020), spec docs/spec/spikebp.md.

Run:  python docs/walkthroughs/spikebp.py [plot.png]

A 3-2-2 network (two hidden LIF neurons, two non-spiking output neurons), one sample of T = 6
steps: the worked example of spec section 11. Every equation is computed here with plain Python
loops and printed; at the end the hand gradient is set beside refsnn's engine and beside central
finite differences of the function whose exact gradient it is (spec 6.2 and 6.3). With matplotlib
installed, the membrane traces and the spike raster are saved to a PNG (the path given, or a
temporary folder).
"""

import math
import sys
import tempfile
from pathlib import Path

import numpy as np

from refsnn import gradcheck
from refsnn.layers import Dense
from refsnn.methods.spikebp import SpikeBP, count_model_loss, frozen_pattern_loss
from refsnn.oracle import run_case

np.set_printoptions(precision=6, suppress=True)


def show(name, value):
    print(f"  {name:<12} {np.array2string(np.asarray(value), prefix=' ' * 15)}")


# ---------------------------------------------------------------------------------------------
# 1. The neuron (paper section 2.1, spec 2)
# ---------------------------------------------------------------------------------------------
# A hidden neuron is a leaky integrate-and-fire unit in discrete time. Its membrane decays by the
# factor λ per step (λ = exp(-dt/τ_m); the paper uses λ = 0.99, here 0.9 to make the leak
# visible), integrates the weighted input spikes of the SAME step (no synaptic delay), fires when
# it exceeds the threshold V_th and is then reset to 0 (hard reset):
#   F4  I[t] = W·x[t]
#   F1  u[t] = λ·v[t-1] + I[t]          v[-1] = 0
#   F2  s[t] = 1 if u[t] > V_th         (strict, as the code's F.threshold)
#   F3  v[t] = u[t]·(1 - s[t])
# The output layer never fires: it accumulates its input with the same leak (F5),
#   U[t] = λ·(U[t-1] + I[t]),   y = U[T-1] / (V_out·T),
# and the prediction is argmax y.

lam, v_th, v_out, c = 0.9, 1.0, 1.0, 1.0
W1 = np.array([[0.8, 0.3, -0.2], [0.4, 0.6, 0.5]])
W2 = np.array([[1.0, -0.5], [-0.3, 0.7]])
x = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 0], [1, 1, 1], [0, 0, 1]], float)
label = 0
T = x.shape[0]

print("Spike-based BP walkthrough: network 3-2-2, T = 6, λ = 0.9, V_th = 1, V_out = 1, label 0\n")
print("1. Forward pass (F1-F5), one line per step")
I1, u1, s1 = np.zeros((T, 2)), np.zeros((T, 2)), np.zeros((T, 2))
I2, U = np.zeros((T, 2)), np.zeros((T, 2))
v = np.zeros(2)                                    # v[-1] = 0
acc = np.zeros(2)                                  # U[-1] = 0
for t in range(T):
    I1[t] = W1 @ x[t]                              # F4
    u1[t] = lam * v + I1[t]                        # F1
    s1[t] = (u1[t] > v_th).astype(float)           # F2
    v = u1[t] * (1 - s1[t])                        # F3
    I2[t] = W2 @ s1[t]                             # F4 of the output layer
    acc = lam * (acc + I2[t])                      # F5
    U[t] = acc
    print(f"  t={t}  x={x[t]}  I1={I1[t]}  u1={u1[t]}  s1={s1[t]}  I2={I2[t]}  U={U[t]}")
y = U[T - 1] / (v_out * T)
show("y", y)

# ---------------------------------------------------------------------------------------------
# 2. The loss (paper section 2.2, spec 4)
# ---------------------------------------------------------------------------------------------
# The target is the one-hot label ŷ. The official code minimises L = c·Σ_k (y_k - ŷ_k)² with
# c = 1 (PyTorch's summed MSE; the paper writes ½), summed over the mini-batch. B1 is exact:
#   e = ∂L/∂y = 2c·(y - ŷ).
y_hat = np.eye(2)[label]
L = c * np.sum((y - y_hat) ** 2)
e = 2 * c * (y - y_hat)
print("\n2. Loss (F6) and output error (B1)")
show("L", L)
show("e", e)

# ---------------------------------------------------------------------------------------------
# 3. The leak-correction factor D (paper section 2.2.1, spec B3)
# ---------------------------------------------------------------------------------------------
# The paper's key idea: an IF neuron's spike count grows like its total input divided by V_th, so
# d(count)/d(input) ≈ 1/V_th. A leaky neuron loses part of its input; the paper estimates the
# loss from the neuron's own spike train and corrects the derivative by
#   D = 1 + ln(λ)·Λ/γ,   Λ = Σ_t λ^(T-1-t)·s[t] (leaky spike trace),  γ = Σ_t s[t] (count),
# i.e. 1 - (dt/τ_m)·(1/γ)·Σ_k exp(-(T-1-t_k)·dt/τ_m). A silent neuron gets D = 0 (the code's
# cut-offs with ε = 1e-3 handle γ = 0).
Lam = np.array([sum(lam ** (T - 1 - t) * s1[t, i] for t in range(T)) for i in range(2)])
gamma = s1.sum(axis=0)
D = (Lam > 1e-3) + math.log(lam) * Lam / (gamma + (gamma < 1e-3))
print("\n3. Leak-correction factor (B3)")
show("Λ", Lam)
show("γ", gamma)
show("D", D)

# ---------------------------------------------------------------------------------------------
# 4. The backward pass, variant "code" (spec B2, B4-B7)
# ---------------------------------------------------------------------------------------------
# The official code back-propagates through the unrolled steps, with three changes:
#  - the membrane decay passes the gradient with gain 1 (output: c_t = 1; hidden: no λ in B5);
#  - the spike's derivative is D/V_th, and only at a spike (B4: h[t] = m·g[t]·D/V_th);
#  - at a spike the reset cuts the membrane path, so δ[t] = s[t]·h[t] + (1 - s[t])·δ[t+1] (B5):
#    every input is credited to the NEXT spike of the post-neuron; inputs after its last spike
#    get nothing.
# Then B6: ∂L/∂W = Σ_t δ[t]·a_pre[t]ᵀ and B7: g_below[t] = Wᵀ·δ[t].
g1 = np.tile(W2.T @ e / (v_out * T), (T, 1))          # B2: ∂L/∂s1[t], c_t = 1
dW2 = np.outer(e / (v_out * T), s1.sum(axis=0))       # B2: Σ_t c_t a[t] = spike counts
h = g1 * D / v_th                                     # B4 (no dropout: m = 1)
delta = np.zeros((T, 2))
d_next = np.zeros(2)                                  # δ[T] = 0
for t in range(T - 1, -1, -1):
    d_next = s1[t] * h[t] + (1 - s1[t]) * d_next      # B5
    delta[t] = d_next
dW1 = delta.T @ x                                     # B6
print("\n4. Backward, variant 'code' (B2, B4-B6)")
show("g1[t]", g1[0])
show("h[t]", h[0])
show("δ[t]", delta)
show("dL/dW2", dW2)
show("dL/dW1", dW1)
print("  input 3 spikes at t = 5, after both hidden neurons' last spike (t = 4): no credit")

# ---------------------------------------------------------------------------------------------
# 5. The paper's aggregated rule (variant "paper", spec B8)
# ---------------------------------------------------------------------------------------------
# The paper's text works with whole-window quantities: one error per neuron δ = G·D/V_th, with
# G = W2ᵀ e/(V_out T), and the input spike COUNTS: ∂L/∂W1 = δ·N_inᵀ. It equals the code variant
# when every hidden neuron is silent or spikes at the last step; here input 3 makes them differ.
delta_p = (W2.T @ e / (v_out * T)) * D / v_th
dW1_paper = np.outer(delta_p, x.sum(axis=0))
print("\n5. Backward, variant 'paper' (B8)")
show("δ", delta_p)
show("dL/dW1", dW1_paper)

# ---------------------------------------------------------------------------------------------
# 6. Checks: refsnn's engine, and finite differences of the relaxations (spec 6.2, 6.3)
# ---------------------------------------------------------------------------------------------
# D and the spike derivative are approximations, so the gradient cannot be checked on the true
# network (its spikes are piecewise constant in W). It IS the exact gradient of a function:
#  - "code": the frozen-pattern linearisation (6.2): spikes, resets and D frozen, no leak,
#    o[t] = s*[t]·(1 + (D/V_th)(ũ[t] - ũ*[t])), ũ[t] = I[t] + (1 - s*[t-1])·ũ[t-1];
#  - "paper": the linearised count model (6.3): N = γ* + (D/V_th)(W N_in - W* N_in*).
# Central differences of those functions must give the hand gradients above.
print("\n6. Hand gradient vs refsnn engine vs central finite differences")
m = SpikeBP()
for variant, hand, relax in (("code", [dW1, dW2], frozen_pattern_loss),
                             ("paper", [dW1_paper, dW2], count_model_loss)):
    params = {"decay": lam, "variant": variant}
    out = run_case("spikebp", [W1, W2], x, label=label, params=params)
    p = m.Params.from_dict(params)
    layers = [Dense(W1.copy()), Dense(W2.copy())]
    xb = x[:, None, :]
    target = m.make_target(p, np.array([label]), 2, T)
    trace = m.forward(p, layers, xb)
    F = relax(p, layers, trace, target)
    engine = max(np.abs(hand[l] - out["grads"][l]).max() for l in range(2))
    print(f"\n  variant {variant!r}: F(W*) = {F():.9f}, L = {out['loss']:.9f}; hand vs refsnn: "
          f"largest difference {engine:.2e}")
    assert engine < 1e-8 and abs(F() - out["loss"]) < 1e-12, variant
    rep = gradcheck.side_by_side(F, [layer.params[0] for layer in layers], hand,
                                 ["dL/dW1", "dL/dW2"], h=1e-4, rtol=1e-8)   # spec: 1e-7
    assert rep.passed, variant
np.testing.assert_allclose(dW1, [[-1.2105, -0.907872, -0.907872], [0.720985, 0.540739, 0.540739]],
                           rtol=1e-5)
print("\n  all agree; spec 11.3 reproduced")

# ---------------------------------------------------------------------------------------------
# 7. Plot: membrane potentials of the hidden neurons, the output accumulator, the spike raster
# ---------------------------------------------------------------------------------------------
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("\n(matplotlib is not installed: no plot; pip install 'refsnn[plot]')")
    sys.exit(0)
path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "spikebp.png"
fig, ax = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
for i in range(2):
    ax[0].plot(range(T), u1[:, i], marker="o", label=f"hidden {i}: u[t]")
ax[0].axhline(v_th, color="k", ls="--", lw=0.8, label="V_th")
ax[0].legend(fontsize=8)
ax[0].set_ylabel("membrane")
for k in range(2):
    ax[1].plot(range(T), U[:, k], marker="s", label=f"output {k}: U[t]")
ax[1].legend(fontsize=8)
ax[1].set_ylabel("accumulator")
for j in range(3):
    ts = np.flatnonzero(x[:, j])
    ax[2].scatter(ts, np.full(ts.size, j), marker="|", s=200, color="gray")
for i in range(2):
    ts = np.flatnonzero(s1[:, i])
    ax[2].scatter(ts, np.full(ts.size, 3 + i), marker="|", s=200, color="C%d" % i)
ax[2].set_yticks(range(5), ["in 0", "in 1", "in 2", "hid 0", "hid 1"])
ax[2].set_xlabel("time step t")
fig.tight_layout()
fig.savefig(path, dpi=100)
print(f"\nplot saved to {path}")
