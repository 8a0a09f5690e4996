"""Optimizers and learning-rate schedules, written out as their update equations.

Each optimizer is one small numba loop over the entries of one parameter array (the array is
updated in place), plus a Python class holding its state (the step count k and the moment or
momentum buffers) that :meth:`Optimizer.state_dict` / :meth:`Optimizer.load_state_dict` save and
restore exactly, so that a resumed run continues bit for bit.

The equations are PyTorch's (``torch.optim.SGD``, ``Adam``, ``AdamW``), as the specs quote them
(stbp 7, hm2bp 7, tsslbp 7, bpsta 7, spikebp 7.3). With g the gradient of the batch loss, wd the
weight decay, lr the learning rate of the current epoch (:func:`lr_at`):

SGD, momentum μ, dampening 0, not Nesterov; buffer B = 0 at the start::

    d = g + wd·w            (coupled weight decay; skipped when wd = 0)
    B ← μ·B + d,  w ← w − lr·B          (μ > 0)
    w ← w − lr·d                        (μ = 0)

Adam, step k = 1, 2, ... (one count for all arrays), m = v = 0 at the start::

    g ← g + wd·w            (coupled, PyTorch Adam's weight_decay; skipped when wd = 0)
    m ← β1·m + (1 − β1)·g
    v ← β2·v + (1 − β2)·g²
    w ← w − lr · (m / (1 − β1^k)) / (√v / √(1 − β2^k) + ε)      (bias correction as stbp 7 writes it)

AdamW: the same Adam step without the coupled term, preceded by the decoupled decay
``w ← w − lr·wd·w``, computed as w·(1 − lr·wd) as PyTorch does.

Global gradient-norm clipping (:func:`clip_grad_norm`, tsslbp 7 step 4, PyTorch's
``clip_grad_norm_``): N = the L2 norm of all gradients as one vector; every gradient is multiplied
by max_norm / (N + 1e-6) when that factor is below 1.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .errors import CheckpointError, ConfigError

# --------------------------------------------------------------------------------------------
# Update kernels: one equation block each, over the flat entries of one array
# --------------------------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def sgd_update(w, g, buf, lr, momentum, weight_decay):
    """SGD with momentum (PyTorch, dampening 0): d = g + wd·w; B ← μ·B + d; w ← w − lr·B.

    w, g, buf : 1-D arrays of one size (buf is unused when μ = 0). Updates w and buf in place.
    """
    for i in prange(w.size):                            # entry by entry: the same bits
        d = g[i]
        if weight_decay != 0.0:
            d = d + weight_decay * w[i]                 # coupled weight decay
        if momentum != 0.0:
            buf[i] = momentum * buf[i] + d              # B ← μ·B + d
            d = buf[i]
        w[i] = w[i] - lr * d


@njit(cache=True, parallel=True)
def adam_update(w, g, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, k):
    """Adam (decoupled = False) or AdamW (decoupled = True), step k >= 1, PyTorch's form.

    AdamW first: w ← w·(1 − lr·wd). Adam: g ← g + wd·w. Then m ← β1·m + (1 − β1)·g,
    v ← β2·v + (1 − β2)·g², w ← w − (lr/(1 − β1^k)) · m / (√v/√(1 − β2^k) + ε).
    w, g, m, v : 1-D arrays of one size, updated in place (w, m, v).
    """
    step_size = lr / (1.0 - beta1 ** k)                 # lr / bias correction 1
    bc2_sqrt = math.sqrt(1.0 - beta2 ** k)              # √(bias correction 2)
    for i in prange(w.size):                            # entry by entry: the same bits
        gi = g[i]
        if weight_decay != 0.0:
            if decoupled:
                w[i] = w[i] * (1.0 - lr * weight_decay)  # AdamW: w ← w − lr·wd·w
            else:
                gi = gi + weight_decay * w[i]            # Adam: coupled L2
        m[i] = beta1 * m[i] + (1.0 - beta1) * gi
        v[i] = beta2 * v[i] + (1.0 - beta2) * gi * gi
        w[i] = w[i] - step_size * (m[i] / (math.sqrt(v[i]) / bc2_sqrt + eps))


# --------------------------------------------------------------------------------------------
# Optimizer classes: hold the state, check arrays, call the kernels
# --------------------------------------------------------------------------------------------


def _order(a: np.ndarray) -> str:
    """The memory order of a contiguous array: "F" for a Fortran-ordered one (a dense layer
    stores W so, Wᵀ contiguous: kernels/stbp_fused.py), else "C"."""
    return "F" if a.flags.f_contiguous and not a.flags.c_contiguous else "C"


def _flat(a: np.ndarray, what: str) -> np.ndarray:
    """A 1-D view of a C- or F-contiguous array in its memory order (never a copy: the kernels
    update it in place). Entries of arrays of one layout pair up by position in that order."""
    if not (a.flags.c_contiguous or a.flags.f_contiguous):
        raise ValueError(f"{what} must be contiguous (C or Fortran order) to be updated in place")
    return a.ravel(order=_order(a))


class Optimizer:
    """Base class: ``step(params, grads, lr)`` updates every array of ``params`` in place.

    ``lr`` is one rate for all arrays, or a sequence of one rate per array (per-layer-group
    rates, e.g. TrainConfig.dense_lr_scale); the step count k is shared either way.

    State: ``k`` (steps taken) and ``buffers``: name -> list of arrays shaped like the params.
    """

    name = ""
    buffer_names: tuple = ()

    def __init__(self, params):
        self.k = 0
        self.shapes = [tuple(p.shape) for p in params]
        self.dtypes = [p.dtype for p in params]
        self.orders = [_order(p) for p in params]
        self.buffers = {n: [np.zeros(p.shape, p.dtype, order=o) for p, o in zip(params, self.orders)]
                        for n in self.buffer_names}

    def hyper(self) -> dict:
        """The hyper-parameters (saved beside the state; a resume must use the same)."""
        return {}

    def step(self, params, grads, lr: float) -> None:
        if len(params) != len(self.shapes) or len(grads) != len(params):
            raise ValueError(f"{self.name}: built for {len(self.shapes)} arrays, got "
                             f"{len(params)} params and {len(grads)} grads")
        for i, (w, g) in enumerate(zip(params, grads)):
            if w.shape != self.shapes[i] or np.shape(g) != self.shapes[i]:
                raise ValueError(f"{self.name}: array {i} has shape {w.shape} and gradient "
                                 f"{np.shape(g)}; the optimizer was built for {self.shapes[i]}")
        lrs = [float(lr)] * len(params) if np.ndim(lr) == 0 else [float(v) for v in lr]
        if len(lrs) != len(params):
            raise ValueError(f"{self.name}: {len(lrs)} learning rates for {len(params)} arrays")
        self.k += 1
        for i, (w, g) in enumerate(zip(params, grads)):
            o = _order(w)
            if o != self.orders[i]:                  # the array was replaced by one of another
                self.orders[i] = o                   # layout: its buffers follow (same values)
                for bufs in self.buffers.values():
                    bufs[i] = np.array(bufs[i], order=o)
            g = np.asarray(g, dtype=w.dtype).ravel(order=o)
            self._update(i, _flat(w, f"parameter {i}"), g, lrs[i])

    def _update(self, i, w, g, lr):
        raise NotImplementedError

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: name, hyper-parameters, k, buffer copies."""
        return {"name": self.name, "hyper": self.hyper(), "k": self.k,
                "buffers": {n: [b.copy() for b in bufs] for n, bufs in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output; a mismatch raises a CheckpointError."""
        if state.get("name") != self.name:
            raise CheckpointError(f"the saved optimizer state is {state.get('name')!r}, "
                                  f"not {self.name!r}; resume with --optimizer "
                                  f"{state.get('name')}")
        saved = state.get("buffers", {})
        if set(saved) != set(self.buffer_names):
            raise CheckpointError(f"{self.name} state holds buffers {sorted(saved)}, expected "
                                  f"{sorted(self.buffer_names)}")
        new = {}
        for n in self.buffer_names:
            arrs = list(saved[n])
            if [tuple(np.shape(a)) for a in arrs] != self.shapes:
                raise CheckpointError(f"{self.name} buffer {n!r} has shapes "
                                      f"{[tuple(np.shape(a)) for a in arrs]}; the network's "
                                      f"arrays are {self.shapes}")
            new[n] = [np.array(a, dtype=dt, copy=True, order=o)
                      for a, dt, o in zip(arrs, self.dtypes, self.orders)]
        k = int(state["k"])
        if k < 0:
            raise CheckpointError(f"{self.name} step count k={k} must be >= 0")
        self.k = k
        self.buffers = new


class SGD(Optimizer):
    name = "sgd"
    buffer_names = ("momentum_buffer",)

    def __init__(self, params, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)

    def hyper(self):
        return {"momentum": self.momentum, "weight_decay": self.weight_decay}

    def _update(self, i, w, g, lr):
        sgd_update(w, g, _flat(self.buffers["momentum_buffer"][i], "buffer"), lr, self.momentum,
                   self.weight_decay)


class Adam(Optimizer):
    name = "adam"
    buffer_names = ("m", "v")
    decoupled = False

    def __init__(self, params, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)

    def hyper(self):
        return {"betas": [self.beta1, self.beta2], "eps": self.eps,
                "weight_decay": self.weight_decay}

    def _update(self, i, w, g, lr):
        m, v = (_flat(self.buffers[n][i], "buffer") for n in ("m", "v"))
        adam_update(w, g, m, v, lr, self.beta1, self.beta2, self.eps, self.weight_decay,
                    self.decoupled, self.k)


class AdamW(Adam):
    name = "adamw"
    decoupled = True


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def make_optimizer(config, params) -> Optimizer:
    """The optimizer a TrainConfig names, over ``params`` (a Network's arrays)."""
    name = config.optimizer
    if name == "sgd":
        return SGD(params, momentum=config.momentum, weight_decay=config.weight_decay)
    if name in ("adam", "adamw"):
        return OPTIMIZERS[name](params, betas=config.betas, eps=config.eps,
                                weight_decay=config.weight_decay)
    raise ConfigError(f"optimizer {name!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")


# --------------------------------------------------------------------------------------------
# Gradient clipping and learning-rate schedules
# --------------------------------------------------------------------------------------------


def grad_norm(grads) -> float:
    """The L2 norm of all gradients taken as one vector."""
    return math.sqrt(sum(float(np.vdot(g, g)) for g in grads))


def clip_grad_norm(grads, max_norm: float) -> tuple[list, float]:
    """PyTorch's ``clip_grad_norm_``: (clipped grads, N). Factor max_norm/(N + 1e-6) when < 1.

    Returns new arrays where the factor applies (the input arrays are left as they are).
    """
    total = grad_norm(grads)
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        grads = [g * np.asarray(coef, dtype=np.result_type(g)) for g in grads]
    return list(grads), total


def lr_at(config, epoch: int) -> float:
    """Learning rate of 0-based ``epoch`` under ``config.lr_schedule``; held for the whole epoch.

    - ``constant``: lr.
    - ``step``: lr multiplied by lr_gamma once for each milestone <= epoch (``lr_milestones`` are
      the first 0-based epochs that run at the next lower rate; stbp 7 "×0.1 after epochs 40
      and 80" is milestones (41, 81)).
    - ``inv_sqrt`` (hm2bp 7): epochs 0 and 1 at lr, epoch e >= 1 at lr/√e.
    - ``warmup_cosine`` (bpsta 7), W = warmup_epochs, E = epochs: e < W: lr/(W − e);
      e >= W: lr·0.5·(1 + cos(π (e − W)/(E − W))).
    """
    e = int(epoch)
    if e < 0:
        raise ConfigError(f"epoch {epoch} must be >= 0")
    lr, kind = float(config.lr), config.lr_schedule
    if kind == "constant":
        return lr
    if kind == "step":
        for m in sorted(config.lr_milestones):
            if e >= m:
                lr = lr * float(config.lr_gamma)         # cumulative, as the codes multiply
        return lr
    if kind == "inv_sqrt":
        return lr if e == 0 else lr / math.sqrt(e)
    if kind == "warmup_cosine":
        W, E = int(config.warmup_epochs), int(config.epochs)
        if e < W:
            return lr / (W - e)
        return lr * 0.5 * (1.0 + math.cos(math.pi * (e - W) / (E - W)))
    raise ConfigError(f"lr-schedule {kind!r} is unknown; choose one of constant, step, "
                      "inv_sqrt, warmup_cosine")
