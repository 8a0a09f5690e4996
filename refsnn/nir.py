"""NIR (Neuromorphic Intermediate Representation) export and import of a Network.

NIR (Pedersen et al., Nat. Commun. 2024; the ``nir`` package, optional extra ``nir``) describes a
network as a graph of linear maps and continuous-time neurons. refsnn's methods are discrete-time,
so the export fixes a time step ``dt`` and an integration rule, and the import reads them back
(docs/nir.md has the full table). One neuron population of refsnn runs, per step t,

    v[t] = β·v_post[t-1] + g·I[t],    z[t] = 1[v[t] > V_th],    v_post[t] = (1 - z[t])·v[t]

(hard reset to 0 in the same step; STBP's u[t] = τ(1 - o[t-1])·u[t-1] + I[t] is this form). Its NIR
node is LIF(tau, r, v_leak = 0, v_threshold = V_th, v_reset = 0) with

    rule "euler" (default; snnTorch's and SpikingJelly's exports):  β = 1 - dt/tau
    rule "exact" (zero-order hold):                                  β = exp(-dt/tau)
    input gain, both rules:                                          g = r·(1 - β)

so a method's per-step decay β becomes tau = dt/(1 - β) (euler) or -dt/ln β (exact), and
r = g/(1 - β).
β = 1 (no leak) is an IF node (g = r·dt). A population without threshold (a PSP trace, an output
accumulator) is an LI node (or I for β = 1) with the same mapping.

Per method (each spiking layer after its Affine/Linear or Conv2d node):

- stbp: LIF(β = decay, g = 1, V_th per layer). NIR cannot carry reset_form 'exp' (S3) nor
  strict=false (S4, u >= V_th): export raises ConfigError naming them.
- bpsta: LIF(β = decay, g = 1, V_th). Not carried: fire_on_equal (u >= V_th), relu_current,
  BatchNorm2d and max pooling layers.
- spikebp: hidden LIF(β = λ, g = 1, V_th per hidden layer); spiking pool = AvgPool2d + IF(g = 1,
  θ_p); output accumulator (F5: U[t] = λ(U[t-1] + I[t])) = LI(β = λ, g = λ).
- tsslbp: LIF(β = 1 - 1/τ_m, g = 1, V_th per layer) then LI(β = 1 - 1/τ_s, g = 1/τ_s), the PSP of
  E4 (E1's input PSP is an LI after the Input node); sum pooling E16 = SumPool2d + Scale(θ_pool).
  A graph that writes each synapse as CubaLIF (tau_syn, tau_mem, w_in = 1, current used in the
  same step) imports too: by linearity its filter is the PSP of the layer below.
- hm2bp: not mapped: NIR has no refractory period (t_ref, spec hm2bp 2.1 step 5), and refsnn maps
  neither its lateral inhibition nor its one-step synaptic delay.

NIR carries no surrogate, loss, target, encoding, T or optimizer. The graph's metadata holds dt,
the rule and the conventions, and a ``refsnn`` JSON record (method, every hyper-parameter, arch),
so a refsnn file round-trips exactly; a foreign file needs ``dt`` (snnTorch and SpikingJelly
exports use 1e-4 but do not record it).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .errors import ConfigError, DataError, RefsnnError
from .methods.base import per_layer

DEFAULT_DT = 1e-4          # seconds; the NIR paper's and snnTorch's choice
RULES = ("euler", "exact")
KIND = "refsnn-nir"
FORMAT_VERSION = 1
MAPPED = ("stbp", "bpsta", "spikebp", "tsslbp")


def _nir():
    try:
        import nir
    except ImportError:
        raise ConfigError("NIR support needs the 'nir' package: pip install nir "
                          "(or pip install refsnn[nir])") from None
    return nir


# --------------------------------------------------------------------------------------------
# A neuron population as refsnn runs it (the discrete-time side of the mapping)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    """v[t] = beta·v_post[t-1] + gain·I[t]; fires, resetting to 0, when v > v_th (None: never)."""
    beta: float
    gain: float
    v_th: float | None
    role: str              # "neuron", "psp", "input_psp", "pool", "readout"


def _close(a, b, rtol=1e-12):
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= rtol * max(1.0, abs(a), abs(b))


def method_cells(net) -> tuple[Cell | None, list]:
    """(input cell or None, per layer: list of cells after it) for ``net``'s method and params.

    Raises ConfigError naming what NIR cannot carry.
    """
    m, p, layers = net.method.name, net.p, net.layers
    _check_exportable(m, p, layers)
    spiking = [li for li, layer in enumerate(layers) if net.method.has_neurons(layer)]
    n = len(spiking)
    cells = [[] for _ in layers]
    first = None
    if m == "tsslbp" and p.input_psp:
        first = Cell(1.0 - p.theta_s, p.theta_s, None, "input_psp")                   # E1
    if m == "spikebp":
        lif = [li for li in spiking[:-1] if not layers[li].kind.endswith("pool")]
    for k, li in enumerate(spiking):
        if m == "stbp":
            cells[li] = [Cell(float(p.decay), 1.0, per_layer(p.v_th, k, n, "v_th", m), "neuron")]
        elif m == "bpsta":
            cells[li] = [Cell(float(p.decay), 1.0, float(p.v_th), "neuron")]
        elif m == "spikebp":
            if li == spiking[-1]:
                cells[li] = [Cell(p.lam, p.lam, None, "readout")]                     # F5
            elif layers[li].kind.endswith("pool"):
                cells[li] = [Cell(1.0, 1.0, float(p.v_th_pool), "pool")]              # B9
            else:
                cells[li] = [Cell(p.lam, 1.0, p.v_th_of(lif.index(li), len(lif)), "neuron")]
        elif m == "tsslbp":
            cells[li] = [Cell(1.0 - p.theta_m, 1.0, per_layer(p.v_th, k, n, "v_th", m), "neuron"),
                         Cell(1.0 - p.theta_s, p.theta_s, None, "psp")]               # E2-E4
    return first, cells


def _check_exportable(m, p, layers):
    why = _unsupported(m, p, layers)
    if why:
        raise ConfigError(f"cannot export to NIR: {why}")


def _unsupported(m, p, layers):
    """Why NIR cannot carry method ``m`` with params ``p`` and these layers (None: it can)."""
    why = None
    if m == "hm2bp":
        t_ref = getattr(p, "t_ref", 0)
        why = (f"hm2bp t_ref={t_ref}: NIR neurons have no refractory period (spec hm2bp 2.1 "
               "step 5)" if int(t_ref) > 0 else
               "hm2bp: refsnn does not map its one-step synaptic delay per layer and its "
               "leak-before-input order (spec hm2bp 2.1) to NIR")
        if float(getattr(p, "w_lat", 0.0)) != 0.0:
            why += f"; nor its lateral inhibition w_lat={p.w_lat}"
    elif m not in MAPPED:
        why = f"method {m!r} has no NIR mapping in refsnn"
    elif m == "stbp":
        if p.reset_form != "linear":
            why = ("stbp reset_form='exp' (S3: f(o) = τ·exp(-o/τ)) keeps τe^{-1/τ}·u after a "
                   "spike; NIR's LIF resets to v_reset: only reset_form 'linear' is exported")
        elif not p.strict:
            why = "stbp strict=false (S4: fire on u >= V_th); NIR fires on v > v_threshold"
        elif p.relax:
            why = "stbp relax=true (smooth forward o = H_k(u - V_th)); NIR neurons emit spikes"
    elif m == "bpsta":
        if p.fire_on_equal:
            why = ("bpsta fire_on_equal=true (u >= v_th); NIR fires on v > v_threshold: "
                   "set fire_on_equal false to export")
        elif p.relu_current:
            why = "bpsta relu_current=true (ReLU on the input current) has no NIR node"
    if why is None:
        for li, layer in enumerate(layers):
            if layer.kind in ("batchnorm", "maxpool"):
                why = (f"layer {li} ({layer.describe()}) has no NIR node "
                       f"({'BatchNorm2d' if layer.kind == 'batchnorm' else 'max pooling'})")
                break
    return why


# --------------------------------------------------------------------------------------------
# Cells <-> NIR neuron nodes
# --------------------------------------------------------------------------------------------

def _tau(beta, dt, rule, where):
    if rule == "euler":
        return dt / (1.0 - beta)
    if beta <= 0.0:
        raise ConfigError(f"{where}: decay {beta} has no time constant under the exact rule "
                          "(exp(-dt/tau) > 0); use integration 'euler'")
    return -dt / math.log(beta)


def _beta(tau, dt, rule):
    return 1.0 - dt / tau if rule == "euler" else math.exp(-dt / tau)


def cell_node(cell: Cell, shape, dt, rule, where):
    nir = _nir()
    full = lambda v: np.full(shape, float(v), dtype=np.float64)      # noqa: E731
    if cell.beta == 1.0:
        r = full(cell.gain / dt)
        if cell.v_th is None:
            return nir.I(r=r)
        return nir.IF(r=r, v_threshold=full(cell.v_th), v_reset=full(0.0))
    tau = _tau(cell.beta, dt, rule, where)
    r = cell.gain / (1.0 - cell.beta)
    if cell.v_th is None:
        return nir.LI(tau=full(tau), r=full(r), v_leak=full(0.0))
    return nir.LIF(tau=full(tau), r=full(r), v_leak=full(0.0), v_threshold=full(cell.v_th),
                   v_reset=full(0.0))


def _uniform(node, name, field, value=None):
    """The one value of a per-neuron parameter array (DataError naming node/parameter if not)."""
    a = np.asarray(value if value is not None else getattr(node, field), dtype=np.float64)
    if a.size == 0 or not np.all(np.isfinite(a)):
        raise DataError(f"NIR node {name!r}: parameter {field} is empty or not finite")
    v = float(a.flat[0])
    if not np.all(a == v):
        raise DataError(f"NIR node {name!r}: parameter {field} differs between neurons "
                        f"({a.min():g} .. {a.max():g}); refsnn's methods use one value per layer")
    return v


def _zero(node, name, field):
    if getattr(node, field, None) is None:
        return
    v = _uniform(node, name, field)
    if v != 0.0:
        raise DataError(f"NIR node {name!r}: {field}={v:g}; refsnn's neurons rest and reset at "
                        f"0, so {field} must be 0")


def node_cell(node, name, dt, rule) -> Cell:
    """NIR neuron node -> Cell; a CubaLIF gives its membrane cell (its synapse: _cuba_psp)."""
    t = type(node).__name__
    if t in ("LIF", "LI"):
        _zero(node, name, "v_leak")
        if t == "LIF":
            _zero(node, name, "v_reset")
        tau = _uniform(node, name, "tau")
        if tau <= 0:
            raise DataError(f"NIR node {name!r}: tau={tau:g} must be > 0")
        beta = _beta(tau, dt, rule)
        gain = _uniform(node, name, "r") * (1.0 - beta)
        v_th = _uniform(node, name, "v_threshold") if t == "LIF" else None
        return Cell(beta, gain, v_th, "")
    if t in ("IF", "I"):
        if t == "IF":
            _zero(node, name, "v_reset")
        gain = _uniform(node, name, "r") * dt
        return Cell(1.0, gain, _uniform(node, name, "v_threshold") if t == "IF" else None, "")
    if t == "CubaLIF":
        _zero(node, name, "v_leak")
        _zero(node, name, "v_reset")
        tau = _uniform(node, name, "tau_mem")
        beta = _beta(tau, dt, rule)
        return Cell(beta, _uniform(node, name, "r") * (1.0 - beta),
                    _uniform(node, name, "v_threshold"), "")
    raise DataError(f"NIR node {name!r} of type {t} is not a neuron refsnn can map")


def _cuba_psp(node, name, dt, rule) -> Cell:
    """The synaptic filter of a CubaLIF as a PSP cell: I[t] = β_s·I[t-1] + (1 - β_s)·w_in·S[t]."""
    tau_s = _uniform(node, name, "tau_syn")
    beta = _beta(tau_s, dt, rule)
    return Cell(beta, (1.0 - beta) * _uniform(node, name, "w_in"), None, "psp")


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

def to_graph(net, dt: float = DEFAULT_DT, integration: str = "euler"):
    """The nir.NIRGraph of ``net`` (a refsnn Network)."""
    nir = _nir()
    dt, integration = _check_dt(dt, integration)
    first, cells = method_cells(net)
    nodes, order = {}, []

    def add(name, node):
        nodes[name] = node
        order.append(name)

    add("input", nir.Input(input_type={"input": np.array(net.in_shape)}))
    if first is not None:
        add("input.psp", cell_node(first, net.in_shape, dt, integration, "input PSP"))
    for li, layer in enumerate(net.layers):
        name = f"layer{li}"
        f64 = [np.array(a, dtype=np.float64) for a in layer.params]
        if layer.kind == "dense":
            add(name, nir.Affine(weight=f64[0], bias=f64[1]) if len(f64) > 1
                else nir.Linear(weight=f64[0]))
        elif layer.kind == "conv":
            add(name, nir.Conv2d(input_shape=tuple(layer.in_shape[1:]), weight=f64[0],
                                 stride=(layer.stride, layer.stride),
                                 padding=(layer.padding, layer.padding), dilation=(1, 1),
                                 groups=1,
                                 bias=f64[1] if len(f64) > 1 else np.zeros(layer.out_shape[0])))
        elif layer.kind in ("avgpool", "spikepool"):
            add(name, nir.AvgPool2d(kernel_size=np.array([layer.k] * 2),
                                    stride=np.array([layer.k] * 2), padding=np.array([0, 0])))
        elif layer.kind == "sumpool":                                           # tsslbp E16
            add(name, nir.SumPool2d(kernel_size=np.array([layer.k] * 2),
                                    stride=np.array([layer.k] * 2), padding=np.array([0, 0])))
            add(f"{name}.scale", nir.Scale(scale=np.full(layer.out_shape, layer.theta_pool)))
        elif layer.kind == "flatten":
            add(name, nir.Flatten(input_type={"input": np.array(layer.in_shape)}, start_dim=0,
                                  end_dim=-1))
        else:
            raise ConfigError(f"cannot export to NIR: layer {li} ({layer.describe()}) has no "
                              "NIR node")
        for cell in cells[li]:
            suffix = {"neuron": "lif", "pool": "if", "readout": "li", "psp": "psp"}[cell.role]
            add(f"{name}.{suffix}", cell_node(cell, tuple(layer.out_shape), dt, integration,
                                              f"layer {li} {cell.role}"))
    add("output", nir.Output(output_type={"output": np.array(net.layers[-1].out_shape)}))
    record = {"kind": KIND, "format_version": FORMAT_VERSION, "refsnn_version": __version__,
              "method": net.method.name, "arch": net.arch or "",
              "params": _jsonable(net.p.as_dict()), "dt": dt, "integration": integration}
    meta = {"dt": dt, "integration": integration, "reset": "zero", "reset_timing": "same_step",
            "spike_amplitude": "unit_per_step", "threshold": "strict",
            "refsnn_method": net.method.name, "refsnn": json.dumps(record)}
    return nir.NIRGraph(nodes=nodes, edges=list(zip(order, order[1:])), metadata=meta,
                        type_check=False)


def export_nir(network, path, *, dt: float = DEFAULT_DT, integration: str = "euler") -> Path:
    """Write ``network`` as a NIR graph (HDF5, ``nir.write``) to ``path``, atomically."""
    nir = _nir()
    graph = to_graph(network, dt, integration)
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigError(f"cannot write {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        nir.write(tmp, graph)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _check_dt(dt, integration):
    if integration not in RULES:
        raise ConfigError(f"integration {integration!r} must be one of {', '.join(RULES)}")
    try:
        dt = float(dt)
    except (TypeError, ValueError):
        raise ConfigError(f"dt={dt!r} must be a positive number (seconds per step)") from None
    if not (math.isfinite(dt) and dt > 0):
        raise ConfigError(f"dt={dt!r} must be a positive number (seconds per step)")
    return dt, integration


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


# --------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------

def read_graph(path):
    """nir.read the file (no type check: refsnn checks every shape itself); DataError if bad."""
    nir = _nir()
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as fh:
        if fh.read(8) != b"\x89HDF\r\n\x1a\n":
            raise DataError(f"{path} is not a NIR file (not HDF5); write one with "
                            "`refsnn nir export` or a framework's NIR export")
    try:
        graph = nir.read(str(path), type_check=False)
    except Exception as err:       # noqa: BLE001 - nir/h5py raise many kinds on a bad file
        msg = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise DataError(f"{path} is not a readable NIR graph ({type(err).__name__}: {msg}); "
                        "it may be truncated or another kind of HDF5 file") from None
    if type(graph).__name__ != "NIRGraph":
        raise DataError(f"{path} holds a single {type(graph).__name__} node, not a NIR graph")
    return graph


def _chain(graph, path):
    """Node names from the Input to the Output node; DataError for branches, cycles, strays."""
    nodes = graph.nodes
    inputs = [k for k, v in nodes.items() if type(v).__name__ == "Input"]
    outputs = [k for k, v in nodes.items() if type(v).__name__ == "Output"]
    if len(inputs) != 1 or len(outputs) != 1:
        raise DataError(f"{path}: refsnn reads graphs with one Input and one Output node, this "
                        f"one has {len(inputs)} and {len(outputs)}")
    succ, npred = {}, {}
    for a, b in graph.edges:
        for v in (a, b):
            if v not in nodes:
                raise DataError(f"{path}: edge ({a!r}, {b!r}) names no node {v!r}")
        if a in succ:
            raise DataError(f"{path}: node {a!r} feeds two nodes ({succ[a]!r}, {b!r}); refsnn "
                            "reads a chain of layers (no branches or recurrent subgraphs)")
        succ[a] = b
        npred[b] = npred.get(b, 0) + 1
        if npred[b] > 1:
            raise DataError(f"{path}: node {b!r} has two inputs; refsnn reads a chain of layers")
    order, name = [inputs[0]], inputs[0]
    while name != outputs[0]:
        if name not in succ:
            raise DataError(f"{path}: the path from the Input stops at node {name!r} before "
                            "reaching the Output")
        name = succ[name]
        if name in order:
            raise DataError(f"{path}: node {name!r} closes a cycle (recurrent graphs are not "
                            "supported)")
        order.append(name)
    stray = [k for k in nodes if k not in order]
    if stray:
        raise DataError(f"{path}: node(s) {', '.join(map(repr, stray))} are not on the path from "
                        "Input to Output (branches and recurrent subgraphs are not supported)")
    return order


@dataclass
class _Stage:
    kind: str              # dense, conv, pool, flatten
    name: str
    token: str             # arch token ("" for flatten)
    arrays: list
    pool: str = ""         # "avg", "sum"
    scale: float | None = None
    cells: list = None
    cuba_psp: Cell | None = None


def _ints(v, name, field):
    a = np.atleast_1d(np.asarray(v)).astype(np.int64)
    if a.size not in (1, 2) or a.min() != a.max():
        raise DataError(f"NIR node {name!r}: {field}={a.tolist()} must be the same in both "
                        "directions (refsnn's kernels and windows are square)")
    return int(a[0])


def _stages(graph, order, path, dt, rule):
    """Parse the chain into linear stages, each with the neuron cells that follow it."""
    nodes = graph.nodes
    in_node = nodes[order[0]]
    shape = tuple(int(v) for v in np.asarray(in_node.input_type["input"]).ravel())
    if len(shape) not in (1, 3) or min(shape, default=0) < 1:
        raise DataError(f"{path}: Input node {order[0]!r} has shape {shape}; refsnn reads a "
                        "vector (N,) or an image (C, H, W)")
    first, stages = None, []
    for name in order[1:-1]:
        node = nodes[name]
        t = type(node).__name__
        if t in ("Affine", "Linear"):
            W = np.asarray(node.weight, dtype=np.float64)
            if W.ndim != 2:
                raise DataError(f"NIR node {name!r}: {t} weight has shape {W.shape}, not (out, in)")
            b = np.asarray(node.bias, dtype=np.float64) if t == "Affine" else None
            stages.append(_Stage("dense", name, str(W.shape[0]), [W, b]))
        elif t == "Conv2d":
            W = np.asarray(node.weight, dtype=np.float64)
            if W.ndim != 4 or W.shape[2] != W.shape[3]:
                raise DataError(f"NIR node {name!r}: Conv2d weight has shape {W.shape}; refsnn "
                                "needs (C_out, C_in, k, k) with a square kernel")
            if int(np.asarray(node.groups)) != 1 or _ints(node.dilation, name, "dilation") != 1:
                raise DataError(f"NIR node {name!r}: Conv2d with groups={node.groups} and "
                                f"dilation={np.asarray(node.dilation).tolist()}; refsnn's conv "
                                "has groups 1 and dilation 1")
            k, s = W.shape[2], _ints(node.stride, name, "stride")
            pad = node.padding
            if isinstance(pad, (str, bytes)):
                pad = pad.decode() if isinstance(pad, bytes) else pad
                if pad == "valid":
                    pad = 0
                elif pad == "same" and s == 1 and k % 2 == 1:
                    pad = (k - 1) // 2
                else:
                    raise DataError(f"NIR node {name!r}: padding {pad!r} with stride {s} and "
                                    f"kernel {k} has no symmetric refsnn padding")
            p_ = _ints(pad, name, "padding")
            token = f"{W.shape[0]}c{k}" + (f"s{s}" if s != 1 else "") + (f"p{p_}" if p_ else "")
            stages.append(_Stage("conv", name, token, [W, np.asarray(node.bias, np.float64)]))
        elif t in ("AvgPool2d", "SumPool2d"):
            k = _ints(node.kernel_size, name, "kernel_size")
            if _ints(node.stride, name, "stride") != k or _ints(node.padding, name, "padding"):
                raise DataError(f"NIR node {name!r}: {t} with stride "
                                f"{np.asarray(node.stride).tolist()} and padding "
                                f"{np.asarray(node.padding).tolist()}; refsnn pools with "
                                "stride = window and no padding")
            stages.append(_Stage("pool", name, f"a{k}", [], pool="avg" if t == "AvgPool2d"
                                 else "sum"))
        elif t == "Scale":
            if not stages or stages[-1].kind != "pool" or stages[-1].scale is not None \
                    or stages[-1].cells:
                raise DataError(f"NIR node {name!r}: a Scale is read only right after a "
                                "SumPool2d (TSSL-BP's θ_pool, E16)")
            stages[-1].scale = _uniform(node, name, "scale")
        elif t == "Flatten":
            stages.append(_Stage("flatten", name, "", []))
        elif t in ("LIF", "LI", "IF", "I", "CubaLIF"):
            cell = node_cell(node, name, dt, rule)
            if not stages:
                if t != "LI" or first is not None:
                    raise DataError(f"NIR node {name!r} ({t}) right after the Input: refsnn reads "
                                    "only an LI there (TSSL-BP's input PSP, E1)")
                first = Cell(cell.beta, cell.gain, None, "input_psp")
                continue
            st = stages[-1]
            if st.kind == "flatten" or (st.cells and type(node).__name__ == "CubaLIF"):
                raise DataError(f"NIR node {name!r} ({t}) follows node {st.name!r}; refsnn puts "
                                "neurons after an Affine/Linear, Conv2d or pooling node")
            st.cells = (st.cells or []) + [Cell(cell.beta, cell.gain, cell.v_th, name)]
            if t == "CubaLIF":
                st.cuba_psp = _cuba_psp(node, name, dt, rule)
        else:
            raise DataError(f"NIR node {name!r} has type {t}, which refsnn does not support "
                            "(supported: Input, Output, Affine, Linear, Conv2d, AvgPool2d, "
                            "SumPool2d(+Scale), Flatten, LIF, IF, LI, I, CubaLIF)")
    return shape, first, stages


def _arch(shape, stages):
    head = str(shape[0]) if len(shape) == 1 else f"{shape[1]}x{shape[2]}x{shape[0]}"
    return "-".join([head] + [s.token for s in stages if s.token])


def import_nir(path, method: str, *, dt: float | None = None, integration: str | None = None,
               params: dict | None = None):
    """Read a NIR graph file as a refsnn Network of ``method`` (float64).

    ``dt`` and ``integration`` default to the values the file records (refsnn and some tools
    write them in the graph metadata); a file without dt needs ``dt``. ``params`` sets
    hyper-parameters NIR does not carry (loss, variant, ...); one that contradicts a neuron node
    raises ConfigError.
    """
    from .methods import get_method
    from .network import Network
    m = get_method(method)
    if m.name not in MAPPED:
        why = _unsupported(m.name, m.Params(), [])
        raise ConfigError(f"cannot read a NIR graph as {m.name}: {why}; choose one of "
                          f"{', '.join(MAPPED)}")
    graph = read_graph(path)
    meta = dict(getattr(graph, "metadata", None) or {})
    record = {}
    if "refsnn" in meta:
        try:
            record = json.loads(_text(meta["refsnn"]))
        except (ValueError, TypeError):
            raise DataError(f"{path}: its 'refsnn' metadata is not JSON; the file is damaged") \
                from None
    if dt is None:
        if "dt" not in meta:
            raise ConfigError(f"{path} does not record its time step dt; pass dt (--dt), e.g. "
                              "1e-4 for snnTorch and SpikingJelly exports")
        dt = float(np.asarray(meta["dt"]))
    if integration is None:
        integration = _text(meta.get("integration", "euler"))
    dt, integration = _check_dt(dt, integration)
    order = _chain(graph, path)
    shape, first, stages = _stages(graph, order, path, dt, integration)
    if not stages:
        raise DataError(f"{path}: the graph has no layers between Input and Output")
    derived = _derive(m.name, first, stages, path)
    base = dict(record.get("params", {})) if record.get("method") == m.name else {}
    arch = _arch(shape, stages)
    net = None
    try:
        if base:                                            # refsnn's own file: exact values
            net = Network.build(arch, m, {**base, **(params or {})}, seed=0)
            _match(net, first, stages, path, strict=True)
    except RefsnnError:
        net = None
    if net is None:
        base = {k: v for k, v in base.items() if k not in _NEURON_KEYS[m.name]}
        try:
            net = Network.build(arch, m, {**base, **derived, **(params or {})}, seed=0)
        except ConfigError as err:
            raise ConfigError(f"{path}: as {m.name}: {err}") from None
        _match(net, first, stages, path, strict=False)
    _copy_arrays(net, stages, path)
    return net


_NEURON_KEYS = {"stbp": ("decay", "v_th", "reset_form", "strict", "relax"),
                "bpsta": ("decay", "v_th", "fire_on_equal", "relu_current", "batch_norm"),
                "spikebp": ("decay", "tau_m", "dt", "v_th", "v_th_pool"),
                "tsslbp": ("tau_m", "tau_s", "v_th", "input_psp", "theta_pool")}


def _text(v):
    v = v.item() if isinstance(v, np.ndarray) else v
    return v.decode() if isinstance(v, bytes) else str(v)


def _one(values, what, path):
    vals = [v for v, _ in values]
    for v, name in values:
        if not _close(v, vals[0], 1e-9):
            raise DataError(f"{path}: NIR node {name!r} gives {what} {v:.12g} but node "
                            f"{values[0][1]!r} gives {vals[0]:.12g}; the method has one {what} "
                            "for all layers")
    return vals[0]


def _per_layer(values):
    vals = [v for v, _ in values]
    return vals[0] if all(v == vals[0] for v in vals) else tuple(vals)


def _derive(m, first, stages, path) -> dict:
    """The method's neuron hyper-parameters from the cells of the graph."""
    spiking = [s for s in stages if s.cells]
    if not spiking:
        raise DataError(f"{path}: the graph has no neuron nodes; refsnn's methods need a neuron "
                        "population after every Affine/Linear/Conv2d")
    cuba = [s for s in stages if s.cuba_psp is not None]
    if cuba and m != "tsslbp":
        raise DataError(f"{path}: NIR node {cuba[0].cells[0].role!r} is a CubaLIF (a current-based "
                        f"synapse); {m} has none (refsnn maps CubaLIF to tsslbp only)")
    if cuba and first is not None:
        raise DataError(f"{path}: an LI after the Input and CubaLIF synapses would filter the "
                        "input twice; TSSL-BP filters it once (E1)")
    if m in ("stbp", "bpsta"):
        lif = [(s.cells[0], s.cells[0].role) for s in spiking]
        decay = _one([(c.beta, n) for c, n in lif], "decay (from tau and dt)", path)
        out = {"decay": decay, "v_th": _per_layer([(c.v_th, n) for c, n in lif])}
        if m == "stbp":
            out.update(reset_form="linear", strict=True, relax=False)
        else:
            if isinstance(out["v_th"], tuple):
                raise DataError(f"{path}: the LIF nodes have different thresholds; bpsta has one "
                                "v_th for every layer")
            out.update(fire_on_equal=False, relu_current=False, batch_norm=False)
        return out
    if m == "spikebp":
        hidden = [(s.cells[0], s.cells[0].role) for s in spiking[:-1] if s.kind != "pool"]
        pools = [(s.cells[0], s.cells[0].role) for s in spiking[:-1] if s.kind == "pool"]
        lam = _one([(c.beta, n) for c, n in hidden + [(spiking[-1].cells[0], spiking[-1].name)]],
                   "decay λ", path)
        out = {"decay": lam, "tau_m": None}
        if hidden:
            out["v_th"] = _per_layer([(c.v_th, n) for c, n in hidden])
        if pools:
            out["v_th_pool"] = _one([(c.v_th, n) for c, n in pools], "pooling threshold θ_p",
                                    path)
        return out
    # tsslbp: LIF then LI per layer, or CubaLIF whose synapse is the PSP of the layer below
    lif = [(s.cells[0], s.cells[0].role) for s in spiking]
    psps = [(s.cells[1], s.cells[1].role) for s in spiking if len(s.cells) > 1]
    psps += [(s.cuba_psp, s.cells[0].role) for s in spiking if s.cuba_psp is not None]
    if first is not None:
        psps.append((first, "input PSP"))
    theta_m = 1.0 - _one([(c.beta, n) for c, n in lif], "membrane decay 1 - 1/τ_m", path)
    out = {"tau_m": 1.0 / theta_m, "v_th": _per_layer([(c.v_th, n) for c, n in lif]),
           "input_psp": first is not None or any(s.cuba_psp is not None for s in spiking[:1])}
    if psps:
        out["tau_s"] = 1.0 / (1.0 - _one([(c.beta, n) for c, n in psps],
                                         "synaptic decay 1 - 1/τ_s", path))
    scales = [(s.scale, s.name) for s in stages if s.kind == "pool" and s.scale is not None]
    if scales:
        out["theta_pool"] = _one(scales, "θ_pool", path)
    return out


def _expected_cells(net, first, stages):
    """(expected input cell, got input cell, [(stage, expected cells, got cells)]) for ``net``.

    A CubaLIF's synapse is compared with the PSP cell of TSSL-BP (all PSPs share θ_s), and the
    first CubaLIF's synapse stands for the input PSP of E1.
    """
    want_first, per_layer_cells = method_cells(net)
    linear = [l for l in net.layers if l.kind != "flatten"]
    pairs = []
    for s, layer in zip([s for s in stages if s.kind != "flatten"], linear):
        want = list(per_layer_cells[net.layers.index(layer)])
        got = list(s.cells or [])
        if s.cuba_psp is not None:
            got.append(s.cuba_psp)
        pairs.append((s, want, got))
    if any(s.cuba_psp is not None for s in stages):
        first = pairs[0][2][-1] if pairs[0][0].cuba_psp is not None else None
    return want_first, first, pairs


def _match(net, first, stages, path, strict):
    """Check that ``net``'s neurons are the graph's cells; DataError/ConfigError naming the node."""
    lin = [l for l in net.layers if l.kind != "flatten"]
    got = [s for s in stages if s.kind != "flatten"]
    kinds = [("pool" if l.kind.endswith("pool") else l.kind) for l in lin]
    if [s.kind for s in got] != kinds:
        raise DataError(f"{path}: the graph's layers {[s.kind for s in got]} do not build a "
                        f"{net.method.name} network ({kinds})")
    want_first, first, pairs = _expected_cells(net, first, stages)
    rtol = 1e-12 if strict else 1e-9
    problems = []
    if (want_first is None) != (first is None) or (
            first is not None and not _cells_close(want_first, first, rtol)):
        problems.append("the input PSP (an LI after the Input node)")
    for (s, want, have), layer in zip(pairs, lin):
        if s.kind == "pool" and s.pool != ("sum" if layer.kind == "sumpool" else "avg"):
            have_t = "AvgPool2d" if s.pool == "avg" else "SumPool2d"
            want_t = "SumPool2d + Scale (E16)" if layer.kind == "sumpool" else "AvgPool2d"
            raise DataError(f"{path}: NIR node {s.name!r} ({have_t}): {net.method.name} pools "
                            f"with {want_t}")
        if len(want) != len(have):
            what = (f"{len(want)} neuron node(s) ({', '.join(c.role for c in want)})" if want
                    else "no neuron node")
            problems.append(f"node {s.name!r} is followed by {len(have)} neuron node(s); "
                            f"{net.method.name} puts {what} there")
            continue
        for w, h in zip(want, have):
            if not _cells_close(w, h, rtol):
                problems.append(f"node {h.role!r}: decay {h.beta:.12g}, gain {h.gain:.12g}, "
                                f"threshold {h.v_th}; {net.method.name} with these parameters "
                                f"runs decay {w.beta:.12g}, gain {w.gain:.12g}, threshold {w.v_th}")
    if problems:
        cls = ConfigError if strict is False else DataError
        raise cls(f"{path}: as {net.method.name}: " + "; ".join(problems))


def _cells_close(a: Cell, b: Cell, rtol):
    return _close(a.beta, b.beta, rtol) and _close(a.gain, b.gain, rtol) and \
        _close(a.v_th, b.v_th, rtol)


def _fit(a, shape, name, path):
    if a.shape != tuple(shape):
        raise DataError(f"{path}: NIR node {name!r} has a bias of shape {a.shape}; the layer "
                        f"needs {tuple(shape)}")
    return a


def _copy_arrays(net, stages, path):
    got = [s for s in stages if s.kind in ("dense", "conv")]
    lin = [l for l in net.layers if l.kind in ("dense", "conv")]
    for s, layer in zip(got, lin):
        W, b = s.arrays
        if W.shape != layer.W.shape:
            raise DataError(f"{path}: NIR node {s.name!r} has weight {W.shape}; the network "
                            f"{net.arch!r} needs {layer.W.shape} there")
        layer.W[...] = W
        if layer.b is not None:
            layer.b[...] = 0.0 if b is None else _fit(b, layer.b.shape, s.name, path)
        elif b is not None and np.any(b != 0):
            raise DataError(f"{path}: NIR node {s.name!r} has a nonzero bias, but "
                            f"{net.method.name}'s layers have none (its spec)")
