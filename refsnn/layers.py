"""Linear maps shared by every method: Dense, Conv2d, AvgPool2d, Flatten.

A layer knows nothing of time or neurons: it maps a time-major batch (T, B, *in_shape) to
(T, B, *out_shape) on all T·B rows at once, and its backward is exact (the adjoint for the input,
the weight and bias gradients summed over T and B). Parameters are arrays held by the layer and
updated in place by the optimizers. The output dtype is the input's; weights are used in the
dtype they are stored in (a float32 network stores float32 weights).

Equations: dense S1/S15, conv S17, average pooling S18 (tags of spec/stbp.md; the other methods'
specs use the same maps).
"""

from __future__ import annotations

import numpy as np

from .errors import ShapeError
from .kernels.conv import col2im, im2col

#: rows of im2col processed at once, so that a batch never needs more than ~64 MB of columns
_COLS_BYTES = 64 * 2 ** 20


class Layer:
    """Base class: see the module docstring for the contract."""

    kind = ""
    in_shape: tuple = ()
    out_shape: tuple = ()

    def __init__(self):
        self.params: list = []
        self.param_names: list = []

    def describe(self) -> str:
        return f"{self.kind} {self.in_shape} -> {self.out_shape}"

    def _rows(self, x, shape, what="input"):
        """(T, B, *shape) -> (T·B, *shape), with a message that says what was expected."""
        if x.ndim != 2 + len(shape) or tuple(x.shape[2:]) != tuple(shape):
            raise ShapeError(f"{self.describe()}: {what} has shape {x.shape}, expected "
                             f"(T, B, {', '.join(map(str, shape))}); arrays are time-major")
        return x.reshape((-1,) + tuple(shape))

    def forward(self, x):
        raise NotImplementedError

    def backward(self, g, x, need_input_grad=True):
        raise NotImplementedError


class Dense(Layer):
    """S1: I = x W^T + b, W of shape (n_out, n_in); S15: dW = Σ g^T x, db = Σ g, g_x = g W."""

    kind = "dense"

    def __init__(self, W, b=None):
        super().__init__()
        if W.ndim != 2:
            raise ShapeError(f"dense weights must be (n_out, n_in), got shape {W.shape}")
        if b is not None and b.shape != (W.shape[0],):
            raise ShapeError(f"dense bias must have shape ({W.shape[0]},), got {b.shape}")
        self.W, self.b = W, b
        self.params = [W] + ([b] if b is not None else [])
        self.param_names = ["W"] + (["b"] if b is not None else [])
        self.in_shape, self.out_shape = (W.shape[1],), (W.shape[0],)

    def describe(self):
        return f"dense {self.W.shape[1]}->{self.W.shape[0]}"

    def forward(self, x):
        T, B = x.shape[:2]
        I = self._rows(x, self.in_shape) @ self.W.T
        if self.b is not None:
            I += self.b
        return I.reshape(T, B, -1)

    def backward(self, g, x, need_input_grad=True):
        T, B = g.shape[:2]
        g2 = self._rows(g, self.out_shape, "gradient")
        x2 = self._rows(x, self.in_shape)
        grads = [g2.T @ x2]
        if self.b is not None:
            grads.append(g2.sum(axis=0))
        gx = (g2 @ self.W).reshape(T, B, -1) if need_input_grad else None
        return gx, grads


class Conv2d(Layer):
    """S17: cross-correlation with zero padding; W (C_out, C_in, k, k), b (C_out,).

    I[c, y, x] = b[c] + Σ_{c', i, j} W[c, c', i, j] · x[c', s·y + i - p, s·x + j - p], computed
    as im2col + one GEMM per chunk of rows; output (C_out, H', W') with H' = (H + 2p - k)//s + 1.
    """

    kind = "conv"

    def __init__(self, W, b=None, in_hw=(28, 28), stride=1, padding=0):
        super().__init__()
        if W.ndim != 4 or W.shape[2] != W.shape[3]:
            raise ShapeError(f"conv weights must be (C_out, C_in, k, k), got shape {W.shape}")
        if b is not None and b.shape != (W.shape[0],):
            raise ShapeError(f"conv bias must have shape ({W.shape[0]},), got {b.shape}")
        H, Wd = (int(v) for v in in_hw)
        self.k, self.stride, self.padding = int(W.shape[2]), int(stride), int(padding)
        if self.stride < 1 or self.padding < 0:
            raise ShapeError(f"conv stride must be >= 1 and padding >= 0, got {stride}, {padding}")
        Ho = (H + 2 * self.padding - self.k) // self.stride + 1
        Wo = (Wd + 2 * self.padding - self.k) // self.stride + 1
        if Ho < 1 or Wo < 1:
            raise ShapeError(f"a {self.k}x{self.k} kernel (padding {padding}) does not fit a "
                             f"{H}x{Wd} input")
        self.W, self.b = W, b
        self.params = [W] + ([b] if b is not None else [])
        self.param_names = ["W"] + (["b"] if b is not None else [])
        self.in_shape = (W.shape[1], H, Wd)
        self.out_shape = (W.shape[0], Ho, Wo)

    def describe(self):
        C, H, W = self.in_shape
        Co, Ho, Wo = self.out_shape
        return (f"conv {C}x{H}x{W} -> {Co}c{self.k} s{self.stride} p{self.padding} -> "
                f"{Co}x{Ho}x{Wo}")

    def _chunks(self, n):
        row = int(np.prod(self.out_shape[1:])) * int(np.prod(self.W.shape[1:])) * self.W.itemsize
        step = max(1, _COLS_BYTES // max(row, 1))
        return [(a, min(a + step, n)) for a in range(0, n, step)]

    def forward(self, x):
        T, B = x.shape[:2]
        xs = self._rows(x, self.in_shape)
        Co, Ho, Wo = self.out_shape
        Wm = self.W.reshape(Co, -1)
        out = np.empty((xs.shape[0], Co, Ho, Wo), dtype=np.result_type(x.dtype, self.W.dtype))
        for a, z in self._chunks(xs.shape[0]):
            cols = im2col(np.ascontiguousarray(xs[a:z]), self.k, self.stride, self.padding, Ho, Wo)
            I = cols.reshape(-1, Wm.shape[1]) @ Wm.T                  # (n·Ho·Wo, C_out)
            out[a:z] = I.reshape(z - a, Ho, Wo, Co).transpose(0, 3, 1, 2)
        if self.b is not None:
            out += self.b[:, None, None]
        return out.reshape((T, B) + self.out_shape)

    def backward(self, g, x, need_input_grad=True):
        T, B = g.shape[:2]
        gs = self._rows(g, self.out_shape, "gradient")
        xs = self._rows(x, self.in_shape)
        Co, Ho, Wo = self.out_shape
        C, H, W = self.in_shape
        Wm = self.W.reshape(Co, -1)
        dW = np.zeros_like(Wm, dtype=np.result_type(g.dtype, self.W.dtype))
        gx = np.empty(xs.shape, dtype=g.dtype) if need_input_grad else None
        for a, z in self._chunks(xs.shape[0]):
            gm = gs[a:z].transpose(0, 2, 3, 1).reshape(-1, Co)        # (n·Ho·Wo, C_out)
            cols = im2col(np.ascontiguousarray(xs[a:z]), self.k, self.stride, self.padding, Ho, Wo)
            dW += gm.T @ cols.reshape(-1, Wm.shape[1])
            if need_input_grad:
                gcols = (gm @ Wm).reshape(z - a, Ho, Wo, -1)
                gx[a:z] = col2im(gcols, C, H, W, self.k, self.stride, self.padding)
        grads = [dW.reshape(self.W.shape)]
        if self.b is not None:
            grads.append(gs.sum(axis=(0, 2, 3)))
        return (gx.reshape(x.shape) if need_input_grad else None), grads


class AvgPool2d(Layer):
    """S18: mean over k×k windows, stride k, no padding, floor; no parameters.

    Backward (exact): each input of a window gets g/k²; an odd last row or column gets 0.
    """

    kind = "avgpool"

    def __init__(self, in_shape, k=2):
        super().__init__()
        C, H, W = (int(v) for v in in_shape)
        self.k = int(k)
        if self.k < 1 or H < self.k or W < self.k:
            raise ShapeError(f"a{k} pooling does not fit a {H}x{W} map")
        self.in_shape, self.out_shape = (C, H, W), (C, H // self.k, W // self.k)

    def describe(self):
        return f"avgpool{self.k} {'x'.join(map(str, self.in_shape))} -> {'x'.join(map(str, self.out_shape))}"

    def forward(self, x):
        T, B = x.shape[:2]
        xs = self._rows(x, self.in_shape)
        C, Ho, Wo = self.out_shape
        k = self.k
        win = xs[:, :, :Ho * k, :Wo * k].reshape(-1, C, Ho, k, Wo, k)
        return win.mean(axis=(3, 5)).reshape((T, B) + self.out_shape)

    def backward(self, g, x, need_input_grad=True):
        if not need_input_grad:
            return None, []
        T, B = g.shape[:2]
        gs = self._rows(g, self.out_shape, "gradient")
        C, Ho, Wo = self.out_shape
        k = self.k
        gx = np.zeros((gs.shape[0],) + self.in_shape, dtype=g.dtype)
        gx[:, :, :Ho * k, :Wo * k] = np.repeat(np.repeat(gs, k, axis=2), k, axis=3) / (k * k)
        return gx.reshape((T, B) + self.in_shape), []


class Flatten(Layer):
    """C-order flatten over (c, y, x): index = c·H·W + y·W + x; backward is the inverse reshape."""

    kind = "flatten"

    def __init__(self, in_shape):
        super().__init__()
        self.in_shape = tuple(int(v) for v in in_shape)
        self.out_shape = (int(np.prod(self.in_shape)),)

    def describe(self):
        return f"flatten {'x'.join(map(str, self.in_shape))} -> {self.out_shape[0]}"

    def forward(self, x):
        T, B = x.shape[:2]
        return self._rows(x, self.in_shape).reshape(T, B, -1)

    def backward(self, g, x, need_input_grad=True):
        if not need_input_grad:
            return None, []
        T, B = g.shape[:2]
        return self._rows(g, self.out_shape, "gradient").reshape((T, B) + self.in_shape), []


def init_torch(fan_in, shape, rng, dtype=np.float64):
    """PyTorch's default init of Linear/Conv2d weights and biases: U(-1/√fan_in, 1/√fan_in)."""
    bound = 1.0 / np.sqrt(max(int(fan_in), 1))
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def init_rownorm(shape, rng, dtype=np.float64):
    """stbp S23: W ~ U[-1, 1], then each row (a conv output channel's C_in·k·k weights) / its L2 norm."""
    W = rng.uniform(-1.0, 1.0, size=shape)
    rows = W.reshape(shape[0], -1)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows.reshape(shape).astype(dtype)
