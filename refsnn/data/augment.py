"""Train-time augmentation (random crop with zero padding, horizontal flip) and per-channel
normalisation of image batches, as the CIFAR runs of the specs use them.

The specs' order (stbp 7 "Code, CIFAR10", tsslbp 3, spikebp 3 and 7.3), training batches only:

1. crop: pad the 0-255 image with P zero pixels on every side and take a uniformly random
   HxW window, i.e. shift the image by (dy, dx), each uniform in -P..P, filling with 0;
2. flip: reverse the columns (left-right) with probability 1/2;
3. scale to [0, 1] (byte / 255);
4. normalise per channel c: x = (p - mean_c) / std_c (also at test time). A padded pixel
   therefore becomes -mean_c / std_c, not 0.

Randomness (the run's one generator, refsnn/train.py): per batch of B images, first the crop
offsets ``rng.integers(0, 2P + 1, size=(B, 2))`` (column 0 the window's top row in the padded
image, column 1 its left column), then the flips ``rng.random(B) < 0.5``. Nothing is drawn for a
step that is off (no ``crop``, P = 0, no ``flip``), so a run without augmentation draws exactly as
before.

The augmentation is written ``crop4,flip`` (TrainConfig.augment, CLI ``--augment``): ``cropP`` with
P >= 0, ``flip``, comma-separated, each at most once; ``""`` or ``none`` for none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refsnn.errors import ConfigError, DataError

__all__ = ["Augment", "parse_augment", "crop_offsets", "crop", "flip_mask", "hflip",
           "augment_batch", "check_norm", "normalize", "images01"]


@dataclass(frozen=True)
class Augment:
    pad: int = 0          # crop padding P (0 = no crop)
    flip: bool = False

    @property
    def active(self) -> bool:
        return self.pad > 0 or self.flip


def parse_augment(text) -> Augment:
    """``"crop4,flip"`` -> Augment(pad=4, flip=True); ``""``/``"none"`` -> Augment()."""
    if text is None:
        return Augment()
    if not isinstance(text, str):
        raise ConfigError(f"augment must be a text like 'crop4,flip', got {text!r}")
    tokens = [t.strip().lower() for t in text.split(",") if t.strip()]
    if tokens == ["none"]:
        return Augment()
    pad, flip, seen = 0, False, set()
    for tok in tokens:
        kind = "crop" if tok.startswith("crop") else tok
        if kind in seen:
            raise ConfigError(f"augment {text!r} names {kind!r} twice; give each step once")
        seen.add(kind)
        if tok == "flip":
            flip = True
        elif tok.startswith("crop") and tok[4:].isdigit():
            pad = int(tok[4:])
        else:
            raise ConfigError(f"augment {text!r}: cannot read {tok!r}; use 'cropP' (random crop "
                              "with P zero pixels of padding, e.g. crop4) and/or 'flip' "
                              "(random left-right flip), comma-separated, or 'none'")
    return Augment(pad, flip)


def crop_offsets(rng: np.random.Generator, B: int, pad: int) -> np.ndarray:
    """(B, 2) int64: each image's window origin (row, column) in the padded image, in 0..2P."""
    return rng.integers(0, 2 * pad + 1, size=(B, 2))


def crop(x: np.ndarray, offsets: np.ndarray, pad: int) -> np.ndarray:
    """Windows of the zero-padded images: out[b, ..., i, j] = x[b, ..., i + oy - P, j + ox - P]
    where that index is inside the image, else 0. x: (B, ..., H, W); a new array, same shape."""
    if pad == 0:
        return x.copy()
    B, H, W = x.shape[0], x.shape[-2], x.shape[-1]
    widths = [(0, 0)] * (x.ndim - 2) + [(pad, pad), (pad, pad)]
    padded = np.pad(x, widths)                        # zeros: black before normalisation
    out = np.empty_like(x)
    for b in range(B):
        oy, ox = int(offsets[b, 0]), int(offsets[b, 1])
        out[b] = padded[b, ..., oy:oy + H, ox:ox + W]
    return out


def flip_mask(rng: np.random.Generator, B: int) -> np.ndarray:
    """(B,) bool: which images are flipped (probability 1/2 each)."""
    return rng.random(B) < 0.5


def hflip(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Images ``mask`` reversed left-right (last axis), the others as they are; a new array."""
    out = x.copy()
    out[mask] = x[mask][..., ::-1]
    return out


def augment_batch(x: np.ndarray, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """Crop then flip a batch x (B, C, H, W) as the module docstring says (draws in that order)."""
    if aug.pad > 0:
        x = crop(x, crop_offsets(rng, len(x), aug.pad), aug.pad)
    if aug.flip:
        x = hflip(x, flip_mask(rng, len(x)))
    return x


def check_norm(mean, std, channels=None) -> None:
    """Per-channel statistics: both empty, or both of length 1 or C, std > 0, all finite."""
    mean, std = tuple(mean or ()), tuple(std or ())
    if bool(mean) != bool(std):
        raise ConfigError("norm-mean and norm-std go together: give both (one value per "
                          "channel, e.g. --norm-mean 0.4914,0.4822,0.4465 --norm-std "
                          "0.2023,0.1994,0.2010) or neither")
    if not mean:
        return
    if len(mean) != len(std):
        raise ConfigError(f"norm-mean has {len(mean)} values but norm-std {len(std)}; give one "
                          "of each per channel")
    vals = np.asarray(mean + std, dtype=np.float64)
    if not np.all(np.isfinite(vals)) or min(std) <= 0:
        raise ConfigError(f"norm-mean {mean} / norm-std {std}: values must be finite and every "
                          "std > 0")
    if channels is not None and len(mean) not in (1, channels):
        raise ConfigError(f"norm-mean/norm-std have {len(mean)} values but the images have "
                          f"{channels} channel(s); give 1 or {channels}")


def normalize(x01: np.ndarray, mean, std) -> np.ndarray:
    """(x - mean_c) / std_c over axis 1 of x (B, C, ...), in float64."""
    x = np.asarray(x01, dtype=np.float64)
    extra = (1,) * (x.ndim - 2)
    m = np.asarray(mean, dtype=np.float64).reshape((-1,) + extra)
    s = np.asarray(std, dtype=np.float64).reshape((-1,) + extra)
    return (x - m) / s


def images01(ds, split: str, idx, rng, dtype, *, augment: str = "", mean=(), std=()):
    """Images ``idx`` of ``split`` as floats (n, *ds.shape): augmented (crop, flip on the bytes,
    ``rng`` drawn as the module says), scaled to [0, 1], normalised per channel if ``mean``.

    With neither augmentation nor normalisation this is ``ds.x01(split, idx, dtype)`` exactly.
    Normalised images are float64 (the encoder casts its output to the run's dtype).
    """
    aug = parse_augment(augment)
    if getattr(ds, "temporal", False) and (aug.active or mean):
        raise ConfigError(f"{ds.name!r} is an event set: --augment and --norm-mean/--norm-std "
                          "apply to image sets only; leave them empty")
    if not aug.active and not mean:
        return ds.x01(split, idx, dtype)
    raw = ds.train_x if split == "train" else ds.test_x
    x = raw[idx].reshape((-1,) + tuple(ds.shape))
    if aug.active:
        if len(ds.shape) != 3:
            raise DataError(f"{ds.name!r}: augmentation needs images (C, H, W), not {ds.shape}")
        x = augment_batch(x, aug, rng)
    if not mean:
        out = x.astype(dtype)
        out /= 255.0                                   # as Dataset.x01
        return out
    check_norm(mean, std, ds.shape[0])
    return normalize(x.astype(np.float64) / 255.0, mean, std)
