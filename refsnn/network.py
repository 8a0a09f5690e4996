"""Network: a chain of layers driven by one method with its parameters.

The architecture is a short string (ARCHITECTURE.md, spec stbp 8.1 notation):

- the first token is the input: ``784`` (a vector) or ``HxWxC`` (an image, e.g. ``28x28x1``);
- ``NcK`` a conv layer with N channels and a KxK kernel, stride 1; ``sS`` and ``pP`` after it set
  the stride and the padding (``32c3p1``, ``64c3s2p1``);
- ``aK`` pooling with a KxK window and stride K (the method's pooling form, e.g. STBP S18);
- ``mK`` max pooling with a KxK window and stride K, for the methods whose spec has it (bpsta 5.4);
- a bare number a dense layer of that size (a Flatten is inserted after a conv/pool stage).

Every conv and dense layer carries neurons; pooling carries neurons where the method's spec makes
it spiking (``Method.spiking_pool``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from . import layers as L
from .errors import ConfigError, ShapeError
from .methods import get_method
from .methods.base import Method, Params, Trace

_CONV = re.compile(r"^(\d+)c(\d+)(?:s(\d+))?(?:p(\d+))?$")
_POOL = re.compile(r"^a(\d+)$")
_MAXPOOL = re.compile(r"^m(\d+)$")
_IMG = re.compile(r"^(\d+)x(\d+)x(\d+)$")


@dataclass(frozen=True)
class LayerSpec:
    kind: str            # "dense", "conv", "pool", "maxpool"
    n: int = 0           # dense size or conv channels
    k: int = 0           # kernel or pool size
    stride: int = 1
    padding: int = 0


def parse_arch(arch: str) -> tuple[tuple, list[LayerSpec]]:
    """``"28x28x1-15c5-a2-300-10"`` -> ((1, 28, 28), [LayerSpec...]); input shape is (C, H, W)."""
    tokens = [t.strip().lower() for t in str(arch).split("-") if t.strip()]
    if len(tokens) < 2:
        raise ConfigError(f"architecture {arch!r} needs an input and at least one layer, "
                          "e.g. '784-400-10' or '28x28x1-15c5-a2-40c5-a2-300-10'")
    m = _IMG.match(tokens[0])
    if m:
        h, w, c = map(int, m.groups())
        in_shape = (c, h, w)
    elif tokens[0].isdigit():
        in_shape = (int(tokens[0]),)
    else:
        raise ConfigError(f"architecture {arch!r}: the first token {tokens[0]!r} must be the input, "
                          "a size like '784' or an image 'HxWxC' like '28x28x1'")
    specs = []
    for tok in tokens[1:]:
        if tok.isdigit():
            specs.append(LayerSpec("dense", n=int(tok)))
        elif (m := _CONV.match(tok)):
            n, k, s, p = m.groups()
            specs.append(LayerSpec("conv", n=int(n), k=int(k), stride=int(s or 1), padding=int(p or 0)))
        elif (m := _POOL.match(tok)):
            specs.append(LayerSpec("pool", k=int(m.group(1))))
        elif (m := _MAXPOOL.match(tok)):
            specs.append(LayerSpec("maxpool", k=int(m.group(1))))
        else:
            raise ConfigError(f"architecture {arch!r}: cannot read {tok!r}; use a number (dense), "
                              "'NcK[sS][pP]' (conv), 'aK' (pooling) or 'mK' (max pooling)")
        if min(v for v in (specs[-1].n or 1, specs[-1].k or 1, specs[-1].stride)) < 1:
            raise ConfigError(f"architecture {arch!r}: {tok!r} has a zero size")
    if specs[-1].kind != "dense":
        raise ConfigError(f"architecture {arch!r} must end with a dense output layer, e.g. '-10'")
    return in_shape, specs


def _init_layer(method: Method, p: Params, layer, rng, dtype, init: str):
    """``method.init_layer``, naming the rule ``init`` (TrainConfig.init) where one is chosen."""
    if not init:
        return method.init_layer(p, layer, rng, dtype)
    import inspect
    if "init" not in inspect.signature(method.init_layer).parameters:
        raise ConfigError(f"{method.name} has one init rule, its spec's; leave init empty "
                          f"(got {init!r})")
    return method.init_layer(p, layer, rng, dtype, init=init)


def build_layers(method: Method, p: Params, arch: str, rng: np.random.Generator,
                 dtype=np.float64, init: str = "") -> list:
    """Layers of ``arch`` with parameters initialised by the method's rule (seeded by ``rng``).

    ``init`` names one of the method's init rules where it has several (stbp: torch, rownorm).
    """
    in_shape, specs = parse_arch(arch)
    shape, layers = in_shape, []
    for s in specs:
        if s.kind in ("conv", "pool", "maxpool") and len(shape) != 3:
            raise ConfigError(f"architecture {arch!r}: a conv or pooling layer needs an image "
                              "input 'HxWxC', not a flat vector")
        if s.kind == "dense":
            if len(shape) == 3:
                layers.append(L.Flatten(shape))
                shape = layers[-1].out_shape
            W = np.zeros((s.n, shape[0]), dtype=dtype, order="F")     # Wᵀ contiguous: Dense
            layer = L.Dense(W, np.zeros(s.n, dtype=dtype) if method.uses_bias(p) else None)
        elif s.kind == "conv":
            c, h, w = shape
            if h + 2 * s.padding < s.k or w + 2 * s.padding < s.k:
                raise ConfigError(f"architecture {arch!r}: a {s.k}x{s.k} kernel does not fit "
                                  f"the {h}x{w} map of that stage")
            W = np.zeros((s.n, c, s.k, s.k), dtype=dtype)
            b = np.zeros(s.n, dtype=dtype) if method.uses_bias(p) else None
            layer = L.Conv2d(W, b, in_hw=(h, w), stride=s.stride, padding=s.padding)
        else:
            if shape[1] < s.k or shape[2] < s.k:
                raise ConfigError(f"architecture {arch!r}: a{s.k} pooling does not fit the "
                                  f"{shape[1]}x{shape[2]} map of that stage")
            layer = (method.make_pool(p, shape, s.k) if s.kind == "pool"
                     else method.make_maxpool(p, shape, s.k))
        _init_layer(method, p, layer, rng, dtype, init)
        layers.append(layer)
        shape = layer.out_shape
        for extra in method.extra_layers(p, layer, dtype):     # e.g. bpsta's BN after a conv
            _init_layer(method, p, extra, rng, dtype, init)
            layers.append(extra)
            shape = extra.out_shape
    return layers


class Network:
    """Layers + a method + its parameters: forward, loss and gradients, prediction.

    >>> net = Network.build("784-400-10", "stbp", seed=0)
    >>> trace = net.forward(x)                       # x: (T, B, 784)
    >>> loss, grads = net.loss_and_grads(x, labels)  # grads: one list per layer, like net.layers[l].params
    """

    def __init__(self, layers, method, params=None, arch: str | None = None):
        self.method = get_method(method) if isinstance(method, str) else method
        self.p = params if isinstance(params, Params) else self.method.Params.from_dict(params)
        self.layers = list(layers)
        self.arch = arch
        for a, b in zip(self.layers, self.layers[1:]):
            if tuple(a.out_shape) != tuple(b.in_shape):
                raise ShapeError(f"layer {a.describe()} emits {a.out_shape} but the next layer "
                                 f"{b.describe()} reads {b.in_shape}")

    @classmethod
    def build(cls, arch: str, method, params=None, *, seed=None, rng=None, dtype=np.float64,
              init: str = ""):
        m = get_method(method) if isinstance(method, str) else method
        p = params if isinstance(params, Params) else m.Params.from_dict(params)
        rng = rng if rng is not None else np.random.default_rng(seed)
        return cls(build_layers(m, p, arch, rng, np.dtype(dtype), init), m, p, arch=arch)

    # ---- shapes and parameters -----------------------------------------------------------------
    @property
    def in_shape(self) -> tuple:
        return tuple(self.layers[0].in_shape)

    @property
    def n_out(self) -> int:
        return int(np.prod(self.layers[-1].out_shape))

    @property
    def dtype(self):
        return next((a.dtype for layer in self.layers for a in layer.params), np.dtype(np.float64))

    def params(self) -> list:
        """Every trainable array, in layer order (the arrays themselves, updated in place)."""
        return [a for layer in self.layers for a in layer.params]

    def param_names(self) -> list[str]:
        return [f"{name}{li}" for li, layer in enumerate(self.layers) for name in layer.param_names]

    def spiking_layers(self) -> list[int]:
        return [li for li, layer in enumerate(self.layers) if self.method.has_neurons(layer)]

    # ---- computation ---------------------------------------------------------------------------
    def check_input(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        want = self.in_shape
        if x.ndim == 2 + len(want) and tuple(x.shape[2:]) == want:
            pass
        elif x.ndim >= 3 and int(np.prod(x.shape[2:])) == int(np.prod(want)):
            x = x.reshape(x.shape[:2] + want)
        else:
            raise ShapeError(f"input has shape {x.shape}; the network reads (T, B, "
                             f"{', '.join(map(str, want))}); arrays are time-major, so a batch "
                             "of (B, T, ...) needs np.swapaxes(x, 0, 1)")
        if not np.all(np.isfinite(x)):
            raise ShapeError("input holds NaN or inf values; check the data and its encoding")
        return x.astype(self.dtype, copy=False)

    def forward(self, x, *, train: bool = False, rng=None) -> Trace:
        return self.method.forward(self.p, self.layers, self.check_input(x), train=train, rng=rng)

    def loss_and_grads(self, x, target, *, train: bool = False, rng=None) -> tuple[float, list, Trace]:
        """The batch loss, the gradient of every parameter (flat, like :meth:`params`), the trace."""
        trace = self.forward(x, train=train, rng=rng)
        grads = self.method.backward(self.p, self.layers, trace, target)
        flat = [g for per_layer in grads for g in (per_layer or [])]
        return float(trace.loss), flat, trace

    def scores(self, x) -> np.ndarray:
        trace = self.forward(x)
        return self.method.scores(self.p, trace.states[-1])

    def predict(self, x) -> np.ndarray:
        return np.argmax(self.scores(x), axis=1)

    def make_target(self, labels, T: int):
        return self.method.make_target(self.p, np.asarray(labels), self.n_out, T)

    def describe(self) -> str:
        return " | ".join(layer.describe() for layer in self.layers)
