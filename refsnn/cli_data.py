"""`refsnn data ...`: look into event files and generate the offline N-MNIST-like set.

    refsnn data inspect FILE [--format nmnist|aedat|cifar10-dvs|shd]
    refsnn data synth-events OUT [--n-train N] [--n-test N] [--seed S] [--contrast C]

A user error (missing or corrupt file, bad option) prints one line ``Error: ...`` on stderr and
exits with status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

from refsnn.data.events import (
    CIFAR10_DVS_CLASSES, DVS128_SENSOR, FORMATS, GESTURE_CLASSES, NMNIST_SENSOR, SHD_UNITS,
    guess_format, read_aedat31, read_cifar10_dvs, read_gesture_labels, read_nmnist, read_shd,
)
from refsnn.errors import RefsnnError

__all__ = ["data", "inspect_lines"]


class _UserError(click.ClickException):
    exit_code = 2                     # show() prints "Error: <message>" to stderr


def _span(t) -> str:
    if len(t) == 0:
        return "no time span"
    lo, hi = int(t.min()), int(t.max())
    return f"t {lo}..{hi} us (span {hi - lo} us)"


def _line(name, fmt, ev, sensor, label=None, what="events") -> str:
    parts = [f"{name}: {fmt}", f"{len(ev)} {what}", sensor, _span(ev["t"])]
    if label is not None:
        parts.append(f"label {label}")
    return ", ".join(parts)


def inspect_lines(path, fmt: str | None = None) -> list[str]:
    """The lines `refsnn data inspect` prints for ``path`` (one per recording)."""
    path = Path(path)
    fmt = fmt or guess_format(path)
    if fmt == "nmnist":
        ev = read_nmnist(path)
        label = None
        if path.parent.name.isdigit() and path.parent.parent.name in ("Train", "Test"):
            label = f"{path.parent.name} (from its folder)"
        h, w = NMNIST_SENSOR
        return [_line(path, fmt, ev, f"sensor {w}x{h}", label)]
    if fmt == "aedat":
        ev = read_aedat31(path)
        h, w = DVS128_SENSOR
        csv = path.with_name(path.stem + "_labels.csv")
        if not csv.is_file():
            return [_line(path, fmt, ev, f"sensor {w}x{h}", f"none (no {csv.name} beside it)")]
        lines = []
        for i, (label, start, end) in enumerate(read_gesture_labels(csv)):
            sel = ev[(ev["t"] >= start) & (ev["t"] < end)]
            lines.append(_line(f"{path} [{i}]", fmt, sel, f"sensor {w}x{h}",
                               f"{label} ({GESTURE_CLASSES[label]})"))
        return lines
    if fmt == "cifar10-dvs":
        ev = read_cifar10_dvs(path)
        label = None
        if path.parent.name in CIFAR10_DVS_CLASSES:
            c = path.parent.name
            label = f"{CIFAR10_DVS_CLASSES.index(c)} ({c}, from its folder)"
        h, w = DVS128_SENSOR
        return [_line(path, fmt, ev, f"sensor {w}x{h}", label)]
    if fmt == "shd":
        samples, labels = read_shd(path)
        return [_line(f"{path} [{i}]", fmt, ev, f"{SHD_UNITS} units", int(lab), "spikes")
                for i, (ev, lab) in enumerate(zip(samples, labels))]
    raise _UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


@click.group("data")
def data():
    """Event files: inspect them, generate the offline N-MNIST-like set."""


@data.command("inspect")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="File format (guessed from the file when not given).")
def inspect_cmd(file, fmt):
    """Print one line per recording of FILE: format, events, sensor, time span, label."""
    try:
        lines = inspect_lines(file, fmt)
    except RefsnnError as err:
        raise _UserError(str(err)) from None
    for ln in lines:
        click.echo(ln)
    if not lines:
        click.echo(f"{file}: no recordings")


@data.command("synth-events")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--n-train", type=click.IntRange(1, 8000), default=8000, show_default=True,
              help="Recordings made from the first N mnist10k training images.")
@click.option("--n-test", type=click.IntRange(1, 2000), default=2000, show_default=True,
              help="Recordings made from the first N mnist10k test images.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--contrast", type=float, default=0.5, show_default=True,
              help="Contrast threshold C (ln intensity); lower gives more events.")
@click.option("--quiet", is_flag=True, help="No progress on stderr.")
def synth_events_cmd(out, n_train, n_test, seed, contrast, quiet):
    """Write the nmnist-synth recordings to OUT in the N-MNIST layout (Train/<digit>/<id>.bin)."""
    from refsnn.data.registry import load_dataset
    from refsnn.data.synth import MARKER, SynthParams, write_nmnist_synth

    try:
        params = SynthParams(contrast=contrast)
        src = load_dataset("mnist10k")
        total = n_train + n_test
        step = max(1, total // 10)

        def progress(done, total):
            if not quiet and (done % step == 0 or done == total):
                print(f"synth-events: {done}/{total} recordings", file=sys.stderr, flush=True)

        write_nmnist_synth(out, (src.train_x[:n_train], src.train_y[:n_train]),
                           (src.test_x[:n_test], src.test_y[:n_test]), seed=seed, params=params,
                           progress=progress)
    except RefsnnError as err:
        raise _UserError(str(err)) from None
    except OSError as err:
        raise _UserError(f"cannot write {out}: {err.strerror or err}") from None
    meta = json.loads((Path(out) / MARKER).read_text())
    mean = np.mean([v["events_mean"] for v in meta["splits"].values()])
    click.echo(f"wrote {total} recordings to {out} (about {mean:.0f} events each); train on them "
               f"with --dataset nmnist-synth --data-dir {out}")
