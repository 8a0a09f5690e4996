#!/usr/bin/env python3
"""Threading policy of a refsnn training step: numba's OpenMP pool beside OpenBLAS's pool.

refsnn's neuron kernels are numba ``parallel=True`` loops (``prange`` over the batch, libgomp's
OpenMP pool) and its layers call numpy's GEMM (OpenBLAS, its own pthread pool). On a small machine
the two pools wait for each other (research/perf_notes.md, technique 1). This script times one
real training step (encoding, forward, backward, optimizer, readout: what refsnn/train.py does per
batch) under several threading policies, each in its own process, because numba and OpenBLAS
read their thread counts when they load.

Policies (environment of the child process; names say numba threads x BLAS threads):

  n2b2-passive   numba 2, BLAS 2, OMP_WAIT_POLICY=passive  (the CLI's setting before issue 12)
  n2b2-default   numba 2, BLAS 2, libgomp's default wait (spin a while, then sleep)
  n2b1-passive   numba 2, BLAS 1, passive
  n2b1-active    numba 2, BLAS 1, OMP_WAIT_POLICY=active
  n2b1-wq        numba 2 on numba's own workqueue layer (no OpenMP), BLAS 1
  n1b2           numba 1, BLAS 2
  n1b1           numba 1, BLAS 1

Workloads (one training step each; mnist10k digits, Bernoulli rate code, as `refsnn train`):

  stbp-default   the default run of `refsnn train --method stbp`: 784-400-10, T 8, batch 50, f64
  stbp-mlp5      784-400-400-10, T 5, batch 64, f64 (the peers' MLP config, issue 12)
  stbp-mlp25     784-400-400-10, T 25, batch 64, f64
  ...-f32        the same in float32
  stbp-conv5     28x28x1-15c5-a2-40c5-a2-300-10, T 5, batch 64, f64 (the peers' conv config)
  <m>-default    the default run of each other method (tsslbp, spikebp, bpsta, hm2bp)

Rounds are interleaved (every policy and workload once per round, the order reversed every
other round) and the table gives the median over rounds of each child's median step time, with
the CPU seconds per step (process_time, all threads) beside it: spinning threads show up there.
The machine is shared and noisy: compare policies only within one run. The load average at the
start of each child is recorded.

    python benchmarks/bench_threads.py                      # all policies x 3 stbp workloads x 3 rounds
    python benchmarks/bench_threads.py --workloads stbp-default,tsslbp-default --rounds 5
    python benchmarks/bench_threads.py --cli                # plus one short `refsnn train` per policy
    python benchmarks/bench_threads.py --policies n2b1-passive --dense-modes gemm,auto
                                            # the event-driven dense kernels against the GEMM
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
THREAD_VARS = ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
               "OMP_WAIT_POLICY", "NUMBA_THREADING_LAYER", "REFSNN_THREADS")

POLICIES = {
    "n2b2-passive": dict(NUMBA_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2", OMP_WAIT_POLICY="passive"),
    "n2b2-default": dict(NUMBA_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2"),
    "n2b1-passive": dict(NUMBA_NUM_THREADS="2", OPENBLAS_NUM_THREADS="1", OMP_WAIT_POLICY="passive"),
    "n2b1-active": dict(NUMBA_NUM_THREADS="2", OPENBLAS_NUM_THREADS="1", OMP_WAIT_POLICY="active"),
    "n2b1-wq": dict(NUMBA_NUM_THREADS="2", OPENBLAS_NUM_THREADS="1",
                    NUMBA_THREADING_LAYER="workqueue"),
    "n1b2": dict(NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="2"),
    "n1b1": dict(NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1"),
}

WORKLOADS = {  # name -> (method, TrainConfig overrides on top of the method's defaults)
    "stbp-default": ("stbp", {}),
    "stbp-default-f32": ("stbp", dict(dtype="float32")),
    "stbp-mlp5": ("stbp", dict(arch="784-400-400-10", T=5, batch_size=64)),
    "stbp-mlp5-f32": ("stbp", dict(arch="784-400-400-10", T=5, batch_size=64, dtype="float32")),
    "stbp-mlp25": ("stbp", dict(arch="784-400-400-10", T=25, batch_size=64)),
    "stbp-mlp25-f32": ("stbp", dict(arch="784-400-400-10", T=25, batch_size=64,
                                    dtype="float32")),
    "stbp-conv5": ("stbp", dict(arch="28x28x1-15c5-a2-40c5-a2-300-10", T=5, batch_size=64)),
    "tsslbp-default": ("tsslbp", {}),
    "spikebp-default": ("spikebp", {}),
    "bpsta-default": ("bpsta", {}),
    "hm2bp-default": ("hm2bp", {}),
}


# ----------------------------------------------------------------------------------------------
# child: time one workload's training step in this process's threading setting

def child(workload: str, min_time: float, min_iters: int, warmup: int,
          dense_mode: str = "auto") -> dict:
    import numpy as np

    from refsnn.kernels import dense
    dense.MODE = dense_mode

    from refsnn.config import TrainConfig
    from refsnn.methods import get_method
    from refsnn.optim import make_optimizer
    from refsnn.train import batch_input, build_network, load_data

    method_name, over = WORKLOADS[workload]
    m = get_method(method_name)
    cfg = TrainConfig().merged(dict(m.defaults)).merged(over)
    p = m.Params.from_dict(cfg.params)
    rng = np.random.default_rng(cfg.seed)
    ds = load_data(cfg.merged(dict(n_train=2000, n_test=10)), rng)
    net = build_network(cfg, m, p, rng)
    opt = make_optimizer(cfg, net.params())
    dtype = np.dtype(cfg.dtype)
    B = cfg.batch_size
    order = rng.permutation(ds.n_train)

    def step(k):
        idx = order[(k * B) % (ds.n_train - B):][:B]
        labels = ds.train_y[idx]
        x = batch_input(cfg, ds, "train", idx, rng, dtype)
        loss, grads, trace = net.loss_and_grads(x, net.make_target(labels, cfg.T), train=True,
                                                rng=rng)
        opt.step(net.params(), grads, cfg.lr)
        m.post_update(p, net.layers)
        m.scores(p, trace.states[-1])
        return loss

    load = os.getloadavg()[0]
    for k in range(warmup):
        step(k)
    walls, cpus = [], []
    t_start = time.perf_counter()
    k = warmup
    while len(walls) < min_iters or time.perf_counter() - t_start < min_time:
        w0, c0 = time.perf_counter(), time.process_time()
        step(k)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        k += 1
    import numba
    return {"workload": workload, "dense": dense_mode, "batch": B, "steps": len(walls),
            "step_ms": 1e3 * statistics.median(walls), "step_min_ms": 1e3 * min(walls),
            "cpu_ms": 1e3 * statistics.median(cpus), "samples_per_s": B / statistics.median(walls),
            "load1": load, "threading_layer": _layer(numba), "numba_threads": numba.get_num_threads()}


def _layer(numba):
    try:
        return numba.threading_layer()
    except ValueError:            # no parallel kernel ran
        return "-"


def cli_child(out: Path) -> dict:
    """A short `refsnn train --method stbp` (1 epoch of 2,000 digits): samples/s of the real CLI."""
    cmd = [sys.executable, "-m", "refsnn", "train", "--method", "stbp", "--epochs", "1",
           "--n-train", "2000", "--n-test", "500", "--quiet", "--out", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"workload": "cli-stbp-1epoch", "samples_per_s": row["samples_per_s"],
            "epoch_s": row["seconds"], "process_s": wall, "test_acc": row["test_acc"]}


# ----------------------------------------------------------------------------------------------
# driver

def spawn(policy: str, args: list, timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(POLICIES[policy])
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    load = os.getloadavg()[0]
    try:
        cp = subprocess.run([sys.executable, str(Path(__file__).resolve())] + args, env=env,
                            capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"policy": policy, "error": f"timeout after {timeout:.0f} s", "load1": load}
    for line in cp.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            res["policy"] = policy
            res.setdefault("load1", load)
            return res
    tail = " | ".join((cp.stderr or cp.stdout).strip().splitlines()[-3:])
    return {"policy": policy, "error": f"rc={cp.returncode}: {tail}", "load1": load}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--cli-child", help=argparse.SUPPRESS)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--workloads", default="stbp-default,stbp-mlp5,stbp-conv5")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=3.0, help="seconds timed per child")
    ap.add_argument("--min-iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cli", action="store_true", help="also time a 1-epoch `refsnn train` per policy")
    ap.add_argument("--dense-modes", default="auto",
                    help="refsnn.kernels.dense.MODE values to compare (auto: events when sparse; "
                         "gemm: always the GEMM)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", default=str(HERE / "results_threads.json"))
    a = ap.parse_args()

    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.min_time, a.min_iters, a.warmup,
                                           a.dense_modes)), flush=True)
        return
    if a.cli_child:
        print("RESULT " + json.dumps(cli_child(Path(a.cli_child))), flush=True)
        return

    policies, workloads = a.policies.split(","), a.workloads.split(",")
    for name in policies:
        if name not in POLICIES:
            sys.exit(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    for name in workloads:
        if name not in WORKLOADS:
            sys.exit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    modes = a.dense_modes.split(",")
    jobs = [(w, pol, m) for w in workloads for pol in policies for m in modes]
    if a.cli:
        jobs += [("cli", pol, "auto") for pol in policies]
    results = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for w, pol, m in (jobs if r % 2 == 0 else jobs[::-1]):
                if w == "cli":
                    args = ["--cli-child", str(Path(tmp) / f"{pol}-{r}")]
                else:
                    args = ["--child", w, "--min-time", str(a.min_time), "--min-iters",
                            str(a.min_iters), "--warmup", str(a.warmup), "--dense-modes", m]
                res = spawn(pol, args, a.timeout)
                if len(modes) > 1:
                    res["policy"] = f"{pol} dense={m}"
                res.setdefault("workload", "cli-stbp-1epoch" if w == "cli" else w)
                res["round"] = r
                results.append(res)
                print(json.dumps(res), flush=True)
    doc = {"policies": {k: POLICIES[k] for k in policies}, "results": results,
           "cpus": os.cpu_count(), "python": sys.version.split()[0],
           "total_s": time.time() - t0}
    Path(a.json).write_text(json.dumps(doc, indent=1))
    names = list(dict.fromkeys(r["policy"] for r in results))
    print(table(results, names))
    print(f"\n{len(results)} children, {time.time() - t0:.0f} s; results in {a.json}")


def table(results: list, policies: list) -> str:
    """Markdown: one row per policy, per workload the median step ms (CPU ms) and samples/s."""
    works = list(dict.fromkeys(r["workload"] for r in results))
    head = "| policy | " + " | ".join(f"{w}: ms/step (CPU ms), samples/s" for w in works) + " |"
    lines = [head, "|---|" + "---|" * len(works)]
    for pol in policies:
        cells = []
        for w in works:
            rs = [r for r in results if r["policy"] == pol and r["workload"] == w and "error" not in r]
            if not rs:
                cells.append("failed")
            elif w.startswith("cli"):
                sps = [r["samples_per_s"] for r in rs]
                cells.append(f"{statistics.median(sps):,.0f} samples/s "
                             f"({min(sps):,.0f}-{max(sps):,.0f})")
            else:
                ms = statistics.median(r["step_ms"] for r in rs)
                cpu = statistics.median(r["cpu_ms"] for r in rs)
                lo = min(r["step_ms"] for r in rs)
                hi = max(r["step_ms"] for r in rs)
                cells.append(f"{ms:.1f} ({cpu:.1f}) [{lo:.1f}-{hi:.1f}], "
                             f"{rs[0]['batch'] * 1e3 / ms:,.0f}")
        lines.append(f"| {pol} | " + " | ".join(cells) + " |")
    loads = [r["load1"] for r in results if "load1" in r]
    if loads:
        lines.append(f"\nload average (1 min) at the children's starts: median "
                     f"{statistics.median(loads):.1f}, range {min(loads):.1f}-{max(loads):.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
