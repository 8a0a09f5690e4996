"""The reference oracle: one sample, float64, fully connected, exactly as each spec defines it.

``run_case`` is the contract of docs/spec/README.md ("The oracle contract"): another
implementation (PyTorch, JAX, hardware) feeds the same weights, inputs and target and must get the
same spikes (exactly) and the same loss and gradients (to float64 round-off).
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError, ShapeError
from .methods import get_method


def run_case(method: str, weights, inputs, *, label=None, target=None, biases=None,
             params=None) -> dict:
    """Compute one sample of ``method`` exactly as its spec defines it, in float64.

    Parameters
    ----------
    method : str
        "stbp", "hm2bp", "tsslbp", "spikebp" or "bpsta".
    weights : list of arrays
        ``W_l`` of shape (n_l, n_{l-1}); ``W_l[i, j]`` goes from pre-neuron j to post-neuron i.
    inputs : array (T, n_0)
        What the spec says the network receives: 0/1 spikes or analog currents.
    label : int, optional
        Class index. ``target`` (the method's own target; its spec gives the shape) overrides it.
    biases : list of (n_l,) arrays, optional
        For the methods whose spec has biases; zeros if absent.
    params : dict, optional
        Hyper-parameters by refsnn name (docs/spec/README.md); unknown names raise ConfigError.

    Returns
    -------
    dict with at least ``"spikes"`` (list of (T, n_l) arrays), ``"loss"`` (float), ``"grads"``
    (list shaped like ``weights``) and the method's intermediate quantities under its spec's names.

    Examples
    --------
    >>> import numpy as np
    >>> out = run_case("stbp", [np.full((2, 3), 0.4)], np.ones((4, 3)), label=1)
    >>> [s.shape for s in out["spikes"]], round(out["loss"], 6)
    ([(4, 2)], 0.5)
    """
    m = get_method(method)
    p = m.Params.from_dict(params)
    W = _as_float_list("weights", weights)
    if not W:
        raise ShapeError("weights is empty; give one (n_l, n_{l-1}) array per layer")
    for l, w in enumerate(W):
        if w.ndim != 2:
            raise ShapeError(f"weights[{l}] has shape {w.shape}; run_case takes dense layers, "
                             "each W_l of shape (n_l, n_{l-1})")
    x = _as_float("inputs", inputs)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ShapeError(f"inputs has shape {x.shape}; run_case takes one sample of shape "
                         f"(T, n_0) = (T, {W[0].shape[1]})")
    if x.shape[1] != W[0].shape[1]:
        raise ShapeError(f"inputs has {x.shape[1]} columns but weights[0] reads "
                         f"{W[0].shape[1]} inputs (shape {W[0].shape})")
    for l in range(1, len(W)):
        if W[l].shape[1] != W[l - 1].shape[0]:
            raise ShapeError(f"weights[{l}] has shape {W[l].shape}: it must read the "
                             f"{W[l - 1].shape[0]} neurons of layer {l} (weights[{l - 1}] has "
                             f"shape {W[l - 1].shape})")
    b = None
    if biases is not None:
        b = _as_float_list("biases", biases)
        if len(b) != len(W) or any(bl.shape != (wl.shape[0],) for bl, wl in zip(b, W)):
            raise ShapeError(f"biases must be one (n_l,) array per layer, shapes "
                             f"{[(w.shape[0],) for w in W]}; got {[bl.shape for bl in b]}")
    if target is not None:
        target = _as_float("target", target)
    elif label is not None:
        if not float(label).is_integer():
            raise ConfigError(f"label={label!r} must be a class index (an integer)")
        label = int(label)
    else:
        raise ConfigError("give a label (class index) or the method's own target")
    return m.run_case(W, x, label=label, target=target, biases=b, p=p)


def _as_float(name, a) -> np.ndarray:
    try:
        arr = np.array(a, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ShapeError(f"{name} must be a numeric array ({err})") from None
    if not np.all(np.isfinite(arr)):
        raise ShapeError(f"{name} holds NaN or inf; every value must be finite")
    return arr


def _as_float_list(name, arrays) -> list[np.ndarray]:
    if isinstance(arrays, np.ndarray):
        raise ShapeError(f"{name} must be a list with one array per layer, not one array")
    return [_as_float(f"{name}[{l}]", a) for l, a in enumerate(arrays)]
