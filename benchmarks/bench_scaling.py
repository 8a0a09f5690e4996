#!/usr/bin/env python3
"""How an STBP training step grows with T, batch and hidden size, and how far it is from the
machine's GEMM bound (issue 12 item 3).

The peers' MLP (benchmarks/bench_peers.py: Bernoulli(0.2) input, PyTorch init x 3, decay 0.8,
V_th 1, rect surrogate, MSE of the output rate, one SGD step) at 784-H-H-10, varied one axis at a
time around T 5, batch 64, H 400. Each point times refsnn's STBP step as the peer benchmark does
(Network.loss_and_grads + SGD), with the fused dense path ("fused") and, for the A/B, the general
layer-by-layer chain ("general"), interleaved in one process (the order reversed every other
round). Reported: the median ms/step over rounds (wall) and CPU ms/step (all threads), samples/s,
and samples/s divided by the GEMM bound = (GEMM FLOP/s) / (FLOPs of the dense equivalent of one
training sample: forward + weight gradients + input gradients but the first layer's), with the
GEMM rate of numpy's BLAS on 2 threads measured in a child process at the start.

    python benchmarks/bench_scaling.py                 # both dtypes, all points, 3 rounds
    python benchmarks/bench_scaling.py --dtypes float32 --rounds 5 --plot scaling.png

Writes benchmarks/results_scaling.json (--out to change); --plot PATH draws samples/s against
each axis (needs the optional extra `plot`, matplotlib). The machine is shared and noisy:
compare only the points of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
POLICY = {"OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "passive"}
for _k, _v in POLICY.items():                       # the CLI's policy, before numpy loads
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402

BASE = dict(T=5, B=64, H=400)
AXES = {"T": [2, 5, 10, 25, 50], "B": [16, 32, 64, 128, 256], "H": [100, 200, 400, 800, 1600]}


def train_flops(T, H):
    macs = [784 * H, H * H, H * 10]
    return 2 * T * (2 * sum(macs) + sum(macs[1:]))


def gemm_rate():
    """GFLOP/s of numpy's BLAS on 2 threads (float32, float64), in a child process."""
    code = ("import json, time, numpy as np\n"
            "out = {}\n"
            "for dt in ('float32', 'float64'):\n"
            "    a = np.random.rand(2048, 2048).astype(dt); b = a.copy(); a @ b; ts = []\n"
            "    for _ in range(5):\n"
            "        t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)\n"
            "    out[dt] = 2 * 2048 ** 3 / sorted(ts)[2] / 1e9\n"
            "print(json.dumps(out))\n")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2", MKL_NUM_THREADS="2")
    cp = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return json.loads(cp.stdout.strip().splitlines()[-1])


def make_step(T, B, H, dtype, seed=7):
    from refsnn.config import TrainConfig
    from refsnn.methods import get_method
    from refsnn.network import Network
    from refsnn.optim import make_optimizer
    m = get_method("stbp")
    p = m.Params.from_dict(dict(decay=0.8, v_th=1.0, surrogate="rect", surrogate_width=1.0))
    rng = np.random.default_rng(seed)
    net = Network.build(f"784-{H}-{H}-10", m, p, rng=rng, dtype=np.dtype(dtype))
    for arr in net.params():
        arr *= 3.0
    x = (rng.random((T, B, 784)) < 0.2).astype(dtype)
    target = net.make_target(rng.integers(0, 10, B), T)
    opt = make_optimizer(TrainConfig(optimizer="sgd", lr=0.1), net.params())

    def step():
        _, grads, _ = net.loss_and_grads(x, target, train=True, rng=rng)
        opt.step(net.params(), grads, 0.1)
    return step


def time_it(step, min_time):
    for _ in range(2):
        step()
    ts = []
    c0, t0 = time.process_time(), time.perf_counter()
    while len(ts) < 3 or time.perf_counter() - t0 < min_time:
        a = time.perf_counter()
        step()
        ts.append(time.perf_counter() - a)
    return statistics.median(ts), (time.process_time() - c0) / len(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--axes", default="T,B,H")
    ap.add_argument("--paths", default="fused,general")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--out", default=str(HERE / "results_scaling.json"))
    ap.add_argument("--plot", help="draw samples/s against each axis into this image")
    a = ap.parse_args()
    import refsnn.methods.stbp as S

    gemm = gemm_rate()
    points = []
    for ax in a.axes.split(","):
        for v in AXES[ax]:
            pt = dict(BASE, **{ax: v})
            if pt not in [q for _, q in points]:
                points.append((ax, pt))
    configs = [(ax, pt, dt, path) for ax, pt in points for dt in a.dtypes.split(",")
               for path in a.paths.split(",")]
    steps, res = {}, {}
    for rnd in range(a.rounds):
        for ax, pt, dt, path in (configs if rnd % 2 == 0 else configs[::-1]):
            key = (pt["T"], pt["B"], pt["H"], dt)
            if key not in steps:
                steps[key] = make_step(pt["T"], pt["B"], pt["H"], dt)
            S.FUSED = "auto" if path == "fused" else "off"
            res.setdefault(key + (path,), []).append(time_it(steps[key], a.min_time))
            print(rnd, key, path, f"{1e3 * res[key + (path,)][-1][0]:.2f} ms", flush=True)
    rows = []
    for (T, B, H, dt, path), v in res.items():
        wall = statistics.median(w for w, _ in v)
        cpu = statistics.median(c for _, c in v)
        sps = B / wall
        bound = gemm[dt] * 1e9 / train_flops(T, H)
        rows.append(dict(T=T, B=B, H=H, dtype=dt, path=path, ms_per_step=1e3 * wall,
                         cpu_ms_per_step=1e3 * cpu, samples_per_s=sps, gemm_bound=bound,
                         fraction_of_bound=sps / bound, rounds=len(v),
                         range_ms=[1e3 * min(w for w, _ in v), 1e3 * max(w for w, _ in v)]))
    Path(a.out).write_text(json.dumps({"gemm_gflops_2threads": gemm, "base": BASE,
                                       "rows": rows}, indent=1))
    print(f"GEMM 2 threads: {gemm['float32']:.0f} / {gemm['float64']:.0f} GFLOP/s (f32 / f64)")
    print("| T | B | H | dtype | path | ms/step (CPU ms) | samples/s | fraction of GEMM bound |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["dtype"], r["path"], r["T"], r["B"], r["H"])):
        print(f"| {r['T']} | {r['B']} | {r['H']} | {r['dtype']} | {r['path']} | "
              f"{r['ms_per_step']:.2f} ({r['cpu_ms_per_step']:.2f}) | {r['samples_per_s']:,.0f} | "
              f"{r['fraction_of_bound']:.2f} |")
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator
        axes = a.axes.split(",")
        fig, axs = plt.subplots(1, len(axes), figsize=(4.5 * len(axes), 3.6))
        axs = np.atleast_1d(axs)
        for sub, ax in zip(axs, axes):
            for dt in a.dtypes.split(","):
                for path in a.paths.split(","):
                    pts = sorted((r[ax], r["samples_per_s"]) for r in rows
                                 if r["dtype"] == dt and r["path"] == path
                                 and all(r[k] == BASE[k] for k in BASE if k != ax))
                    if pts:
                        sub.plot(*zip(*pts), marker="o", label=f"{dt} {path}")
            sub.set_xscale("log")
            sub.set_yscale("log")
            sub.set_xticks(AXES[ax])
            sub.set_xticklabels([str(v) for v in AXES[ax]])
            sub.minorticks_off()
            sub.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))   # labels inside a decade
            sub.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
            sub.set_xlabel({"T": "time steps T", "B": "batch", "H": "hidden size H"}[ax])
            sub.set_ylabel("samples/s")
            sub.grid(True, which="both", alpha=0.3)
        axs[0].legend(fontsize=8)
        fig.suptitle("refsnn STBP step, 784-H-H-10 (base T 5, batch 64, H 400)")
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)
        print(f"plot: {a.plot}")


if __name__ == "__main__":
    main()
