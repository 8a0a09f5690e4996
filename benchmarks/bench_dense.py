#!/usr/bin/env python3
"""Event-driven dense kernels vs the GEMM, by input density: where the crossover lies.

For a dense layer n_in -> n_out on R = T·B rows of 0/1 input with a given density, times

  forward      events: event lists + Wᵀ copy + gather (refsnn/kernels/dense.py)  vs  x Wᵀ + b
  weight grad  events: check of the forward's lists + CSC + column sums + transpose vs  gᵀ x

both complete (everything the layer does per call), under the CLI's threading policy (one BLAS
thread, numba threads passive; set below before numpy loads). Each figure is the median of
``--repeat`` timings of at least ``--min-time`` seconds each; events and GEMM alternate within
each repetition, so they see the same machine. The ratio GEMM / events > 1 means the events win.

    python benchmarks/bench_dense.py                       # 784->400 and 400->400 and 400->10
    python benchmarks/bench_dense.py --shapes 784x400 --rows 1600 --dtypes float32
"""

import os

for _var, _value in (("OPENBLAS_NUM_THREADS", "1"), ("MKL_NUM_THREADS", "1"),
                     ("OMP_WAIT_POLICY", "passive")):
    os.environ.setdefault(_var, _value)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from refsnn.kernels import dense  # noqa: E402

HERE = Path(__file__).resolve().parent


def timed(fn, min_time):
    """Seconds per call of fn, averaged over as many calls as fit in min_time (at least 3)."""
    fn()
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < min_time:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def _events(x):
    idx, cnt = np.empty(x.shape, np.int32), np.empty(x.shape[0], np.int64)
    dense.build_events(x, idx, cnt)
    return idx, cnt


def measure(n_in, n_out, R, density, dtype, repeat, min_time, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.random((R, n_in)) < density).astype(dtype)
    W = rng.normal(0, 1 / np.sqrt(n_in), (n_out, n_in)).astype(dtype)
    b = rng.normal(0, 0.1, n_out).astype(dtype)
    g = rng.normal(0, 1, (R, n_out)).astype(dtype)

    def with_mode(mode, fn):
        def run():
            old, dense.MODE = dense.MODE, mode
            try:
                return fn()
            finally:
                dense.MODE = old
        return run

    ev = dense.Events(*_events(x), n_in)
    fns = {   # what Dense.forward / Dense.backward do on each path
        "fwd_gemm": lambda: dense.forward(x, W, b, None),
        "fwd_events": with_mode("events", lambda: dense.forward(
            x, W, b, dense.spike_events(x, n_out))),
        "dw_gemm": lambda: dense.weight_grad(g, x, None),
        "dw_events": lambda: dense.weight_grad(g, x, ev if ev.match(x) else None),
    }
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            times[k].append(timed(fn, min_time))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"n_in": n_in, "n_out": n_out, "rows": R, "density": density,
            "dtype": np.dtype(dtype).name, **{k + "_ms": 1e3 * v for k, v in med.items()},
            "fwd_speedup": med["fwd_gemm"] / med["fwd_events"],
            "dw_speedup": med["dw_gemm"] / med["dw_events"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="784x400,400x400,400x10", help="n_in x n_out, comma list")
    ap.add_argument("--rows", default="320,1600", help="R = T·B (320: T5 B64; 1600: T25 B64)")
    ap.add_argument("--densities", default="0.02,0.05,0.1,0.15,0.2,0.3,0.4,0.5")
    ap.add_argument("--dtypes", default="float64,float32")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=0.2)
    ap.add_argument("--json", default=str(HERE / "results_dense.json"))
    a = ap.parse_args()
    out = []
    print("| n_in x n_out | rows | dtype | density | fwd GEMM ms | fwd events ms | x | "
          "dW GEMM ms | dW events ms | x |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in a.shapes.split(","):
        n_in, n_out = (int(v) for v in shape.split("x"))
        for R in (int(v) for v in a.rows.split(",")):
            for dt in a.dtypes.split(","):
                for d in (float(v) for v in a.densities.split(",")):
                    r = measure(n_in, n_out, R, d, np.dtype(dt), a.repeat, a.min_time)
                    r["load1"] = os.getloadavg()[0]
                    out.append(r)
                    print(f"| {n_in}x{n_out} | {R} | {dt} | {d:g} | {r['fwd_gemm_ms']:.3f} | "
                          f"{r['fwd_events_ms']:.3f} | {r['fwd_speedup']:.2f} | "
                          f"{r['dw_gemm_ms']:.3f} | {r['dw_events_ms']:.3f} | "
                          f"{r['dw_speedup']:.2f} |", flush=True)
    Path(a.json).write_text(json.dumps({"results": out, "cpus": os.cpu_count()}, indent=1))


if __name__ == "__main__":
    main()
