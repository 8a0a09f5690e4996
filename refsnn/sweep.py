"""Sweeps: many training runs (methods x settings x seeds), resumable, and one table of them all.

``refsnn sweep CONFIG.toml`` and ``refsnn compare`` (refsnn/cli_sweep.py) are two fronts of this
module: a sweep file (or compare's flags) is expanded into a list of :class:`RunSpec`, each run
trains in its own run folder with :func:`refsnn.train.train`, and :func:`write_results` turns
the runs' reports into one Markdown table, two CSV files and a plot of the learning curves.

A sweep folder (``--out``)::

    sweep.json              the expanded runs: name, method, settings, seed, full configuration
    runs/<name>/            one run folder per run (config.json, metrics.jsonl, checkpoint.h5,
                            report.json; refsnn/train.py)
    log/<name>.log          the run's progress lines (every attempt, appended)
    log/<name>.jsonl        one line per attempt: start time, host, pid, the epoch it started from
    results.md, results.csv one row per group of runs that differ only by their seed: mean and
                            std of the test accuracy, spikes per sample, seconds per epoch, peak
                            memory
    runs.csv                one row per run, the same numbers
    curves.png              test accuracy per epoch, mean over seeds (matplotlib, extra `plot`)

Run names are deterministic: ``<method>[-<settings>]-s<seed>-<hash>``, the hash being the first
8 hex digits of the SHA-256 of the run's full configuration (config.json), so the same file
finds the same folders again. A run is finished when its report.json exists: it is skipped. An
unfinished run continues from its last checkpoint (the bit-identical resume of refsnn/train.py);
one with no checkpoint starts over. Changing any option of a run in the file makes it a new run
(a new hash), never a mix of two.

Execution: :func:`execute_run` trains one run in the calling process. ``refsnn sweep`` submits
one Dask task per unfinished run to a LocalCluster (worker processes, one thread each) or to the
scheduler given by ``--scheduler``; a worker that dies mid-run makes Dask run the task again on
another worker (up to ``distributed.scheduler.allowed-failures`` times, 3 by default), which
resumes from the run's last checkpoint. A lock file per run (log/<name>.lock) keeps two processes
from training the same run at once (e.g. a left-over worker of a killed sweep).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from .config import TrainConfig
from .errors import ConfigError, RefsnnError

SWEEP_JSON = "sweep.json"
RUNS = "runs"
LOGS = "log"

#: the top-level keys of a sweep file
TOP_KEYS = ("methods", "seeds", "out", "train", "grid", "method", "run", "paper")
#: the TrainConfig options a sweep file may set (seed comes from ``seeds``)
OPTION_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "seed")


# --------------------------------------------------------------------------------------------
# Run specs
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSpec:
    """One training run of a sweep: method, full TrainConfig, and what sets it apart."""

    method: str
    config: TrainConfig
    settings: tuple = ()          # ((key, value), ...): the grid point / [[run]] options
    preset: str = ""

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def record(self) -> dict:
        """What train() writes to config.json (method + full normalised configuration)."""
        from .methods import get_method
        from .train import _normal
        return {"method": self.method, "config": _normal(self.config, get_method(self.method))}

    @property
    def digest(self) -> str:
        text = json.dumps(self.record, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    @property
    def label(self) -> str:
        """The settings as text, e.g. ``lr=0.003 v_th=0.5`` ("" for none)."""
        return " ".join(f"{k}={_text(v)}" for k, v in self.settings)

    @property
    def group(self) -> tuple:
        """Runs that differ only by their seed share a group (one row of the table)."""
        d = self.record
        d["config"] = {k: v for k, v in d["config"].items() if k != "seed"}
        return (self.method, self.label, json.dumps(d, sort_keys=True))

    @property
    def name(self) -> str:
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in
                       "-".join(f"{k}{_text(v)}" for k, v in self.settings))[:60]
        return f"{self.method}{'-' + slug if slug else ''}-s{self.seed}-{self.digest}"

    def as_dict(self) -> dict:
        return {"name": self.name, "method": self.method, "preset": self.preset,
                "settings": dict(self.settings), "seed": self.seed,
                "config": self.config.as_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        return cls(d["method"], TrainConfig.from_dict(d["config"]),
                   tuple(d.get("settings", {}).items()), d.get("preset", ""))


def _text(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(_text(x) for x in v)
    if isinstance(v, dict):
        return ",".join(f"{k}:{_text(x)}" for k, x in v.items())
    return f"{v:g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------------------------
# The sweep file
# --------------------------------------------------------------------------------------------

@dataclass
class Sweep:
    runs: list                    # of RunSpec, in the file's order
    out: str | None = None
    paper: dict = dataclasses.field(default_factory=dict)   # method -> the papers' figures


def load_sweep(path) -> Sweep:
    """Read and expand a sweep file (TOML); every mistake is a one-line ConfigError."""
    path = Path(path)
    try:
        import tomllib
    except ModuleNotFoundError:                               # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError("reading a sweep file needs Python >= 3.11 (tomllib) or "
                              "`pip install tomli`") from None
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"no sweep file {path}; give the path of a TOML file (see "
                          "docs/sweep.md)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read the sweep file {path}: {err}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}; see docs/sweep.md for the "
                          "format") from None
    try:
        return expand(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _where(*keys) -> str:
    return ".".join(str(k) for k in keys)


def _check_type(where: str, key: str, value):
    """A TrainConfig option of the file has the type of its default (a list for a tuple)."""
    default = TrainConfig.__dataclass_fields__[key].default
    if default is dataclasses.MISSING:
        default = TrainConfig.__dataclass_fields__[key].default_factory()
    kind = type(default)
    want = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            tuple: "a list", dict: "a table"}[kind]
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is tuple:
        ok = isinstance(value, list)
    elif kind is bool:
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, kind) and not isinstance(value, bool)
    if not ok:
        raise ConfigError(f"{where}.{key} = {value!r} should be {want}")


def _options(where: str, table, allow=("params",)) -> dict:
    """Check a table of TrainConfig options (+ ``params``); returns it as a dict."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} should be a table of training options")
    out = {}
    for key, value in table.items():
        if key == "seed":
            raise ConfigError(f"{where}.seed: give seeds with the top-level key `seeds` (or "
                              "`seeds` in a [[run]])")
        if key in allow:
            if key == "params" and not isinstance(value, dict):
                raise ConfigError(f"{where}.params should be a table of method parameters, e.g. "
                                  "params = { v_th = 0.5 }")
            out[key] = value
            continue
        if key not in OPTION_KEYS:
            raise ConfigError(f"unknown key {where}.{key}; valid keys: "
                              f"{', '.join(OPTION_KEYS + tuple(allow))}")
        _check_type(where, key, value)
        out[key] = value
    return out


def _seeds(where: str, value) -> list:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ConfigError(f"{where} = {value}: give a count >= 1 or a list of seeds")
        return list(range(value))
    if (isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool)
                                                  and s >= 0 for s in value)):
        if len(set(value)) != len(value):
            raise ConfigError(f"{where} = {value}: a seed appears twice")
        return list(value)
    raise ConfigError(f"{where} = {value!r} should be a count (3 means 0, 1, 2) or a non-empty "
                      "list of integers >= 0")


def _method_name(where: str, name) -> str:
    from .methods import METHODS
    key = str(name).strip().lower() if isinstance(name, str) else None
    if key not in METHODS:
        raise ConfigError(f"{where}: unknown method {name!r}; choose from {', '.join(METHODS)}")
    return key


def _grid_points(grid) -> list:
    """[grid] -> list of ((key, value), ...); a key is an option or params.NAME."""
    if not isinstance(grid, dict):
        raise ConfigError("grid should be a table of lists, e.g. lr = [1e-3, 3e-3]")
    axes = []
    for key, values in grid.items():
        if key == "params":
            if not isinstance(values, dict):
                raise ConfigError("grid.params should be a table of lists, e.g. v_th = [0.5, 1]")
            axes += [(f"params.{k}", v) for k, v in values.items()]
        else:
            axes.append((key, values))
    for key, values in axes:
        if not isinstance(values, list):
            raise ConfigError(f"grid.{key} = {values!r} should be a list of values")
        if not values:
            raise ConfigError(f"grid.{key} is an empty list: the grid would hold no run")
        if not key.startswith("params."):
            if key == "seed":
                raise ConfigError("grid.seed: give seeds with the top-level key `seeds`")
            if key not in OPTION_KEYS:
                raise ConfigError(f"unknown key grid.{key}; valid keys: training options "
                                  f"({', '.join(OPTION_KEYS)}) or params.NAME")
            for v in values:
                _check_type("grid", key, v)
    return [tuple(zip([k for k, _ in axes], combo))
            for combo in itertools.product(*[v for _, v in axes])]


def _layer(settings) -> dict:
    """((key, value), ...) with params.NAME keys -> an overrides dict for TrainConfig.merged."""
    out, params = {}, {}
    for k, v in settings:
        if k.startswith("params."):
            params[k[len("params."):]] = v
        else:
            out[k] = v
    if params:
        out["params"] = params
    return out


def make_run(method: str, layers, *, seed: int, preset: str = "", settings=(),
             where: str = "") -> RunSpec:
    """The RunSpec of ``method``: its defaults < ``preset`` < each dict of ``layers`` in turn
    (TrainConfig options, ``params`` merged by name), then ``seed``. As `refsnn train` does, a
    new ``encoding`` drops the previous ``encoding_kw`` unless the same layer gives one, and an
    event set without an explicit ``arch`` gets its input size from the dataset."""
    from .cli import build_config, check_params
    from .methods import get_method
    m = get_method(method)
    try:
        cfg = build_config(m, preset or None)
        arch_given = False
        for layer in layers:
            layer = dict(layer)
            if "encoding" in layer and layer["encoding"] != cfg.encoding \
                    and "encoding_kw" not in layer:
                layer["encoding_kw"] = {}
            arch_given |= "arch" in layer
            unknown = [k for k in layer.get("params", {}) if k not in
                       {f.name for f in dataclasses.fields(m.Params)}]
            if unknown:
                raise ConfigError(f"{', '.join(unknown)} is not a parameter of {m.name} (see "
                                  f"`refsnn methods {m.name}`); put method-only parameters under "
                                  f"[method.{m.name}.params]")
            cfg = cfg.merged(layer)
        cfg = cfg.merged({"seed": seed})
        if not arch_given:
            from .data.eventsets import arch_for_dataset
            cfg = cfg.merged({"arch": arch_for_dataset(cfg.arch, cfg.dataset)})
        p = check_params(m, cfg.params)
        cfg = dataclasses.replace(cfg, params={k: v for k, v in p.as_dict().items()
                                               if k in cfg.params})
    except ConfigError as err:
        raise ConfigError(f"{where or m.name}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or m.name}: bad value ({err})") from None
    return RunSpec(m.name, cfg, tuple(settings), preset)


def expand(data: dict) -> Sweep:
    """A parsed sweep file -> Sweep (the runs in order); see docs/sweep.md for the format."""
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {', '.join(unknown)}; valid keys: "
                          f"{', '.join(TOP_KEYS)}")
    seeds = _seeds("seeds", data.get("seeds", 1))
    out = data.get("out")
    if out is not None and (not isinstance(out, str) or not out):
        raise ConfigError(f"out = {out!r} should be a folder name (a string)")
    common = _options("train", data.get("train", {}))
    per_method = data.get("method", {})
    if not isinstance(per_method, dict):
        raise ConfigError("method should be tables [method.NAME] of options")
    method_opts = {}
    for name, table in per_method.items():
        key = _method_name(f"[method.{name}]", name)
        method_opts[key] = _options(f"method.{name}", table, allow=("params", "preset"))
    methods = data.get("methods")
    runs = []
    if methods is not None:
        if not isinstance(methods, list) or not methods:
            raise ConfigError(f"methods = {methods!r} should be a non-empty list of method "
                              "names, e.g. [\"stbp\", \"hm2bp\"]")
        names = [_method_name("methods", n) for n in methods]
        if len(set(names)) != len(names):
            raise ConfigError(f"methods = {methods!r}: a method appears twice")
        points = _grid_points(data.get("grid", {})) if data.get("grid") else [()]
        for name in names:
            mo = dict(method_opts.get(name, {}))
            preset = mo.pop("preset", "")
            if not isinstance(preset, str):
                raise ConfigError(f"method.{name}.preset = {preset!r} should be a string")
            for point in points:
                for seed in seeds:
                    runs.append(make_run(name, [common, mo, _layer(point)], seed=seed,
                                         preset=preset, settings=point, where=name))
    elif "grid" in data:
        raise ConfigError("grid needs a list of methods (methods = [...]) to apply to")
    entries = data.get("run", [])
    if not isinstance(entries, list):
        raise ConfigError("run should be an array of tables: [[run]] method = \"stbp\" ...")
    for i, entry in enumerate(entries, 1):
        where = f"run {i}"
        if not isinstance(entry, dict) or "method" not in entry:
            raise ConfigError(f"[[run]] number {i} needs method = \"NAME\"")
        entry = dict(entry)
        name = _method_name(where, entry.pop("method"))
        run_seeds = _seeds(f"{where}: seeds", entry.pop("seeds")) if "seeds" in entry else seeds
        opts = _options(f"run.{i}", entry, allow=("params", "preset"))
        mo = dict(method_opts.get(name, {}))
        preset = opts.pop("preset", mo.pop("preset", ""))
        if not isinstance(preset, str):
            raise ConfigError(f"{where}: preset = {preset!r} should be a string")
        settings = tuple((k, v) for k, v in opts.items() if k != "params") + tuple(
            opts.get("params", {}).items())
        for seed in run_seeds:
            runs.append(make_run(name, [common, mo, opts], seed=seed, preset=preset,
                                 settings=settings, where=where))
    if not runs:
        raise ConfigError("the sweep holds no run: give methods = [...] (with an optional "
                          "[grid]) or [[run]] tables")
    runs = [dataclasses.replace(r, settings=tuple(         # settings shown without "params."
        (k[len("params."):] if k.startswith("params.") else k, v) for k, v in r.settings))
        for r in runs]
    seen = {}
    for r in runs:
        if r.name in seen:
            raise ConfigError(f"two runs have the same configuration ({r.name}); remove one")
        seen[r.name] = r
    paper = data.get("paper", {})
    if not isinstance(paper, dict) or not all(isinstance(v, str) for v in paper.values()):
        raise ConfigError("paper should be a table of texts, e.g. stbp = \"98.89% (MNIST)\"")
    for name in paper:
        _method_name("paper", name)
    return Sweep(runs, out, {k.strip().lower(): v for k, v in paper.items()})


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

def _reset_peak_rss() -> None:
    """Linux: reset the process's peak resident memory (VmHWM, which getrusage reports), so
    that report.json's peak_rss_mb covers this run alone. Elsewhere the figure stays the
    process's peak so far (an upper bound)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


class _RunLock:
    """An exclusive lock (fcntl.flock) on log/<name>.lock, released by the kernel if the
    holder dies; a no-op where fcntl is missing."""

    def __init__(self, path: Path):
        self.path, self.fh = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self.fh = open(self.path, "a")
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fh is not None:
            self.fh.close()                              # releases the lock


def _read_report(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def execute_run(run: dict, root: str, data_dir=None, numba_threads=None) -> dict:
    """Train one run (``RunSpec.as_dict()``) of the sweep folder ``root`` in this process.

    Skips a finished run (report.json), resumes an unfinished one from its checkpoint, and
    returns the run's report. This is the Dask task of `refsnn sweep` and compare's loop body.
    """
    from .checkpoint import load_checkpoint
    from .train import CHECKPOINT, REPORT, train
    spec = RunSpec.from_dict(run)
    root = Path(root)
    folder, logs = root / RUNS / spec.name, root / LOGS
    report = folder / REPORT
    if report.exists():
        return json.loads(report.read_text())
    logs.mkdir(parents=True, exist_ok=True)
    with _RunLock(logs / f"{spec.name}.lock"):
        if report.exists():                           # trained by another process meanwhile
            return json.loads(report.read_text())
        if numba_threads:
            import numba
            numba.set_num_threads(max(1, min(int(numba_threads), numba.config.NUMBA_NUM_THREADS)))
        resume = (folder / CHECKPOINT).exists()
        start = load_checkpoint(folder / CHECKPOINT).epoch if resume else 0
        with open(logs / f"{spec.name}.jsonl", "a") as fh:
            fh.write(json.dumps({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                 "host": socket.gethostname(), "pid": os.getpid(),
                                 "from_epoch": start}) + "\n")
        _reset_peak_rss()
        with open(logs / f"{spec.name}.log", "a") as fh:
            return train(spec.config, spec.method, folder, resume=resume, progress=fh,
                         data_dir=data_dir)


def run_state(root: Path, spec: RunSpec) -> str:
    """"finished" (report.json), "partial" (a checkpoint) or "new"."""
    from .train import CHECKPOINT, REPORT
    folder = Path(root) / RUNS / spec.name
    if (folder / REPORT).exists():
        return "finished"
    return "partial" if (folder / CHECKPOINT).exists() else "new"


def _write_json(path: Path, obj) -> None:
    from .train import _json_dump_atomic
    _json_dump_atomic(path, obj)


def run_sweep(runs, root, *, workers=None, scheduler=None, data_dir=None, local=False,
              echo=print) -> dict:
    """Train every unfinished run of ``runs`` (RunSpecs) under the sweep folder ``root``.

    ``local=True`` trains them one after another in this process (no Dask); otherwise each is a
    task of a Dask cluster: ``scheduler`` (an address) or an embedded LocalCluster of
    ``workers`` processes (default min(cores, runs to train)). Returns {run name: report or
    the exception that stopped it}; finished runs are read back, not trained again.
    """
    root = Path(root).absolute()
    states = {r.name: run_state(root, r) for r in runs}
    todo = [r for r in runs if states[r.name] != "finished"]
    if todo and not local:
        _dask()                                      # installed? (before anything is written)
    (root / RUNS).mkdir(parents=True, exist_ok=True)
    _write_json(root / SWEEP_JSON, {"runs": [r.as_dict() for r in runs]})
    n_partial = sum(states[r.name] == "partial" for r in todo)
    echo(f"{len(runs)} runs in {root}: {len(runs) - len(todo)} finished, {n_partial} to resume, "
         f"{len(todo) - n_partial} to start")
    results = {}
    if todo:
        args = [(r.as_dict(), str(root), None if data_dir is None else str(data_dir)) for r in todo]
        if local:
            for r, a in zip(todo, args):
                echo(f"training {r.name}")
                try:
                    results[r.name] = execute_run(*a)
                except RefsnnError as err:
                    results[r.name] = err
                _say_done(echo, r.name, results[r.name])
        else:
            results.update(_run_dask(todo, args, workers, scheduler, echo))
    from .train import REPORT
    for r in runs:
        if r.name not in results:
            results[r.name] = _read_report(root / RUNS / r.name / REPORT)
    return results


def _say_done(echo, name, result):
    if isinstance(result, BaseException):
        echo(f"FAILED {name}: {' '.join(str(result).split())}")
    else:
        echo(f"done {name}: test accuracy {100 * result['test_acc']:.2f}%")


def _dask():
    """dask.distributed, or a ConfigError saying how to install it."""
    try:
        import dask.distributed
    except ImportError:
        raise ConfigError("refsnn sweep runs its runs on Dask, which is not installed: pip "
                          "install 'refsnn[sweep]' (or 'dask[distributed]'); refsnn compare "
                          "runs without it") from None
    return dask.distributed


def _run_dask(todo, args, workers, scheduler, echo) -> dict:
    dd = _dask()
    Client, LocalCluster, as_completed = dd.Client, dd.LocalCluster, dd.as_completed
    import logging
    from . import cli  # noqa: F401  its threading policy (one BLAS thread) reaches the workers
    cluster = None
    if scheduler:
        if workers:
            echo("note: --workers applies to the embedded cluster only; the scheduler's workers "
                 "run the tasks")
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError, ValueError) as err:
            raise ConfigError(f"cannot reach the Dask scheduler {scheduler}: "
                              f"{' '.join(str(err).split())}; check the address "
                              "(tcp://HOST:8786) and that it runs") from None
        numba_threads = None
    else:
        cores = os.cpu_count() or 1
        n = workers or min(cores, len(todo))
        if n < 1:
            raise ConfigError(f"--workers {n}: give at least 1")
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               memory_limit=0, dashboard_address=None,
                               silence_logs=logging.ERROR)
        client = Client(cluster)
        numba_threads = max(1, cores // n)                # the workers share the cores
        echo(f"Dask LocalCluster: {n} worker processes, 1 task each, {numba_threads} numba "
             f"thread(s) per task")
    results = {}
    try:
        futures = {client.submit(execute_run, *a, numba_threads, key=f"refsnn-{r.name}",
                                 pure=False): r.name for r, a in zip(todo, args)}
        for fut in as_completed(futures):
            name = futures[fut]
            try:
                results[name] = fut.result()
            except RefsnnError as err:
                results[name] = err
            except Exception as err:                        # noqa: BLE001  KilledWorker etc.
                if type(err).__name__ != "KilledWorker":
                    raise
                results[name] = RefsnnError(f"workers died while training it ("
                                            f"{' '.join(str(err).split())}); rerun the sweep "
                                            "to resume it from its last checkpoint")
            _say_done(echo, name, results[name])
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return results


# --------------------------------------------------------------------------------------------
# Tables and plot
# --------------------------------------------------------------------------------------------

def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _std(xs):
    """Sample standard deviation (n - 1); None for fewer than two values."""
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def run_row(spec: RunSpec, rep: dict | None) -> dict:
    """One run's numbers (percent for accuracies); None where the run has no report."""
    c = spec.config
    row = {"name": spec.name, "method": spec.method, "settings": spec.label,
           "seed": spec.seed, "dataset": c.dataset, "arch": c.arch, "T": c.T,
           "epochs": c.epochs}
    if rep is None:
        return {**row, "test_acc_pct": None, "best_test_acc_pct": None,
                "spikes_per_sample": None, "seconds_per_epoch": None, "peak_rss_mb": None}
    return {**row, "test_acc_pct": 100 * rep["test_acc"],
            "best_test_acc_pct": 100 * rep["best_test_acc"],
            "spikes_per_sample": rep.get("spikes_per_sample"),
            "seconds_per_epoch": rep["seconds"] / rep["epochs"],
            "peak_rss_mb": rep.get("peak_rss_mb")}


def group_rows(runs, reports) -> list[dict]:
    """One row per group of runs differing only by seed, in the runs' order."""
    groups = {}
    for spec in runs:
        groups.setdefault(spec.group, []).append(spec)
    rows = []
    for specs in groups.values():
        rr = [run_row(s, reports.get(s.name)) for s in specs]
        done = [r for r in rr if r["test_acc_pct"] is not None]
        c = specs[0].config
        rows.append({
            "method": specs[0].method, "settings": specs[0].label, "dataset": c.dataset,
            "arch": c.arch, "T": c.T, "epochs": c.epochs, "runs": len(done),
            "runs_planned": len(specs), "seeds": " ".join(str(s.seed) for s in specs),
            "test_acc_pct_mean": _mean([r["test_acc_pct"] for r in done]),
            "test_acc_pct_std": _std([r["test_acc_pct"] for r in done]),
            "best_test_acc_pct_mean": _mean([r["best_test_acc_pct"] for r in done]),
            "spikes_per_sample_mean": _mean([r["spikes_per_sample"] for r in done]),
            "seconds_per_epoch_mean": _mean([r["seconds_per_epoch"] for r in done]),
            "peak_rss_mb_max": max([r["peak_rss_mb"] for r in done
                                    if r["peak_rss_mb"] is not None], default=None),
        })
    return rows


def _csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["method"])
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if v is None else (repr(v) if isinstance(v, float) else v)
                        for k, v in r.items()})
    os.replace(tmp, path)


def _f(v, fmt, none="–"):
    return none if v is None else format(v, fmt)


def _count(v):
    """Spike counts: whole numbers from 100 up, three significant digits below."""
    return "–" if v is None else format(v, ",.0f" if v >= 100 else ".3g")


def markdown_table(rows: list[dict], paper: dict | None = None) -> str:
    paper = paper or {}
    head = ["method", "settings", "dataset", "network", "T", "epochs", "runs",
            "test accuracy % (mean ± std)", "best %", "spikes / sample", "s / epoch",
            "peak memory MiB"] + (["paper"] if paper else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = _f(r["test_acc_pct_mean"], ".2f")
        if r["test_acc_pct_std"] is not None:
            acc += f" ± {r['test_acc_pct_std']:.2f}"
        runs = str(r["runs"]) if r["runs"] == r["runs_planned"] else \
            f"{r['runs']} of {r['runs_planned']}"
        cells = [r["method"], r["settings"] or "", r["dataset"], r["arch"], str(r["T"]),
                 str(r["epochs"]), runs, acc, _f(r["best_test_acc_pct_mean"], ".2f"),
                 _count(r["spikes_per_sample_mean"]), _f(r["seconds_per_epoch_mean"], ".3g"),
                 _f(r["peak_rss_mb_max"], ",.0f")]
        if paper:
            cells.append(paper.get(r["method"], ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(runs, reports: dict, root, paper=None, echo=print) -> dict:
    """results.md, results.csv (per group), runs.csv (per run), curves.png; returns the paths."""
    root = Path(root)
    reports = {k: v for k, v in reports.items() if isinstance(v, dict)}
    rows = group_rows(runs, reports)
    paths = {"md": root / "results.md", "csv": root / "results.csv",
             "runs_csv": root / "runs.csv"}
    note = ("test accuracy: the last epoch's, in %, mean ± sample std over seeds; best: the best "
            "epoch's (on the test set); spikes / sample: every spiking layer over all T steps, "
            "per test sample (last epoch); s / epoch: training + test evaluation; peak memory: "
            "peak resident memory of the process that trained the run, interpreter, numba and "
            "dataset included (largest over seeds).\n")
    text = "# Sweep results\n\n" + markdown_table(rows, paper) + "\n" + note
    tmp = paths["md"].with_name(f".results.md.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, paths["md"])
    _csv(paths["csv"], rows)
    _csv(paths["runs_csv"], [run_row(s, reports.get(s.name)) for s in runs])
    png = plot_curves(runs, root, root / "curves.png")
    if png is None:
        echo("note: matplotlib is not installed (extra `plot`): no curves.png")
    else:
        paths["png"] = png
    return paths


def _history(root: Path, spec: RunSpec) -> list[dict]:
    from .train import METRICS
    path = root / RUNS / spec.name / METRICS
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def plot_curves(runs, root, path):
    """Test accuracy per epoch, mean over each group's seeds (band: min to max); None when
    matplotlib is missing."""
    from .plots import Curve, draw_curves
    root = Path(root)
    groups = {}
    for spec in runs:
        groups.setdefault(spec.group, []).append(spec)
    curves = []
    for specs in groups.values():
        runs_acc = [[100 * r["test_acc"] for r in _history(root, s)] for s in specs]
        runs_acc = [c for c in runs_acc if c]
        if not runs_acc:
            continue
        cols = [[c[e] for c in runs_acc] for e in range(min(len(c) for c in runs_acc))]
        label = specs[0].method + (f" {specs[0].label}" if specs[0].label else "")
        band = len(runs_acc) > 1
        curves.append(Curve(label, [sum(v) / len(v) for v in cols],
                            lo=[min(v) for v in cols] if band else None,
                            hi=[max(v) for v in cols] if band else None))
    return draw_curves(curves, path)
