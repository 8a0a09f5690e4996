"""`refsnn nir export | import`: NIR graphs of a network (docs/nir.md; needs the extra `nir`).

    refsnn nir export runs/stbp/checkpoint.h5 stbp.nir            dt 1e-4 s, forward Euler
    refsnn nir import stbp.nir --method stbp net.h5                a checkpoint (epoch 0)
    refsnn nir import snntorch.nir --method stbp --dt 1e-4 net.h5  a file that does not record dt
"""

from __future__ import annotations

import click

from .cli import user_errors

RULE_HELP = "how tau maps to a per-step decay β: euler (β = 1 - dt/tau) or exact (β = exp(-dt/tau))"


@click.group()
def nir():
    """NIR graphs: export a checkpoint's network, import a graph as a checkpoint (docs/nir.md)."""


@nir.command("export")
@click.argument("checkpoint", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--dt", default=1e-4, show_default=True, type=float, help="seconds per time step")
@click.option("--integration", type=click.Choice(["euler", "exact"]), default="euler",
              show_default=True, help=RULE_HELP)
@user_errors
def export(checkpoint, out, dt, integration):
    """Write the network of CHECKPOINT as a NIR graph to OUT."""
    from .checkpoint import load_checkpoint, network_from_checkpoint
    from .nir import export_nir
    net = network_from_checkpoint(load_checkpoint(checkpoint))
    export_nir(net, out, dt=dt, integration=integration)
    click.echo(f"wrote {net.method.name} {net.arch} as NIR (dt {dt:g}, {integration}) to {out}")


@nir.command("import")
@click.argument("file", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--method", required=True, help="stbp, bpsta, spikebp or tsslbp")
@click.option("--dt", type=float, default=None, help="seconds per step (default: the file's)")
@click.option("--integration", type=click.Choice(["euler", "exact"]), default=None,
              help=RULE_HELP + " (default: the file's, else euler)")
@click.option("--param", "param_flags", multiple=True, metavar="NAME=VALUE",
              help="a hyper-parameter NIR does not carry (loss, variant, ...), repeatable")
@user_errors
def import_(file, out, method, dt, integration, param_flags):
    """Read the NIR graph FILE as a METHOD network and save it as the checkpoint OUT."""
    from .checkpoint import save_checkpoint
    from .cli import parse_param_flags
    from .config import TrainConfig
    from .methods import get_method
    from .nir import import_nir
    m = get_method(method)
    net = import_nir(file, m.name, dt=dt, integration=integration,
                     params=parse_param_flags(param_flags, m))
    cfg = TrainConfig().merged(dict(m.defaults)).merged({"arch": net.arch, "dtype": "float64"})
    save_checkpoint(out, net, cfg)
    click.echo(f"read {file} as {m.name} {net.arch}; wrote the checkpoint {out}")
