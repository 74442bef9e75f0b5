"""The `advcli` command: parse options, call the Python API, report. No modelling happens here.

Rich output goes to stderr so stdout stays clean for ``--json``. Bad input exits 2 with one
paragraph naming what was wrong; anything unexpected exits 1.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__, keys
from .config import IntegrationConfig
from .errors import InputError

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
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]: no output was written.")
            raise typer.Exit(130) from None
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
        sys.stdout.write(json.dumps(payload, default=_json_default) + "\n")
        sys.stdout.flush()


def _json_default(obj):
    import numpy as np

    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


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

    start = time.perf_counter()
    info = run(IntegrationSimulation(n_a=n_a, n_b=n_b, genes=genes, cell_types=cell_types,
                                     batch_strength=batch_strength, seed=seed), out)
    seconds = time.perf_counter() - start
    rows = _written_rows(out, seconds, (info["n_cells"], genes),
                         ["X", f"obs['{keys.BATCH}']", f"obs['{keys.CELL_TYPE}']"])
    _report("simulate integrate", rows, as_json,
            {"command": "simulate integrate", "out": str(out), "seconds": seconds, **info})


# Options of `fit` that belong to one mode only; giving one for the other mode is an error.
CONFOUNDER_ONLY = ("treatment_key", "treated_level", "covariate_keys", "size_factors",
                   "sample_key", "control_genes", "warm_start", "z_dim", "z_type",
                   "strategy", "generator_inputs", "dispersion_key", "intercept", "bce_weight",
                   "nb_weight", "dbpr_weight", "outer_iterations", "predictor_epochs",
                   "generator_epochs", "preset")
INTEGRATE_ONLY = ("batch_key", "latent_dim", "likelihood", "adversary", "adv_loss", "adv_weight",
                  "grl_lambda", "d_steps", "e_steps", "beta_kl", "dropout", "val_fraction",
                  "design", "lr_discriminator")


@app.command("fit")
@_handle_errors
def fit(
    data: Path = typer.Argument(..., help="Input .h5ad with raw counts."),
    mode: str = typer.Option(..., "--mode", help="confounder or integrate."),
    out: Path = typer.Option(..., "-o", "--out", help="Model file to write (.pt)."),
    layer: Optional[str] = typer.Option(None, "--layer", help="Counts layer instead of X."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    max_epochs: Optional[int] = typer.Option(None, "--max-epochs",
                                             help="Upper bound on passes over the data, all "
                                                  "phases counted."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate."),
    patience: Optional[int] = typer.Option(None, "--patience",
                                           help="Epochs without improvement before a phase (or "
                                                "training) stops."),
    backed: bool = typer.Option(False, "--backed", help="Read cells from disk in blocks."),
    as_json: bool = JSON_OPTION,
    # confounder mode
    treatment_key: Optional[str] = typer.Option(None, "--treatment-key", help="[confounder] obs "
                                                "column with the binary treatment (default D)."),
    treated_level: Optional[str] = typer.Option(None, "--treated-level",
                                                help="[confounder] Level that means treated."),
    covariate_keys: Optional[str] = typer.Option(None, "--covariate-keys",
                                                 help="[confounder] Comma list of obs columns "
                                                      "(default: those the simulator recorded)."),
    size_factors: Optional[str] = typer.Option(None, "--size-factors",
                                               help="[confounder] Per-cell offset of every NB "
                                                    "model: library (total counts, default), "
                                                    "none, or a numeric obs column."),
    sample_key: Optional[str] = typer.Option(None, "--sample-key",
                                             help="[confounder] obs column naming each cell's "
                                                  "sample (donor): effects are tested on "
                                                  "pseudobulk samples, not on cells."),
    control_genes: Optional[str] = typer.Option(None, "--control-genes",
                                                help="[confounder] Negative-control genes (not "
                                                     "affected by the treatment): a comma list "
                                                     "or a text file with one gene per line. "
                                                     "They fix Z-hat's treatment share."),
    z_dim: Optional[int] = typer.Option(None, "--z-dim",
                                        help="[confounder] Columns of Z (default: counted from "
                                             "the data, 1-10)."),
    z_type: Optional[str] = typer.Option(None, "--z-type",
                                         help="[confounder] gumbel (default, a near-binary "
                                              "group), binary, soft, or continuous (a "
                                              "gradient)."),
    warm_start: Optional[bool] = typer.Option(None, "--warm-start/--no-warm-start",
                                              help="[confounder] Start Z at the top residual "
                                                   "factors of Y on [X, D] (default on)."),
    strategy: Optional[str] = typer.Option(None, "--strategy",
                                           help="[confounder] alternating or joint."),
    generator_inputs: Optional[str] = typer.Option(None, "--generator-inputs",
                                                   help="[confounder] What the Z-generator sees: "
                                                        "comma list of x, d, y."),
    dispersion_key: Optional[str] = typer.Option(None, "--dispersion-key",
                                                 help="[confounder] var column with a fixed NB "
                                                      "dispersion per gene."),
    intercept: Optional[bool] = typer.Option(None, "--intercept/--no-intercept",
                                             help="[confounder] Intercepts in the heads."),
    bce_weight: Optional[float] = typer.Option(None, "--bce-weight", help="[confounder]"),
    nb_weight: Optional[float] = typer.Option(None, "--nb-weight",
                                              help="[confounder] Weight of the per-gene mean NB "
                                                   "loss (default: the number of genes)."),
    dbpr_weight: Optional[float] = typer.Option(None, "--dbpr-weight",
                                                help="[confounder] Weight of the DBPR reward."),
    outer_iterations: Optional[int] = typer.Option(None, "--outer-iterations",
                                                   help="[confounder] Alternating iterations."),
    predictor_epochs: Optional[int] = typer.Option(None, "--predictor-epochs",
                                                   help="[confounder] Head epochs per odd "
                                                        "iteration."),
    generator_epochs: Optional[int] = typer.Option(None, "--generator-epochs",
                                                   help="[confounder] Generator epochs per even "
                                                        "iteration."),
    preset: Optional[str] = typer.Option(None, "--preset",
                                         help="[confounder] 'seed' reproduces the original "
                                              "design's settings."),
    # integrate mode
    batch_key: Optional[str] = typer.Option(None, "--batch-key", help="[integrate] obs column "
                                            "with the domains (default batch)."),
    latent_dim: Optional[int] = typer.Option(None, "--latent-dim", help="[integrate] (10)"),
    likelihood: Optional[str] = typer.Option(None, "--likelihood", help="[integrate] nb or mse."),
    design: Optional[str] = typer.Option(None, "--design",
                                         help="[integrate] shared (one encoder, domain-"
                                              "conditioned decoder) or paired (one VAE per "
                                              "domain, the original design)."),
    lr_discriminator: Optional[float] = typer.Option(None, "--lr-discriminator",
                                                     help="[integrate] (default: --lr)"),
    adversary: Optional[str] = typer.Option(None, "--adversary",
                                            help="[integrate] grl or alternate."),
    adv_loss: Optional[str] = typer.Option(None, "--adv-loss",
                                           help="[integrate] negce, uniform or flip."),
    adv_weight: Optional[float] = typer.Option(None, "--adv-weight", help="[integrate]"),
    grl_lambda: Optional[float] = typer.Option(None, "--grl-lambda", help="[integrate]"),
    d_steps: Optional[int] = typer.Option(None, "--d-steps", help="[integrate] alternate only."),
    e_steps: Optional[int] = typer.Option(None, "--e-steps", help="[integrate] alternate only."),
    beta_kl: Optional[float] = typer.Option(None, "--beta-kl", help="[integrate] KL weight."),
    dropout: Optional[float] = typer.Option(None, "--dropout",
                                            help="[integrate] Dropout in the encoder (default "
                                                 "0.1)."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction",
                                                 help="[integrate] Held-out cells for early "
                                                      "stopping."),
) -> None:
    """Train a model and write it to one file (loadable with torch.load(weights_only=True))."""
    given = {k: v for k, v in locals().items() if v is not None}
    if mode not in keys.MODES:
        raise InputError(f"--mode must be 'confounder' or 'integrate' (got '{mode}').")
    wrong = CONFOUNDER_ONLY if mode == "integrate" else INTEGRATE_ONLY
    misplaced = ["--" + k.replace("_", "-") for k in wrong if k in given]
    if misplaced:
        raise InputError(f"{', '.join(misplaced)} do(es) not apply to --mode {mode}.")
    if backed:
        raise InputError("--backed comes with the scale work and is not available yet; drop it "
                         "to load the cells into memory.")
    shared = {k: given[k] for k in ("layer", "seed", "device", "max_epochs", "batch_size", "lr",
                                    "patience") if k in given}
    specific = {k: given[k] for k in (CONFOUNDER_ONLY if mode == "confounder" else INTEGRATE_ONLY)
                if k in given}
    if "control_genes" in specific:
        specific["control_genes"] = _gene_list(specific["control_genes"])
    for list_key in ("covariate_keys", "generator_inputs"):
        if list_key in specific:
            from .data import parse_key_list

            specific[list_key] = parse_key_list(specific[list_key])
    _check_out_differs(out, [data])

    from . import api

    start = time.perf_counter()
    if mode == "confounder":
        cfg = api.confounder_config(**shared, **specific)
    else:
        cfg = IntegrationConfig(**shared, **specific)
    cfg.check()
    adata = _read(data)
    model_cls = api.ConfounderModel if mode == "confounder" else api.IntegrationModel
    model = model_cls(adata, cfg)
    with _progress_bar(model.planned_epochs, f"fit {mode}") as on_epoch:
        model.train(on_epoch=on_epoch)
    model.save(out)
    seconds = time.perf_counter() - start
    summary = model.fit_summary()
    rows = _written_rows(out, seconds, (summary["n_cells"], summary["n_genes"]))
    rows.update({k: _fmt(v) for k, v in summary.items() if k not in ("n_cells", "n_genes")})
    for warning in summary.get("warnings", []):
        console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)
    _report(f"fit --mode {mode}", rows, as_json,
            {"command": "fit", "out": str(out), "seconds": seconds, **summary})


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


class _progress_bar:
    """A rich progress bar over epochs showing the latest losses; yields the per-epoch callback."""

    def __init__(self, total: int, title: str):
        self.total, self.title = total, title

    def __enter__(self):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[losses]}"), console=console,
                                 transient=False, disable=not console.is_terminal
                                 and os.environ.get("ADVCLI_PROGRESS") != "1")
        self.progress.__enter__()
        self.task = self.progress.add_task(self.title, total=self.total, losses="")

        def on_epoch(done: int, losses: dict[str, float]) -> None:
            text = "  ".join(f"{k} {v:.4g}" for k, v in losses.items())
            self.progress.update(self.task, completed=done, losses=text)

        return on_epoch

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


def _read(path: Path):
    from .data import read_h5ad

    return read_h5ad(path)


def _check_out_differs(out: Path, inputs: list[Path]) -> None:
    for path in inputs:
        if Path(out).resolve() == Path(path).resolve():
            raise InputError(f"Output '{out}' is the input file; advcli never overwrites its "
                             "inputs. Choose another output name.")


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
    as_json: bool = JSON_OPTION,
) -> None:
    """Add the model's per-cell outputs to a copy of DATA and write it to OUT."""
    from . import api
    from .data import set_uns
    from .io import file_sha256, load_model

    _check_out_differs(out, [data, model_path])
    if csv is not None:
        _check_out_differs(csv, [data, model_path, out])
    if effects is not None:
        _check_out_differs(effects, [data, model_path, out] + ([csv] if csv else []))
    start = time.perf_counter()
    payload = load_model(model_path)
    model = api.load(payload, model_path)
    if decode_as is not None and payload["mode"] != "integrate":
        raise InputError("--decode-as applies to integrate-mode models only.")
    if effects is not None and payload["mode"] != "confounder":
        raise InputError("--effects applies to confounder-mode models only.")
    adata = _read(data)
    written = model.predict_into(adata, batch_size=batch_size, device=device,
                                 **({"decode_as": decode_as} if decode_as is not None else {}))
    set_uns(adata, keys.PREDICT, {"model_sha256": file_sha256(model_path),
                                  "mode": payload["mode"], "version": __version__,
                                  "model_version": payload["version"]})
    from .io import atomic_files

    table = model.treatment_effects(adata) if effects is not None else None
    with atomic_files([out] + [p for p in (csv, effects) if p is not None]) as tmps:
        if csv is not None:
            api.per_cell_frame(adata, written).to_csv(tmps[csv], index_label="cell")
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


@app.command("diagnose")
@_handle_errors
def diagnose(
    predicted: Path = typer.Argument(..., metavar="OUT.h5ad", help="File written by `predict`."),
    out: Path = typer.Option(..., "-o", "--out", help="Report folder (created as needed)."),
    model_path: Optional[Path] = typer.Option(None, "--model", help="Model file, for loss curves."),
    label_key: str = typer.Option(keys.CELL_TYPE, "--label-key",
                                  help="[integrate] obs column with cell labels."),
    batch_key: Optional[str] = typer.Option(None, "--batch-key",
                                            help="[integrate] obs column with the domains "
                                                 "(default: the model's)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Write metrics, tables and plots about a prediction to a report folder."""
    from .report import diagnose as run

    start = time.perf_counter()
    summary = run(predicted, out, model_path=model_path, label_key=label_key,
                  batch_key=batch_key)
    seconds = time.perf_counter() - start
    rows = {"folder": str(out), "files": ", ".join(summary["files"]), "time": f"{seconds:.1f} s"}
    rows.update({k: _fmt(v) for k, v in summary["headline"].items()})
    for note in summary.get("notes", []):
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    _report(f"diagnose ({summary['mode']})", rows, as_json, {"command": "diagnose", **summary,
                                                            "seconds": seconds})


if __name__ == "__main__":  # pragma: no cover
    app()
