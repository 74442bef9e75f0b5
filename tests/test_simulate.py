import anndata as ad
import numpy as np
import pytest

import advcli.simulate as sim
from advcli.errors import InputError
from advcli.simulate import (ConfounderSimulation, IntegrationSimulation, simulate_confounder,
                             simulate_integration)


def test_confounder_file_has_every_spec_key(tmp_path):
    path = tmp_path / "c.h5ad"
    simulate_confounder(ConfounderSimulation(n=200, genes=15, covariates=3, z_dim=2,
                                             setting="general"), path)
    a = ad.read_h5ad(path)
    assert a.shape == (200, 15)
    assert {"D", "cov_0", "cov_1", "cov_2", "logit_D_true"} <= set(a.obs.columns)
    assert a.obsm["Z_true"].shape == (200, 2)
    assert a.layers["log_mu_true"].shape == (200, 15)
    assert "alpha_true" in a.var
    meta = a.uns["advcli"]
    assert list(meta["covariate_keys"]) == ["cov_0", "cov_1", "cov_2"]
    s = meta["simulation"]
    assert np.asarray(s["beta_2"]).shape == (4, 15) and np.asarray(s["gamma_2"]).shape == (2, 15)
    X = a.X.toarray()
    assert (X == np.round(X)).all() and (X >= 0).all()
    # the stored truth is what generated the data
    XD = np.column_stack([a.obs[[f"cov_{j}" for j in range(3)]].to_numpy(), a.obs["D"]])
    log_mu = XD @ np.asarray(s["beta_2"]) + a.obsm["Z_true"] @ np.asarray(s["gamma_2"])
    np.testing.assert_allclose(a.layers["log_mu_true"], log_mu, rtol=1e-5, atol=1e-5)


def test_extreme_setting_keeps_the_seeds_zero_gamma_1(tmp_path):
    path = tmp_path / "e.h5ad"
    info = simulate_confounder(ConfounderSimulation(n=500, genes=10, setting="extreme"), path)
    s = ad.read_h5ad(path).uns["advcli"]["simulation"]
    assert np.all(np.asarray(s["beta_1"]) == 0) and np.all(np.asarray(s["beta_2"]) == 0)
    assert info["gamma_1"] == 0.0  # sd(X beta_1) = 0 makes the variance-ratio rule give 0


def test_general_setting_calibration(tmp_path):
    path = tmp_path / "g.h5ad"
    simulate_confounder(ConfounderSimulation(n=20000, genes=5, setting="general", seed=4), path)
    a = ad.read_h5ad(path)
    s = a.uns["advcli"]["simulation"]
    X = a.obs[[f"cov_{j}" for j in range(4)]].to_numpy(float)
    xb = X @ np.asarray(s["beta_1"])
    assert abs(xb.std(ddof=1) - 0.8) < 1e-6
    zg = a.obsm["Z_true"] @ np.asarray(s["gamma_1"])
    assert abs(zg.var(ddof=1) / xb.var(ddof=1) - 0.3) < 1e-6
    # counts follow the truth: mean count vs mean of exp(log mu)
    mu = np.exp(a.layers["log_mu_true"]).mean(axis=0)
    assert np.allclose(np.asarray(a.X.mean(axis=0)).ravel(), mu, rtol=0.15)


def test_same_seed_same_file_other_seed_other_file(tmp_path):
    cfg = ConfounderSimulation(n=100, genes=8)
    simulate_confounder(cfg, tmp_path / "a.h5ad")
    simulate_confounder(cfg, tmp_path / "b.h5ad")
    simulate_confounder(ConfounderSimulation(n=100, genes=8, seed=1), tmp_path / "c.h5ad")
    a, b, c = ((tmp_path / f"{x}.h5ad").read_bytes() for x in "abc")
    assert a == b and a != c


def test_blocks_stream_without_changing_the_result(tmp_path, monkeypatch):
    """More cells than one block: the file is assembled from several appended CSR blocks."""
    monkeypatch.setattr(sim, "SIM_BLOCK", 64)
    simulate_confounder(ConfounderSimulation(n=300, genes=6), tmp_path / "s.h5ad")
    a = ad.read_h5ad(tmp_path / "s.h5ad")
    assert a.X.shape == (300, 6) and a.X.nnz > 0
    assert np.isfinite(a.layers["log_mu_true"]).all() and a.layers["log_mu_true"][299].any()


def test_integration_simulation(tmp_path):
    path = tmp_path / "i.h5ad"
    info = simulate_integration(IntegrationSimulation(n_a=400, n_b=500, genes=100,
                                                      cell_types=4), path)
    a = ad.read_h5ad(path)
    assert a.shape == (900, 100) and info["domains"] == {"A": 400, "B": 500}
    assert list(a.obs["batch"].cat.categories) == ["A", "B"]
    table = a.obs.groupby(["batch", "cell_type"], observed=False).size().unstack()
    assert table.loc["A", "type_3"] == 0 and table.loc["B", "type_3"] > 0
    assert (table.loc["B"] > 0).all()
    lib = np.asarray(a.X.sum(axis=1)).ravel()
    assert lib[:400].mean() > lib[400:].mean()  # the library-size shift of domain B
    zeros_a = (a.X[:400].toarray() == 0).mean()
    zeros_b = (a.X[400:].toarray() == 0).mean()
    assert zeros_b > zeros_a  # extra dropout in B


def test_zero_batch_strength_has_no_domain_effect_on_libraries(tmp_path):
    simulate_integration(IntegrationSimulation(n_a=800, n_b=800, genes=60, batch_strength=0.0),
                         tmp_path / "z.h5ad")
    a = ad.read_h5ad(tmp_path / "z.h5ad")
    lib = np.asarray(a.X.sum(axis=1)).ravel()
    assert abs(np.log(lib[:800].mean() / lib[800:].mean())) < 0.1


@pytest.mark.parametrize("cfg", [ConfounderSimulation(n=1), ConfounderSimulation(genes=0),
                                 ConfounderSimulation(setting="odd"),
                                 ConfounderSimulation(covariates=-1)])
def test_bad_confounder_options(cfg, tmp_path):
    with pytest.raises(InputError):
        simulate_confounder(cfg, tmp_path / "x.h5ad")
    assert not (tmp_path / "x.h5ad").exists()


@pytest.mark.parametrize("cfg", [IntegrationSimulation(cell_types=1),
                                 IntegrationSimulation(n_a=0), IntegrationSimulation(batch_strength=-1)])
def test_bad_integration_options(cfg, tmp_path):
    with pytest.raises(InputError):
        simulate_integration(cfg, tmp_path / "x.h5ad")
