"""Golden vectors in HDF5: export random cases, re-check them, and compare another implementation.

The file schema is docs/oracle-format.md (``FORMAT_VERSION``). One case is one call of
:func:`refsnn.oracle.run_case`: its arguments (weights, inputs, label/target, biases, params) and
everything it returned (spikes, loss, grads and the method's intermediate quantities).

- :func:`export_cases` draws ``n`` random cases with :meth:`Method.random_case` and writes them.
- :func:`check_file` recomputes every case with refsnn and reports agreement.
- :func:`compare_impl` calls another implementation (same signature as ``run_case``) on every
  case and tabulates the error per quantity, and where the spikes first differ.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .errors import CheckpointError, ConfigError
from .methods import get_method
from .oracle import run_case

FORMAT_VERSION = 1
KIND = "refsnn-oracle"


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

def export_cases(method: str, path, n: int = 20, seed: int = 0, sizes=None, T=None,
                 fixed: dict | None = None) -> int:
    """Write ``n`` random cases of ``method`` (and run_case's answers) to ``path``, atomically.

    ``fixed`` pins parameters (e.g. ``{"variant": "code"}``) over the randomly drawn switches.
    """
    import h5py
    if n < 1:
        raise ConfigError(f"--cases {n} must be at least 1")
    m = get_method(method)
    rng = np.random.default_rng(seed)
    cases = [m.random_case(rng, sizes=sizes, T=T) for _ in range(n)]
    pinned = m.Params.from_dict(fixed or {})
    fixed = {k: getattr(pinned, k) for k in (fixed or {})}      # parsed and checked values
    for case in cases:
        case["params"] = {**case["params"], **(fixed or {})}
        m.Params.from_dict(case["params"])          # a bad pinned value is a ConfigError here
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigError(f"cannot write {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(kind=KIND, format_version=FORMAT_VERSION, method=m.name,
                           refsnn_version=__version__, seed=seed, n_cases=n)
            for ci, case in enumerate(cases):
                out = run_case(m.name, **case)
                g = f.create_group(f"cases/{ci:05d}")
                _write_case(g, case, out)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def _write_case(g, case: dict, out: dict):
    g.attrs["params"] = json.dumps(_jsonable(case.get("params") or {}))
    g.attrs["label"] = -1 if case.get("label") is None else int(case["label"])
    _write_list(g, "weights", case["weights"])
    g.create_dataset("inputs", data=np.asarray(case["inputs"], dtype=np.float64))
    if case.get("target") is not None:
        g.create_dataset("target", data=np.asarray(case["target"], dtype=np.float64))
    if case.get("biases") is not None:
        _write_list(g, "biases", case["biases"])
    e = g.create_group("expected")
    e.attrs["loss"] = float(out["loss"])
    for key, value in out.items():
        if key == "loss":
            continue
        if isinstance(value, (list, tuple)):
            _write_list(e, key, value)
        else:
            e.create_dataset(key, data=np.asarray(value, dtype=np.float64))


def _write_list(g, name, arrays):
    sub = g.create_group(name)
    sub.attrs["length"] = len(arrays)
    for i, a in enumerate(arrays):
        sub.create_dataset(str(i), data=np.asarray(a, dtype=np.float64))


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_jsonable(x) for x in np.asarray(v, dtype=object).tolist()] \
            if isinstance(v, np.ndarray) else [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

@dataclass
class Case:
    index: int
    args: dict          # keyword arguments of run_case (weights, inputs, label, target, biases, params)
    expected: dict      # spikes, loss, grads, ...


def read_cases(path) -> tuple[str, list[Case]]:
    """The method and the cases of an oracle file; a bad file raises a CheckpointError."""
    import h5py
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise CheckpointError(f"{path} is not a readable HDF5 file ({err}); it may be truncated "
                              "or not an oracle file: write one with `refsnn oracle export`") from None
    with f:
        if f.attrs.get("kind") != KIND:
            raise CheckpointError(f"{path} is an HDF5 file but not a refsnn oracle file "
                                  f"(attribute kind={f.attrs.get('kind')!r}, expected {KIND!r})")
        version = int(f.attrs.get("format_version", -1))
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{path} has format_version {version}, newer than this refsnn "
                                  f"reads ({FORMAT_VERSION}); upgrade refsnn")
        if version < 1:
            raise CheckpointError(f"{path} has no valid format_version attribute")
        method = str(f.attrs["method"])
        cases = []
        for name in sorted(f.get("cases", {})):
            g = f["cases"][name]
            try:
                cases.append(_read_case(int(name), g))
            except KeyError as err:
                raise CheckpointError(f"{path}: case {name} lacks the field {err.args[0]!r}; "
                                      "the file is incomplete (re-export it)") from None
        if not cases:
            raise CheckpointError(f"{path} holds no cases")
    return method, cases


def _read_list(g):
    if "length" not in g.attrs:
        raise KeyError(g.name.rsplit("/", 1)[-1])
    return [np.array(g[str(i)]) for i in range(int(g.attrs["length"]))]


def _read_case(index, g) -> Case:
    for key in ("weights", "inputs", "expected"):
        if key not in g:
            raise KeyError(key)
    if "params" not in g.attrs or "label" not in g.attrs:
        raise KeyError("params" if "params" not in g.attrs else "label")
    label = int(g.attrs["label"])
    args = {"weights": _read_list(g["weights"]), "inputs": np.array(g["inputs"]),
            "label": None if label < 0 else label,
            "target": np.array(g["target"]) if "target" in g else None,
            "biases": _read_list(g["biases"]) if "biases" in g else None,
            "params": json.loads(g.attrs["params"])}
    e = g["expected"]
    if "loss" not in e.attrs:
        raise KeyError("expected/loss")
    expected = {"loss": float(e.attrs["loss"])}
    for key in e:
        expected[key] = _read_list(e[key]) if hasattr(e[key], "keys") else np.array(e[key])
    for key in ("spikes", "grads"):
        if key not in expected:
            raise KeyError(f"expected/{key}")
    return Case(index, args, expected)


# --------------------------------------------------------------------------------------------
# comparing
# --------------------------------------------------------------------------------------------

@dataclass
class QuantityStats:
    name: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    worst_case: int = -1
    cases: int = 0


@dataclass
class Comparison:
    method: str
    n_cases: int
    stats: dict = field(default_factory=dict)          # name -> QuantityStats
    spike_mismatch: list = field(default_factory=list)  # (case, layer, t, neuron)
    errors: list = field(default_factory=list)          # (case, message)
    missing: set = field(default_factory=set)           # quantities the other impl did not return

    def passed(self, rtol: float) -> bool:
        return (not self.errors and not self.spike_mismatch
                and all(s.max_rel <= rtol for s in self.stats.values()))

    def table(self, rtol: float) -> str:
        lines = [f"{self.method}: {self.n_cases} cases; rule: spikes equal, loss and arrays within "
                 f"rtol {rtol:g} of each case's largest magnitude",
                 f"{'quantity':<12} {'cases':>5} {'max abs err':>12} {'max rel err':>12} {'worst case':>10}  ok"]
        for s in self.stats.values():
            lines.append(f"{s.name:<12} {s.cases:>5} {s.max_abs:>12.3e} {s.max_rel:>12.3e} "
                         f"{s.worst_case:>10}  {'yes' if s.max_rel <= rtol else 'NO'}")
        if self.spike_mismatch:
            c, l, t, i = self.spike_mismatch[0]
            lines.append(f"spikes differ in {len(self.spike_mismatch)} case(s); first: case {c}, "
                         f"layer {l + 1}, t={t}, neuron {i} (every quantity after a forward "
                         "mismatch differs too)")
        else:
            lines.append("spikes: equal in every case")
        for c, msg in self.errors:
            lines.append(f"case {c}: the implementation raised {msg}")
        if self.missing:
            lines.append(f"not returned by the implementation: {', '.join(sorted(self.missing))}")
        return "\n".join(lines)


def load_impl(spec: str):
    """``module:function`` (module importable from the current folder too) -> the callable."""
    if ":" not in spec:
        raise ConfigError(f"--impl {spec!r} must be 'module:function', e.g. mypkg.snn:run_case")
    mod, fn = spec.split(":", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod)
    except Exception as err:     # noqa: BLE001 - any import failure is the user's to fix
        raise ConfigError(f"--impl {spec!r}: cannot import {mod!r} ({type(err).__name__}: {err})") from None
    if not callable(getattr(module, fn, None)):
        raise ConfigError(f"--impl {spec!r}: {mod!r} has no function {fn!r}")
    return getattr(module, fn)


def compare_impl(path, impl, quantities=None) -> Comparison:
    """Call ``impl(method, weights, inputs, label=, target=, biases=, params=)`` on every case."""
    method, cases = read_cases(path)
    comp = Comparison(method, len(cases))
    for case in cases:
        try:
            got = impl(method, [w.copy() for w in case.args["weights"]], case.args["inputs"].copy(),
                       label=case.args["label"], target=case.args["target"],
                       biases=case.args["biases"], params=dict(case.args["params"]))
        except Exception as err:   # noqa: BLE001 - reported per case, the run goes on
            comp.errors.append((case.index, f"{type(err).__name__}: {err}"))
            continue
        _accumulate(comp, case, got, quantities)
    return comp


def check_file(path) -> Comparison:
    """Recompute every case with refsnn's own run_case."""
    return compare_impl(path, run_case)


def _accumulate(comp: Comparison, case: Case, got: dict, quantities):
    exp = case.expected
    scale = max([1e-3, abs(exp["loss"])] + [float(np.max(np.abs(g))) if np.size(g) else 0.0
                                            for g in exp["grads"]])
    sp_e, sp_g = exp["spikes"], got.get("spikes")
    if sp_g is None:
        comp.missing.add("spikes")
    else:
        for l, (a, b) in enumerate(zip(sp_e, sp_g)):
            b = np.asarray(b, dtype=np.float64)
            if a.shape != b.shape or not np.array_equal(a, b):
                idx = (0, 0) if a.shape != b.shape else tuple(np.argwhere(a != b)[0])
                comp.spike_mismatch.append((case.index, l, int(idx[0]), int(idx[1])))
                break
    for name in exp:
        if name == "spikes" or (quantities and name not in quantities):
            continue
        if name not in got:
            comp.missing.add(name)
            continue
        try:
            e = exp[name] if isinstance(exp[name], list) else [exp[name]]
            g = got[name] if isinstance(got[name], (list, tuple)) else [got[name]]
            err = max(float(np.max(np.abs(np.asarray(a, float) - np.asarray(b, float))))
                      if np.size(a) else 0.0 for a, b in zip(e, g)) if e else 0.0
            if len(e) != len(g):
                err = float("inf")
        except ValueError:      # shapes that do not broadcast
            err = float("inf")
        if name not in ("loss", "grads", "grads_b"):     # other quantities: their own magnitude too
            err = err / max(1.0, max((float(np.max(np.abs(np.asarray(a, float)))) if np.size(a)
                                      else 0.0 for a in e), default=0.0) / scale)
        s = comp.stats.setdefault(name, QuantityStats(name))
        s.cases += 1
        if err / scale >= s.max_rel:
            s.max_rel, s.worst_case = err / scale, case.index
        s.max_abs = max(s.max_abs, err)
