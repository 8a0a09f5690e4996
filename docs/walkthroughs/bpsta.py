"""BPSTA, step by step: Shen, Zhao & Zeng, Patterns 3(6):100522 (2022), spec docs/spec/bpsta.md.

Run:  python docs/walkthroughs/bpsta.py [plot.png]

A 3-2-2 spiking network, one sample of T = 6 steps (the worked example of spec section 11). Every
equation of the paper is computed here with plain Python loops and printed; at the end the hand
gradient is set beside the gradient refsnn's engine returns and beside central finite differences
of the frozen-mask surrogate function of spec 6.1. With matplotlib installed, the membrane traces
and the spike raster are saved to a PNG (the path given, or a temporary folder).
"""

import sys
import tempfile
from pathlib import Path

import numpy as np

from refsnn import gradcheck
from refsnn.layers import Dense
from refsnn.network import Network
from refsnn.oracle import run_case
from refsnn.methods.bpsta import surrogate_loss

np.set_printoptions(precision=6, suppress=True)


def show(name, value):
    print(f"  {name:<10} {np.array2string(np.asarray(value), prefix=' ' * 13)}")


# ---------------------------------------------------------------------------------------------
# 1. The neuron (paper Eq. 2-4, spec 2)
# ---------------------------------------------------------------------------------------------
# The paper starts from the leaky integrate-and-fire neuron  τ du/dt = -u + R·I  and discretises
# it with forward Euler, dt = 1, C = 1:  u[t+1] = (1 - 1/τ)·u[t] + I[t].  The decay factor
# λ = 1 - 1/τ = 0.9 (τ = 10) and the threshold θ = 0.5 are the only neuron constants. When u
# reaches θ the neuron emits a spike o = 1 and its potential is reset to 0 (hard reset).
# The official code processes all layers within the same step t (no synaptic delay) and fires on
# u >= θ (the paper writes u > θ); refsnn follows the code by default (fire_on_equal = True).
#
# Per layer l and step t (spec 2, steps 1-5):
#   I[t] = W·x[t]                      x = input for layer 1, spikes of layer l-1 above that
#   u[t] = λ·r[t-1] + I[t]             r[0] = 0
#   o[t] = 1 if u[t] >= θ else 0
#   r[t] = u[t]·(1 - o[t])             hard reset to 0

theta, lam, alpha = 0.5, 0.9, 0.2
W = [np.array([[0.40, 0.30, -0.10], [0.10, 0.35, 0.30]]),
     np.array([[0.55, 0.25], [0.05, 0.60]])]
x = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 1, 1], [0, 0, 1], [1, 1, 0]], float)
label, C = 1, 2
T = x.shape[0]

print("BPSTA walkthrough: network 3-2-2, T = 6, θ = 0.5, λ = 0.9, α = 0.2, label 1\n")
print("1. Forward pass (paper Eq. 3-4): current, potential, spike, per step")
I, u, o = [], [], []
inp = x
for l, Wl in enumerate(W):
    Il, ul, ol = np.zeros((T, Wl.shape[0])), np.zeros((T, Wl.shape[0])), np.zeros((T, Wl.shape[0]))
    r = np.zeros(Wl.shape[0])                       # r[0] = 0
    for t in range(T):
        Il[t] = Wl @ inp[t]                          # step 1: synaptic current
        ul[t] = lam * r + Il[t]                      # step 3: integrate
        ol[t] = (ul[t] >= theta).astype(float)       # step 4: fire (code: >=)
        r = ul[t] * (1 - ol[t])                      # step 5: hard reset
    print(f" layer {l + 1}")
    for t in range(T):
        print(f"  t={t + 1}  I={Il[t]}  u={ul[t]}  o={ol[t]}")
    I.append(Il), u.append(ul), o.append(ol)
    inp = ol

# ---------------------------------------------------------------------------------------------
# 2. Output and loss (paper Eq. 5, code: mean over classes, voting)
# ---------------------------------------------------------------------------------------------
# The output of class c is its firing rate averaged over the T steps (and over its G voting
# neurons; here G = 1). The loss is the squared error to a one-hot target; the official code
# divides by the number of classes C (MSELoss "mean"), the paper's Eq. 5 does not ("sum").
rate = o[-1].mean(axis=0)
y = np.zeros(C)
y[label] = 1.0
loss = np.mean((rate - y) ** 2)
print("\n2. Output rate and loss (Eq. 5, mean over the C = 2 classes as in the code)")
show("rate", rate)
show("target y", y)
show("loss", loss)

# ---------------------------------------------------------------------------------------------
# 3. The error at the output spikes (exact, Eq. 6-7)
# ---------------------------------------------------------------------------------------------
# e[t] = ∂L/∂o^L[t] = (2/C)(rate - y)/T at every step: each spike adds 1/T to the rate.
e_out = np.tile(2.0 / C * (rate - y) / T, (T, 1))
print("\n3. Error at the output spikes, e = (2/C)(rate - y)/T, the same at every step")
show("e^L[t]", e_out[0])

# ---------------------------------------------------------------------------------------------
# 4-5. BPSA (Eq. 9) and BPTA (Eq. 10): the backward recursion in time
# ---------------------------------------------------------------------------------------------
# A spike is a step function of u, so ∂o/∂u is 0 almost everywhere. BPSA replaces it by
#     g[t] = o[t]/u[t]          (1/u at a spike, 0 otherwise: no surrogate window)
# so only the steps where the neuron fired pass error down, and spikes produced by a large
# potential get a smaller step. The reset r = u·(1 - o) has derivative (1 - o) w.r.t. u (the
# spike treated as a constant); BPTA adds a residual α·g to it, so error also crosses a spike
# back to the earlier steps:
#     ∂r[t]/∂u[t] ≈ (1 - o[t]) + α·g[t]
# With ε[t] = dL/du[t], read backwards from t = T (ε[T+1] = 0):
#     ε[t] = g[t]·e[t] + λ·[(1 - o[t]) + α·g[t]]·ε[t+1]                      (spec 5.2 a)
# and then, with no ReLU on the current, δ[t] = dL/dI[t] = ε[t]; the weight gradient and the
# error sent to the layer below are exact (spec 5.2 c, d):
#     ∂L/∂W[i, j] = Σ_t δ_i[t]·x_j[t]        e^{l-1}_j[t] = Σ_i W[i, j]·δ_i[t]
print("\n4-5. Backward: g = o/u (BPSA, Eq. 9), reset factor (1 - o) + α·g (BPTA, Eq. 10)")
grads, eps_all = [None, None], [None, None]
e = e_out
for l in (1, 0):
    g = np.where(o[l] > 0, 1.0 / np.where(o[l] > 0, u[l], 1.0), 0.0)
    eps = np.zeros_like(u[l])
    nxt = np.zeros(u[l].shape[1])
    for t in range(T - 1, -1, -1):
        eps[t] = g[t] * e[t] + lam * ((1 - o[l][t]) + alpha * g[t]) * nxt
        nxt = eps[t]
    inp = x if l == 0 else o[l - 1]
    grads[l] = eps.T @ inp                           # Σ_t δ[t] x[t]^T
    eps_all[l] = eps
    print(f" layer {l + 1}")
    for t in range(T):
        print(f"  t={t + 1}  g={g[t]}  e={e[t]}  eps={eps[t]}")
    e = eps @ W[l]                                   # error to the layer below, same step
print("\n  Check by hand (layer 2, neuron 1): ε[6] = e/u = 0.083333/0.8 =", round(1 / 12 / 0.8, 6))
print("  t = 5 has no spike: ε[5] = λ·ε[6] =", round(0.9 * 1 / 12 / 0.8, 6))
print("  t = 4 spikes at u = 1.025: ε[4] = (e + α·λ·ε[5])/1.025 =",
      round((1 / 12 + 0.2 * 0.9 * 0.09375) / 1.025, 6))

# ---------------------------------------------------------------------------------------------
# 6. The same numbers from refsnn, and finite differences of the surrogate (spec 6.1)
# ---------------------------------------------------------------------------------------------
# The true loss is piecewise constant in W (spikes are 0 or 1), so its finite differences are 0
# or jumps: BPSTA's gradient is not the derivative of the forward model. It IS the exact gradient
# of the frozen-mask surrogate F of spec 6.1, which keeps the spike pattern m = o_ref and the
# potentials û = u_ref of the reference pass and sets
#     o = m·(1 + ln u - ln û),   r = (1 - m)·u + α·m·(ln u - ln û)
# so that ∂o/∂u = m/u = g and ∂r/∂u = (1 - m) + α·m/u. F(W_ref) = L(W_ref), and central
# differences of F must give the hand gradient.
ref = run_case("bpsta", W, x, label=label)
net = Network([Dense(W[0].copy()), Dense(W[1].copy())], "bpsta", {})
xb = x[:, None, :]
target = net.make_target([label], T)
loss_e, grads_e, trace = net.loss_and_grads(xb, target)
F = lambda: surrogate_loss(net.method, net.p, net.layers, xb, target, trace)
print("\n6. Hand gradient, refsnn's engine, and central differences of the surrogate F")
print(f"  loss: hand {loss:.12f}  engine {ref['loss']:.12f}  F(W_ref) {F():.12f}")
engine = max(float(np.max(np.abs(grads[l] - ref["grads"][l]))) for l in range(2))
print(f"  hand vs engine: largest difference {engine:.2e}")
assert engine < 1e-8, "hand gradient and engine disagree"
rep = gradcheck.side_by_side(F, net.params(), grads, ["dL/dW1", "dL/dW2"], h=1e-6,
                             rtol=1e-8)         # spec 6.1 step; observed errors ~1e-11
assert rep.passed, "hand gradient and finite differences of F disagree"

# ---------------------------------------------------------------------------------------------
# 7. The ablation of the paper's Table 4
# ---------------------------------------------------------------------------------------------
# "bpsa" drops the temporal adjustment (α = 0): error no longer crosses a spike backwards.
# "baseline" is the code's STBP-like node: surrogate 1[|u - θ| < 0.5] and gradient through the
# reset. The forward pass (and the loss) is the same for all three.
print("\n7. The ablation (Table 4): the same sample, three backward passes")
for adjust in ("bpsta", "bpsa", "baseline"):
    out = run_case("bpsta", W, x, label=label, params={"adjust": adjust})
    print(f"  adjust={adjust:<9} loss {out['loss']:.6f}  dW1 row 1 {out['grads'][0][0]}")

# ---------------------------------------------------------------------------------------------
# Plot: membrane traces and spike raster
# ---------------------------------------------------------------------------------------------
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("\n(matplotlib is not installed: no plot; pip install 'refsnn[plot]')")
else:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "bpsta.png"
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    steps = np.arange(1, T + 1)
    for l, ax in enumerate(axes[:2]):
        for i in range(u[l].shape[1]):
            ax.plot(steps, u[l][:, i], marker="o", label=f"neuron {i + 1}")
        ax.axhline(theta, color="k", ls="--", lw=0.8)
        ax.set_ylabel(f"u, layer {l + 1}")
        ax.legend(loc="upper right", fontsize=8)
    rows = [(x[:, j], f"in {j + 1}") for j in range(3)] + \
           [(o[l][:, i], f"L{l + 1} n{i + 1}") for l in range(2) for i in range(2)]
    for k, (train, _) in enumerate(rows):
        axes[2].vlines(steps[train > 0], k + 0.6, k + 1.4)
    axes[2].set_yticks(range(1, len(rows) + 1), [name for _, name in rows])
    axes[2].set_xlabel("time step t")
    fig.tight_layout()
    fig.savefig(path)
    print(f"\nplot saved to {path}")
