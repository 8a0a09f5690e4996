#!/usr/bin/env python3
"""refsnn against the PyTorch SNN libraries: CPU training throughput and peak memory (issue 12).

One run trains the same networks, on the same input, with refsnn (float32 and float64) and with
each peer, and reports samples/s (median over interleaved rounds) and peak RSS per config.

Networks (batch 64):
  mlp5    784-400-400-10, T 5
  mlp25   784-400-400-10, T 25
  conv5   28x28x1 -> 15c5 -> LIF -> avgpool 2 -> 40c5 -> LIF -> avgpool 2 -> 640-300-10, T 5
          (LIF after every weighted layer)
Input: Bernoulli(0.2) spikes at every step, drawn once (fixed seed); one-hot targets of random
labels. Weights: PyTorch's default init (U(±1/sqrt(fan_in)), weights and biases) times GAIN = 3 so
that every layer fires (hidden rates 3-15%; recorded). One training step = forward over T,
loss, backward (BPTT), one SGD update at lr 0.1.

Implementations:
  torch_step / torch_layer   plain PyTorch autograd with refsnn's STBP neuron (below), time loop
                             outside / inside each layer
  snntorch                   snn.Leaky(beta 0.8, threshold 1), its default subtractive reset, ATan
  sj_s / sj_m                SpikingJelly LIFNode(tau 5, decay_input False): u = 0.8 u + I, hard
                             reset to 0, its sigmoid surrogate; single-step / multi-step mode
  norse_cell / norse_seq     norse LIFBoxCell (dt 1 ms, tau_mem_inv 200: decay 0.8, input x 0.2,
                             so its weights get another x5), step loop / norse.torch.Lift
  refsnn-stbp                refsnn's STBP (the peers' model): u[t] = 0.8 u[t-1] (1 - o[t-1]) + I[t],
                             o = 1[u > 1], rect surrogate (width 1), loss MSE of the output rate
  refsnn-stbp-general        the same, with STBP's fused dense path switched off (the general
                             layer-by-layer chain: the A/B baseline of the fused kernels)
  refsnn-<method>            the other methods on the same nets with their own default
                             parameters and optimizer, or those of their preset for the same
                             net (their own throughput; no peer has them); their
                             weights are scaled layer by layer (calibrate_rates) until each
                             spiking layer fires 3-15% on the benchmark input, as the peers'
                             do, so that the figure is the cost of a working network
Each config runs in its own process (peak RSS = VmHWM of that process). Each peer runs with each
torch thread count of --torch-threads (name/tN; default 1 and 2: on a loaded machine torch's
spinning OpenMP threads make 2 slower than 1) and the fastest counts; refsnn runs under its CLI
threading policy (one BLAS thread, numba threads, passive wait) and the heap setting its training
loop makes (refsnn/runtime.py).
Rounds interleave all configs, the order reversed every other round; the machine is shared and
noisy, so only figures of one run are compared. Nothing here is a test.

Install (the peers are optional: extra `bench`; a plain `pip install` of the peers swaps the CPU
torch for a multi-GB CUDA build, so install torch first and the libraries without dependencies):

    pip install torch==2.13.0 --index-url <PyTorch's CPU wheel index>   # or any CPU torch
    pip install --no-deps snntorch spikingjelly norse nir nirtorch
    pip install loguru                                                  # spikingjelly's logger

Usage:
    python benchmarks/bench_peers.py              # 3 nets x all impls x 3 rounds + GEMM probe
    python benchmarks/bench_peers.py --quick      # one round of mlp5 (about 1-2 minutes)
    python benchmarks/bench_peers.py --nets mlp5,conv5 --impls torch_layer,refsnn-stbp --rounds 5
Writes benchmarks/results.json (results_quick.json with --quick; --json PATH as well): a list of
{"impl", "config", "dtype", "samples_per_s", "peak_rss_mib", ...}, a Markdown table beside it
(.md), and prints the ratio refsnn / fastest peer per config.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BATCH = 64
DECAY = 0.8
V_TH = 1.0
IN_RATE = 0.2
LR = 0.1
GAIN = 3.0
SEED = 7

NETS = {"mlp5": ("mlp", 5), "mlp25": ("mlp", 25), "conv5": ("conv", 5)}
ARCH = {"mlp": "784-400-400-10", "conv": "28x28x1-15c5-a2-40c5-a2-300-10"}
PEERS = ["torch_step", "torch_layer", "snntorch", "sj_s", "sj_m", "norse_cell", "norse_seq"]
OTHER_METHODS = ["tsslbp", "spikebp", "bpsta", "hm2bp"]
POLICY = {"OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "passive"}


# ----------------------------------------------------------------------------------------------
# FLOPs of the dense equivalent (multiply-add = 2), for the fraction of the GEMM bound

def macs_per_step(kind):
    if kind == "mlp":
        return [784 * 400, 400 * 400, 400 * 10]
    return [24 * 24 * 15 * 25, 8 * 8 * 40 * 25 * 15, 640 * 300, 300 * 10]


def train_flops(kind, T):
    """Forward + weight gradients + input gradients of every layer but the first, per sample."""
    m = macs_per_step(kind)
    return 2 * T * (2 * sum(m) + sum(m[1:]))


# ----------------------------------------------------------------------------------------------
# Children

def peak_rss_mib():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def time_steps(step, min_time, min_iters, max_iters, warmup=3):
    for _ in range(warmup):
        step()
    times = []
    t0 = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - t0 < min_time):
        a = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - a)
    return times, loss


RATE_LO, RATE_HI = 0.03, 0.15          # the firing rates every hidden layer must have


def calibrate_rates(netw, x, lo=RATE_LO, hi=RATE_HI, steps=30):
    """Scale each weighted layer's parameters, in order, until the layer's spike rate on x is in
    [lo, hi] (bisection on the log of the scale, aiming at the geometric middle); layers without
    a spike output (an accumulator read-out) keep their weights. Returns the scale per layer."""
    import numpy as np
    target = math.sqrt(lo * hi)
    scales = []
    for li, layer in enumerate(netw.layers):
        if not layer.params:
            continue
        base = [a.copy() for a in layer.params]

        def rate(log_s):
            for a, a0 in zip(layer.params, base):
                a[...] = a0 * math.exp(log_s)
            st = netw.forward(x).states[li]
            return float(np.mean(st.spikes)) if hasattr(st, "spikes") else None

        r = rate(0.0)
        if r is None:
            continue
        a_lo, a_hi = -6.0, 6.0                           # scale between e^-6 and e^6
        log_s = 0.0
        for _ in range(steps):
            if lo <= r <= hi and abs(math.log(max(r, 1e-12) / target)) < 0.5:
                break
            if r < target:
                a_lo = log_s
            else:
                a_hi = log_s
            log_s = 0.5 * (a_lo + a_hi)
            r = rate(log_s)
        scales.append(round(math.exp(log_s), 4))
    return scales


def refsnn_child(method, net, dtype, a):
    import numpy as np

    from refsnn.config import TrainConfig
    from refsnn.methods import get_method
    from refsnn.network import Network
    from refsnn.optim import make_optimizer
    from refsnn.runtime import keep_freed_memory

    keep_freed_memory()                   # as refsnn.train does (refsnn/runtime.py)

    kind, T = NETS[net]
    if method.endswith("-general"):       # STBP without its fused dense path (the A/B baseline)
        import refsnn.methods.stbp as stbp_module
        stbp_module.FUSED = "off"
        method = method[:-len("-general")]
    m = get_method(method)
    params = dict(m.defaults.get("params", {}))
    for preset in m.presets.values():     # a preset for this very net: its neuron parameters
        if method != "stbp" and preset.get("arch") == ARCH[kind]:
            params.update(preset.get("params", {}))
            break
    if method == "stbp":
        params.update(decay=DECAY, v_th=V_TH, surrogate="rect", surrogate_width=1.0)
    if method == "hm2bp":                 # its default counts (35 / 5) are for T = 100
        params.update(desired_count=max(1.0, 0.35 * T), undesired_count=0.05 * T)
    n_spiking = 3 if kind == "mlp" else (6 if m.spiking_pool else 4)
    for name, v in params.items():       # per-layer values of a default net: hidden..., output
        if name.startswith("v_th") and isinstance(v, (list, tuple)) and len(v) != n_spiking:
            params[name] = tuple([v[0]] * (n_spiking - 1) + [v[-1]])
    p = m.Params.from_dict(params)
    rng = np.random.default_rng(SEED)
    netw = Network.build(ARCH[kind], m, p, rng=rng, dtype=np.dtype(dtype))
    for arr in netw.params():
        arr *= GAIN
    shape = (T, BATCH, 784) if kind == "mlp" else (T, BATCH, 1, 28, 28)
    x = (rng.random(shape) < IN_RATE).astype(dtype)
    scales = calibrate_rates(netw, x) if method != "stbp" else []
    rates0 = [float(np.mean(s.spikes)) for s in netw.forward(x).spiking_states
              if hasattr(s, "spikes")]
    labels = rng.integers(0, 10, BATCH)
    target = netw.make_target(labels, T)
    if method == "stbp":                  # the peers' optimizer
        cfg = TrainConfig(optimizer="sgd", lr=LR)
    else:                                 # the method's own (its preset's lr, no schedule)
        keys = ("optimizer", "lr", "momentum", "betas", "eps", "weight_decay")
        cfg = TrainConfig.from_dict({k: m.defaults[k] for k in keys if k in m.defaults})
    opt = make_optimizer(cfg, netw.params())
    last = {}

    def step():
        loss, grads, trace = netw.loss_and_grads(x, target, train=True, rng=rng)
        opt.step(netw.params(), grads, cfg.lr)
        m.post_update(p, netw.layers)
        last["trace"] = trace
        return loss

    times, loss = time_steps(step, a.min_time, a.min_iters, a.max_iters)
    trace = last["trace"]
    rates = [float(np.mean(s.spikes)) for s in trace.spiking_states if hasattr(s, "spikes")]
    import numba
    return dict(times=times, loss=float(loss), rates=rates, numba_threads=numba.get_num_threads(),
                weight_scales=scales, rates_at_start=rates0, optimizer=f"{cfg.optimizer} lr {cfg.lr}")


def torch_child(impl, net, a):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    impl, threads = impl.split("/t")
    torch.set_num_threads(int(threads))
    torch.manual_seed(SEED)
    kind, T = NETS[net]
    shape = (T, BATCH, 784) if kind == "mlp" else (T, BATCH, 1, 28, 28)
    x = (torch.rand(shape) < IN_RATE).float()
    target = F.one_hot(torch.randint(0, 10, (BATCH,)), 10).float()

    def weighted():
        if kind == "mlp":
            return [nn.Linear(784, 400), nn.Linear(400, 400), nn.Linear(400, 10)]
        return [nn.Conv2d(1, 15, 5), nn.Conv2d(15, 40, 5), nn.Linear(640, 300), nn.Linear(300, 10)]

    def after(k, s):
        """What follows spiking layer k: pooling (and flatten) after the conv layers."""
        if kind == "conv" and k < 2:
            s = F.avg_pool2d(s, 2)
            return s.flatten(1) if k == 1 else s
        return s

    def seq_after(k, s):                      # the same on a (T, B, ...) sequence
        y = after(k, s.reshape((T * BATCH,) + tuple(s.shape[2:])))
        return y.reshape((T, BATCH) + tuple(y.shape[1:]))

    rec = {"on": False, "rates": None}
    if impl in ("torch_step", "torch_layer"):
        class Spike(torch.autograd.Function):
            """o = 1[u > V_th]; backward: the rect surrogate 1[|u - V_th| < 1/2] (refsnn S9)."""

            @staticmethod
            def forward(ctx, u):
                ctx.save_for_backward(u)
                return (u > V_TH).to(u.dtype)

            @staticmethod
            def backward(ctx, grad):
                (u,) = ctx.saved_tensors
                return grad * ((u - V_TH).abs() < 0.5).to(grad.dtype)

        layers = nn.ModuleList(weighted())
        params = list(layers.parameters())

        def note(k, o):
            if rec["on"]:
                rec["rates"][k] += float(o.mean()) / (T if impl == "torch_step" else 1)

        if impl == "torch_step":
            def forward():
                u = [None] * len(layers)
                o = [None] * len(layers)
                total = 0.0
                for t in range(T):
                    h = x[t]
                    for k, lay in enumerate(layers):
                        I = lay(h)
                        u[k] = I if u[k] is None else DECAY * u[k] * (1.0 - o[k]) + I
                        o[k] = Spike.apply(u[k])
                        note(k, o[k])
                        h = after(k, o[k])
                    total = total + h
                return total
        else:
            def forward():
                h = x
                for k, lay in enumerate(layers):
                    I = lay(h.reshape((T * BATCH,) + tuple(h.shape[2:])))
                    I = I.reshape((T, BATCH) + tuple(I.shape[1:]))
                    outs, u, o = [], None, None
                    for t in range(T):
                        u = I[t] if u is None else DECAY * u * (1.0 - o) + I[t]
                        o = Spike.apply(u)
                        outs.append(o)
                    s = torch.stack(outs)
                    note(k, s)
                    h = seq_after(k, s)
                return h.sum(0)
    elif impl == "snntorch":
        import snntorch as snn
        layers = nn.ModuleList(weighted())
        lifs = nn.ModuleList([snn.Leaky(beta=DECAY, threshold=V_TH) for _ in layers])
        params = list(layers.parameters())

        def forward():
            mem = [lif.reset_mem() for lif in lifs]
            total = 0.0
            for t in range(T):
                h = x[t]
                for k, (lay, lif) in enumerate(zip(layers, lifs)):
                    s, mem[k] = lif(lay(h), mem[k])
                    h = after(k, s)
                total = total + h
            return total
    elif impl in ("sj_s", "sj_m"):
        from spikingjelly.activation_based import functional, layer, neuron

        def lif():
            return neuron.LIFNode(tau=1.0 / (1.0 - DECAY), decay_input=False, v_threshold=V_TH)
        if kind == "mlp":
            model = nn.Sequential(layer.Linear(784, 400), lif(), layer.Linear(400, 400), lif(),
                                  layer.Linear(400, 10), lif())
        else:
            model = nn.Sequential(layer.Conv2d(1, 15, 5), lif(), layer.AvgPool2d(2),
                                  layer.Conv2d(15, 40, 5), lif(), layer.AvgPool2d(2),
                                  layer.Flatten(), layer.Linear(640, 300), lif(),
                                  layer.Linear(300, 10), lif())
        multi = impl == "sj_m"
        functional.set_step_mode(model, "m" if multi else "s")
        params = list(model.parameters())

        def forward():
            functional.reset_net(model)
            if multi:
                return model(x).sum(0)
            total = 0.0
            for t in range(T):
                total = total + model(x[t])
            return total
    elif impl in ("norse_cell", "norse_seq"):
        import norse.torch as nt
        p = nt.LIFBoxParameters(tau_mem_inv=torch.tensor((1.0 - DECAY) / 1e-3),
                                v_th=torch.tensor(V_TH))
        layers = nn.ModuleList(weighted())
        params = list(layers.parameters())
        if impl == "norse_cell":
            cells = nn.ModuleList([nt.LIFBoxCell(p) for _ in layers])

            def forward():
                state = [None] * len(layers)
                total = 0.0
                for t in range(T):
                    h = x[t]
                    for k, (lay, cell) in enumerate(zip(layers, cells)):
                        s, state[k] = cell(lay(h), state[k])
                        h = after(k, s)
                    total = total + h
                return total
        else:
            lifted = nn.ModuleList([nt.Lift(nt.LIFBoxCell(p)) for _ in layers])

            def forward():
                h = x
                for k, (lay, lf) in enumerate(zip(layers, lifted)):
                    I = lay(h.reshape((T * BATCH,) + tuple(h.shape[2:])))
                    s, _ = lf(I.reshape((T, BATCH) + tuple(I.shape[1:])))
                    h = seq_after(k, s)
                return h.sum(0)
    else:
        raise SystemExit(f"unknown implementation {impl!r}")

    gain = GAIN / (1.0 - DECAY) if impl.startswith("norse") else GAIN   # norse: input x 0.2
    with torch.no_grad():
        for prm in params:
            prm.mul_(gain)
    opt = torch.optim.SGD(params, lr=LR)

    def step():
        opt.zero_grad(set_to_none=True)
        rate = forward() / T
        loss = F.mse_loss(rate, target)
        loss.backward()
        opt.step()
        return float(loss.detach())

    times, loss = time_steps(step, a.min_time, a.min_iters, a.max_iters)
    rates = None
    if impl in ("torch_step", "torch_layer"):
        rec["on"], rec["rates"] = True, [0.0] * len(layers)
        with torch.no_grad():
            forward()
        rates = rec["rates"]
    return dict(times=times, loss=loss, rates=rates, torch=torch.__version__,
                torch_threads=torch.get_num_threads())


def gemm_probe():
    """numpy GEMM rate (GFLOP/s), 2048^3, float32 and float64, in this process's threading."""
    import numpy as np
    rng = np.random.default_rng(0)
    out = {}
    for dt in ("float32", "float64"):
        A = rng.standard_normal((2048, 2048)).astype(dt)
        B = rng.standard_normal((2048, 2048)).astype(dt)
        A @ B
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            A @ B
            ts.append(time.perf_counter() - t0)
        out[dt] = 2 * 2048 ** 3 / statistics.median(ts) / 1e9
    return out


def child_main(a):
    impl, net, dtype = a.child
    if impl == "gemm":
        print("RESULT " + json.dumps(gemm_probe()), flush=True)
        return
    t0 = time.perf_counter()
    if impl.startswith("refsnn-"):
        res = refsnn_child(impl.split("-", 1)[1], net, dtype, a)
    else:
        res = torch_child(impl, net, a)
    times = res.pop("times")
    med = statistics.median(times)
    res.update(impl=impl, config=net, dtype=dtype, samples_per_s=BATCH / med,
               step_ms=1e3 * med, steps=len(times), peak_rss_mib=peak_rss_mib(),
               loss_finite=math.isfinite(res["loss"]), wall_s=time.perf_counter() - t0)
    print("RESULT " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------------------------
# Parent

def spawn(cfg, a):
    impl, net, dtype = cfg
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS",
                        "OMP_WAIT_POLICY", "NUMBA_NUM_THREADS")}
    if impl.startswith("refsnn-") or impl == "gemm":
        env.update(POLICY)
        if impl == "gemm":
            env["OPENBLAS_NUM_THREADS"] = env["MKL_NUM_THREADS"] = net  # thread count as "net"
    else:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = impl.split("/t")[1]
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl, net, dtype,
           "--min-time", str(a.min_time), "--min-iters", str(a.min_iters),
           "--max-iters", str(a.max_iters)]
    load = os.getloadavg()[0]
    try:
        cp = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "config": net, "dtype": dtype, "error": "timeout", "load1": load}
    for line in cp.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            res["load1"] = load
            return res
    tail = " | ".join((cp.stderr or cp.stdout).strip().splitlines()[-2:])
    return {"impl": impl, "config": net, "dtype": dtype, "error": f"rc={cp.returncode}: {tail}",
            "load1": load}


def summarize(results):
    """One row per (impl, config, dtype): median samples/s over rounds, range, peak RSS."""
    keys = list(dict.fromkeys((r["impl"], r["config"], r["dtype"]) for r in results))
    rows = []
    for impl, net, dt in keys:
        rs = [r for r in results if (r["impl"], r["config"], r["dtype"]) == (impl, net, dt)]
        ok = [r for r in rs if "samples_per_s" in r]
        row = {"impl": impl, "config": net, "dtype": dt}
        if ok:
            sps = [r["samples_per_s"] for r in ok]
            row.update(samples_per_s=statistics.median(sps), min=min(sps), max=max(sps),
                       rounds=len(ok), peak_rss_mib=max(r["peak_rss_mib"] for r in ok),
                       rates=ok[0].get("rates"), loss_finite=all(r["loss_finite"] for r in ok))
            for k in ("weight_scales", "rates_at_start", "optimizer"):
                if ok[0].get(k):
                    row[k] = ok[0][k]
        else:
            row["error"] = rs[0].get("error", "failed")
        rows.append(row)
    return rows


def ratios(rows):
    """refsnn-stbp (per dtype) / the fastest peer, per config."""
    out = {}
    for net in dict.fromkeys(r["config"] for r in rows):
        peers = [r for r in rows if r["config"] == net and not r["impl"].startswith("refsnn-")
                 and "samples_per_s" in r]
        if not peers:
            continue
        best = max(peers, key=lambda r: r["samples_per_s"])
        for r in rows:
            if r["config"] == net and r["impl"] == "refsnn-stbp" and "samples_per_s" in r:
                out[f"{net} {r['dtype']}"] = {
                    "ratio": r["samples_per_s"] / best["samples_per_s"], "fastest_peer": best["impl"],
                    "peer_samples_per_s": best["samples_per_s"],
                    "refsnn_samples_per_s": r["samples_per_s"],
                    "rss_below_every_peer": all(r["peak_rss_mib"] < p["peak_rss_mib"] for p in peers)}
    return out


def markdown(rows, ratio, gemm, rounds):
    nets = list(dict.fromkeys(r["config"] for r in rows))
    lines = [f"Median samples/s over {rounds} interleaved round(s) (min-max), peak RSS MiB; "
             f"batch {BATCH}.", "",
             "| implementation | dtype | " + " | ".join(f"{n} samples/s | {n} MiB" for n in nets) + " |",
             "|---|---|" + "---|---|" * len(nets)]
    for impl, dt in dict.fromkeys((r["impl"], r["dtype"]) for r in rows):
        cells = []
        for n in nets:
            r = next((r for r in rows if (r["impl"], r["dtype"], r["config"]) == (impl, dt, n)), None)
            if r is None:
                cells += ["", ""]
            elif "samples_per_s" in r:
                cells += [f"{r['samples_per_s']:,.0f} ({r['min']:,.0f}-{r['max']:,.0f})",
                          f"{r['peak_rss_mib']:.0f}"]
            else:
                cells += ["failed", ""]
        lines.append(f"| {impl} | {dt} | " + " | ".join(cells) + " |")
    if gemm:
        for dt in ("float32", "float64"):
            cells = []
            for n in nets:
                fl = train_flops(*NETS[n])
                cells += [f"{gemm[dt] * 1e9 / fl:,.0f}", ""]
            lines.append(f"| GEMM bound ({gemm[dt]:.0f} GFLOP/s) | {dt} | " + " | ".join(cells) + " |")
    lines += ["", "| config | refsnn-stbp / fastest peer | fastest peer | refsnn peak RSS below "
              "every peer | refsnn-stbp / GEMM bound |", "|---|---|---|---|---|"]
    for k, v in ratio.items():
        net, dt = k.split()
        bound = (f"{v['refsnn_samples_per_s'] / (gemm[dt] * 1e9 / train_flops(*NETS[net])):.2f}"
                 if gemm else "")
        lines.append(f"| {k} | {v['ratio']:.2f} | {v['fastest_peer']} ({v['peer_samples_per_s']:,.0f}) "
                     f"| {'yes' if v['rss_below_every_peer'] else 'no'} | {bound} |")
    rate_lines = [f"- {r['impl']} {r['config']} {r['dtype']}: spike rates per layer "
                  + ", ".join(f"{v:.3f}" for v in r["rates"])
                  + (f" after the timed steps, {', '.join(f'{v:.3f}' for v in r['rates_at_start'])}"
                     f" at the start (weights scaled by {', '.join(map(str, r['weight_scales']))};"
                     f" {r['optimizer']})" if r.get("weight_scales") else "")
                  for r in rows if r.get("rates")]
    return "\n".join(lines + [""] + rate_lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="one round of mlp5, shorter timings")
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--impls", default=",".join(PEERS + ["refsnn-stbp"] +
                                                  [f"refsnn-{m}" for m in OTHER_METHODS]))
    ap.add_argument("--dtypes", default="float32,float64", help="refsnn-stbp dtypes")
    ap.add_argument("--other-dtypes", default="float64", help="dtypes of the other methods")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=3.0, help="seconds timed per config")
    ap.add_argument("--min-iters", type=int, default=5)
    ap.add_argument("--max-iters", type=int, default=300)
    ap.add_argument("--torch-threads", default="1,2",
                    help="torch thread counts; each peer runs with each (impl/tN)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", help="also write the result list here")
    ap.add_argument("--out", help="results file (default benchmarks/results.json, "
                    "results_quick.json with --quick); .md and .raw.json go beside it")
    a = ap.parse_args()
    if a.child:
        child_main(a)
        return
    if a.quick:
        a.nets, a.rounds, a.min_time = "mlp5", 1, 1.0
    out = Path(a.out) if a.out else HERE / ("results_quick.json" if a.quick else "results.json")
    impls, nets = a.impls.split(","), a.nets.split(",")
    configs = []
    for net in nets:
        for impl in impls:
            if impl in ("refsnn-stbp", "refsnn-stbp-general"):
                dts = a.dtypes.split(",")
            elif impl.startswith("refsnn-"):
                dts = a.other_dtypes.split(",")
            else:
                configs += [(f"{impl}/t{n}", net, "float32") for n in a.torch_threads.split(",")]
                continue
            configs += [(impl, net, dt) for dt in dts]
    t0 = time.time()
    results, gemms = [], []
    for rnd in range(a.rounds):
        if not a.quick:
            g = spawn(("gemm", "2", "-"), a)
            if "error" not in g:
                gemms.append(g)
        for cfg in (configs if rnd % 2 == 0 else configs[::-1]):
            r = spawn(cfg, a)
            r["round"] = rnd
            results.append(r)
            short = {k: r.get(k) for k in ("impl", "config", "dtype", "samples_per_s",
                                           "peak_rss_mib", "rates", "error")}
            print(json.dumps(short), flush=True)
    gemm = ({dt: statistics.median(g[dt] for g in gemms) for dt in ("float32", "float64")}
            if gemms else None)
    rows = summarize(results)
    ratio = ratios(rows)
    doc = [dict(r) for r in rows]
    out.write_text(json.dumps(doc, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=1))
    (out.with_suffix(".raw.json")).write_text(json.dumps(
        {"results": results, "gemm_gflops": gemm, "ratios": ratio, "cpus": os.cpu_count(),
         "total_s": time.time() - t0}, indent=1))
    md = markdown(rows, ratio, gemm, a.rounds)
    out.with_suffix(".md").write_text(md + "\n")
    print("\n" + md)
    for k, v in ratio.items():
        print(f"ratio refsnn-stbp / fastest peer, {k}: {v['ratio']:.2f} ({v['fastest_peer']})")
    print(f"total {time.time() - t0:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
