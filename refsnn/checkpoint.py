"""HDF5 checkpoints of a training run: written atomically, read back with checks.

A checkpoint holds everything a run needs to continue bit for bit: the method and its
hyper-parameters, the TrainConfig, every layer array, the optimizer state, the random generator's
state, the epoch and the metrics so far. It is written to a temporary file in the same folder and
then renamed over the old one (``os.replace``), so a crash or a full disk during the write leaves
the previous checkpoint intact and no partial file behind.

Schema (``format = "refsnn-checkpoint"``, ``format_version = 1``)::

    /                       attrs: format, format_version, refsnn_version, created (ISO 8601),
                                   method, arch, dtype, epoch (epochs completed),
                                   elapsed_s (training seconds so far),
                                   config (JSON: the TrainConfig, method params under "params"),
                                   rng_state (JSON: numpy bit_generator.state, or "null"),
                                   best, last (JSON: metrics of the best and the last epoch)
    /history                scalar string dataset: JSON list of the per-epoch metrics
    /params                 attrs: the method's hyper-parameters by refsnn name (None as "None";
                                   the exact values are the JSON in /config)
    /layers/<l>             attrs: kind, describe, param_names, buffer_names (JSON lists)
    /layers/<l>/<name>      one dataset per trainable array (W, b, ...) and per state buffer
                            (running_mean, ...), in the layer's order
    /optimizer              attrs: name, k (steps taken), hyper (JSON); absent when none saved
    /optimizer/<buf>/<i>    the buffers (m, v or momentum_buffer), one per network array i
    /sample_state           the method's per-sample state over the training set (HM2-BP's
                            boosting weights β_n, Method.init_sample_state); absent when none

The file starts with a 512-byte HDF5 user block (ignored by HDF5 readers such as h5py and h5dump)
holding three text lines: ``refsnn-checkpoint``, ``format_version N`` and ``sha256 <hex>``, the
SHA-256 of every byte after the user block. ``load_checkpoint`` checks that header and the digest
BEFORE the HDF5 library parses the file, so a truncated or damaged file is refused with a clear
message (the HDF5 C library may crash on damaged input) and never yields altered values. It then
validates the format, the version and every array's presence and shape and
raises :class:`refsnn.errors.CheckpointError` with the file's name and what is wrong.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .errors import CheckpointError, RefsnnError

FORMAT = "refsnn-checkpoint"
FORMAT_VERSION = 1
USERBLOCK = 512
_MAGIC = FORMAT.encode() + b"\n"
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _sha256_after_userblock(fh) -> str:
    fh.seek(USERBLOCK)
    h = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def _seal(path) -> None:
    """Write the user-block header (magic, version, SHA-256 of the rest) and fsync the file."""
    with open(path, "r+b") as fh:
        digest = _sha256_after_userblock(fh)
        head = _MAGIC + f"format_version {FORMAT_VERSION}\nsha256 {digest}\n".encode()
        fh.seek(0)
        fh.write(head.ljust(USERBLOCK, b"\0"))
        fh.flush()
        os.fsync(fh.fileno())


def _verify(path: Path) -> None:
    """Check the header and the digest without parsing HDF5; raise a CheckpointError if off."""
    with open(path, "rb") as fh:
        head = fh.read(USERBLOCK)
        if not head.startswith(_MAGIC):
            if head.startswith(_HDF5_SIGNATURE):
                raise CheckpointError(f"{path} is an HDF5 file but not a refsnn checkpoint (it "
                                      f"has no {FORMAT!r} header)")
            raise CheckpointError(f"{path} is not a refsnn checkpoint (no {FORMAT!r} header); "
                                  "pass the checkpoint.h5 of a run folder")
        lines = head[len(_MAGIC):].split(b"\0", 1)[0].decode("ascii", "replace").splitlines()
        fields = dict(ln.split(" ", 1) for ln in lines if " " in ln)
        try:
            version = int(fields.get("format_version", ""))
        except ValueError:
            raise CheckpointError(f"{path} is damaged: its header has no valid format_version "
                                  "(truncated or corrupt file)") from None
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{path} has format_version {version}, newer than this refsnn "
                                  f"reads ({FORMAT_VERSION}); upgrade refsnn")
        if len(head) < USERBLOCK or fields.get("sha256") != _sha256_after_userblock(fh):
            raise CheckpointError(f"{path} is damaged: its contents do not match the checksum in "
                                  "its header (truncated or corrupt file; a checkpoint is "
                                  "rewritten every epoch, so use an intact copy)")


def _h5py():
    import h5py
    return h5py


def to_jsonable(value):
    """Tuples -> lists, numpy scalars and arrays -> Python numbers and lists (for json.dumps)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _dumps(value) -> str:
    return json.dumps(to_jsonable(value), sort_keys=True)


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` reads back (the file's name in ``path``)."""

    path: str
    method: str
    arch: str
    dtype: str
    config: dict
    epoch: int
    layers: list                  # per layer: {"kind", "param_names", "params", "buffer_names", "buffers"}
    optimizer: dict | None        # Optimizer.state_dict() form
    rng_state: dict | None
    history: list = field(default_factory=list)
    best: dict | None = None
    last: dict | None = None
    elapsed_s: float = 0.0
    refsnn_version: str = ""
    format_version: int = FORMAT_VERSION
    sample_state: np.ndarray | None = None   # /sample_state (absent in older files: None)

    @property
    def params(self) -> dict:
        return dict(self.config.get("params", {}))


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def save_checkpoint(path, net, config, *, optimizer=None, rng=None, epoch: int = 0,
                    history=(), best=None, last=None, elapsed_s: float = 0.0,
                    sample_state=None) -> Path:
    """Write ``net`` (a Network) and the run state to ``path`` atomically; returns the path.

    ``config`` is the run's TrainConfig (or a dict of it); its ``params`` are replaced by the
    network's full parameter record so the file names every hyper-parameter. ``sample_state``:
    the method's per-sample array over the training set, if it keeps one (stored as is).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    cfg = dict(config.as_dict() if hasattr(config, "as_dict") else config)
    cfg["params"] = net.p.as_dict()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as err:
        raise RefsnnError(f"cannot write a checkpoint in {folder}: {err.strerror or err}; "
                          "choose a writable --out folder") from None
    os.close(fd)
    try:
        _write(tmp, net, cfg, optimizer, rng, epoch, list(history), best, last, elapsed_s,
               sample_state)
        _seal(tmp)                                 # header + digest, fsync'd before the rename
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _write(tmp, net, cfg, optimizer, rng, epoch, history, best, last, elapsed_s,
           sample_state=None):
    h5py = _h5py()
    with h5py.File(tmp, "w", userblock_size=USERBLOCK) as f:
        a = f.attrs
        a["format"] = FORMAT
        a["format_version"] = FORMAT_VERSION
        a["refsnn_version"] = __version__
        a["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        a["method"] = net.method.name
        a["arch"] = str(net.arch or "")
        a["dtype"] = np.dtype(net.dtype).name
        a["epoch"] = int(epoch)
        a["elapsed_s"] = float(elapsed_s)
        a["config"] = _dumps(cfg)
        a["rng_state"] = _dumps(rng.bit_generator.state if rng is not None else None)
        a["best"] = _dumps(best)
        a["last"] = _dumps(last)
        f.create_dataset("history", data=_dumps(history))
        g = f.create_group("params")
        for k, v in net.p.as_dict().items():
            g.attrs[k] = _attr_value(v)
        lg = f.create_group("layers")
        for li, layer in enumerate(net.layers):
            sub = lg.create_group(str(li))
            pnames = list(getattr(layer, "param_names", []))
            bnames = list(getattr(layer, "buffer_names", []))
            sub.attrs["kind"] = str(getattr(layer, "kind", type(layer).__name__))
            sub.attrs["describe"] = layer.describe() if hasattr(layer, "describe") else ""
            sub.attrs["param_names"] = json.dumps(pnames)
            sub.attrs["buffer_names"] = json.dumps(bnames)
            for name, arr in zip(pnames, layer.params):
                _array(sub, name, arr)
            for name, arr in zip(bnames, getattr(layer, "buffers", [])):
                _array(sub, name, arr)
        if optimizer is not None:
            st = optimizer.state_dict()
            og = f.create_group("optimizer")
            og.attrs["name"] = st["name"]
            og.attrs["k"] = int(st["k"])
            og.attrs["hyper"] = _dumps(st["hyper"])
            for bname, arrs in st["buffers"].items():
                bg = og.create_group(bname)
                for i, arr in enumerate(arrs):
                    _array(bg, str(i), arr)
        if sample_state is not None:
            _array(f, "sample_state", sample_state)


def _array(group, name, arr):
    group.create_dataset(name, data=np.ascontiguousarray(arr))


def _attr_value(v):
    """An HDF5-storable form of a hyper-parameter value (for reading with other tools)."""
    if v is None:
        return "None"
    if isinstance(v, (tuple, list)):
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            return np.asarray(v, dtype=np.float64)
        return json.dumps(to_jsonable(v))
    return v


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def load_checkpoint(path) -> Checkpoint:
    """Read and validate a checkpoint; any problem raises a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}" + (" (it is a folder; pass the "
                              "checkpoint.h5 inside it)" if path.is_dir() else ""))
    _verify(path)
    h5py = _h5py()
    try:
        f = h5py.File(path, "r")
    except (OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable HDF5 file ({_short(err)}); it may be "
                              "truncated or corrupt, or not a refsnn checkpoint") from None
    try:
        with f:
            return _read(path, f)
    except CheckpointError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path} is damaged: {_short(err)}; the file is truncated or "
                              "corrupt (a checkpoint is rewritten every epoch; use an intact "
                              "copy)") from None


def _short(err) -> str:
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__


def _read(path: Path, f) -> Checkpoint:
    a = f.attrs
    fmt = a.get("format")
    if fmt is None or _str(fmt) != FORMAT:
        raise CheckpointError(f"{path} is an HDF5 file but not a refsnn checkpoint (its 'format' "
                              f"attribute is {None if fmt is None else _str(fmt)!r}, expected "
                              f"{FORMAT!r})")
    version = int(a.get("format_version", -1))
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {version}, newer than this refsnn "
                              f"reads ({FORMAT_VERSION}); upgrade refsnn")
    if version < 1:
        raise CheckpointError(f"{path} has an invalid format_version {version}")
    need = ("method", "arch", "dtype", "epoch", "config", "rng_state")
    missing = [k for k in need if k not in a] + [g for g in ("layers", "history") if g not in f]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; the file is incomplete or "
                              "corrupt")
    hist = _str(f["history"][()])
    config = json.loads(_str(a["config"]))
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: the config attribute is not a JSON object")
    layers = []
    lg = f["layers"]
    n_layers = len(lg.keys())
    if sorted(lg.keys(), key=int) != [str(i) for i in range(n_layers)]:
        raise CheckpointError(f"{path}: layer groups {sorted(lg.keys())} are not 0..{n_layers - 1}")
    for li in range(n_layers):
        sub = lg[str(li)]
        pnames = json.loads(_str(sub.attrs["param_names"]))
        bnames = json.loads(_str(sub.attrs["buffer_names"]))
        absent = [n for n in pnames + bnames if n not in sub]
        if absent:
            raise CheckpointError(f"{path}: layer {li} lacks its array(s) {', '.join(absent)}")
        layers.append({"kind": _str(sub.attrs["kind"]), "param_names": pnames,
                       "params": [np.array(sub[n][()]) for n in pnames],
                       "buffer_names": bnames,
                       "buffers": [np.array(sub[n][()]) for n in bnames]})
    optimizer = None
    if "optimizer" in f:
        og = f["optimizer"]
        n_arrays = sum(len(layer["params"]) for layer in layers)
        buffers = {}
        for bname in og.keys():
            bg = og[bname]
            if sorted(bg.keys(), key=int) != [str(i) for i in range(n_arrays)]:
                raise CheckpointError(f"{path}: optimizer buffer {bname!r} holds "
                                      f"{len(bg.keys())} arrays; the network has {n_arrays}")
            buffers[bname] = [np.array(bg[str(i)][()]) for i in range(n_arrays)]
        optimizer = {"name": _str(og.attrs["name"]), "k": int(og.attrs["k"]),
                     "hyper": json.loads(_str(og.attrs["hyper"])), "buffers": buffers}
    return Checkpoint(
        path=str(path), method=_str(a["method"]), arch=_str(a["arch"]), dtype=_str(a["dtype"]),
        config=config, epoch=int(a["epoch"]), layers=layers, optimizer=optimizer,
        rng_state=json.loads(_str(a["rng_state"])),
        history=json.loads(hist),
        best=json.loads(_str(a.get("best", "null"))), last=json.loads(_str(a.get("last", "null"))),
        elapsed_s=float(a.get("elapsed_s", 0.0)), refsnn_version=_str(a.get("refsnn_version", "")),
        format_version=version,
        sample_state=np.array(f["sample_state"][()]) if "sample_state" in f else None)


def _str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# --------------------------------------------------------------------------------------------
# Back into a network
# --------------------------------------------------------------------------------------------

def load_into(net, ck: Checkpoint) -> None:
    """Copy the checkpoint's arrays into ``net`` in place, checking kinds and shapes."""
    if len(net.layers) != len(ck.layers):
        raise CheckpointError(f"{ck.path} holds {len(ck.layers)} layers; the network "
                              f"{net.arch!r} has {len(net.layers)}")
    for li, (layer, saved) in enumerate(zip(net.layers, ck.layers)):
        pairs = list(zip(layer.params, saved["params"])) + \
            list(zip(getattr(layer, "buffers", []), saved["buffers"]))
        if len(saved["params"]) != len(layer.params) or \
                len(saved["buffers"]) != len(getattr(layer, "buffers", [])):
            raise CheckpointError(f"{ck.path}: layer {li} ({saved['kind']}) holds "
                                  f"{saved['param_names'] + saved['buffer_names']}, the network's "
                                  f"layer {layer.describe()} has other arrays")
        for live, arr in pairs:
            if live.shape != arr.shape:
                raise CheckpointError(f"{ck.path}: layer {li} array of shape {arr.shape} does not "
                                      f"fit the network's {live.shape}")
            live[...] = arr


def network_from_checkpoint(ck: Checkpoint):
    """A Network rebuilt from the checkpoint's method, params, architecture and dtype."""
    from .network import Network
    net = Network.build(ck.arch, ck.method, ck.params, rng=np.random.default_rng(0),
                        dtype=np.dtype(ck.dtype))
    load_into(net, ck)
    return net
