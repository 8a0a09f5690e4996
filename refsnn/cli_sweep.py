"""`refsnn compare` and `refsnn sweep CONFIG.toml` (refsnn/sweep.py does the work).

    refsnn compare --methods stbp,hm2bp,tsslbp,spikebp,bpsta --dataset mnist10k --arch 784-400-10
    refsnn sweep examples/sweep_mnist10k.toml [--workers N | --scheduler tcp://HOST:8786]

compare is a sweep over methods x seeds (each method's default run, with the dataset, network
and the options given here in common), trained one after another in this process unless
``--workers`` asks for a Dask LocalCluster. Both are resumable: the same command again skips
finished runs and continues unfinished ones from their last checkpoint (docs/sweep.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .cli import user_errors
from .errors import ConfigError


def _finish(runs, root, results, paper=None):
    from .sweep import group_rows, markdown_table, write_results
    paths = write_results(runs, results, root, paper=paper, echo=lambda s: click.echo(s, err=True))
    reports = {k: v for k, v in results.items() if isinstance(v, dict)}
    click.echo(markdown_table(group_rows(runs, reports), paper), nl=False)
    click.echo(f"tables: {paths['md']}, {paths['csv']}, {paths['runs_csv']}"
               + (f"; curves: {paths['png']}" if "png" in paths else ""), err=True)
    failed = [name for name, r in results.items() if not isinstance(r, dict)]
    if failed:
        raise ConfigError(f"{len(failed)} of {len(runs)} runs did not finish ("
                          f"{', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''}); see "
                          f"{Path(root) / 'log'}; the same command resumes them")


def _run(runs, root, *, paper=None, **kw):
    from .sweep import run_sweep
    try:
        results = run_sweep(runs, root, echo=lambda s: click.echo(s, err=True), **kw)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; the same command continues the sweep in {root}", err=True)
        sys.exit(130)
    _finish(runs, root, results, paper)


def _dry_run(runs, root):
    from .sweep import run_state
    for r in runs:
        click.echo(f"{run_state(root, r):<9} {r.name}")
    click.echo(f"{len(runs)} runs in {root}")


@click.command()
@click.option("--methods", default="stbp,hm2bp,tsslbp,spikebp,bpsta", show_default=True,
              help="comma-separated method names.")
@click.option("--dataset", default="mnist10k", show_default=True)
@click.option("--arch", default="784-400-10", show_default=True,
              help="the network every method trains.")
@click.option("--epochs", type=int, help="default: each method's own default run.")
@click.option("--steps", type=int, help="T for every method (default: each method's own).")
@click.option("--seeds", type=int, default=1, show_default=True, help="K: seeds 0 .. K-1.")
@click.option("--n-train", type=int, help="stratified subset of the training set (0 = all).")
@click.option("--n-test", type=int, help="stratified subset of the test set (0 = all).")
@click.option("--batch-size", type=int, help="default: each method's own.")
@click.option("--data-dir", type=click.Path(), help="where to look first for full datasets.")
@click.option("--out", type=click.Path(),
              help="sweep folder (default runs/compare-<dataset>-<arch>).")
@click.option("--workers", type=int,
              help="train on a Dask LocalCluster of N processes (extra `sweep`); default: one "
                   "run after another in this process.")
@click.option("--dry-run", is_flag=True, help="list the runs and their state, train nothing.")
@user_errors
def compare(methods, dataset, arch, epochs, steps, seeds, n_train, n_test, batch_size, data_dir,
            out, workers, dry_run):
    """Train several methods on the same data and network; one table of them all."""
    from .sweep import expand
    common = {"dataset": dataset, "arch": arch}
    for key, value in (("epochs", epochs), ("T", steps), ("n_train", n_train),
                       ("n_test", n_test), ("batch_size", batch_size)):
        if value is not None:
            common[key] = value
    sweep = expand({"methods": [m.strip() for m in methods.split(",") if m.strip()],
                    "seeds": seeds, "train": common})
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in
                   f"{Path(dataset).name}-{arch}")
    root = Path(out) if out else Path("runs") / f"compare-{safe}"
    if dry_run:
        return _dry_run(sweep.runs, root)
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers}: give at least 1")
    _run(sweep.runs, root, local=not workers or workers == 1, workers=workers,
         data_dir=data_dir)


@click.command()
@click.argument("config", type=click.Path())
@click.option("--out", type=click.Path(),
              help="sweep folder (default: the file's `out`, else runs/sweep-<file name>).")
@click.option("--workers", type=int,
              help="worker processes of the embedded LocalCluster (default min(cores, runs)).")
@click.option("--scheduler", metavar="ADDRESS",
              help="a running Dask scheduler (e.g. tcp://10.0.0.5:8786) instead of the "
                   "embedded cluster; the run folders must be on a file system its workers "
                   "share.")
@click.option("--data-dir", type=click.Path(), help="where to look first for full datasets.")
@click.option("--dry-run", is_flag=True, help="list the runs and their state, train nothing.")
@user_errors
def sweep(config, out, workers, scheduler, data_dir, dry_run):
    """Run a grid or list of runs (CONFIG.toml, docs/sweep.md) on Dask; resumable."""
    from .sweep import load_sweep
    spec = load_sweep(config)
    root = Path(out or spec.out or Path("runs") / f"sweep-{Path(config).stem}")
    if dry_run:
        return _dry_run(spec.runs, root)
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers}: give at least 1")
    _run(spec.runs, root, paper=spec.paper, workers=workers, scheduler=scheduler,
         data_dir=data_dir)
