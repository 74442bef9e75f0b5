"""Generated bad and odd input files: every command ends with exit 0 or 2 and a message, never a
traceback, and a failed command leaves no output behind.

ADVCLI_FUZZ_EXAMPLES=1000 python -m pytest tests/test_fuzz.py runs the long version.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from advcli.cli import app

EXAMPLES = int(os.environ.get("ADVCLI_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))

ODD_VALUES = st.sampled_from([np.nan, np.inf, -1.0, 0.5, 1e30, 0.0, 3.0])


@st.composite
def anndata_files(draw) -> dict:
    """A small AnnData with random shapes, dtypes, value defects and obs columns."""
    n = draw(st.integers(0, 24))
    p = draw(st.integers(0, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    x = rng.poisson(3.0, size=(n, p)).astype(draw(st.sampled_from(["int32", "int64", "float32",
                                                                   "float64"])))
    if n and p and draw(st.booleans()):
        for _ in range(draw(st.integers(1, 3))):
            value = draw(ODD_VALUES)
            if np.issubdtype(x.dtype, np.floating) or value in (-1.0, 0.0, 3.0):
                x[rng.integers(n), rng.integers(p)] = value
    genes = [f"g{i}" for i in range(p)]
    if p > 1 and draw(st.booleans()):
        genes[1] = genes[0]  # duplicated gene names
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n)])
    batch = draw(st.sampled_from(["two", "one", "numeric", "nan", "missing"]))
    if batch == "two":
        obs["batch"] = pd.Categorical(np.where(np.arange(n) % 2 == 0, "A", "B"))
    elif batch == "one":
        obs["batch"] = "A"
    elif batch == "numeric":
        obs["batch"] = rng.normal(size=n)
    elif batch == "nan":
        obs["batch"] = pd.Categorical(np.where(np.arange(n) % 3 == 0, None, "A"))
    treatment = draw(st.sampled_from(["binary", "three", "constant", "text", "missing"]))
    if treatment == "binary":
        obs["D"] = np.arange(n) % 2
    elif treatment == "three":
        obs["D"] = np.arange(n) % 3
    elif treatment == "constant":
        obs["D"] = 1
    elif treatment == "text":
        obs["D"] = "yes"
    sparse = draw(st.booleans())
    return {"X": sp.csr_matrix(x) if sparse else x, "obs": obs,
            "var": pd.DataFrame(index=genes)}


def _check(result, out: Path) -> None:
    text = result.stdout + result.stderr
    assert result.exit_code in (0, 2), (result.exit_code, text[-3000:])
    assert "Traceback" not in text and "internal error" not in text, text[-3000:]
    if result.exit_code == 2:
        assert not out.exists()
        assert text.strip()


@FUZZ
@given(spec=anndata_files(), mode=st.sampled_from(["integrate", "confounder"]),
       store=st.sampled_from(["X", "raw", "backed"]))
def test_fit_on_generated_files(spec, mode, store):
    runner = CliRunner()
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "data.h5ad", Path(tmp) / "model.pt"
        adata = ad.AnnData(X=spec["X"], obs=spec["obs"], var=spec["var"])
        extra = []
        if store == "raw":  # scanpy's layout: counts in .raw, X normalised on fewer genes
            counts = adata.copy()
            adata = counts[:, : counts.n_vars // 2].copy()
            adata.X = np.full(adata.shape, 0.5, dtype=np.float32)
            adata.raw = counts
            extra = ["--layer", "raw"]
        if store == "backed":  # the same file, its counts read from disk in blocks
            extra = ["--backed"]
        adata.write_h5ad(path)
        result = runner.invoke(app, ["fit", str(path), "--mode", mode, "-o", str(out),
                                     "--max-epochs", "1", "--hidden", "8", *extra])
        _check(result, out)


@FUZZ
@given(data=st.binary(max_size=2048), truncate=st.booleans())
def test_commands_on_files_that_are_not_h5ad(data, truncate):
    runner = CliRunner()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.h5ad"
        if truncate:  # the start of a real file
            good = ad.AnnData(X=np.ones((5, 3), dtype=np.float32))
            good.write_h5ad(path)
            raw = path.read_bytes()
            path.write_bytes(raw[: max(1, len(raw) * (len(data) % 97) // 100)])
        else:
            path.write_bytes(data)
        for args, out in ((["fit", str(path), "--mode", "integrate"], Path(tmp) / "m.pt"),
                          (["fit", str(path), "--mode", "integrate", "--backed"],
                           Path(tmp) / "m.pt"),
                          (["diagnose", str(path)], Path(tmp) / "report"),
                          (["diagnose", str(path), "--backed"], Path(tmp) / "report"),
                          (["predict", str(path), str(path)], Path(tmp) / "p.h5ad")):
            result = runner.invoke(app, [*args, "-o", str(out)])
            _check(result, out)
            assert result.exit_code == 2
