"""The training loop: batches, epochs, evaluation, metrics, checkpoints, exact resume.

:func:`train` runs one TrainConfig with one method and writes a run folder::

    out_dir/config.json      the method and the full TrainConfig of the run
    out_dir/metrics.jsonl    one JSON line per epoch (see below)
    out_dir/checkpoint.h5    rewritten atomically after every epoch (refsnn/checkpoint.py)
    out_dir/report.json      at the end: final and best test accuracy, minutes, machine, versions

Randomness: ONE ``numpy.random.Generator`` seeded by ``config.seed`` is used, in this order: the
stratified subset (``n_train``/``n_test``), the weight initialisation, then per epoch the shuffle
of the training set, per batch the augmentation (``augment``: crop offsets, then flips;
refsnn/data/augment.py), the input encoding and the method's training-time draws (dropout),
then the encoding of the test set. Its state is saved with every checkpoint, so an
interrupted run resumed from its last checkpoint ends with the same weights, bit for bit, as an
uninterrupted one (same machine, same thread count).

One step: x = encode(batch) (T, B, *shape); loss, grads = Network.loss_and_grads(x, target,
train=True); optional global grad-norm clip; optimizer step at the epoch's lr (optim.lr_at);
Method.post_update (the spec's weight clamps). A NaN or inf loss or weight stops the run with a
RefsnnError; the last checkpoint stays intact.

Per-sample state: a method may keep one array over the training set (Method.init_sample_state;
HM2-BP's boosting weights β_n of its spec 7, with ``--param boost=true``). Each batch's target is
then built from it (Method.batch_target, given the batch's indices), and after each epoch's
training pass it is updated from that pass's predictions (Method.update_sample_state), before
the test evaluation; it is saved with every checkpoint, so resuming keeps it bit for bit.

metrics.jsonl, one object per epoch: ``epoch`` (1-based; the lr schedule's 0-based index is
epoch - 1), ``lr``, ``loss`` (the method's batch loss averaged over the epoch's batches),
``train_acc`` (measured on the training batches as they were trained), ``test_acc``,
``layers`` (one entry per spiking layer: ``layer`` index, ``name``, ``spike_rate``, ``silent``
(fraction of neurons that never fired in a batch), ``grad_norm`` (L2 norm of the layer's
gradient before clipping), each averaged over the batches), ``spikes_per_sample`` (spikes of
every spiking layer over all T steps, per test sample, counted in the epoch's test evaluation),
``samples_per_s``, ``seconds``. report.json adds ``spikes_per_sample`` (the last epoch's) and
``peak_rss_mb``: the peak resident memory of the process (resource.getrusage), which covers the
run alone when the caller resets the peak first (refsnn/sweep.py does, on Linux).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__
from .checkpoint import load_checkpoint, load_into, save_checkpoint, to_jsonable
from .config import TrainConfig
from .errors import CheckpointError, ConfigError, RefsnnError, ShapeError
from .methods import get_method
from .optim import clip_grad_norm, lr_at, make_optimizer
from . import runtime

CHECKPOINT = "checkpoint.h5"
METRICS = "metrics.jsonl"
REPORT = "report.json"
CONFIG = "config.json"


# --------------------------------------------------------------------------------------------
# Progress on stderr
# --------------------------------------------------------------------------------------------

class Progress:
    """A \\r bar per epoch (only on a terminal) and one line per epoch; silent when quiet."""

    def __init__(self, stream, quiet: bool, epochs: int):
        self.stream = None if quiet else (stream if stream is not None else sys.stderr)
        self.tty = bool(self.stream is not None and getattr(self.stream, "isatty", lambda: False)())
        self.epochs = epochs
        self._last = 0.0

    def say(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write(text + "\n")
            self.stream.flush()

    def bar(self, epoch: int, done: int, total: int, t0: float, loss: float, acc: float,
            final: bool = False) -> None:
        if self.stream is None:
            return
        now = time.perf_counter()
        if not self.tty:
            # a log file (nohup, a batch job): a plain line a minute, so long epochs show life
            if not final and now - max(self._last, t0) >= 60.0:
                self._last = now
                self.say(f"  epoch {epoch}/{self.epochs}: {done}/{total} samples, "
                         f"{done / max(now - t0, 1e-9):,.0f} samples/s, loss {loss:.4g}, "
                         f"acc {100 * acc:.1f}%")
            return
        if not final and now - self._last < 0.2:
            return
        self._last = now
        width = 24
        fill = int(width * done / max(total, 1))
        rate = done / max(now - t0, 1e-9)
        self.stream.write(f"\repoch {epoch}/{self.epochs} [{'#' * fill}{'.' * (width - fill)}] "
                          f"{done}/{total} {rate:,.0f} samples/s loss {loss:.4g} "
                          f"acc {100 * acc:.1f}%  ")
        if final:
            self.stream.write("\r" + " " * 100 + "\r")
        self.stream.flush()


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _json_dump_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:
            json.dump(to_jsonable(obj), fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _normal(config: TrainConfig, method) -> dict:
    """The config as plain JSON values, with the method's FULL parameter record (for comparing)."""
    d = config.as_dict()
    d["params"] = method.Params.from_dict(config.params).as_dict()
    return json.loads(json.dumps(to_jsonable(d), sort_keys=True))


def _differences(a: dict, b: dict, skip=("epochs",)) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if k in skip:
            continue
        if k == "params":
            pa, pb = a.get(k, {}), b.get(k, {})
            out += [f"param {n}: {pa.get(n)!r} vs {pb.get(n)!r}" for n in sorted(set(pa) | set(pb))
                    if pa.get(n) != pb.get(n)]
        elif a.get(k) != b.get(k):
            out.append(f"{k}: {a.get(k)!r} vs {b.get(k)!r}")
    return out


def _prepare_out(out: Path, record: dict, resume: bool) -> str:
    """Create or check the run folder. Returns "new", "restart" or "resume"."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the run folder {out}: {err.strerror or err}; choose "
                          "a writable --out") from None
    if not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder; choose a folder")
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"the run folder {out} is not writable; choose a writable --out")
    entries = [p.name for p in out.iterdir()]
    if (out / CHECKPOINT).exists():
        if resume:
            return "resume"
        raise ConfigError(f"{out} already holds a run ({CHECKPOINT}); pass --resume to continue "
                          "it, or choose another --out")
    same = False
    if (out / CONFIG).is_file():
        try:
            same = json.loads((out / CONFIG).read_text()) == record
        except (OSError, ValueError):
            same = False
    if resume and not same:
        raise ConfigError(f"nothing to resume in {out}: it has no {CHECKPOINT} of this run; "
                          "start without --resume")
    if entries and not same:
        raise ConfigError(f"{out} is not empty and holds no run of this configuration; choose a "
                          "new or empty --out folder (or pass the same options to --resume)")
    return "restart" if entries else "new"


def _check_finite_loss(loss, epoch, batch, lr, out):
    if not math.isfinite(loss):
        raise RefsnnError(f"training diverged in epoch {epoch}, batch {batch}: the loss is "
                          f"{loss}; lower the learning rate (--lr, {lr:g} in this epoch) or "
                          f"check the method's parameters; the checkpoint of the last finished "
                          f"epoch in {out} is intact")


def _check_finite_weights(net, names, epoch, batch, lr, out):
    for name, a in zip(names, net.params()):
        if not np.all(np.isfinite(a)):
            raise RefsnnError(f"training diverged in epoch {epoch}, batch {batch}: {name} holds "
                              f"NaN or inf after the optimizer step; lower the learning rate "
                              f"(--lr, {lr:g} in this epoch); the checkpoint of the last "
                              f"finished epoch in {out} is intact")


def _restored_sample_state(ck, fresh):
    """The checkpoint's per-sample state, checked against the one this run starts with."""
    saved = ck.sample_state
    if fresh is None and saved is None:
        return None
    if fresh is None or saved is None:
        raise CheckpointError(f"{ck.path} {'holds no' if saved is None else 'holds a'} "
                              f"per-sample training state (e.g. boosting weights) but this run "
                              f"{'keeps one' if saved is None else 'keeps none'}; it cannot be "
                              "resumed with these options")
    if saved.shape != fresh.shape or saved.dtype != fresh.dtype:
        raise CheckpointError(f"{ck.path}: the per-sample training state has shape "
                              f"{saved.shape} ({saved.dtype}); this run's training set needs "
                              f"{fresh.shape} ({fresh.dtype})")
    return saved


def build_network(config: TrainConfig, method, p, rng):
    """The network of ``config.arch``, initialised from ``rng`` (the method's init rule)."""
    from .network import Network
    return Network.build(config.arch, method, p, rng=rng, dtype=np.dtype(config.dtype),
                         init=config.init)


def load_data(config: TrainConfig, rng, data_dir=None):
    """The dataset of ``config`` (a stratified subset when n_train/n_test > 0)."""
    from .data import load_dataset, subset
    ds = load_dataset(config.dataset, data_dir)
    if config.n_train or config.n_test:
        for what, n, have in (("n-train", config.n_train, ds.n_train),
                              ("n-test", config.n_test, ds.n_test)):
            if n > have:
                raise ConfigError(f"{what}={n} is more than the {have} samples of "
                                  f"{ds.name!r}; use at most {have} (0 = all)")
        ds = subset(ds, config.n_train or None, config.n_test or None, rng)
    return ds


def check_shapes(ds, net, arch: str) -> None:
    n_in, n_ds = int(np.prod(net.in_shape)), int(np.prod(ds.shape))
    if n_in != n_ds:
        c, h, w = ds.shape if len(ds.shape) == 3 else (1,) + tuple(ds.shape)
        raise ShapeError(f"dataset {ds.name!r} has {'x'.join(map(str, ds.shape))} samples "
                         f"({n_ds} values) but the architecture {arch!r} reads {n_in}; start "
                         f"--arch with {n_ds} or {h}x{w}x{c}")
    n_out = net.n_out
    if n_out < ds.n_classes:
        raise ShapeError(f"the architecture {arch!r} has {n_out} outputs but {ds.name!r} has "
                         f"{ds.n_classes} classes; end --arch with -{ds.n_classes} (or more "
                         "with voting)")


def encode_batch(config: TrainConfig, x01, rng, dtype):
    from .encoding import encode
    return encode(config.encoding, x01, config.T, rng, dtype, **dict(config.encoding_kw))


def batch_input(config: TrainConfig, ds, split: str, idx, rng, dtype, train: bool = False):
    """Network input (T, B, *shape) of samples ``idx``: an image set is encoded (augmented
    first when ``train`` and ``config.augment``, normalised per channel when
    ``config.norm_mean``); an event set (``ds.temporal``, refsnn/data/eventsets.py) bins its
    recordings into T frames instead."""
    if getattr(ds, "temporal", False):
        if config.augment or config.norm_mean:
            raise ConfigError(f"{ds.name!r} is an event set: augment and norm-mean/norm-std "
                              "apply to image sets only; leave them empty")
        binning = config.binning or None      # None: the set's own binning
        return ds.frames(split, idx, config.T, dtype, binning=binning)
    from .data.augment import images01
    x = images01(ds, split, idx, rng, dtype, augment=config.augment if train else "",
                 mean=config.norm_mean, std=config.norm_std)
    return encode_batch(config, x, rng, dtype)


def evaluate(net, ds, config: TrainConfig, rng, split: str = "test", batch_size=None,
             counts: dict | None = None) -> float:
    """Accuracy of ``net`` on a split (inputs encoded as in training, drawn from ``rng``).

    ``counts``, when given, receives ``spikes_per_sample``: the spikes of every spiking layer
    over all T steps, summed and divided by the number of samples.
    """
    y = ds.test_y if split == "test" else ds.train_y
    B = batch_size or config.batch_size
    dtype = np.dtype(config.dtype)
    correct, spikes = 0, 0.0
    for s in range(0, len(y), B):
        idx = np.arange(s, min(s + B, len(y)))
        x = batch_input(config, ds, split, idx, rng, dtype)
        if counts is None:
            pred = net.predict(x)
        else:                                    # net.predict, keeping the trace to count spikes
            trace = net.forward(x)
            pred = np.argmax(net.method.scores(net.p, trace.states[-1]), axis=1)
            spikes += sum(float(np.sum(st.spikes)) for st in trace.states
                          if getattr(st, "spikes", None) is not None)
        correct += int(np.sum(pred == y[idx]))
    if counts is not None:
        counts["spikes_per_sample"] = spikes / len(y)
    return correct / len(y)


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MiB (resource.getrusage), None where unknown."""
    try:
        import resource
    except ImportError:                          # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10   # bytes / KiB


def machine_info() -> dict:
    import h5py
    import numba
    return {"platform": platform.platform(), "processor": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "numba": numba.__version__, "h5py": h5py.__version__,
            "refsnn": __version__, "threads": thread_info()}


def thread_info() -> dict:
    """The threading a run had (it changes speed, not results; benchmarks/README.md)."""
    import numba
    info = {"numba_threads": numba.get_num_threads(), "keep_freed_memory": runtime.applied}
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY",
                "NUMBA_THREADING_LAYER", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        if var in os.environ:
            info[var] = os.environ[var]
    return info


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

def train(config: TrainConfig, method: str, out_dir, *, resume: bool = False,
          quiet: bool = False, progress=None, data_dir=None) -> dict:
    """Train ``method`` under ``config``, writing the run folder ``out_dir``; returns the report.

    ``resume=True`` continues from ``out_dir/checkpoint.h5``; the config must equal the saved one
    except for ``epochs`` (a longer run may continue a shorter one). ``progress`` is the stream
    of the progress bar and the epoch lines (stderr by default); ``quiet`` silences both.
    ``data_dir`` is where full datasets are looked for first (the CLI's --data-dir).
    """
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    runtime.keep_freed_memory()             # speed only (refsnn/runtime.py)
    m = get_method(method)
    p = m.Params.from_dict(config.params)
    out = Path(out_dir)
    record = {"method": m.name, "config": _normal(config, m)}
    ck = None
    if resume and (out / CHECKPOINT).exists():
        ck = load_checkpoint(out / CHECKPOINT)
        if ck.method != m.name:
            raise ConfigError(f"{out} holds a {ck.method} run; resume it with --method "
                              f"{ck.method}")
        saved = {**TrainConfig().as_dict(), **ck.config}   # an option newer than the run: default
        saved["params"] = {**m.Params().as_dict(), **saved.get("params", {})}    # same for params
        diff = _differences(json.loads(json.dumps(to_jsonable(saved), sort_keys=True)),
                            record["config"])
        if diff:
            raise ConfigError(f"--resume: the options differ from the saved run in {out} "
                              f"(saved vs given): {'; '.join(diff)}; only --epochs may change")
    state = _prepare_out(out, record, resume)
    _json_dump_atomic(out / CONFIG, record)

    rng = np.random.default_rng(config.seed)
    ds = load_data(config, rng, data_dir)
    net = build_network(config, m, p, rng)
    check_shapes(ds, net, config.arch)
    opt = make_optimizer(config, net.params())
    names = net.param_names()
    spiking = net.spiking_layers()
    layer_of = [li for li, layer in enumerate(net.layers) for _ in layer.params]
    from .layers import Dense
    lr_scale = [config.dense_lr_scale if isinstance(layer, Dense) else 1.0
                for layer in net.layers for _ in layer.params]    # per array (dense_lr_scale)
    dtype = np.dtype(config.dtype)
    prog = Progress(progress, quiet, config.epochs)
    sample_state = m.init_sample_state(p, ds.train_y)       # None for most methods

    start, history, elapsed = 0, [], 0.0
    if ck is not None:
        load_into(net, ck)
        if ck.optimizer is None:
            raise CheckpointError(f"{ck.path} holds no optimizer state; it cannot be resumed")
        opt.load_state_dict(ck.optimizer)
        if ck.rng_state is None:
            raise CheckpointError(f"{ck.path} holds no random-generator state; it cannot be "
                                  "resumed")
        try:
            rng.bit_generator.state = ck.rng_state
        except (TypeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{ck.path}: the saved random-generator state does not fit "
                                  f"numpy's {type(rng.bit_generator).__name__} ({err})") from None
        sample_state = _restored_sample_state(ck, sample_state)
        start, history, elapsed = ck.epoch, list(ck.history), ck.elapsed_s
        prog.say(f"resuming {out} after epoch {start} of {config.epochs}")
    elif state == "restart":
        prog.say(f"{out} holds an unfinished start of this run with no checkpoint; starting over")
    with open(out / METRICS, "w") as fh:                     # the log agrees with the checkpoint
        for row in history:
            fh.write(json.dumps(to_jsonable(row)) + "\n")

    if start == 0:
        prog.say(f"{m.name} on {ds.name}: {ds.n_train} train / {ds.n_test} test, "
                 f"{net.describe()}, T={config.T}, {config.epochs} epochs, {config.dtype}")
    n, B = ds.n_train, config.batch_size
    for epoch in range(start, config.epochs):
        e1 = epoch + 1
        lr = lr_at(config, epoch)
        t0 = time.perf_counter()
        order = rng.permutation(n)
        loss_sum, n_batches, correct, seen = 0.0, 0, 0, 0
        layer_sums = [dict() for _ in spiking]
        gnorm_sums = np.zeros(len(net.layers))
        train_pred = None if sample_state is None else np.empty(n, dtype=np.int64)
        for b, s in enumerate(range(0, n, B)):
            idx = order[s:s + B]
            labels = ds.train_y[idx]
            x = batch_input(config, ds, "train", idx, rng, dtype, train=True)
            target = net.make_target(labels, config.T)
            if sample_state is not None:
                target = m.batch_target(p, target, sample_state, idx)
            loss, grads, trace = net.loss_and_grads(x, target, train=True, rng=rng)
            _check_finite_loss(loss, e1, b + 1, lr, out)
            sq = np.zeros(len(net.layers))
            for li, g in zip(layer_of, grads):
                sq[li] += float(np.vdot(g, g))
            gnorm_sums += np.sqrt(sq)                         # per-layer norm, this batch
            if config.grad_clip_norm > 0:
                grads, _ = clip_grad_norm(grads, config.grad_clip_norm)
            opt.step(net.params(), grads,
                     lr if config.dense_lr_scale == 1.0 else [lr * f for f in lr_scale])
            m.post_update(p, net.layers)
            _check_finite_weights(net, names, e1, b + 1, lr, out)
            pred = np.argmax(m.scores(p, trace.states[-1]), axis=1)
            correct += int(np.sum(pred == labels))
            if train_pred is not None:
                train_pred[idx] = pred
            seen += len(idx)
            loss_sum += loss
            n_batches += 1
            for k, li in enumerate(spiking):
                for key, v in m.layer_summary(trace.states[li]).items():
                    layer_sums[k][key] = layer_sums[k].get(key, 0.0) + float(v)
            prog.bar(e1, seen, n, t0, loss_sum / n_batches, correct / seen)
        train_s = time.perf_counter() - t0
        prog.bar(e1, seen, n, t0, loss_sum / n_batches, correct / seen, final=True)
        if sample_state is not None:                          # e.g. HM2-BP's boosting (spec 7)
            sample_state = m.update_sample_state(p, sample_state, ds.train_y, train_pred)
        counts = {}
        test_acc = evaluate(net, ds, config, rng, counts=counts)
        seconds = time.perf_counter() - t0
        elapsed += seconds
        layers = []
        for k, li in enumerate(spiking):
            row = {"layer": li, "name": net.layers[li].describe()}
            row.update({key: v / n_batches for key, v in layer_sums[k].items()})
            row["grad_norm"] = gnorm_sums[li] / n_batches
            layers.append(row)
        metrics = {"epoch": e1, "lr": lr, "loss": loss_sum / n_batches,
                   "train_acc": correct / seen, "test_acc": test_acc, "layers": layers,
                   "spikes_per_sample": counts["spikes_per_sample"],
                   "samples_per_s": n / train_s, "seconds": seconds}
        history.append(metrics)
        best = max(history, key=lambda r: r["test_acc"])
        save_checkpoint(out / CHECKPOINT, net, config, optimizer=opt, rng=rng, epoch=e1,
                        history=history, best=best, last=metrics, elapsed_s=elapsed,
                        sample_state=sample_state)
        with open(out / METRICS, "a") as fh:
            fh.write(json.dumps(to_jsonable(metrics)) + "\n")
        silent = [f"layer {r['layer']} silent" for r in layers if r.get("spike_rate", 1) == 0]
        rates = "/".join(f"{r['spike_rate']:.3f}" if "spike_rate" in r else "-" for r in layers)
        prog.say(f"epoch {e1}/{config.epochs}  lr {lr:.3g}  loss {metrics['loss']:.4g}  "
                 f"train {100 * metrics['train_acc']:.2f}%  test {100 * test_acc:.2f}%  "
                 f"spike rates {rates}  {n / train_s:,.0f} samples/s  {seconds:.1f} s"
                 + (f"  WARNING: {', '.join(silent)}" if silent else ""))

    if not history:
        raise ConfigError(f"epochs={config.epochs}: nothing was trained")
    best = max(history, key=lambda r: r["test_acc"])
    last = history[-1]
    report = {
        "method": m.name, "dataset": ds.name, "arch": config.arch, "T": config.T,
        "epochs": len(history), "n_train": ds.n_train, "n_test": ds.n_test,
        "test_acc": last["test_acc"], "train_acc": last["train_acc"],
        "best_test_acc": best["test_acc"], "best_epoch": best["epoch"],
        "minutes": elapsed / 60.0, "seconds": elapsed,
        "samples_per_s": float(np.mean([r["samples_per_s"] for r in history])),
        "spikes_per_sample": last.get("spikes_per_sample"), "peak_rss_mb": peak_rss_mb(),
        "config": record["config"], "machine": machine_info(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "note": "test_acc is the last epoch's; best_test_acc is the best over epochs ON THE TEST "
                "SET (no validation split), reported for comparison with the papers",
    }
    _json_dump_atomic(out / REPORT, report)
    return report
