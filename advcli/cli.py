"""The `advcli` command: parse options, call the Python API, report. No modelling happens here.

Rich output goes to stderr so stdout stays clean for ``--json``. Bad input exits 2 with one
paragraph naming what was wrong; anything unexpected exits 1.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__, keys
from .errors import InputError
from .progress import EpochProgress

console = Console(stderr=True)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Adversarial and alternating training of latent-variable models on "
                       "single-cell counts: confounder inference and domain integration.")
simulate_app = typer.Typer(no_args_is_help=True, help="Write simulated .h5ad data with known truth.")
app.add_typer(simulate_app, name="simulate")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"advcli {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """advcli: simulate -> fit -> predict -> diagnose."""
    import signal

    from .io import interrupt_for

    def terminate(signum, frame):
        raise interrupt_for(signum)

    signal.signal(signal.SIGTERM, terminate)  # cleanups run on SIGTERM as on Ctrl-C


THREADS_OPTION = typer.Option(None, "--threads", help="CPU threads for torch and its BLAS "
                              "(default: torch's choice, usually one per core).",
                              rich_help_panel="Scaling")
BACKED_MODES = ("integrate", "confounder")
BACKED_OPTION = typer.Option(False, "--backed", help="Leave the counts on disk and read them in "
                             "row blocks (integrate and confounder modes), for files larger than memory.",
                             rich_help_panel="Scaling")

WRITE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EISDIR,
                errno.ENOTDIR, errno.EFBIG}


@contextlib.contextmanager
def _about(path: Path):
    """Name the input file in any bad-input message raised about its contents."""
    try:
        yield
    except InputError as exc:
        if str(path) in str(exc):
            raise
        raise InputError(f"In '{path}': {exc}") from None


def _json_error(kwargs: dict, exc: Exception, code: int) -> None:
    """With --json, the error as one JSON object on stdout, so a pipeline reads it as it reads
    a result."""
    from .distributed import is_main

    if kwargs.get("as_json") and is_main():
        sys.stdout.write(json.dumps({"error": str(exc), "exit_code": code}) + "\n")
        sys.stdout.flush()


def _handle_errors(fn: Callable) -> Callable:
    """Exit 2 with the message on InputError; exit 1 with a traceback on anything unexpected."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except InputError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            _json_error(kwargs, exc, 2)
            raise typer.Exit(2) from None
        except OSError as exc:
            if exc.errno not in WRITE_ERRORS:
                raise
            where = f" '{exc.filename}'" if exc.filename else ""
            console.print(f"[bold red]error:[/] could not write{where}: {exc.strerror}. Nothing "
                          "was left half-written.", highlight=False, soft_wrap=True)
            _json_error(kwargs, exc, 2)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as exc:
            from .io import Terminated

            console.print("[bold red]interrupted[/]: no output was written.")
            raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None
        except Exception as exc:  # an advcli bug, not the user's input
            console.print(f"[bold red]internal error[/] ({type(exc).__name__}: {exc}). This is a "
                          "bug in advcli; please report it with the traceback below.",
                          highlight=False)
            console.print(traceback.format_exc(), highlight=False, markup=False)
            raise typer.Exit(1) from None

    return wrapper


def _file_size(path: Path) -> str:
    size = float(path.stat().st_size)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def _report(title: str, rows: dict[str, Any], as_json: bool, payload: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False, title_justify="left", title_style="bold green")
    table.add_column(style="cyan")
    table.add_column()
    for key, value in rows.items():
        table.add_row(key, str(value))
    console.print(table)
    if as_json:
        from .io import plain

        # NaN (a loss a model does not have) as null: jq and strict parsers reject NaN
        sys.stdout.write(json.dumps(plain(payload, json_safe=True), default=str,
                                    allow_nan=False) + "\n")
        sys.stdout.flush()


def _written_rows(path: Path, seconds: float, shape=None, keys_written=None) -> dict[str, Any]:
    rows: dict[str, Any] = {"file": str(path)}
    if shape is not None:
        rows["shape"] = f"{shape[0]:,} cells x {shape[1]:,} genes"
    if keys_written:
        rows["keys"] = ", ".join(keys_written)
    rows["size"] = _file_size(path)
    rows["time"] = f"{seconds:.1f} s"
    return rows


OUT_OPTION = typer.Option(..., "-o", "--out", help="Output .h5ad file (folders are created).")
JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object on stdout.")


@simulate_app.command("confounder")
@_handle_errors
def simulate_confounder(
    out: Path = OUT_OPTION,
    n: int = typer.Option(1000, "--n", help="Cells."),
    genes: int = typer.Option(100, "--genes", help="Genes."),
    covariates: int = typer.Option(4, "--covariates", help="Binary covariates X."),
    z_dim: int = typer.Option(1, "--z-dim", help="Columns of the hidden confounder Z."),
    setting: str = typer.Option("extreme", "--setting",
                                help="extreme: beta_1 = beta_2 = 0 (D a fair coin); general: X acts "
                                     "on D and [X, D] on Y, so Z confounds D's effect."),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = JSON_OPTION,
) -> None:
    """The latent-confounder simulation: X, hidden Z, treatment D and NB counts Y, with the truth."""
    from .simulate import ConfounderSimulation, simulate_confounder as run

    _check_output(out, [])
    start = time.perf_counter()
    info = run(ConfounderSimulation(n=n, genes=genes, covariates=covariates, z_dim=z_dim,
                                    setting=setting, seed=seed), out)
    seconds = time.perf_counter() - start
    written = ["X", f"obs['{keys.TREATMENT}']", f"obs['{keys.COVARIATE_PREFIX}*']",
               f"obsm['{keys.Z_TRUE}']", f"layers['{keys.LOG_MU_TRUE}']"]
    rows = _written_rows(out, seconds, (n, genes), written)
    rows["treated"] = f"{info['treated_fraction']:.1%}"
    _report("simulate confounder", rows, as_json,
            {"command": "simulate confounder", "out": str(out), "seconds": seconds, **info})


@simulate_app.command("integrate")
@_handle_errors
def simulate_integrate(
    out: Path = OUT_OPTION,
    n_a: int = typer.Option(5000, "--n-a", help="Cells in domain A."),
    n_b: int = typer.Option(6000, "--n-b", help="Cells in domain B."),
    genes: int = typer.Option(2000, "--genes", help="Genes."),
    cell_types: int = typer.Option(5, "--cell-types", help="Cell types (the last is in B only)."),
    batch_strength: float = typer.Option(1.0, "--batch-strength",
                                         help="Scales every part of the domain effect."),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Two domains with cell types and a domain effect, for integrate mode."""
    from .simulate import IntegrationSimulation, simulate_integration as run

    _check_output(out, [])
    start = time.perf_counter()
    info = run(IntegrationSimulation(n_a=n_a, n_b=n_b, genes=genes, cell_types=cell_types,
                                     batch_strength=batch_strength, seed=seed), out)
    seconds = time.perf_counter() - start
    rows = _written_rows(out, seconds, (info["n_cells"], genes),
                         ["X", f"obs['{keys.BATCH}']", f"obs['{keys.CELL_TYPE}']"])
    _report("simulate integrate", rows, as_json,
            {"command": "simulate integrate", "out": str(out), "seconds": seconds, **info})


def _fit_option_specs() -> dict[str, dict]:
    """Every config field of every mode as one `fit` option: its type, modes, group and help
    with the default of each mode that has it."""
    import dataclasses
    import typing

    from .config import CONFIGS, LATENT, TRAINING, default_of

    specs: dict[str, dict] = {}
    for mode, cls in CONFIGS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            spec = specs.setdefault(f.name, {"modes": [], "defaults": {}, "meta": f.metadata,
                                             "type": hints[f.name]})
            spec["modes"].append(mode)
            shown = f.metadata.get("shown")
            default = default_of(f)
            if isinstance(default, list):
                default = ",".join(default)
            spec["defaults"][mode] = shown if shown is not None else default
            if f.metadata.get("group") != TRAINING:
                spec.setdefault("groups", set()).add(f.metadata["group"])
                spec["meta"] = f.metadata
    for name, spec in specs.items():
        if len(spec.get("groups", ())) > 1:  # a mode option several modes have
            spec["meta"] = {**spec["meta"], "group": LATENT,
                            "help": f"({', '.join(spec['modes'])}) {spec['meta']['help']}"}
    return specs


def _cli_type(hint) -> type:
    """The command-line type of a config field (lists are comma-separated text)."""
    import typing

    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = args[0]
    return str if typing.get_origin(base) is list or base is list else base


def _help_with_default(spec: dict) -> str:
    defaults = spec["defaults"]
    values = {m: ("none" if v is None else v) for m, v in defaults.items()}
    groups: dict[str, list[str]] = {}
    for m, v in values.items():
        groups.setdefault(str(v), []).append(m)
    if len(groups) == 1:
        text = next(iter(groups))
    else:
        text = "; ".join(f"{', '.join(ms)}: {v}" for v, ms in groups.items())
    choices = spec["meta"].get("choices")
    extra = f" One of: {', '.join(choices)}." if choices and len(choices) > 2 else ""
    return f"{spec['meta']['help']}{extra} [default: {text}]"


def _fit_parameters() -> tuple[list, dict]:
    """The generated options of `fit` as inspect parameters and their annotations."""
    import inspect

    params, annotations = [], {}
    for name, spec in _fit_option_specs().items():
        kind = _cli_type(spec["type"])
        flag = "--" + name.replace("_", "-")
        decls = [f"{flag}/--no-{name.replace('_', '-')}"] if kind is bool else [flag]
        from rich.markup import escape

        option_ = typer.Option(None, *decls, help=escape(_help_with_default(spec)),
                               rich_help_panel=spec["meta"]["group"], show_default=False)
        annotations[name] = Optional[kind]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option_,
                                        annotation=Optional[kind]))
    return params, annotations


def _options_for(mode: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options given for ``mode``, parsed; an option of another mode is bad input."""
    specs = _fit_option_specs()
    wrong = [k for k in given if mode not in specs[k]["modes"]]
    if wrong:
        parts = []
        for k in wrong:
            modes = specs[k]["modes"]
            where = modes[0] if len(modes) == 1 else ", ".join(modes[:-1]) + " or " + modes[-1]
            parts.append(f"--{k.replace('_', '-')} applies to --mode {where} only")
        raise InputError(f"{'; '.join(parts)}, not to --mode {mode}.")
    options = dict(given)
    if "control_genes" in options:
        options["control_genes"] = _gene_list(options["control_genes"])
    for name in ("covariate_keys", "generator_inputs"):
        if name in options:
            from .data import parse_key_list

            options[name] = parse_key_list(options[name])
    return options


def _checkpoint_path(out: Path) -> Path:
    """Where fit keeps its resumable state: next to the model file, MODEL.ckpt.pt."""
    return out.with_name(out.name[:-3] + ".ckpt.pt" if out.name.endswith(".pt")
                         else out.name + ".ckpt.pt")


def fit(data: Path, mode: str, out: Path, backed: bool, as_json: bool, checkpoint_every: int,
        resume: Optional[Path], nproc: int, threads: Optional[int], **given) -> None:
    """Train a model and write it to one file (loadable with torch.load(weights_only=True))."""
    from . import distributed

    if mode not in keys.MODES:
        raise InputError(f"--mode must be one of {', '.join(keys.MODES)} (got '{mode}').")
    options = _options_for(mode, {k: v for k, v in given.items() if v is not None})
    if backed and mode not in BACKED_MODES:
        raise InputError(f"--backed (cells read from disk in blocks) is available for --mode "
                         f"{' and '.join(BACKED_MODES)}; drop it to load the cells into memory.")
    if checkpoint_every < 0:
        raise InputError(f"--checkpoint-every must be zero or more (got {checkpoint_every}).")
    _check_output(out, [data] + ([resume] if resume else []))
    if nproc < 1:
        raise InputError(f"--nproc must be 1 or more (got {nproc}).")
    _set_threads(threads)

    from .config import make_config

    start = time.perf_counter()
    cfg = make_config(mode, **options)
    cfg.check()
    if nproc > 1 and not distributed.launched_by_torchrun():
        raise typer.Exit(distributed.launch(nproc, _argv_without_nproc(sys.argv[1:])))
    if distributed.launched_by_torchrun():
        cfg = replace(cfg, device=distributed.init_from_env(cfg.device))
        console.quiet = not distributed.is_main()
    try:
        _fit_in_process(data, mode, out, as_json, checkpoint_every, resume, cfg, start, backed)
    finally:
        distributed.shutdown()


def _argv_without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _set_threads(threads: Optional[int]) -> None:
    """--threads: torch's (and its BLAS's) threads, for pipelines that run jobs side by side."""
    if threads is None:
        return
    if threads < 1:
        raise InputError(f"--threads must be 1 or more (got {threads}).")
    import torch

    torch.set_num_threads(threads)


def _fit_in_process(data: Path, mode: str, out: Path, as_json: bool, checkpoint_every: int,
                    resume: Optional[Path], cfg, start: float, backed: bool = False) -> None:
    from . import distributed

    adata = _read(data, backed)
    from .io import load_model
    from .models import MODELS

    with _about(data):
        model = MODELS[mode](adata, cfg)
    if resume is not None:
        model.resume_from(load_model(resume, mode=mode), resume)
    checkpoint = _checkpoint_path(out)
    from .train import DivergedAt, TrainingInterrupted

    done = model.epochs_
    try:
        with EpochProgress(model.planned_epochs, f"fit {mode}", model.progress_keys, done,
                           console) as on_epoch:
            model.train(on_epoch=on_epoch, checkpoint_path=checkpoint,
                        checkpoint_every=checkpoint_every)
    except TrainingInterrupted as exc:
        import signal

        name = signal.Signals(exc.signum).name
        console.print(f"[bold red]interrupted[/] ({name}) in epoch {exc.epoch}. The state is "
                      f"saved in {checkpoint}; continue with the same command and --resume "
                      f"{checkpoint}.", highlight=False, soft_wrap=True)
        raise typer.Exit(128 + exc.signum) from None
    except DivergedAt as exc:
        kept = (f" The last good checkpoint is {checkpoint}." if checkpoint.exists()
                else " No model was written.")
        console.print(f"[bold red]error:[/] {exc} Try a lower --lr (now {cfg.lr:g}) or "
                      f"--max-grad-norm 1.{kept}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    if not distributed.is_main():
        return
    model.save(out)
    checkpoint.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    summary = model.fit_summary()
    rows = _written_rows(out, seconds, (summary["n_cells"], summary["n_genes"]))
    rows.update({k: _fmt(v) for k, v in summary.items() if k not in ("n_cells", "n_genes")})
    for warning in summary.get("warnings", []):
        console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)
    _report(f"fit --mode {mode}", rows, as_json,
            {"command": "fit", "out": str(out), "seconds": seconds, **summary})


def _register_fit() -> None:
    """`fit` with its fixed arguments and the options generated from the configs."""
    import inspect

    fixed = [
        ("data", Path, typer.Argument(..., help="Input .h5ad with raw counts.")),
        ("mode", str, typer.Option(..., "--mode",
                                   help="confounder, integrate, aae or disentangle.")),
        ("out", Path, typer.Option(..., "-o", "--out", help="Model file to write (.pt).")),
        ("backed", bool, BACKED_OPTION),
        ("as_json", bool, JSON_OPTION),
        ("checkpoint_every", int, typer.Option(0, "--checkpoint-every", help="Write a "
                                               "resumable MODEL.ckpt.pt every N epochs (0: "
                                               "only on SIGINT / SIGTERM).",
                                               rich_help_panel="Checkpoints")),
        ("resume", Optional[Path], typer.Option(None, "--resume", help="Continue from a "
                                                "checkpoint (or model file) written with the "
                                                "same options and data.",
                                                rich_help_panel="Checkpoints")),
        ("nproc", int, typer.Option(1, "--nproc", help="Train in N processes on this machine "
                                    "(torch.distributed: gloo on CPU, one GPU per process with "
                                    "nccl). Under torchrun leave it out.",
                                    rich_help_panel="Scaling")),
        ("threads", Optional[int], THREADS_OPTION),
    ]
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d,
                                annotation=t) for n, t, d in fixed]
    generated, annotations = _fit_parameters()

    @functools.wraps(fit)
    def command(**kwargs):
        return fit(**kwargs)

    command.__signature__ = inspect.Signature(params + generated)
    command.__annotations__ = {**{n: t for n, t, _ in fixed}, **annotations}
    del command.__wrapped__
    app.command("fit")(_handle_errors(command))


_register_fit()


def _gene_list(text: str) -> list[str]:
    """A comma list of genes, or the path of a text file with one gene per line."""
    path = Path(text)
    if path.is_file():
        try:
            genes = [line.strip() for line in path.read_text().splitlines()]
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"--control-genes file '{path}' cannot be read ({exc}).") from None
    else:
        genes = [g.strip() for g in text.split(",")]
    genes = [g for g in genes if g and not g.startswith("#")]
    if not genes:
        raise InputError("--control-genes names no genes.")
    return genes


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "; ".join(_fmt(v) for v in value) or "none"
    return str(value)


def _read(path: Path, backed: bool | str = False):
    from .data import read_h5ad

    return read_h5ad(path, backed)


def _check_output(out: Path, inputs: list[Path], folder: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written or would overwrite an input:
    a folder where a file goes (or a file where a folder goes), a parent that is a file, a
    folder without write permission."""
    out = Path(out)
    for path in inputs:
        if out.resolve() == Path(path).resolve():
            raise InputError(f"Output '{out}' is the input file; advcli never overwrites its "
                             "inputs. Choose another output name.")
    if not folder and out.is_dir():
        raise InputError(f"Output '{out}' is a folder; give a file name.")
    if folder and out.exists() and not out.is_dir():
        raise InputError(f"Report folder '{out}' is a file; give a folder name.")
    parent = out if folder and out.is_dir() else out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"Output '{out}' cannot be created: '{parent}' is a file, not a "
                         "folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"Output '{out}' cannot be written: no write permission in "
                         f"'{parent}'.")


@app.command("predict")
@_handle_errors
def predict(
    model_path: Path = typer.Argument(..., metavar="MODEL.pt", help="Model file from `fit`."),
    data: Path = typer.Argument(..., help="Input .h5ad with the same genes."),
    out: Path = OUT_OPTION,
    csv: Optional[Path] = typer.Option(None, "--csv", help="Also write per-cell values as CSV."),
    batch_size: int = typer.Option(1024, "--batch-size", help="Cells per inference batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    decode_as: Optional[str] = typer.Option(None, "--decode-as",
                                            help="[integrate] Decode every cell as this domain."),
    effects: Optional[Path] = typer.Option(None, "--effects",
                                           help="[confounder] Also write the per-gene treatment "
                                                "effects (naive and adjusted for Z-hat) as CSV."),
    nb_mean: bool = typer.Option(True, "--nb-mean/--no-nb-mean",
                                 help="Write layers['nb_mean'] (cells x genes; the largest "
                                      "output)."),
    backed: bool = BACKED_OPTION,
    as_json: bool = JSON_OPTION,
    threads: Optional[int] = THREADS_OPTION,
) -> None:
    """Add the model's per-cell outputs to a copy of DATA and write it to OUT."""
    from .data import per_cell_frame
    from .io import load_model
    from .models import load

    _check_output(out, [data, model_path])
    if csv is not None:
        _check_output(csv, [data, model_path, out])
    if effects is not None:
        _check_output(effects, [data, model_path, out] + ([csv] if csv else []))
    _set_threads(threads)
    start = time.perf_counter()
    payload = load_model(model_path)
    model = load(payload, model_path)
    if decode_as is not None and payload["mode"] != "integrate":
        raise InputError("--decode-as applies to models of mode integrate only.")
    if effects is not None and payload["mode"] != "confounder":
        raise InputError("--effects applies to models of mode confounder only.")
    if backed and payload["mode"] not in BACKED_MODES:
        raise InputError(f"--backed applies to models of mode {' and '.join(BACKED_MODES)}; this "
                         f"one is {payload['mode']}. Drop --backed.")
    if backed and effects is not None:
        raise InputError("--effects with --backed: the treatment-effect GLMs read every cell's "
                         "counts in memory. Drop --backed, or get the effects on a subsample of "
                         "cells from `advcli diagnose --backed`.")
    options = {"decode_as": decode_as} if decode_as is not None else {}
    if not nb_mean:
        options["nb_mean"] = False
    from .io import atomic_files

    outputs = [out] + [p for p in (csv, effects) if p is not None]
    if backed:  # the copy of DATA is the output: written in place, renamed when complete
        _read(data, backed=True).close()
        with atomic_files(outputs) as tmps:
            shutil.copyfile(data, tmps[out])
            adata = _read(tmps[out], backed="r+")
            try:
                with _about(data):
                    written = model.predict_into(adata, batch_size=batch_size, device=device,
                                                 **options)
                _record_predict(adata, payload, model_path)
                adata.save()
            finally:
                adata.close()
            if csv is not None:
                per_cell_frame(adata, written).to_csv(tmps[csv], index_label="cell")
        table = None
    else:
        adata = _read(data)
        with _about(data):
            written = model.predict_into(adata, batch_size=batch_size, device=device, **options)
        _record_predict(adata, payload, model_path)
        with _about(data):
            table = model.treatment_effects(adata) if effects is not None else None
        with atomic_files(outputs) as tmps:
            if csv is not None:
                per_cell_frame(adata, written).to_csv(tmps[csv], index_label="cell")
            if table is not None:
                table.to_csv(tmps[effects], index=False)
            adata.write_h5ad(tmps[out])
    seconds = time.perf_counter() - start
    rows = _written_rows(out, seconds, adata.shape, written)
    if csv is not None:
        rows["csv"] = f"{csv} ({_file_size(csv)})"
    extra: dict[str, Any] = {}
    if table is not None:
        n_sig = int((table["qvalue"] < 0.05).sum())
        explained = table.attrs["z_deviance_explained"]
        rows["effects"] = f"{effects} ({len(table):,} genes, {n_sig:,} with q < 0.05)"
        rows["deviance explained by Z-hat"] = f"{explained:.1%}"
        extra = {"genes_q_below_0.05": n_sig, "z_deviance_explained": explained,
                 "genes_not_tested": int((~table["converged"]).sum())}
        if explained < 0.01:
            console.print("[bold yellow]warning:[/] Z-hat explains under 1% of the counts' "
                          "deviance beyond [X, D]: it captured little, and the adjusted effects "
                          "are close to the naive ones.", highlight=False)
    _report(f"predict ({payload['mode']})", rows, as_json,
            {"command": "predict", "mode": payload["mode"], "out": str(out),
             "csv": str(csv) if csv else None, "effects": str(effects) if effects else None,
             "keys": written, "n_cells": adata.n_obs, **extra,
             "n_genes": adata.n_vars, "seconds": seconds})


def _record_predict(adata, payload: dict, model_path: Path) -> None:
    from .data import set_uns
    from .io import file_sha256

    set_uns(adata, keys.PREDICT, {"model_sha256": file_sha256(model_path),
                                  "mode": payload["mode"], "version": __version__,
                                  "model_version": payload["version"]})


@app.command("sample")
@_handle_errors
def sample(
    model_path: Path = typer.Argument(..., metavar="MODEL.pt", help="An aae model from `fit`."),
    out: Path = OUT_OPTION,
    n: int = typer.Option(1000, "--n", help="Cells to generate."),
    condition: Optional[str] = typer.Option(None, "--condition",
                                            help="Class of the model's condition key to "
                                                 "generate (default: drawn in the training "
                                                 "proportions)."),
    attribute: Optional[float] = typer.Option(None, "--attribute",
                                              help="Value of the model's attribute: sets the "
                                                   "attribute dimension of every draw."),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = JSON_OPTION,
    threads: Optional[int] = THREADS_OPTION,
) -> None:
    """Generate new cells: decode draws of the prior N(0, I) into counts (aae models)."""
    from .io import load_model, write_h5ad
    from .models import load

    _check_output(out, [model_path])
    _set_threads(threads)
    start = time.perf_counter()
    payload = load_model(model_path, mode="aae")
    model = load(payload, model_path)
    adata = model.sample(n, condition=condition, attribute=attribute, seed=seed)
    write_h5ad(adata, out)
    seconds = time.perf_counter() - start
    written = ["X", f"obsm['{keys.X_LATENT}']", f"layers['{keys.NB_MEAN}']"]
    _report("sample", _written_rows(out, seconds, adata.shape, written), as_json,
            {"command": "sample", "out": str(out), "n_cells": adata.n_obs,
             "n_genes": adata.n_vars, "condition": condition, "attribute": attribute,
             "seconds": seconds})


@app.command("diagnose")
@_handle_errors
def diagnose(
    predicted: Path = typer.Argument(..., metavar="OUT.h5ad", help="File written by `predict`."),
    out: Path = typer.Option(..., "-o", "--out", help="Report folder (created as needed)."),
    model_path: Optional[Path] = typer.Option(None, "--model", help="Model file, for loss curves."),
    label_key: Optional[str] = typer.Option(None, "--label-key",
                                            help="[integrate] obs column with cell labels "
                                                 "(default: cell_type when the file has it)."),
    batch_key: Optional[str] = typer.Option(None, "--batch-key",
                                            help="[integrate] obs column with the domains "
                                                 "(default: the model's)."),
    map_method: str = typer.Option("tsne", "--map",
                                   help="[integrate] 2-D map drawn in embedding.png: tsne, or "
                                        "umap (needs umap-learn: pip install 'advcli[umap]')."),
    backed: bool = BACKED_OPTION,
    as_json: bool = JSON_OPTION,
    threads: Optional[int] = THREADS_OPTION,
) -> None:
    """Write metrics, tables and plots about a prediction to a report folder."""
    from .report import diagnose as run
    from .report.integrate import check_map_method

    check_map_method(map_method)  # here too, so the message is not put on the input file
    _check_output(out, [predicted] + ([model_path] if model_path else []), folder=True)
    _set_threads(threads)
    start = time.perf_counter()
    with _about(predicted):
        summary = run(predicted, out, model_path=model_path, label_key=label_key,
                      batch_key=batch_key, map_method=map_method, backed=backed)
    seconds = time.perf_counter() - start
    rows = {"folder": str(out), "files": ", ".join(summary["files"]), "time": f"{seconds:.1f} s"}
    rows.update({k: _fmt(v) for k, v in summary["headline"].items()})
    for note in summary.get("notes", []):
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    _report(f"diagnose ({summary['mode']})", rows, as_json, {"command": "diagnose", **summary,
                                                            "seconds": seconds})


if __name__ == "__main__":  # pragma: no cover
    app()
