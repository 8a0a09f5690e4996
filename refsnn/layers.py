"""Linear maps shared by every method: Dense, Conv2d, AvgPool2d, Flatten.

A layer knows nothing of time or neurons. It maps a time-major batch (T, B, *in_shape) to
(T, B, *out_shape) on all T·B rows at once, and its backward is exact: the adjoint for the input,
and the weight and bias gradients summed over T and B.

Parameters are the arrays in ``layer.params`` (names in ``layer.param_names``); optimizers update
them in place, and ``layer.W`` / ``layer.b`` read the same arrays.

Precision: a call runs in the dtype of its input x (float64 or float32); the output, the input
gradient and the parameter gradients come in that dtype. The weights are used as stored when they
have x's dtype (a float32 network stores float32 weights, so nothing is copied); otherwise a cast
copy of them is made for the call. float32 input is never upcast to float64. Other dtypes raise
ShapeError.

Equations (tags of spec/stbp.md; the other specs use the same maps): dense S1/S15, conv S17,
average pooling S18, flatten 5.7.
"""

from __future__ import annotations

import weakref

import numpy as np

from .errors import ShapeError
from .kernels import conv_events as conv_kernels
from .kernels import blas
from .kernels import dense as dense_kernels
from .kernels.pool import avgpool_backward, avgpool_forward

_FLOATS = (np.dtype(np.float64), np.dtype(np.float32))
_TIME_MAJOR = ("arrays are time-major (T, B, ...): for a single step pass x[None], for one sample "
               "x[:, None], for a batch-major (B, T, ...) array np.swapaxes(x, 0, 1)")


def _shape_str(shape) -> str:
    return "x".join(str(v) for v in shape)


def _pos_int(what: str, v, low: int) -> int:
    """v as an int >= low, or a ShapeError naming ``what``."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < low:
        raise ShapeError(f"{what} must be an integer >= {low}, got {v!r}")
    return int(v)


def _param(what: str, a, ndim: int, hint: str) -> np.ndarray:
    """A weight or bias array: ndarray of float64/float32 with ``ndim`` axes, else ShapeError."""
    if not isinstance(a, np.ndarray):
        raise ShapeError(f"{what} must be a numpy array, got {type(a).__name__}; "
                         f"pass np.asarray(...) of shape {hint}")
    if a.ndim != ndim:
        raise ShapeError(f"{what} has shape {a.shape}; expected {hint}")
    if a.dtype not in _FLOATS:
        raise ShapeError(f"{what} has dtype {a.dtype}; layers hold float64 or float32 "
                         f"parameters: pass {what.split()[-1]}.astype(np.float64)")
    return a


class Layer:
    """Base class of the linear maps. Subclasses set kind, in_shape, out_shape, params, param_names.

    forward(x): x (T, B, *in_shape) -> (T, B, *out_shape), same dtype as x.
    backward(g, x, need_input_grad=True): g = dL/d(output) (T, B, *out_shape), x = the forward
    input -> (g_x or None, [dL/dparam for each param]), parameter gradients summed over T and B.
    """

    kind: str = ""
    in_shape: tuple = ()
    out_shape: tuple = ()

    def __init__(self):
        self.params: list = []
        self.param_names: list = []

    def describe(self) -> str:
        return f"{self.kind} {_shape_str(self.in_shape)} -> {_shape_str(self.out_shape)}"

    def _rows(self, x, shape, what="input"):
        """(T, B, *shape) -> (T·B, *shape) view (or copy), with a ShapeError saying what was
        expected when x does not fit."""
        if not isinstance(x, np.ndarray):
            raise ShapeError(f"{self.describe()}: {what} must be a numpy array, got "
                             f"{type(x).__name__}")
        shape = tuple(shape)
        if x.ndim != 2 + len(shape) or tuple(x.shape[2:]) != shape:
            want = ", ".join(["T", "B"] + [str(v) for v in shape])
            raise ShapeError(f"{self.describe()}: {what} has shape {x.shape}, expected ({want}); "
                             f"{_TIME_MAJOR}")
        if x.dtype not in _FLOATS:
            raise ShapeError(f"{self.describe()}: {what} has dtype {x.dtype}; layers run in "
                             f"float64 or float32: pass x.astype(np.float64)")
        return x.reshape((-1,) + shape)

    def _backward_rows(self, g, x, need_x=False):
        """g and x as rows in one dtype (x's, else g's), checking that their T and B agree."""
        gs = self._rows(g, self.out_shape, "gradient g")
        if x is None:
            if need_x:
                raise ShapeError(f"{self.describe()}: backward needs the forward input x for the "
                                 "weight gradient; pass backward(g, x)")
            return gs, None
        xs = self._rows(x, self.in_shape, "forward input x")
        if g.shape[:2] != x.shape[:2]:
            raise ShapeError(f"{self.describe()}: gradient g has (T, B) = {g.shape[:2]} but the "
                             f"forward input x has {x.shape[:2]}; pass the x this layer's "
                             "forward read")
        return gs.astype(x.dtype, copy=False), xs

    def forward(self, x):
        raise NotImplementedError

    def backward(self, g, x, need_input_grad=True):
        raise NotImplementedError


class Dense(Layer):
    """S1 (current of a dense layer) and its adjoint S15 on all T·B rows.

    forward:  I = x Wᵀ + b                 W (n_out, n_in), W[i, j] from pre j to post i
    backward: g_x = g W,  dW = Σ_{t,b} gᵀ x,  db = Σ_{t,b} g

    I and dW read x: when x is a sparse spike train (every entry 0 or 1, few ones), they are
    sums over its active entries (refsnn/kernels/dense.py, event-driven); otherwise one GEMM
    each. Both give the same numbers up to the order of the sums (1e-12 relative in float64).

    W may be C- or Fortran-ordered; Network.build stores it Fortran-ordered, i.e. Wᵀ
    contiguous, the layout the event kernels read (rows of Wᵀ), so no copy is made per call,
    and the weight gradient comes in the same layout.
    """

    kind = "dense"

    def __init__(self, W, b=None):
        super().__init__()
        W = _param("dense weight W", W, 2, "(n_out, n_in)")
        if b is not None:
            b = _param("dense bias b", b, 1, f"({W.shape[0]},) = (n_out,)")
            if b.shape != (W.shape[0],) or b.dtype != W.dtype:
                raise ShapeError(f"dense bias b has shape {b.shape} and dtype {b.dtype}; W "
                                 f"{W.shape} {W.dtype} needs b of shape ({W.shape[0]},) and "
                                 "the same dtype")
        if min(W.shape) < 1:
            raise ShapeError(f"dense weight W has shape {W.shape}; both sizes must be >= 1")
        self.params = [W] if b is None else [W, b]
        self.param_names = ["W"] if b is None else ["W", "b"]
        self.in_shape, self.out_shape = (W.shape[1],), (W.shape[0],)

    @property
    def W(self):
        return self.params[0]

    @property
    def b(self):
        return self.params[1] if len(self.params) > 1 else None

    def describe(self):
        return f"dense {self.in_shape[0]}->{self.out_shape[0]}"

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_events", None)          # a cache between forward and backward, not state
        return state

    def forward(self, x):
        xs = self._rows(x, self.in_shape)
        b = None if self.b is None else self.b.astype(x.dtype, copy=False)
        ev = dense_kernels.spike_events(xs, self.out_shape[0])
        # kept for the backward of the same x (checked there, so a changed x is never trusted)
        self._events = (weakref.ref(x), ev) if ev is not None else None
        I = dense_kernels.forward(xs, self.W.astype(x.dtype, copy=False), b, ev)  # S1: W o[t] + b
        return I.reshape(x.shape[:2] + self.out_shape)

    def backward(self, g, x, need_input_grad=True):
        gs, xs = self._backward_rows(g, x, need_x=True)
        kept, self._events = getattr(self, "_events", None), None
        if kept is not None and kept[0]() is x and kept[1].match(xs):
            ev = kept[1]
        else:
            ev = dense_kernels.spike_events(xs, self.out_shape[0])
        grads = [dense_kernels.weight_grad(gs, xs, ev)]               # S15: Σ e oᵀ
        if self.b is not None:
            grads.append(gs.sum(axis=0))                              # S15: Σ e
        gx = None
        if need_input_grad:
            gx = blas.matmul(gs, self.W.astype(xs.dtype, copy=False)).reshape(x.shape)  # Wᵀ e
        return gx, grads


class Conv2d(Layer):
    """S17: cross-correlation (PyTorch Conv2d), zero padding p, stride s; W (C_out, C_in, k, k).

    I[c, y, x] = b[c] + Σ_{c', i, j} W[c, c', i, j] · x[c', s·y + i - p, s·x + j - p]
    in_shape (C_in, H, W), out_shape (C_out, H', W') with H' = (H + 2p - k)//s + 1 (W' likewise).
    Kernels in refsnn/kernels/conv.py and conv_events.py: events for a sparse 0/1 input, else
    channels-last windows + BLAS per chunk of samples (one-BLAS-thread policy), else per-sample
    loops; the path is chosen per call (conv_events.py), all give the same sums up to rounding.
    """

    kind = "conv"

    def __init__(self, W, b=None, in_hw=(28, 28), stride=1, padding=0):
        super().__init__()
        W = _param("conv weight W", W, 4, "(C_out, C_in, k, k)")
        if W.shape[2] != W.shape[3] or min(W.shape) < 1:
            raise ShapeError(f"conv weight W has shape {W.shape}; expected (C_out, C_in, k, k) "
                             "with a square k x k kernel and every size >= 1")
        if b is not None:
            b = _param("conv bias b", b, 1, f"({W.shape[0]},) = (C_out,)")
            if b.shape != (W.shape[0],) or b.dtype != W.dtype:
                raise ShapeError(f"conv bias b has shape {b.shape} and dtype {b.dtype}; W "
                                 f"{W.shape} {W.dtype} needs b of shape ({W.shape[0]},) and "
                                 "the same dtype")
        try:
            H, Wd = in_hw
        except (TypeError, ValueError):
            raise ShapeError(f"conv in_hw must be (H, W), got {in_hw!r}") from None
        H, Wd = _pos_int("conv input height H", H, 1), _pos_int("conv input width W", Wd, 1)
        self.k = int(W.shape[2])
        self.stride = _pos_int("conv stride", stride, 1)
        self.padding = _pos_int("conv padding", padding, 0)
        if H + 2 * self.padding < self.k or Wd + 2 * self.padding < self.k:
            raise ShapeError(f"a {self.k}x{self.k} kernel with padding {self.padding} does not "
                             f"fit a {H}x{Wd} input; use a smaller kernel or more padding")
        Ho = (H + 2 * self.padding - self.k) // self.stride + 1
        Wo = (Wd + 2 * self.padding - self.k) // self.stride + 1
        self.params = [W] if b is None else [W, b]
        self.param_names = ["W"] if b is None else ["W", "b"]
        self.in_shape = (int(W.shape[1]), H, Wd)
        self.out_shape = (int(W.shape[0]), Ho, Wo)

    @property
    def W(self):
        return self.params[0]

    @property
    def b(self):
        return self.params[1] if len(self.params) > 1 else None

    def describe(self):
        return (f"conv {_shape_str(self.in_shape)} -> {self.out_shape[0]}c{self.k} "
                f"s{self.stride} p{self.padding} -> {_shape_str(self.out_shape)}")

    def _Wm(self, dtype):
        """W as (C_out, C_in·k·k), contiguous, in ``dtype``."""
        return np.ascontiguousarray(self.W.reshape(self.out_shape[0], -1), dtype=dtype)

    def forward(self, x):
        xs = np.ascontiguousarray(self._rows(x, self.in_shape))
        b = (np.zeros(0, x.dtype) if self.b is None
             else np.ascontiguousarray(self.b, dtype=x.dtype))
        I = conv_kernels.forward(xs, self.W, b, self.stride, self.padding, self.out_shape[1],
                                 self.out_shape[2])
        return I.reshape(x.shape[:2] + self.out_shape)

    def backward(self, g, x, need_input_grad=True):
        gs, xs = self._backward_rows(g, x, need_x=True)
        gs, xs = np.ascontiguousarray(gs), np.ascontiguousarray(xs)
        dW = conv_kernels.weight_grad(gs, xs, self.W.shape, self.stride, self.padding)
        grads = [dW]
        if self.b is not None:
            grads.append(gs.sum(axis=(0, 2, 3)))                     # Σ_{t,b,y,x} e[c]
        gx = None
        if need_input_grad:
            gx = conv_kernels.input_grad(gs, self.W, self.in_shape, self.stride,
                                         self.padding).reshape(x.shape)
        return gx, grads


class AvgPool2d(Layer):
    """S18: mean over k×k windows, stride k, no padding, floor; no parameters.

    out_shape (C, H // k, W // k). Backward (exact): each input of a window gets g / k²; an odd
    last row or column (read by no window) gets 0. Kernels in refsnn/kernels/pool.py.
    """

    kind = "avgpool"

    def __init__(self, in_shape=(1, 28, 28), k=2):
        super().__init__()
        try:
            C, H, W = in_shape
        except (TypeError, ValueError):
            raise ShapeError(f"average pooling reads (C, H, W) maps, got in_shape {in_shape!r}") \
                from None
        C, H, W = (_pos_int(f"pooling in_shape {n}", v, 1) for n, v in zip("CHW", (C, H, W)))
        self.k = _pos_int("pooling window k", k, 1)
        if H < self.k or W < self.k:
            raise ShapeError(f"a {self.k}x{self.k} pooling window does not fit the {H}x{W} map; "
                             "use a window no larger than the map")
        self.in_shape, self.out_shape = (C, H, W), (C, H // self.k, W // self.k)

    def describe(self):
        return f"avgpool{self.k} {_shape_str(self.in_shape)} -> {_shape_str(self.out_shape)}"

    def forward(self, x):
        xs = np.ascontiguousarray(self._rows(x, self.in_shape))
        return avgpool_forward(xs, self.k).reshape(x.shape[:2] + self.out_shape)

    def backward(self, g, x=None, need_input_grad=True):
        gs, _ = self._backward_rows(g, x)
        if not need_input_grad:
            return None, []
        gx = avgpool_backward(np.ascontiguousarray(gs), self.k, self.in_shape[1],
                              self.in_shape[2])
        return gx.reshape(g.shape[:2] + self.in_shape), []


class Flatten(Layer):
    """C-order flatten of (C, H, W) (or any per-sample shape): index = c·H·W + y·W + x (spec
    stbp 5.7). Backward is the inverse reshape. The output is a view of x where x allows it."""

    kind = "flatten"

    def __init__(self, in_shape):
        super().__init__()
        try:
            shape = tuple(in_shape)
        except TypeError:
            raise ShapeError(f"flatten in_shape must be a tuple of sizes, got {in_shape!r}") \
                from None
        if not shape:
            raise ShapeError("flatten in_shape must have at least one axis, got ()")
        self.in_shape = tuple(_pos_int("flatten in_shape entry", v, 1) for v in shape)
        self.out_shape = (int(np.prod(self.in_shape)),)

    def describe(self):
        return f"flatten {_shape_str(self.in_shape)} -> {self.out_shape[0]}"

    def forward(self, x):
        return self._rows(x, self.in_shape).reshape(x.shape[:2] + self.out_shape)

    def backward(self, g, x=None, need_input_grad=True):
        gs, _ = self._backward_rows(g, x)
        if not need_input_grad:
            return None, []
        return gs.reshape(g.shape[:2] + self.in_shape), []


def init_torch(fan_in, shape, rng, dtype=np.float64):
    """PyTorch's default init of Linear/Conv2d weights and biases (stbp spec 7): each entry
    independently U(-1/√fan_in, 1/√fan_in), fan_in = n_in (dense) or C_in·k·k (conv)."""
    fan_in = _pos_int("init_torch fan_in", fan_in, 1)
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def init_rownorm(shape, rng, dtype=np.float64):
    """stbp S23: W ~ U[-1, 1], then each row divided by its L2 norm; for a conv weight a row is
    one output channel's C_in·k·k weights (refsnn choice, spec 7)."""
    W = rng.uniform(-1.0, 1.0, size=shape)
    rows = W.reshape(shape[0], -1)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows.reshape(shape).astype(dtype)
