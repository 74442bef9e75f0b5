"""Tiny AnnData fixtures written to tmp dirs, and a CLI runner that keeps stdout and stderr apart."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"


@pytest.fixture(scope="session")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def invoke(runner):
    from advcli.cli import app

    def run(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return run


@pytest.fixture(scope="session")
def confounder_file(tmp_path_factory) -> Path:
    """A small confounder simulation (general setting) shared by read-only tests."""
    from advcli.simulate import ConfounderSimulation, simulate_confounder

    path = tmp_path_factory.mktemp("sim") / "conf.h5ad"
    simulate_confounder(ConfounderSimulation(n=300, genes=30, setting="general", seed=3), path)
    return path


@pytest.fixture(scope="session")
def integrate_file(tmp_path_factory) -> Path:
    from advcli.simulate import IntegrationSimulation, simulate_integration

    path = tmp_path_factory.mktemp("sim") / "integ.h5ad"
    simulate_integration(IntegrationSimulation(n_a=300, n_b=360, genes=120, cell_types=4,
                                               seed=1), path)
    return path


def make_adata(n: int = 40, genes: int = 12, seed: int = 0, **obs) -> ad.AnnData:
    """A hand-made AnnData with integer counts, a 0/1 treatment and a categorical covariate."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(3.0, (n, genes)).astype(np.float32)
    frame = pd.DataFrame({"D": rng.integers(0, 2, n), "group": pd.Categorical(
        rng.choice(["a", "b", "c"], n)), "batch": np.where(np.arange(n) < n // 2, "x", "y")},
        index=[f"c{i}" for i in range(n)])
    for key, value in obs.items():
        frame[key] = value
    return ad.AnnData(X=sp.csr_matrix(counts), obs=frame,
                      var=pd.DataFrame(index=[f"g{j}" for j in range(genes)]))


BAD_COUNTS = {"nan": np.nan, "negative": -2.0, "fraction": 1.5}


def make_bad_counts(kind: str | None, n: int = 60, genes: int = 10, fmt=sp.csr_matrix
                    ) -> ad.AnnData:
    """``make_adata`` with one bad count of ``kind`` (a key of BAD_COUNTS; anything else leaves
    the counts clean), stored with ``fmt`` (CSR by default)."""
    adata = make_adata(n=n, genes=genes)
    x = adata.X.toarray()
    if kind in BAD_COUNTS:
        x[1, 1] = BAD_COUNTS[kind]
    adata.X = fmt(x)
    return adata


@pytest.fixture
def write(tmp_path):
    """Write an AnnData into the test's tmp dir and return the path."""

    def _write(adata: ad.AnnData, name: str = "data.h5ad") -> Path:
        path = tmp_path / name
        adata.write_h5ad(path)
        return path

    return _write
