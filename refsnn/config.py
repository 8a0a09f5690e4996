"""TrainConfig: every option of a training run, with checks; presets and defaults are dicts of it.

A method's ``defaults`` (the run of plain ``refsnn train --method M``) and each of its ``presets``
(spec section 8, docs/spec/README.md "Preset names") are dicts with keys of this dataclass; the
key ``params`` holds the method's hyper-parameters by refsnn name. The CLI layers them:
TrainConfig defaults < method defaults < preset < explicit flags.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "step", "inv_sqrt", "warmup_cosine")
DTYPES = ("float64", "float32")


@dataclass(frozen=True)
class TrainConfig:
    """Options of one training run (names are the CLI's, with dashes as underscores)."""

    dataset: str = "mnist10k"        # a registry name or a folder of IDX files
    arch: str = "784-400-10"         # network/parse_arch notation
    T: int = 8                       # time steps per sample
    epochs: int = 15
    batch_size: int = 50
    optimizer: str = "adam"          # adam | adamw (decoupled weight decay) | sgd (+momentum)
    lr: float = 1e-3
    momentum: float = 0.0            # sgd only
    betas: tuple = (0.9, 0.999)      # adam, adamw
    eps: float = 1e-8                # adam, adamw
    weight_decay: float = 0.0        # sgd: coupled (g + wd·w); adamw: decoupled
    grad_clip_norm: float = 0.0      # > 0: scale all grads so their global L2 norm is at most this
    lr_schedule: str = "constant"    # constant | step | inv_sqrt | warmup_cosine (refsnn.optim.lr_at)
    lr_milestones: tuple = ()        # step: first 0-based epochs that run at the next lower rate
    lr_gamma: float = 0.1            # step: factor applied at each milestone
    warmup_epochs: int = 0           # warmup_cosine
    encoding: str = "bernoulli"      # refsnn.encoding name
    binning: str = ""                # event sets: refsnn.data.binning rule ("" = the set's default)
    encoding_kw: dict = field(default_factory=dict)   # its keywords (rate=, mean=, std=...)
    seed: int = 0
    dtype: str = "float64"
    n_train: int = 0                 # > 0: a stratified subset of the training set (quick runs)
    n_test: int = 0
    init: str = ""                   # "" = the method's own init rule; "torch" | "rownorm"
    params: dict = field(default_factory=dict)   # the method's hyper-parameters
    augment: str = ""                # training batches: "crop4,flip" etc. (refsnn.data.augment)
    norm_mean: tuple = ()            # per-channel (x - mean_c)/std_c after scaling to [0, 1]
    norm_std: tuple = ()             #   (image sets, train and test; () = none)
    dense_lr_scale: float = 1.0      # lr factor of the Dense layers' arrays (stbp cifar: 0.1)

    def __post_init__(self):
        def bad(msg):
            raise ConfigError(msg)
        for name in ("T", "epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(f"{name.replace('_', '-')}={v!r} must be a positive integer")
        for name in ("lr", "momentum", "eps", "weight_decay", "grad_clip_norm", "lr_gamma"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(f"{name.replace('_', '-')}={v!r} must be a finite number >= 0")
        if self.lr <= 0:
            bad(f"lr={self.lr!r} must be > 0")
        if self.optimizer not in OPTIMIZERS:
            bad(f"optimizer {self.optimizer!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in SCHEDULES:
            bad(f"lr-schedule {self.lr_schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
        if self.dtype not in DTYPES:
            bad(f"dtype {self.dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            bad(f"betas={self.betas!r} must be two numbers in [0, 1)")
        from .data.augment import check_norm, parse_augment
        parse_augment(self.augment)
        check_norm(self.norm_mean, self.norm_std)
        v = self.dense_lr_scale
        if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                or v <= 0):
            bad(f"dense-lr-scale={v!r} must be a finite number > 0")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown training option(s) {', '.join(unknown)}; valid: "
                              f"{', '.join(sorted(names))}")
        vals = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**vals)

    def merged(self, overrides: dict) -> "TrainConfig":
        """A copy with ``overrides`` applied; ``params`` are merged key by key."""
        over = dict(overrides)
        params = {**self.params, **over.pop("params", {})}
        return TrainConfig.from_dict({**self.as_dict(), **over, "params": params})

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
