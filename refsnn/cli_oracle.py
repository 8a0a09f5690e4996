"""`refsnn oracle export | check | compare`: golden vectors for other implementations.

    refsnn oracle export --method stbp --cases 50 --seed 1 stbp.h5
    refsnn oracle check stbp.h5                          recompute with refsnn, report agreement
    refsnn oracle compare stbp.h5 --impl mysnn:run_case  check another implementation

compare calls ``function(method, weights, inputs, label=, target=, biases=, params=)`` (the
signature of refsnn.oracle.run_case) on every case and exits with status 1 when a quantity is off
by more than --rtol, or spikes differ, or the implementation raised.
"""

from __future__ import annotations

import click

from .cli import user_errors


@click.group()
def oracle():
    """Golden vectors: export, re-check, compare another implementation (docs/oracle-format.md)."""


def _sizes(text):
    if not text:
        return None
    from .errors import ConfigError
    try:
        sizes = [int(v) for v in text.split("-")]
    except ValueError:
        raise ConfigError(f"--arch {text!r} must be dense layer sizes like 8-6-4") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise ConfigError(f"--arch {text!r} needs an input size and at least one layer, all >= 1")
    return sizes


@oracle.command("export")
@click.option("--method", required=True, help="stbp, hm2bp, tsslbp, spikebp or bpsta")
@click.option("--cases", default=20, show_default=True, type=int, help="number of random cases")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--arch", default="", help="fixed dense sizes n_0-n_1-...-n_L (default: random, 1-3 layers)")
@click.option("--steps", "T", default=0, type=int, help="fixed T (default: random 2-10)")
@click.option("--param", "param_flags", multiple=True, metavar="NAME=VALUE",
              help="pin a parameter in every case (repeatable), e.g. --param variant=code")
@click.argument("out", type=click.Path(dir_okay=False))
@user_errors
def export(method, cases, seed, arch, T, param_flags, out):
    """Write random cases of METHOD with refsnn's answers to OUT (HDF5)."""
    from .cli import parse_param_flags
    from .conformance import export_cases
    from .methods import get_method
    fixed = parse_param_flags(param_flags, get_method(method))
    n = export_cases(method, out, n=cases, seed=seed, sizes=_sizes(arch), T=T or None, fixed=fixed)
    click.echo(f"wrote {n} {method} cases to {out}")


@oracle.command("check")
@click.argument("file", type=click.Path())
@click.option("--rtol", default=1e-9, show_default=True, type=float)
@user_errors
def check(file, rtol):
    """Recompute every case of FILE with refsnn and report agreement."""
    from .conformance import check_file
    comp = check_file(file)
    click.echo(comp.table(rtol))
    raise SystemExit(0 if comp.passed(rtol) else 1)


@oracle.command("compare")
@click.argument("file", type=click.Path())
@click.option("--impl", required=True, help="module:function with run_case's signature")
@click.option("--rtol", default=1e-9, show_default=True, type=float)
@user_errors
def compare(file, impl, rtol):
    """Run another implementation on every case of FILE and tabulate its errors."""
    from .conformance import compare_impl, load_impl
    fn = load_impl(impl)
    comp = compare_impl(file, fn)
    click.echo(comp.table(rtol))
    raise SystemExit(0 if comp.passed(rtol) else 1)
