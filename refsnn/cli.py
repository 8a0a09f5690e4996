"""The `refsnn` command line (click).

    refsnn train --method stbp                      the method's default run (needs nothing else)
    refsnn train --method stbp --preset mnist-cnn32 a paper configuration (spec section 8)
    refsnn train --resume --out runs/x              continue an interrupted run, bit for bit
    refsnn eval runs/x/checkpoint.h5                test accuracy of a checkpoint
    refsnn gradcheck --method stbp --cases 5        hand gradients vs central finite differences
    refsnn methods [NAME]                           methods, parameters, defaults, presets
    refsnn datasets                                 datasets and where they are found
    refsnn compare --methods stbp,hm2bp --seeds 3   several methods, same data and network
    refsnn sweep CONFIG.toml                        a grid of runs on Dask (docs/sweep.md)

Options of a run are layered: TrainConfig defaults < the method's ``defaults`` < ``--preset`` <
explicit flags. A preset's ``params`` replace the default run's (a parameter the preset does not
name keeps the spec's default, spec 8). A user mistake prints one line ``Error: ...`` on stderr
and exits with status 2; a bug keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from pathlib import Path

# Threading policy (benchmarks/README.md, "Threading"): numba's prange kernels get the cores, BLAS
# runs on one thread. Two thread pools (numba's OpenMP one and OpenBLAS's) on the same cores wait
# for each other; on a shared 2-core machine a default STBP step took 285 ms with 2 BLAS threads
# and 48 ms with 1 (same results); a BLAS call made from inside a prange needs one BLAS thread
# anyway. OpenBLAS/MKL read these when numpy loads, libgomp when numba starts its pool, so they
# must be set before either is imported (nothing above imports them). Passive waiting keeps
# idle numba threads off the cores. A user's setting wins.
for _var, _value in (("OPENBLAS_NUM_THREADS", "1"), ("MKL_NUM_THREADS", "1"),
                     ("OMP_WAIT_POLICY", "passive")):
    os.environ.setdefault(_var, _value)

import click

from . import __version__
from .errors import ConfigError, RefsnnError


class UserError(click.ClickException):
    """A RefsnnError shown click's way: ``Error: <message>`` on stderr, exit status 2."""

    exit_code = 2


def user_errors(fn):
    """Turn a RefsnnError raised by ``fn`` into a one-line UserError (no traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RefsnnError as err:
            raise UserError(" ".join(str(err).split())) from None
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="refsnn")
def main():
    """refsnn: five published SNN backpropagation methods, in float64, on the CPU."""


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------

#: CLI flag (click's parameter name) -> TrainConfig field
FLAG_FIELDS = {
    "dataset": "dataset", "arch": "arch", "epochs": "epochs", "batch_size": "batch_size",
    "lr": "lr", "optimizer": "optimizer", "steps": "T", "seed": "seed", "dtype": "dtype",
    "encoding": "encoding", "lr_schedule": "lr_schedule", "momentum": "momentum",
    "weight_decay": "weight_decay", "grad_clip": "grad_clip_norm", "n_train": "n_train",
    "n_test": "n_test", "init": "init", "binning": "binning",
    "augment": "augment", "norm_mean": "norm_mean", "norm_std": "norm_std",
    "dense_lr_scale": "dense_lr_scale",
}


def _floats(ctx, param, value):
    """``--norm-mean 0.49,0.48,0.45`` -> (0.49, 0.48, 0.45); ``none`` -> () (clears a preset's)."""
    if value is None:
        return None
    if value.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated numbers, one per channel, "
                                 "e.g. 0.4914,0.4822,0.4465 (or none)") from None


def parse_param_flags(pairs, method) -> dict:
    """``--param NAME=VALUE`` texts -> {name: value}, checked by the method's Params."""
    from .methods.base import parse_value
    fields = {f.name: f for f in dataclasses.fields(method.Params)}
    out = {}
    for text in pairs:
        if "=" not in text:
            raise ConfigError(f"--param {text!r} needs the form NAME=VALUE, e.g. --param v_th=0.5")
        name, value = (s.strip() for s in text.split("=", 1))
        name = name.replace("-", "_")
        if name in fields:
            default = fields[name].default
            parsed = parse_value(value, method.name, name)
            if isinstance(default, bool) and not isinstance(parsed, bool):
                raise ConfigError(f"--param {name}={value!r}: {name} is a switch; give true or "
                                  "false")
            if (isinstance(default, (int, float)) and not isinstance(default, bool)
                    and isinstance(parsed, str)):
                raise ConfigError(f"--param {name}={value!r}: {name} takes a number (default "
                                  f"{default!r})")
        out[name] = value
    return out


def check_params(method, params: dict):
    """Params.from_dict, with a type or value mistake in user input shown as a ConfigError."""
    try:
        return method.Params.from_dict(params)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{method.name}: bad parameter value ({err}); see "
                          f"`refsnn methods {method.name}`") from None


def build_config(method, preset=None, flags=None, param_pairs=(), base=None):
    """The TrainConfig of a run: base < method.defaults < preset < flags (see the module doc).

    ``base`` (a TrainConfig) replaces the first two layers (used by --resume: the saved run).
    """
    from .config import TrainConfig
    cfg = base if base is not None else TrainConfig().merged(dict(method.defaults))
    if preset:
        if preset not in method.presets:
            valid = ", ".join(sorted(method.presets)) or "none"
            raise ConfigError(f"{method.name} has no preset {preset!r}; valid presets: {valid}")
        pre = dict(method.presets[preset])
        if "encoding" in pre and "encoding_kw" not in pre:
            pre["encoding_kw"] = {}
        pre_params = dict(pre.pop("params", {}))
        cfg = dataclasses.replace(cfg.merged(pre), params=pre_params)
    explicit = {FLAG_FIELDS[k]: v for k, v in (flags or {}).items() if v is not None}
    if "encoding" in explicit and explicit["encoding"] != cfg.encoding:
        explicit["encoding_kw"] = {}
    cfg = cfg.merged({**explicit, "params": parse_param_flags(param_pairs, method)})
    p = check_params(method, cfg.params)
    return dataclasses.replace(cfg, params={k: v for k, v in p.as_dict().items()
                                            if k in cfg.params})


def _default_out(method: str, dataset: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(dataset).name)
    return Path("runs") / f"{method}-{safe}-{stamp}"


@main.command()
@click.option("--method", "-m", help="stbp, hm2bp, tsslbp, spikebp or bpsta (see `refsnn methods`).")
@click.option("--preset", help="a paper configuration of the method's spec, section 8.")
@click.option("--dataset", help="mnist10k (embedded), mnist, fashion-mnist, or a folder of IDX files.")
@click.option("--data-dir", type=click.Path(), help="where to look first for full datasets.")
@click.option("--arch", help="e.g. 784-400-10 or 28x28x1-15c5-a2-40c5-a2-300-10.")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--lr", type=float, help="learning rate (the schedule's base rate).")
@click.option("--optimizer", help="adam, adamw or sgd.")
@click.option("--steps", type=int, help="T, time steps per sample.")
@click.option("--seed", type=int)
@click.option("--dtype", help="float64 (default) or float32.")
@click.option("--encoding", help="bernoulli, poisson or direct.")
@click.option("--binning", help="event sets: a binning rule of refsnn.data.binning (e.g. stbp:1000).")
@click.option("--lr-schedule", help="constant, step, inv_sqrt or warmup_cosine.")
@click.option("--momentum", type=float, help="sgd momentum.")
@click.option("--weight-decay", type=float)
@click.option("--grad-clip", type=float, help="global grad-norm limit (0 = off).")
@click.option("--init", help="weight init rule, where the method has several (e.g. torch, rownorm).")
@click.option("--augment", help="training-batch augmentation, e.g. crop4,flip (none = off).")
@click.option("--norm-mean", callback=_floats, help="per-channel mean, e.g. 0.4914,0.4822,0.4465.")
@click.option("--norm-std", callback=_floats, help="per-channel std, e.g. 0.2023,0.1994,0.2010.")
@click.option("--dense-lr-scale", type=float, help="lr factor for the dense layers (default 1).")
@click.option("--n-train", type=int, help="stratified subset of the training set (0 = all).")
@click.option("--n-test", type=int, help="stratified subset of the test set (0 = all).")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="a method hyper-parameter by refsnn name (repeatable).")
@click.option("--out", type=click.Path(), help="run folder (default runs/<method>-<dataset>-<time>).")
@click.option("--resume", is_flag=True, help="continue the run in --out from its checkpoint.")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar and no per-epoch lines.")
@user_errors
def train(method, preset, data_dir, params, out, resume, quiet, **flags):
    """Train a spiking network; prints the final test accuracy."""
    from .checkpoint import load_checkpoint
    from .config import TrainConfig
    from .methods import get_method
    from .train import CHECKPOINT, train as run_training

    base = None
    if resume:
        if not out:
            raise ConfigError("--resume needs --out, the folder of the run to continue")
        ck_path = Path(out) / CHECKPOINT
        if ck_path.exists():
            ck = load_checkpoint(ck_path)
            if method and get_method(method).name != ck.method:
                raise ConfigError(f"{out} holds a {ck.method} run, not {method}; drop --method "
                                  "or give the same")
            method = ck.method
            base = TrainConfig.from_dict(ck.config)
    if not method:
        raise ConfigError("give --method (stbp, hm2bp, tsslbp, spikebp or bpsta)")
    m = get_method(method)
    cfg = build_config(m, preset, flags, params, base=base)
    if flags.get("arch") is None and base is None:      # an event set: the default arch's input
        from .data.eventsets import arch_for_dataset     # token follows it (2312-..., 34x34x2-...)
        cfg = cfg.merged({"arch": arch_for_dataset(cfg.arch, cfg.dataset)})
    out = Path(out) if out else _default_out(m.name, cfg.dataset)
    try:
        report = run_training(cfg, m.name, out, resume=resume, quiet=quiet, data_dir=data_dir)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; continue with: refsnn train --resume --out {out}", err=True)
        sys.exit(130)
    if not quiet:
        click.echo(f"best test accuracy {100 * report['best_test_acc']:.2f}% (epoch "
                   f"{report['best_epoch']}); {report['minutes']:.1f} min; run folder {out}",
                   err=True)
    click.echo(f"test accuracy: {100 * report['test_acc']:.2f}%")


# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------

@main.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--dataset", help="default: the run's dataset.")
@click.option("--data-dir", type=click.Path())
@click.option("--n-test", type=int, default=0, help="stratified subset of the test set (0 = all).")
@click.option("--batch-size", type=int)
@click.option("--seed", type=int, default=0, help="seed of the input encoding.")
@user_errors
def eval_(checkpoint, dataset, data_dir, n_test, batch_size, seed):
    """Test accuracy of a checkpoint."""
    import numpy as np

    from .checkpoint import load_checkpoint, network_from_checkpoint
    from .config import TrainConfig
    from .data import load_dataset, subset
    from .train import check_shapes, evaluate

    ck = load_checkpoint(checkpoint)
    cfg = TrainConfig.from_dict(ck.config)
    net = network_from_checkpoint(ck)
    rng = np.random.default_rng(seed)
    ds = load_dataset(dataset or cfg.dataset, data_dir)
    if n_test:
        if n_test > ds.n_test:
            raise ConfigError(f"--n-test {n_test} is more than the {ds.n_test} test samples")
        ds = subset(ds, None, n_test, rng)
    check_shapes(ds, net, ck.arch)
    acc = evaluate(net, ds, cfg, rng, batch_size=batch_size)
    click.echo(f"{ck.method} {ck.arch}, epoch {ck.epoch}, on {ds.name} ({ds.n_test} test "
               "samples)", err=True)
    click.echo(f"test accuracy: {100 * acc:.2f}%")


# --------------------------------------------------------------------------------------------
# gradcheck
# --------------------------------------------------------------------------------------------

@main.command()
@click.option("--method", "-m", required=True)
@click.option("--arch", default="12-8-4", show_default=True, help="a small network.")
@click.option("--cases", type=int, default=3, show_default=True)
@click.option("--steps", type=int, default=6, show_default=True, help="T.")
@click.option("--batch", type=int, default=2, show_default=True)
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--richardson", is_flag=True,
              help="central differences at h and h/2 combined (error O(h⁴), twice the cost): "
                   "for sharply curved relaxations, e.g. a narrow Gaussian surrogate, where the "
                   "plain difference's own truncation error can exceed the rule.")
@user_errors
def gradcheck(method, arch, cases, steps, batch, params, seed, richardson):
    """Hand gradients vs central finite differences of the spec's relaxation, float64."""
    import numpy as np

    from . import gradcheck as gc
    from .methods import get_method
    from .network import Network

    m = get_method(method)
    if cases < 1 or steps < 1 or batch < 1:
        raise ConfigError("--cases, --steps and --batch must be >= 1")
    p = check_params(m, {**m.gradcheck_params, **parse_param_flags(params, m)})
    if m.gradcheck_params:
        click.echo(f"gradcheck: {m.name} cases use " + ", ".join(
            f"{k}={v}" for k, v in m.gradcheck_params.items()) + " unless --param says otherwise")
    rng = np.random.default_rng(seed)
    failed = 0
    for c in range(cases):
        net = Network.build(arch, m, p, rng=rng, dtype=np.float64)
        rate = rng.uniform(0.2, 0.6)
        x = (rng.random((steps, batch) + net.in_shape) < rate).astype(np.float64)
        labels = rng.integers(0, net.n_out, size=batch)
        target = net.make_target(labels, steps)
        try:
            chk = m.fd_objective(p, net.layers, x, target)
        except NotImplementedError:
            click.echo(f"gradcheck: {m.name} has no finite-difference objective "
                       "(Method.fd_objective); nothing was checked")
            sys.exit(1)
        if c == 0 and chk.note:
            click.echo(chk.note)
        rep = gc.check(chk.F, net.params(), chk.grads, h=chk.h, rtol=chk.rtol,
                       names=net.param_names(), scale="global", richardson=richardson)
        ok = rep.passed
        failed += not ok
        click.echo(f"case {c + 1}/{cases}: {m.name} {arch} T={steps} B={batch}  "
                   f"{'passed' if ok else 'FAILED'}  rule max|fd-an|/max|an| <= {chk.rtol:g}, "
                   f"h={chk.h:g}" + (", Richardson h/2" if richardson else "")
                   + (f" ({chk.rule})" if chk.rule else ""))
        click.echo(f"  {'array':<8} {'shape':<12} {'max|fd-an|':>11} {'rel':>10}  worst index"
                   f"  {'an':>12} {'fd':>12}")
        for a in rep.arrays:
            click.echo(f"  {a.name:<8} {str(a.shape):<12} {a.max_abs:11.3e} {a.rel:10.3e}  "
                       f"{str(a.worst):<11}  {a.an:12.5e} {a.fd:12.5e}")
    click.echo(f"{cases - failed} of {cases} cases passed")
    if failed:
        sys.exit(1)


# --------------------------------------------------------------------------------------------
# methods, datasets
# --------------------------------------------------------------------------------------------

def _fmt(v) -> str:
    if isinstance(v, tuple):
        return ",".join(_fmt(x) for x in v)
    return repr(v) if isinstance(v, str) else str(v)


@main.command()
@click.argument("name", required=False)
@user_errors
def methods(name):
    """Every method with its parameters (defaults, meaning, spec tags) and presets."""
    from .methods import METHODS, get_method
    names = [get_method(name).name] if name else list(METHODS)
    for n in names:
        try:
            m = get_method(n)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("refsnn.methods."):
                click.echo(f"{n}: not available in this installation ({err.name} missing)\n")
                continue
            raise
        click.echo(f"{m.name}  (spec/{m.spec})\n  {m.title}")
        click.echo("  parameters (--param NAME=VALUE):")
        for row in m.Params.table():
            choices = f" [{'|'.join(map(str, row.choices))}]" if row.choices else ""
            tag = f" ({row.tag})" if row.tag else ""
            click.echo(f"    {row.name} = {_fmt(row.default)}{choices}  {row.meaning}{tag}")
        if m.defaults:
            d = dict(m.defaults)
            pp = d.pop("params", {})
            click.echo("  default run: " + ", ".join(f"{k}={_fmt(v)}" for k, v in d.items())
                       + ("; params " + ", ".join(f"{k}={_fmt(v)}" for k, v in pp.items())
                          if pp else ""))
        if m.presets:
            click.echo("  presets (--preset NAME):")
            for pn, pre in m.presets.items():
                bits = [f"{k}={_fmt(pre[k])}" for k in ("dataset", "arch", "T", "epochs")
                        if k in pre]
                click.echo(f"    {pn}: {', '.join(bits)}")
        click.echo("")


@main.command()
@click.option("--data-dir", type=click.Path())
@user_errors
def datasets(data_dir):
    """Registered datasets and whether (and where) they are found."""
    from .data import list_datasets
    for row in list_datasets(data_dir):
        where = row.location if row.found else "not found (see data/README.md)"
        if not row.found and getattr(row, "how_to_get", None):
            where = f"not found; {row.how_to_get}"
        click.echo(f"{row.name:<14} {row.description}\n{'':<14} {where}")


# --------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------

@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("-o", "--output", default="curves.png", show_default=True, type=click.Path(),
              help="the PNG to write.")
@click.option("--no-train", is_flag=True, help="test accuracy only (no dashed train curves).")
@user_errors
def plot(runs, output, no_train):
    """Learning curves (accuracy per epoch) of one or more run folders, as a PNG."""
    from .plots import draw_curves, run_curves
    curves = run_curves(runs, train=not no_train)
    if draw_curves(curves, output, ylabel="accuracy (%)") is None:
        raise UserError("plotting needs matplotlib: pip install 'refsnn[plot]'")
    click.echo(f"wrote {output}", err=True)


# --------------------------------------------------------------------------------------------
# command groups that live in their own modules
# --------------------------------------------------------------------------------------------

def _add_subcommands():
    """`refsnn data ...` (cli_data.py), `refsnn oracle ...` (cli_oracle.py), `refsnn nir ...`,
    `refsnn compare` and `refsnn sweep` (cli_sweep.py)."""
    import importlib
    for module, name in (("refsnn.cli_data", "data"), ("refsnn.cli_oracle", "oracle"),
                         ("refsnn.cli_nir", "nir"), ("refsnn.cli_sweep", "compare"),
                         ("refsnn.cli_sweep", "sweep")):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name == module:                    # not in this installation
                continue
            raise
        main.add_command(getattr(mod, name))


_add_subcommands()
