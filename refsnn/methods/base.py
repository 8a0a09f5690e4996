"""The method protocol: what a training method provides, and how a Network drives it.

A refsnn network is a chain of LAYERS (refsnn/layers.py: Dense, Conv2d, pooling, Flatten), which
are linear and know nothing of time, and one METHOD, which owns the neurons, the loss and the
temporal part of the backward pass. A method module reads top to bottom beside its paper:

1. ``Params``: a frozen dataclass of the method's hyper-parameters, with refsnn's names
   (docs/spec/README.md) and the spec's defaults; each field declared with :func:`param`
   (default, meaning, spec tag), checked in ``__post_init__``.
2. Forward kernels (numba) in spec order, then backward kernels.
3. A subclass of :class:`Method` gluing them to the network:

   - ``neuron_forward(p, k, I, is_output)``: the neuron recursion of spiking layer ``k`` on its
     input current ``I`` of shape (T, B, N); returns a state record (a NamedTuple) whose field
     ``out`` is what the next layer reads (spikes for most methods, a PSP for TSSL-BP) and whose
     field ``spikes`` holds the 0/1 spikes.
   - ``loss(p, state_L, target)``: the loss of the batch (sum over samples) and ∂L/∂out of the
     output layer, (T, B, N_L).
   - ``neuron_backward(p, k, state, g, is_output)``: the temporal backward of layer ``k`` given
     g = ∂L/∂out (T, B, N) coming from above; returns ``(e_w, e_down)``: the error whose product
     with the layer's input gives the weight gradient, and the error sent through the layer's
     adjoint to the layer below (the same array for an exact BPTT; different where a paper's
     recursion drops paths, e.g. STBP S14c).
   - ``scores(p, state_L)``: class scores (B, C) whose argmax is the prediction.
   - ``make_target(p, labels, n_out, T)``: the method's target for integer labels.
   - optionally ``init_sample_state`` / ``batch_target`` / ``update_sample_state``: per-sample
     state over the training set that the trainer keeps, checkpoints and updates after each
     epoch from the training-pass predictions (HM2-BP's boosting weights, spec 7).

   The default :meth:`Method.forward` and :meth:`Method.backward` chain these over the layers. A
   method whose backward does not factor through ``layer.backward`` (HM2-BP's S-PSP weight
   gradient) overrides those two methods, and still uses the layers' forward maps.

Which layers carry neurons: every Dense and Conv2d layer; pooling layers only when the method's
spec makes pooling spiking (``spiking_pool = True``); never Flatten.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import numpy as np

from ..errors import ConfigError

# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------

#: spec name -> refsnn name (docs/spec/README.md, "Shared names"), for helpful errors.
RENAMED = {
    "V_th": "v_th", "theta": "v_th", "tau": "decay", "leak": "decay", "lam": "decay",
    "desired": "desired_count", "undesired": "undesired_count", "a": "surrogate_width",
    "V_th_out": "v_th_out",
}


def param(default, meaning: str, tag: str = "", choices: Sequence | None = None):
    """Declare one hyper-parameter of a method's Params dataclass.

    ``meaning`` and ``tag`` (the spec's section or equation) are what `refsnn methods` prints;
    ``choices`` lists the valid values of a switch (checked by :meth:`Params.validate`).
    """
    return field(default=default, metadata={"meaning": meaning, "tag": tag, "choices": choices})


@dataclass(frozen=True)
class ParamInfo:
    name: str
    default: Any
    meaning: str
    tag: str
    choices: tuple | None


@dataclass(frozen=True)
class Params:
    """Base of every method's parameter record. Subclasses add fields with :func:`param`."""

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Check switches against their choices; subclasses extend it with range checks."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and value not in choices:
                raise ConfigError(
                    f"{self.method_name()}: {f.name}={value!r} is not valid; "
                    f"choose one of {', '.join(map(repr, choices))}")

    @classmethod
    def method_name(cls) -> str:
        return getattr(cls, "METHOD", cls.__name__)

    @classmethod
    def table(cls) -> list[ParamInfo]:
        """One row per parameter: name, default, meaning, spec tag, choices."""
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            ch = f.metadata.get("choices")
            rows.append(ParamInfo(f.name, default, f.metadata.get("meaning", ""),
                                  f.metadata.get("tag", ""), tuple(ch) if ch else None))
        return rows

    @classmethod
    def from_dict(cls, values: dict | None):
        """Build from a name -> value mapping; unknown names raise a ConfigError listing valid ones."""
        values = dict(values or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in values if k not in names]
        if unknown:
            hints = [f"{k!r} is called {RENAMED[k]!r} in refsnn" for k in unknown
                     if RENAMED.get(k) in names]
            raise ConfigError(
                f"{cls.method_name()}: unknown parameter(s) {', '.join(map(repr, unknown))}"
                + (f" ({'; '.join(hints)})" if hints else "")
                + f"; valid names: {', '.join(names)}")
        return cls(**{k: _coerce(cls, k, v) for k, v in values.items()})

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _coerce(cls, name, value):
    """Turn a CLI string or a list into the field's type (float, int, bool, str, tuple)."""
    default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(value, str) and not isinstance(default, str):
        return parse_value(value, cls.method_name(), name)
    if isinstance(default, bool) and isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(default, float) and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return float(value)
    return value


def parse_value(text: str, method: str, name: str):
    """Parse ``--param NAME=VALUE`` text: bool, int, float, a comma list of numbers, or a string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        if "," in text:
            return tuple(float(v) for v in text.split(","))
        number = float(text)
        return int(number) if low.lstrip("+-").isdigit() else number
    except ValueError:
        return text.strip()


def check_finite(method: str, **values):
    """Raise a ConfigError for a NaN/inf number among ``values`` (scalars or tuples)."""
    for name, v in values.items():
        arr = np.asarray(v, dtype=float) if v is not None else np.zeros(0)
        if not np.all(np.isfinite(arr)):
            raise ConfigError(f"{method}: {name}={v!r} must be finite")


def check_range(method: str, name: str, value, lo=None, hi=None, lo_open=False, hi_open=False):
    """Raise a ConfigError unless lo <= value <= hi (open ends where asked), elementwise."""
    arr = np.atleast_1d(np.asarray(value, dtype=float))
    ok = np.all(np.isfinite(arr))
    if lo is not None:
        ok &= bool(np.all(arr > lo) if lo_open else np.all(arr >= lo))
    if hi is not None:
        ok &= bool(np.all(arr < hi) if hi_open else np.all(arr <= hi))
    if not ok:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ConfigError(f"{method}: {name}={value!r} is out of range; it must lie in "
                          f"{lb}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{rb}")


def per_layer(value, k: int, n_layers: int, name: str = "v_th", method: str = ""):
    """Value for spiking layer k of a scalar-or-one-per-layer parameter (e.g. v_th)."""
    if np.ndim(value) == 0:
        return float(value)
    if len(value) != n_layers:
        raise ConfigError(f"{method}: {name} has {len(value)} values but the network has "
                          f"{n_layers} spiking layers; give one value, or one per spiking layer")
    return float(value[k])


# --------------------------------------------------------------------------------------------
# Traces and the method base class
# --------------------------------------------------------------------------------------------

@dataclass
class Trace:
    """Everything one forward pass leaves for the backward pass and for inspection.

    ``inputs[l]`` is what layer l read (T, B, *in_shape); ``states[l]`` the neuron state of layer
    l (None for a layer without neurons); ``out`` what the last layer emits; ``loss`` is filled
    by :meth:`Method.backward` (or the loss call); ``train`` is the mode of the forward pass.
    """
    inputs: list
    states: list
    out: np.ndarray
    loss: float | None = None
    extra: dict = field(default_factory=dict)
    train: bool = False

    @property
    def spiking_states(self) -> list:
        return [s for s in self.states if s is not None]


class Method:
    """Base class of a training method; see the module docstring for the protocol."""

    name: str = ""
    title: str = ""               # paper, for `refsnn methods`
    spec: str = ""                # spec file name, e.g. "stbp.md"
    Params: type = Params
    spiking_pool: bool = False    # do pooling layers carry neurons in this method?
    presets: dict = {}            # preset name -> dict of training options and params (spec 8)
    defaults: dict = {}           # the default run of `refsnn train --method NAME`
    gradcheck_params: dict = {}   # params of `refsnn gradcheck`'s small cases (--param wins)

    # ---- per-method pieces -------------------------------------------------------------------
    def encode_input(self, p, x):
        """What the first layer reads, given the network input x (T, B, *shape)."""
        return x

    def neuron_forward(self, p, k: int, n_spiking: int, I: np.ndarray, is_output: bool):
        raise NotImplementedError

    def neuron_backward(self, p, k: int, n_spiking: int, state, g: np.ndarray, is_output: bool):
        raise NotImplementedError

    def loss(self, p, state, target) -> tuple[float, np.ndarray]:
        raise NotImplementedError

    def scores(self, p, state) -> np.ndarray:
        raise NotImplementedError

    def make_target(self, p, labels: np.ndarray, n_out: int, T: int) -> np.ndarray:
        """Default target: the labels themselves (methods with a richer target override this)."""
        return np.asarray(labels)

    def uses_bias(self, p) -> bool:
        """Do this method's dense and conv layers have a bias (its spec says)?"""
        return False

    def make_pool(self, p, in_shape: tuple, k: int):
        """The pooling layer of this method's spec for an ``aK`` token (default: STBP S18 average)."""
        from ..layers import AvgPool2d
        return AvgPool2d(in_shape, k=k)

    def make_maxpool(self, p, in_shape: tuple, k: int):
        """The max-pooling layer of an ``mK`` token, for the methods whose spec has one."""
        raise ConfigError(f"{self.name} has no max pooling in its spec; use 'a{k}' pooling")

    def extra_layers(self, p, layer, dtype) -> list:
        """Layers the method's spec puts right after ``layer`` (bpsta: BN after a conv); none."""
        return []

    def init_layer(self, p, layer, rng, dtype):
        """Initialise a layer's parameters in place (default: PyTorch's U(±1/sqrt(fan_in)))."""
        from ..layers import init_torch
        fan_in = int(np.prod(layer.params[0].shape[1:])) if layer.params else 0
        for arr in layer.params:
            arr[...] = init_torch(fan_in, arr.shape, rng, dtype)

    def post_update(self, p, layers):
        """Called after every optimizer step (weight clamps and limits of the spec); default none."""

    # ---- per-sample state over the training set (HM2-BP's boosting weights, spec 7) ----
    def init_sample_state(self, p, labels: np.ndarray) -> np.ndarray | None:
        """An array with one row per training sample that the trainer keeps across epochs
        (saved in checkpoints), given the training set's ``labels``; None (default): none."""
        return None

    def batch_target(self, p, target, sample_state: np.ndarray, idx: np.ndarray):
        """The target of a training batch, given its plain ``target`` (make_target of its labels)
        and its indices ``idx`` into the training set (only when there is a sample state)."""
        return target

    def update_sample_state(self, p, sample_state: np.ndarray, labels: np.ndarray,
                            pred: np.ndarray) -> np.ndarray:
        """The state after an epoch, from the training set's ``labels`` and the predictions
        ``pred`` made on each sample as it was trained (the training pass)."""
        return sample_state

    def layer_summary(self, state) -> dict:
        """Per-layer numbers for the metrics log; default: spike rate and silent fraction."""
        s = np.asarray(state.spikes)
        rate = float(s.mean()) if s.size else 0.0
        silent = float(np.mean(s.reshape(-1, s.shape[-1]).sum(axis=0) == 0)) if s.size else 0.0
        return {"spike_rate": rate, "silent": silent}

    def fd_objective(self, p, layers, x, target) -> "FDCheck":
        """The spec's finite-difference check on one batch (used by `refsnn gradcheck`).

        Returns an :class:`FDCheck`: ``F()`` is the loss of the exactly differentiable relaxation
        the spec names (e.g. spike masks frozen at the reference forward), evaluated at the
        CURRENT values of the layers' parameter arrays, which the check perturbs in place and
        restores; ``grads`` is the method's hand gradient at the reference values, one array per
        array of ``[a for layer in layers for a in layer.params]``; at the reference values F()
        equals the method's loss. ``h``, ``rtol`` and ``rule`` are the spec's step and pass rule
        (max|fd - an| <= rtol * max|an| over all arrays). Default: no such check.
        """
        raise NotImplementedError(f"{self.name} provides no finite-difference objective "
                                  "(Method.fd_objective)")

    # ---- the default driver ------------------------------------------------------------------
    def has_neurons(self, layer) -> bool:
        return layer.kind in ("dense", "conv") or (self.spiking_pool and layer.kind.endswith("pool"))

    def input_mask(self, p, li: int, k: int, n_spiking: int, layer, h, rng):
        """Dropout: the scaled mask (broadcastable to h) on the input of layer ``li`` in
        training, or None. ``k`` is the index the next spiking layer will have. Default: none."""
        return None

    def forward(self, p, layers, x, *, train: bool = False, rng=None, masks=None) -> Trace:
        """Run the chain: I_l = layer_l(x_{l-1}) on all T*B rows, then the neuron recursion.

        In training (``train``) the method's :meth:`input_mask` may draw a dropout mask for the
        input of a layer from ``rng``; ``masks`` ({layer index: mask}) replays given masks
        instead (the finite-difference checks). Masks used are kept in
        ``trace.extra["dropout_masks"]`` and applied again, as adjoints, by :meth:`backward`.
        A layer with ``train_mode = True`` (BatchNorm: batch or running statistics) gets
        ``train=`` in its forward and backward.
        """
        T, B = x.shape[:2]
        n_spiking = sum(self.has_neurons(layer) for layer in layers)
        h = self.encode_input(p, x)
        inputs, states, k = [], [], 0
        used = dict(masks or {})
        for li, layer in enumerate(layers):
            if masks is None and train:
                m = self.input_mask(p, li, k, n_spiking, layer, h, rng)
                if m is not None:
                    used[li] = m
            if li in used:
                h = h * used[li]
            inputs.append(h)
            I = layer.forward(h, **_mode(layer, train))
            if self.has_neurons(layer):
                is_output = k == n_spiking - 1
                st = self.neuron_forward(p, k, n_spiking, I.reshape(T, B, -1), is_output)
                states.append(st)
                h = st.out.reshape((T, B) + tuple(layer.out_shape)) if not is_output else st.out
                k += 1
            else:
                states.append(None)
                h = I
        trace = Trace(inputs=inputs, states=states, out=h, train=bool(train))
        if used:
            trace.extra["dropout_masks"] = used
        return trace

    def backward(self, p, layers, trace: Trace, target) -> list:
        """Loss and gradients of every layer parameter, in layer order (a list per layer)."""
        T, B = trace.inputs[0].shape[:2]
        n_spiking = sum(self.has_neurons(layer) for layer in layers)
        masks = trace.extra.get("dropout_masks", {})
        loss, g = self.loss(p, trace.states[-1], target)
        trace.loss = loss
        grads = [None] * len(layers)
        k = n_spiking
        for li in range(len(layers) - 1, -1, -1):
            layer, st = layers[li], trace.states[li]
            need_down = li > 0
            mode = _mode(layer, trace.train)
            if st is not None:
                k -= 1
                res = self.neuron_backward(p, k, n_spiking, st, g.reshape(T, B, -1),
                                           k == n_spiking - 1)
                e_w, e_down = res[0], res[1]
                for key, value in (res[2] if len(res) > 2 else {}).items():
                    trace.extra.setdefault(key, [None] * n_spiking)[k] = value
                shape = (T, B) + tuple(layer.out_shape)
                same = e_w is e_down                                    # one adjoint pass
                e_w = e_w.reshape(shape)
                g_x, grads[li] = self.layer_backward(layer, e_w, e_w if same else
                                                     e_down.reshape(shape), trace.inputs[li],
                                                     need_down, **mode)
            else:
                g_x, grads[li] = layer.backward(g, trace.inputs[li], need_input_grad=need_down,
                                                **mode)
            if li in masks and g_x is not None:
                g_x = g_x * masks[li]                                   # dropout adjoint
            g = g_x
        return grads

    @staticmethod
    def layer_backward(layer, e_w, e_down, x, need_down, **mode):
        """Weight grads from e_w; the error to the layer below from e_down (one pass if equal)."""
        if e_w is e_down or not need_down:
            return layer.backward(e_w, x, need_input_grad=need_down, **mode)
        _, grads = layer.backward(e_w, x, need_input_grad=False, **mode)
        g_x, _ = layer.backward(e_down, x, need_input_grad=True, **mode)
        return g_x, grads

    # ---- the oracle --------------------------------------------------------------------------
    def run_case(self, weights, inputs, *, label=None, target=None, biases=None, p=None) -> dict:
        """One sample, float64, dense: the oracle contract of docs/spec/README.md.

        Runs the same forward and backward as training, on a batch of one. The common checks of
        the arguments are done by :func:`refsnn.oracle.run_case` before this is called. Returns
        "spikes", "loss", "grads" ("grads_b" with biases), every field of the layer states (e.g.
        "u", "h") and every extra quantity the backward recorded (e.g. "delta"), one (T, n_l)
        array per spiking layer.
        """
        from ..layers import Dense
        if biases is not None and not self.uses_bias(p):
            raise ConfigError(f"{self.name} has no biases in its spec; leave biases out")
        layers = []
        for l, W in enumerate(weights):
            b = None
            if self.uses_bias(p):
                b = biases[l].copy() if biases is not None else np.zeros(W.shape[0])
            layers.append(Dense(W.copy(), b))
        x = inputs[:, None, :]
        T = x.shape[0]
        n_out = weights[-1].shape[0]
        tgt = (self.case_target(p, target, n_out, T) if target is not None
               else self.make_target(p, np.array([label]), n_out, T))
        trace = self.forward(p, layers, x)
        grads = self.backward(p, layers, trace, tgt)
        out = {"loss": float(trace.loss), "grads": [g[0] for g in grads]}
        if self.uses_bias(p):
            out["grads_b"] = [g[1] for g in grads]
        states = trace.spiking_states
        for name in states[0]._fields:
            if name != "out":
                out[name] = [_one(getattr(st, name)) for st in states]
        for name, per_layer in trace.extra.items():
            if name != "dropout_masks":                 # training only; never in the oracle
                out[name] = [_one(v) for v in per_layer]
        return out

    def random_case(self, rng, sizes=None, T=None) -> dict:
        """Arguments of one random oracle case (for `refsnn oracle export`).

        Draws T in 2..10 (or ``T``), 1-3 layers of 2-8 neurons (or ``sizes`` = [n_0, ..., n_L]),
        N(0, 1/n_in)-scaled weights times 1-3, Bernoulli(0.2-0.6) input spikes, a label, and a
        random value of every switch of the method's Params (redrawn while the combination is
        invalid). Methods whose spec needs other ranges (thresholds, analog input, targets)
        override this.
        """
        T = int(T or rng.integers(2, 11))
        if sizes is None:
            depth = int(rng.integers(1, 4))
            sizes = [int(v) for v in rng.integers(2, 9, size=depth + 1)]
        scale = rng.uniform(1.0, 3.0)
        weights = [rng.normal(0, scale / np.sqrt(n_in), (n_out, n_in))
                   for n_in, n_out in zip(sizes[:-1], sizes[1:])]
        inputs = (rng.random((T, sizes[0])) < rng.uniform(0.2, 0.6)).astype(np.float64)
        for _ in range(100):
            params = {r.name: r.choices[int(rng.integers(len(r.choices)))]
                      for r in self.Params.table() if r.choices}
            try:
                p = self.Params.from_dict(params)
                self.make_target(p, np.array([0]), sizes[-1], T)
                break
            except ConfigError:
                continue
        n_classes = self.n_classes(p, sizes[-1])
        case = {"weights": weights, "inputs": inputs, "label": int(rng.integers(n_classes)),
                "params": params}
        if self.uses_bias(p):
            case["biases"] = [rng.normal(0, 0.2, n) for n in sizes[1:]]
        return case

    def n_classes(self, p, n_out: int) -> int:
        """Number of classes read from an output layer of n_out neurons (default: n_out)."""
        return n_out

    def case_target(self, p, target, n_out: int, T: int):
        """The oracle's explicit ``target`` as a batch of one (methods check its shape)."""
        return np.asarray(target, dtype=np.float64)[None]


def _mode(layer, train) -> dict:
    """``train=`` for a layer whose map depends on the mode (``train_mode``), else nothing."""
    return {"train": bool(train)} if getattr(layer, "train_mode", False) else {}


def _one(a):
    """Drop the batch axis of a (T, 1, N) array (or (1, N)); other values pass through."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[1] == 1:
        return a[:, 0, :]
    if a.ndim == 2 and a.shape[0] == 1:
        return a[0]
    return a


class FDCheck(NamedTuple):
    """What :meth:`Method.fd_objective` returns: F, the hand gradient, and the spec's rule."""
    F: Any                  # () -> float, the relaxation's loss at the current parameter values
    grads: list             # hand gradient, flat like Network.params()
    h: float = 1e-6         # central-difference step
    rtol: float = 1e-6      # pass: max|fd - an| <= rtol * max|an| (over all arrays)
    rule: str = ""          # where the rule is written, e.g. "stbp 6.2"
    note: str = ""          # one line for the user: what F checks and what has no FD meaning


class Ref(NamedTuple):
    """A lazy reference to a method class, so that `refsnn methods` imports only what it needs."""
    module: str
    cls: str


def load_method(ref: Ref) -> Method:
    import importlib
    return getattr(importlib.import_module(ref.module), ref.cls)()

