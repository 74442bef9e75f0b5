"""--backed: counts left on disk, read in row blocks (advcli/backed.py) through fit, predict and
diagnose; the same answers as in memory where the two should agree."""

from __future__ import annotations

import json

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from advcli import backed
from advcli.data import CountRows, count_rows, read_h5ad
from advcli.errors import InputError

from conftest import make_adata, make_bad_counts


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks and buffers of a few rows, so a small file spans many of each."""
    monkeypatch.setattr(backed, "CHUNK_ROWS", 16)
    monkeypatch.setattr(backed, "BUFFER_ROWS", 64)


def _counts(n=300, genes=20, seed=0):
    rng = np.random.default_rng(seed)
    return rng.negative_binomial(2, 0.4, (n, genes)).astype(np.float32)


@pytest.mark.parametrize("dense", [False, True])
def test_backed_rows_equal_the_in_memory_rows(tmp_path, small_chunks, dense):
    counts = _counts()
    X = counts if dense else sp.csr_matrix(counts)
    path = tmp_path / "d.h5ad"
    ad.AnnData(X=X, var=pd.DataFrame(index=[f"g{j}" for j in range(20)])).write_h5ad(path)
    columns = np.array([5, 0, 19, 3])
    disk = count_rows(read_h5ad(path, backed=True), None, torch.device("cpu"), columns)
    memory = CountRows(sp.csr_matrix(counts[:, columns]), torch.device("cpu"))
    assert disk.backed and disk.shape == (300, 4)
    assert torch.allclose(disk.log_factorial, memory.log_factorial)
    np.testing.assert_allclose(disk.col_sums, counts[:, columns].sum(axis=0))
    np.testing.assert_allclose(disk.library, counts[:, columns].sum(axis=1))
    idx = torch.tensor([299, 3, 150, 3, 42])  # unplanned, unsorted, repeated: read directly
    assert torch.equal(disk.rows(idx), memory.rows(idx))
    assert disk.rows(torch.tensor([], dtype=torch.long)).shape == (0, 4)
    keep = np.ones(300, dtype=bool)
    keep[::7] = False
    disk.hold(np.flatnonzero(~keep))
    buffers = disk.shuffled_buffers(torch.Generator().manual_seed(0), keep)
    seen = np.concatenate(buffers)
    assert np.array_equal(np.sort(seen), np.flatnonzero(keep))  # every kept row once an epoch
    assert len(buffers) == 5  # 19 chunks of 16 rows, 4 chunks a buffer
    first_chunks = [np.unique(b // 16) for b in buffers]
    assert not all(np.all(np.diff(c) == 1) for c in first_chunks)  # chunks are shuffled
    for rows in buffers:
        idx = torch.from_numpy(np.random.default_rng(1).permutation(rows)[:10])
        assert torch.equal(disk.rows(idx), memory.rows(idx))
    held = torch.from_numpy(np.flatnonzero(~keep)[:9])
    assert torch.equal(disk.rows(held), memory.rows(held))
    disk.close()


def test_a_csc_file_is_refused_with_backed(tmp_path):
    path = tmp_path / "csc.h5ad"
    ad.AnnData(X=sp.csc_matrix(_counts(30, 5))).write_h5ad(path)
    with pytest.raises(InputError, match="CSC"):
        count_rows(read_h5ad(path, backed=True), None, torch.device("cpu"))


def test_backed_anndata_leaves_layers_on_disk(tmp_path):
    adata = make_adata(n=50, genes=6)
    adata.layers["big"] = np.ones((50, 6), dtype=np.float32)
    adata.obsm["emb"] = np.zeros((50, 2))
    path = tmp_path / "d.h5ad"
    adata.write_h5ad(path)
    disk = read_h5ad(path, backed=True)
    assert isinstance(disk.layers["big"], h5py.Dataset)  # not read
    assert disk.shape == (50, 6) and list(disk.var_names) == list(adata.var_names)
    assert disk.obs.equals(adata.obs) and disk.obsm["emb"].shape == (50, 2)
    disk.close()


def _fit_predict(invoke, tmp_path, data, backed_flag: list[str], name: str):
    model, out = tmp_path / f"{name}.pt", tmp_path / f"{name}.h5ad"
    fit = invoke("fit", data, "--mode", "integrate", "-o", model, "--max-epochs", "4", "--json",
                 *backed_flag)
    assert fit.exit_code == 0, fit.output
    pred = invoke("predict", model, data, "-o", out, *backed_flag[:1])
    assert pred.exit_code == 0, pred.output
    return model, out, json.loads(fit.stdout)


def test_fit_predict_diagnose_backed(tmp_path, invoke, integrate_file, small_chunks):
    model, out, summary = _fit_predict(invoke, tmp_path, integrate_file, ["--backed"], "b")
    assert summary["epochs"] == 4 and summary["n_cells"] == 660
    result = ad.read_h5ad(out)
    source = ad.read_h5ad(integrate_file)
    assert (result.X != source.X).nnz == 0  # the input's contents are kept
    assert result.obsm["X_advcli"].shape[0] == 660
    assert np.isfinite(result.layers["nb_mean"]).all()
    assert result.uns["advcli"]["predict"]["mode"] == "integrate"
    # the backed model, predicted in memory, gives the same outputs
    memory = tmp_path / "mem.h5ad"
    assert invoke("predict", model, integrate_file, "-o", memory).exit_code == 0
    in_memory = ad.read_h5ad(memory)
    np.testing.assert_allclose(result.obsm["X_advcli"], in_memory.obsm["X_advcli"], atol=1e-5)
    np.testing.assert_allclose(result.layers["nb_mean"], in_memory.layers["nb_mean"],
                               rtol=1e-4)
    np.testing.assert_allclose(result.obs["domain_prob"], in_memory.obs["domain_prob"],
                               atol=1e-5)
    reports = {}
    for name, flag in (("disk", ["--backed"]), ("memory", [])):
        rep = invoke("diagnose", out, "-o", tmp_path / name, "--model", model, "--json", *flag)
        assert rep.exit_code == 0, rep.output
        reports[name] = json.loads(rep.stdout)["metrics"]
    by_domain = {name: report.pop("ilisi_by_domain") for name, report in reports.items()}
    assert by_domain["disk"] == pytest.approx(by_domain["memory"])
    assert reports["disk"] == pytest.approx(reports["memory"])


def test_backed_training_mixes_like_in_memory(tmp_path, integrate_file, small_chunks):
    """Block-shuffled minibatches are still minibatches: the held-out ELBO after a few epochs is
    close to the in-memory run's."""
    import advcli

    results = {}
    for name, adata in (("memory", ad.read_h5ad(integrate_file)),
                        ("disk", advcli.read_backed(integrate_file))):
        model = advcli.IntegrationModel(adata, max_epochs=15, seed=0).train()
        results[name] = model.train_state_.records[-1]
        assert model.train_state_.records[-1]["val_elbo"] < model.train_state_.records[0]["val_elbo"]
    assert results["disk"]["val_elbo"] == pytest.approx(results["memory"]["val_elbo"], rel=0.05)
    # predicting into a read-only backed file: latent yes, per-gene layers refused
    assert model.get_latent_representation(adata).shape[0] == 660
    with pytest.raises(InputError, match="read-only"):
        model.predict(adata, inplace=True)
    assert "X_advcli" not in adata.obsm
    model.predict(adata, inplace=True, nb_mean=False)
    assert adata.obsm["X_advcli"].shape[0] == 660


def test_gene_selection_on_a_backed_file_matches_memory(tmp_path, invoke, integrate_file,
                                                       small_chunks):
    """--n-top-genes reads the file in two passes; the genes and the model's inputs are those
    of the in-memory run, and predict places the outputs at the chosen genes."""
    import advcli

    memory = advcli.IntegrationModel(ad.read_h5ad(integrate_file), n_top_genes=40, max_epochs=1)
    disk = advcli.IntegrationModel(advcli.read_backed(integrate_file), n_top_genes=40,
                                   max_epochs=1)
    assert disk.genes_ == memory.genes_ and len(disk.genes_) == 40
    assert disk.fingerprint_ == memory.fingerprint_  # same counts per gene and domains
    model, out, _ = _fit_predict(invoke, tmp_path, integrate_file,
                                 ["--backed", "--n-top-genes", "40"], "hvg")
    result = ad.read_h5ad(out)
    chosen = result.var_names.isin(disk.genes_)
    assert np.isfinite(result.layers["nb_mean"][:, chosen]).all()
    assert np.isnan(result.layers["nb_mean"][:, ~chosen]).all()


def test_no_nb_mean_skips_the_layer(tmp_path, invoke, integrate_file):
    model = tmp_path / "m.pt"
    assert invoke("fit", integrate_file, "--mode", "integrate", "-o", model,
                  "--max-epochs", "2").exit_code == 0
    for flag in ([], ["--backed"]):
        out = tmp_path / f"o{len(flag)}.h5ad"
        res = invoke("predict", model, integrate_file, "-o", out, "--no-nb-mean", *flag)
        assert res.exit_code == 0, res.output
        result = ad.read_h5ad(out)
        assert "nb_mean" not in result.layers and "X_advcli" in result.obsm


def _nothing_written(tmp_path, before: set) -> bool:
    return set(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("problem, message", [
    ("nan", "NaN"), ("negative", "negative"), ("fraction", "non-integer"), ("csc", "CSC"),
    ("empty", "0 cells"), ("batch", "Batch key 'batch' not found"), ("genes", "not unique"),
    ("text", "not a readable .h5ad")])
def test_bad_backed_input_exits_2_and_writes_nothing(tmp_path, invoke, problem, message):
    adata = make_bad_counts(problem, genes=8,
                            fmt=sp.csc_matrix if problem == "csc" else sp.csr_matrix)
    if problem == "empty":
        adata = adata[:0].copy()
    if problem == "batch":
        del adata.obs["batch"]
    if problem == "genes":
        adata.var_names = ["g0"] * 8
    path = tmp_path / "bad.h5ad"
    if problem == "text":
        path.write_text("not hdf5")
    else:
        adata.write_h5ad(path)
    before = set(p.name for p in tmp_path.iterdir())
    res = invoke("fit", path, "--mode", "integrate", "-o", tmp_path / "m.pt", "--backed")
    assert res.exit_code == 2, res.output
    assert message in res.output.replace("\n", " ")
    assert "Traceback" not in res.output
    assert _nothing_written(tmp_path, before)


def test_backed_is_refused_where_it_does_not_apply(tmp_path, invoke, integrate_file,
                                                   confounder_file):
    before = set(p.name for p in tmp_path.iterdir())
    res = invoke("fit", integrate_file, "--mode", "aae", "-o", tmp_path / "m.pt", "--backed")
    assert res.exit_code == 2 and "--mode integrate and confounder" in res.output
    res = invoke("fit", integrate_file, "--mode", "integrate", "-o", tmp_path / "m.pt",
                 "--backed", "--layer", "raw")
    assert res.exit_code == 2 and "adata.raw" in res.output
    assert _nothing_written(tmp_path, before)


def test_backed_predict_on_mismatched_genes_writes_nothing(tmp_path, invoke, integrate_file):
    model = tmp_path / "m.pt"
    assert invoke("fit", integrate_file, "--mode", "integrate", "-o", model,
                  "--max-epochs", "1").exit_code == 0
    fewer = ad.read_h5ad(integrate_file)[:, 10:].copy()
    path = tmp_path / "fewer.h5ad"
    fewer.write_h5ad(path)
    before = set(p.name for p in tmp_path.iterdir())
    res = invoke("predict", model, path, "-o", tmp_path / "o.h5ad", "--backed")
    assert res.exit_code == 2 and "lack 10 of the 120 genes" in res.output
    assert _nothing_written(tmp_path, before)
    res = invoke("predict", model, tmp_path / "missing.h5ad", "-o", tmp_path / "o.h5ad",
                 "--backed")
    assert res.exit_code == 2 and "does not exist" in res.output
    assert _nothing_written(tmp_path, before)


def test_validation_cells_are_capped(monkeypatch):
    from advcli import data

    monkeypatch.setattr(data, "MAX_VAL_CELLS", 30)
    domain = np.repeat([0, 1], [400, 200])
    train, val = data.stratified_split(domain, ["a", "b"], 0.1, 0, "batch")
    assert len(val) == 30 and sum(len(t) for t in train) == 570
    assert (domain[val.numpy()] == 0).sum() == 20  # still stratified


def test_large_data_trains_for_a_budget_of_cells():
    from advcli.models.base import default_epochs

    assert default_epochs(None, 4000, n_cells=1_000_000) == 8
    assert default_epochs(None, 300, n_cells=50_000) == 100
    assert default_epochs(None, 5, n_cells=600) == 300  # small data: enough steps
    assert default_epochs(12, 4000, n_cells=1_000_000) == 12


def test_confounder_setup_from_disk_equals_memory(confounder_file, small_chunks):
    """The streaming pass gives the in-memory statistics: gene means and SDs of the log counts,
    the NB heads' start, the SVA-like start of Z and its number of factors."""
    import advcli

    memory = advcli.ConfounderModel(ad.read_h5ad(confounder_file), seed=0)
    disk = advcli.ConfounderModel(advcli.read_backed(confounder_file), seed=0)
    assert disk.config.z_dim == memory.config.z_dim
    for a, b in zip(memory._init[1:], disk._init[1:]):
        if a is not None:
            assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5)
    assert torch.allclose(memory._start, disk._start, atol=1e-4)
    assert torch.allclose(memory._off, disk._off, atol=1e-6)
    assert memory.fingerprint_ == disk.fingerprint_
    for a, b in zip(vars(memory._y.count_histogram).values(),
                    vars(disk._y.count_histogram).values()):
        assert torch.equal(a, b)


def test_confounder_fit_predict_diagnose_backed(tmp_path, invoke, confounder_file,
                                                small_chunks):
    model = tmp_path / "c.pt"
    assert invoke("fit", confounder_file, "--mode", "confounder", "-o", model, "--backed",
                  "--max-epochs", "12").exit_code == 0
    outputs = {}
    for name, flag in (("disk", ["--backed"]), ("memory", [])):
        out = tmp_path / f"{name}.h5ad"
        res = invoke("predict", model, confounder_file, "-o", out, *flag)
        assert res.exit_code == 0, res.output
        outputs[name] = ad.read_h5ad(out)
    disk, memory = outputs["disk"], outputs["memory"]
    np.testing.assert_allclose(disk.obsm["Z_hat"], memory.obsm["Z_hat"], atol=1e-5)
    np.testing.assert_allclose(disk.layers["nb_mean"], memory.layers["nb_mean"], rtol=1e-4)
    np.testing.assert_allclose(disk.obs["log_lik_Y"], memory.obs["log_lik_Y"], rtol=1e-5)
    reports = {}
    for name, flag in (("disk", ["--backed"]), ("memory", [])):
        rep = invoke("diagnose", tmp_path / "disk.h5ad", "-o", tmp_path / f"r_{name}",
                     "--json", *flag)
        assert rep.exit_code == 0, rep.output
        reports[name] = json.loads(rep.stdout)["headline"]
    assert reports["disk"] == reports["memory"]
    before = set(p.name for p in tmp_path.iterdir())
    res = invoke("predict", model, confounder_file, "-o", tmp_path / "e.h5ad", "--backed",
                 "--effects", tmp_path / "e.csv")
    assert res.exit_code == 2 and "--effects with --backed" in res.output
    assert _nothing_written(tmp_path, before)


def test_backed_training_is_repeatable_and_resumes_where_it_stopped(integrate_file,
                                                                    small_chunks):
    """The buffers come from the seeded sampler: the same seed gives the same model, and a
    run continued after 3 epochs ends where an uninterrupted one does."""
    import advcli

    def fit(*budgets):
        model = advcli.IntegrationModel(advcli.read_backed(integrate_file), seed=3,
                                        max_epochs=budgets[0], patience=0)
        for budget in budgets:
            model.train(max_epochs=budget)
        return model.get_latent_representation()

    straight = fit(6)
    assert np.array_equal(straight, fit(6))
    assert np.allclose(straight, fit(3, 6), atol=1e-6)


@pytest.mark.parametrize("dense", [False, True])
def test_scattered_rows_are_read_alone(tmp_path, dense):
    counts = _counts(n=1000, genes=7)
    path = tmp_path / "d.h5ad"
    ad.AnnData(X=counts if dense else sp.csr_matrix(counts)).write_h5ad(path)
    disk = read_h5ad(path, backed=True)
    rows = np.sort(np.random.default_rng(0).choice(1000, 37, replace=False))
    got = backed.read_rows(disk.X, rows)
    got = got.toarray() if sp.issparse(got) else got
    np.testing.assert_array_equal(got, counts[rows])
    np.testing.assert_array_equal(backed.read_rows(counts, rows), counts[rows])  # in memory
    assert backed.read_rows(disk.X, np.array([], dtype=int)).shape[0] == 0
    disk.close()


@pytest.mark.parametrize("span", [1, 9, 200])
def test_scattered_rows_split_into_spans_read_the_same(tmp_path, monkeypatch, span):
    """Reads cut into spans of at most ``span`` stored values (a row longer than a span is read
    alone) give the rows asked for, empty rows included."""
    counts = _counts(n=300, genes=7)
    counts[[0, 17]] = 0
    path = tmp_path / "d.h5ad"
    ad.AnnData(X=sp.csr_matrix(counts)).write_h5ad(path)
    disk = read_h5ad(path, backed=True)
    monkeypatch.setattr(backed, "SPAN_ENTRIES", span)
    rows = np.r_[0, 17, np.sort(np.random.default_rng(1).choice(np.arange(18, 300), 60,
                                                                 replace=False))]
    np.testing.assert_array_equal(backed.read_rows(disk.X, rows).toarray(), counts[rows])
    disk.close()
