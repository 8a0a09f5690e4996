"""Conv layer (spec stbp S17): which way of computing it is fastest here?

Four ways of computing the forward, the weight gradient and the input gradient, timed on the
shapes of the specs' conv presets and on T·B = 5·64 and 20·100 rows:

  sample-loop   refsnn's kernels (refsnn/kernels/conv.py): one sample's windows as a (C·k·k, H'·W')
                matrix in cache, then the sample's matrix product as numba loops; prange over samples
  sample-gemm   the same, with numba's np.dot (BLAS) for each sample's product, called from the
                numba threads
  rows-gemm     im2col of all T·B·H'·W' rows, then one numpy GEMM (in row chunks of at most 64 MB of
                columns) and the NCHW transposes
  direct        numba loops straight over (n, c_out, c_in, i, j, y, x), no window matrix

Run from the repository root:

    python benchmarks/bench_conv.py                 # all shapes, float64, numba's default threads
    python benchmarks/bench_conv.py --threads 1 --dtype float32 --reps 3
    python benchmarks/bench_conv.py --events --rows 320 --reps 15 [--dtype float32]

Each figure is "wall/cpu": the fastest of --reps calls (after one warm-up call) in wall-clock
milliseconds, and the least process CPU time (all threads) of those calls; the four ways are timed
round-robin so that a burst of load elsewhere hits them alike. On a shared machine the CPU time of
a one-thread run (--threads 1) is the steadiest measure of the work each way does. The ways are first
checked to agree (to 1e-9 relative) on every shape. Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=0, help="numba/BLAS threads (0: default)")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ways", default="sample-loop,sample-gemm,rows-gemm,direct")
    ap.add_argument("--rows", default="320,2000", help="T·B values, comma separated")
    ap.add_argument("--events", action="store_true",
                    help="A/B of the library's three paths (loop, gemm, events) per layer shape "
                         "of conv5 and spikebp's LeNet and input density (see events_ab)")
    ap.add_argument("--densities", default="0.02,0.05,0.1,0.2,0.3")
    return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.events:                     # the CLI's policy (as the library's
    for var, val in (("OPENBLAS_NUM_THREADS", "1"), ("MKL_NUM_THREADS", "1"),   # BLAS path needs)
                     ("OMP_WAIT_POLICY", "passive")):
        os.environ.setdefault(var, val)
if ARGS is not None and ARGS.threads:                   # must be set before numba/BLAS load
    for var in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import numba                                             # noqa: E402
import numpy as np                                       # noqa: E402
from numba import njit, prange                           # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from refsnn.kernels import conv as K                     # noqa: E402

# (name, C_in, H, C_out, k, padding); stride 1 everywhere, as in the presets
SHAPES = [
    ("28x28x1-15c5", 1, 28, 15, 5, 0),       # stbp Frontiers CNN, first conv
    ("12x12x15-40c5", 15, 12, 40, 5, 0),     # its second conv (after a2)
    ("28x28x1-32c3p1", 1, 28, 32, 3, 1),     # stbp official MNIST CNN, first conv
    ("14x14x32-32c3p1", 32, 14, 32, 3, 1),   # its second conv (after a2)
]


# ----------------------------------------------------------------------------- rows-gemm
@njit(cache=True, parallel=True)
def im2row(x, k, s, p, Ho, Wo):
    """(N·Ho·Wo, C·k·k): row (n, y, x), column (c, i, j) = x[n, c, s·y+i-p, s·x+j-p], 0 outside."""
    N, C, H, W = x.shape
    cols = np.zeros((N * Ho * Wo, C * k * k), dtype=x.dtype)
    for n in prange(N):
        for y in range(Ho):
            for xo in range(Wo):
                r = (n * Ho + y) * Wo + xo
                for c in range(C):
                    for i in range(k):
                        yi = s * y + i - p
                        if yi < 0 or yi >= H:
                            continue
                        for j in range(k):
                            xj = s * xo + j - p
                            if 0 <= xj < W:
                                cols[r, (c * k + i) * k + j] = x[n, c, yi, xj]
    return cols


@njit(cache=True, parallel=True)
def row2im(dcols, N, C, H, W, k, s, p, Ho, Wo):
    """Adjoint of im2row: scatter-add the rows back into (N, C, H, W)."""
    gx = np.zeros((N, C, H, W), dtype=dcols.dtype)
    for n in prange(N):
        for y in range(Ho):
            for xo in range(Wo):
                r = (n * Ho + y) * Wo + xo
                for c in range(C):
                    for i in range(k):
                        yi = s * y + i - p
                        if yi < 0 or yi >= H:
                            continue
                        for j in range(k):
                            xj = s * xo + j - p
                            if 0 <= xj < W:
                                gx[n, c, yi, xj] += dcols[r, (c * k + i) * k + j]
    return gx


def _chunks(N, row_bytes, limit=64 * 2 ** 20):
    step = max(1, limit // max(row_bytes, 1))
    return [(a, min(a + step, N)) for a in range(0, N, step)]


def rows_forward(x, Wm, k, s, p, Ho, Wo):
    N, Co = x.shape[0], Wm.shape[0]
    out = np.empty((N, Co, Ho, Wo), dtype=x.dtype)
    for a, z in _chunks(N, Ho * Wo * Wm.shape[1] * x.itemsize):
        I = im2row(x[a:z], k, s, p, Ho, Wo) @ Wm.T                    # (n·Ho·Wo, C_out)
        out[a:z] = I.reshape(z - a, Ho, Wo, Co).transpose(0, 3, 1, 2)
    return out


def rows_weight_grad(g, x, k, s, p):
    N, Co, Ho, Wo = g.shape
    Q = x.shape[1] * k * k
    dW = np.zeros((Co, Q), dtype=x.dtype)
    for a, z in _chunks(N, Ho * Wo * Q * x.itemsize):
        gm = g[a:z].transpose(0, 2, 3, 1).reshape(-1, Co)
        dW += gm.T @ im2row(x[a:z], k, s, p, Ho, Wo)
    return dW


def rows_input_grad(g, Wm, C, H, W, k, s, p):
    N, Co, Ho, Wo = g.shape
    gx = np.empty((N, C, H, W), dtype=g.dtype)
    for a, z in _chunks(N, Ho * Wo * Wm.shape[1] * g.itemsize):
        gm = g[a:z].transpose(0, 2, 3, 1).reshape(-1, Co)
        gx[a:z] = row2im(gm @ Wm, z - a, C, H, W, k, s, p, Ho, Wo)
    return gx


# ----------------------------------------------------------------------------- direct
@njit(cache=True, parallel=True)
def direct_forward(x, Wt, s, p, Ho, Wo):
    N, C, H, W = x.shape
    Co, _, k, _ = Wt.shape
    out = np.zeros((N, Co, Ho, Wo), dtype=x.dtype)
    for n in prange(N):
        for co in range(Co):
            for c in range(C):
                for i in range(k):
                    for j in range(k):
                        w = Wt[co, c, i, j]
                        x0, x1 = K._valid_x(W, Wo, j, s, p)
                        for y in range(Ho):
                            yi = s * y + i - p
                            if 0 <= yi < H:
                                for xo in range(x0, x1):
                                    out[n, co, y, xo] += w * x[n, c, yi, s * xo + j - p]
    return out


@njit(cache=True, parallel=True)
def direct_weight_grad(g, x, k, s, p):
    N, Co, Ho, Wo = g.shape
    _, C, H, W = x.shape
    dW = np.zeros((Co, C, k, k), dtype=x.dtype)
    for co in prange(Co):                                   # disjoint rows of dW
        acc = np.zeros(Wo, dtype=x.dtype)                   # per-x partial sums: vectorises
        for c in range(C):
            for i in range(k):
                for j in range(k):
                    x0, x1 = K._valid_x(W, Wo, j, s, p)
                    acc[:] = 0.0
                    for n in range(N):
                        for y in range(Ho):
                            yi = s * y + i - p
                            if 0 <= yi < H:
                                for xo in range(x0, x1):
                                    acc[xo] += g[n, co, y, xo] * x[n, c, yi, s * xo + j - p]
                    dW[co, c, i, j] = acc.sum()
    return dW


@njit(cache=True, parallel=True)
def direct_input_grad(g, Wt, H, W, s, p):
    N, Co, Ho, Wo = g.shape
    _, C, k, _ = Wt.shape
    gx = np.zeros((N, C, H, W), dtype=g.dtype)
    for n in prange(N):
        for co in range(Co):
            for c in range(C):
                for i in range(k):
                    for j in range(k):
                        w = Wt[co, c, i, j]
                        x0, x1 = K._valid_x(W, Wo, j, s, p)
                        for y in range(Ho):
                            yi = s * y + i - p
                            if 0 <= yi < H:
                                for xo in range(x0, x1):
                                    gx[n, c, yi, s * xo + j - p] += w * g[n, co, y, xo]
    return gx


# ----------------------------------------------------------------------------- sample-gemm
# refsnn's scheme with numba's np.dot (BLAS) for the per-sample products, called from the threads
@njit(cache=True, parallel=True)
def blas_forward(x, Wm, k, s, p, Ho, Wo):
    N = x.shape[0]
    Co, Q = Wm.shape
    out = np.empty((N, Co, Ho, Wo), dtype=x.dtype)
    n_chunks = min(N, K.N_CHUNKS)
    for ch in prange(n_chunks):
        a, z = K._chunk(N, n_chunks, ch)
        cols = np.empty((Q, Ho * Wo), dtype=x.dtype)
        for n in range(a, z):
            K.im2col_sample(x, n, k, s, p, Ho, Wo, cols)
            np.dot(Wm, cols, out[n].reshape(Co, Ho * Wo))
    return out


@njit(cache=True, parallel=True)
def blas_weight_grad(g, x, k, s, p):
    N, Co, Ho, Wo = g.shape
    Q = x.shape[1] * k * k
    n_chunks = min(N, K.N_CHUNKS)
    part = np.zeros((n_chunks, Co, Q), dtype=x.dtype)
    for ch in prange(n_chunks):
        a, z = K._chunk(N, n_chunks, ch)
        cols = np.empty((Q, Ho * Wo), dtype=x.dtype)
        dW = np.empty((Co, Q), dtype=x.dtype)
        for n in range(a, z):
            K.im2col_sample(x, n, k, s, p, Ho, Wo, cols)
            np.dot(g[n].reshape(Co, Ho * Wo), cols.T, dW)
            part[ch] += dW
    out = np.zeros((Co, Q), dtype=x.dtype)
    for ch in range(n_chunks):
        out += part[ch]
    return out


@njit(cache=True, parallel=True)
def blas_input_grad(g, Wm, C, H, W, k, s, p):
    N, Co, Ho, Wo = g.shape
    Q = Wm.shape[1]
    gx = np.zeros((N, C, H, W), dtype=g.dtype)
    WmT = np.ascontiguousarray(Wm.T)
    n_chunks = min(N, K.N_CHUNKS)
    for ch in prange(n_chunks):
        a, z = K._chunk(N, n_chunks, ch)
        dcols = np.empty((Q, Ho * Wo), dtype=g.dtype)
        for n in range(a, z):
            np.dot(WmT, g[n].reshape(Co, Ho * Wo), dcols)
            K.col2im_sample(dcols, n, k, s, p, Ho, Wo, gx)
    return gx


# ----------------------------------------------------------------------------- harness
def ways(x, Wt, g, k, p):
    """{way: {op: zero-argument callable}} for one problem (stride 1)."""
    s = 1
    N, C, H, W = x.shape
    Co, Ho, Wo = g.shape[1:]
    Wm = np.ascontiguousarray(Wt.reshape(Co, -1))
    nob = np.zeros(0, x.dtype)
    return {
        "sample-loop": {"forward": lambda: K.conv_forward(x, Wm, nob, k, s, p, Ho, Wo),
                        "weight grad": lambda: K.conv_weight_grad(g, x, k, s, p),
                        "input grad": lambda: K.conv_input_grad(g, Wm, C, H, W, k, s, p)},
        "sample-gemm": {"forward": lambda: blas_forward(x, Wm, k, s, p, Ho, Wo),
                        "weight grad": lambda: blas_weight_grad(g, x, k, s, p),
                        "input grad": lambda: blas_input_grad(g, Wm, C, H, W, k, s, p)},
        "rows-gemm": {"forward": lambda: rows_forward(x, Wm, k, s, p, Ho, Wo),
                      "weight grad": lambda: rows_weight_grad(g, x, k, s, p),
                      "input grad": lambda: rows_input_grad(g, Wm, C, H, W, k, s, p)},
        "direct": {"forward": lambda: direct_forward(x, Wt, s, p, Ho, Wo),
                   "weight grad": lambda: direct_weight_grad(g, x, k, s, p),
                   "input grad": lambda: direct_input_grad(g, Wt, H, W, s, p)},
    }


def main(args):
    dtype = np.dtype(args.dtype)
    chosen = args.ways.split(",")
    rng = np.random.default_rng(0)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}, "
          f"numba threads {numba.config.NUMBA_NUM_THREADS}, {dtype}, min of {args.reps}")
    print(f"# load average at start: {os.getloadavg()}")
    print(f"{'shape':16s} {'T*B':>5s} {'op':12s} " + " ".join(f"{w:>12s}" for w in chosen))
    for rows in (int(v) for v in args.rows.split(",")):
        for name, C, H, Co, k, p in SHAPES:
            Ho = H + 2 * p - k + 1
            x = (rng.random((rows, C, H, H)) < 0.2).astype(dtype)      # spikes, 20 % rate
            Wt = rng.uniform(-0.3, 0.3, (Co, C, k, k)).astype(dtype)
            g = rng.standard_normal((rows, Co, Ho, Ho)).astype(dtype)
            fns = ways(x, Wt, g, k, p)
            for op in ("forward", "weight grad", "input grad"):
                ref = fns[chosen[0]][op]().reshape(-1)               # warm-up and agreement
                scale = np.abs(ref).max()
                for w in chosen[1:]:
                    got = fns[w][op]().reshape(-1)
                    tol = 1e-9 if dtype == np.float64 else 1e-4
                    assert np.abs(got - ref).max() <= tol * scale, (name, op, w)
                wall = {w: np.inf for w in chosen}
                cpu = {w: np.inf for w in chosen}
                for _ in range(args.reps):
                    for w in chosen:
                        t0, c0 = time.perf_counter(), time.process_time()
                        fns[w][op]()
                        wall[w] = min(wall[w], time.perf_counter() - t0)
                        cpu[w] = min(cpu[w], time.process_time() - c0)
                print(f"{name:16s} {rows:5d} {op:12s} "
                      + " ".join(f"{1e3 * wall[w]:6.0f}/{1e3 * cpu[w]:<5.0f}" for w in chosen),
                      flush=True)
    print(f"# load average at end: {os.getloadavg()}")


# ----------------------------------------------------------------------------- events A/B
# (name, C_in, H, C_out, k, padding): conv5's two conv layers and spikebp's LeNet (20c5, 50c5)
EVENT_SHAPES = [
    ("28x28x1-15c5", 1, 28, 15, 5, 0),
    ("12x12x15-40c5", 15, 12, 40, 5, 0),
    ("28x28x1-20c5", 1, 28, 20, 5, 0),
    ("12x12x20-50c5", 20, 12, 50, 5, 0),
]


def events_ab(args):
    """The library's paths of refsnn/kernels/conv_events.py, interleaved in one process: the
    per-sample loops (``loop``), channels-last windows + BLAS per chunk (``gemm``) and the event
    kernels (``events``, 0/1 inputs), forward and weight gradient, on T·B rows of Bernoulli spikes
    of each density. Each cell: median / min wall ms over --reps rounds (the ways in a rotating
    order each round); the last column the ratio loop / events and gemm / events of the minima."""
    from refsnn.kernels import conv_events as CE
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    rows = int(args.rows.split(",")[0])
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}, "
          f"numba threads {numba.config.NUMBA_NUM_THREADS}, OPENBLAS_NUM_THREADS="
          f"{os.environ.get('OPENBLAS_NUM_THREADS')}, {dtype}, T*B {rows}, {args.reps} rounds")
    print(f"# load average at start: {os.getloadavg()}")
    print(f"{'shape':16s} {'dens':>5s} {'op':7s} {'loop':>13s} {'gemm':>13s} {'events':>13s}"
          f"  loop/ev gemm/ev")
    for name, C, H, Co, k, p in EVENT_SHAPES:
        Ho = H + 2 * p - k + 1
        Wt = rng.uniform(-0.3, 0.3, (Co, C, k, k)).astype(dtype)
        Wm = np.ascontiguousarray(Wt.reshape(Co, -1))
        Wr, Wev = CE.w_rows(Wt, dtype), CE.w_events(Wt, dtype)
        b = np.zeros(0, dtype)
        g = rng.standard_normal((rows, Co, Ho, Ho)).astype(dtype)
        spc = K.gemm_samples(Ho * Ho)
        for d in (float(v) for v in args.densities.split(",")):
            x = (rng.random((rows, C, H, H)) < d).astype(dtype)
            ops = {
                "forward": {"loop": lambda: K.conv_forward(x, Wm, b, k, 1, p, Ho, Ho),
                            "gemm": lambda: K.conv_forward_gemm(x, Wr, b, k, 1, p, Ho, Ho, spc),
                            "events": lambda: CE.event_forward(x, Wev, b, k, 1, p, Ho, Ho)},
                "wgrad": {"loop": lambda: K.conv_weight_grad(g, x, k, 1, p).reshape(Wt.shape),
                          "gemm": lambda: CE.dw_from_rows(
                              K.conv_weight_grad_gemm(g, x, k, 1, p, spc), Wt.shape),
                          "events": lambda: CE.dw_from_events(
                              CE.event_weight_grad(g, x, k, 1, p), Wt.shape)},
            }
            for op, fns in ops.items():
                ref = fns["loop"]()
                for w in ("gemm", "events"):                       # warm-up and agreement
                    tol = 1e-12 if dtype == np.float64 else 1e-5
                    assert np.abs(fns[w]() - ref).max() <= tol * max(np.abs(ref).max(), 1e-300)
                times = {w: [] for w in fns}
                order = list(fns)
                for r in range(args.reps):
                    for w in order[r % 3:] + order[:r % 3]:
                        t0 = time.perf_counter()
                        fns[w]()
                        times[w].append(time.perf_counter() - t0)
                med = {w: 1e3 * float(np.median(v)) for w, v in times.items()}
                lo = {w: 1e3 * min(v) for w, v in times.items()}
                print(f"{name:16s} {d:5.2f} {op:7s} "
                      + " ".join(f"{med[w]:6.2f}/{lo[w]:<6.2f}" for w in fns)
                      + f"  {lo['loop'] / lo['events']:6.2f} {lo['gemm'] / lo['events']:6.2f}",
                      flush=True)
    print(f"# load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    if ARGS.events:
        events_ab(ARGS)
    else:
        main(ARGS)
