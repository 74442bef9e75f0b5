"""Bad inputs across the commands: broken model files, outputs that cannot be written, odd
prediction files. Each ends with exit 2 and a message, never a traceback or a crash."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from conftest import SAMPLE


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny integrate model and its prediction file."""
    from typer.testing import CliRunner

    from advcli.cli import app

    folder = tmp_path_factory.mktemp("fitted")
    a = ad.read_h5ad(SAMPLE / "integrate.h5ad")
    small = a[np.r_[0:200, a.n_obs - 200:a.n_obs]].copy()
    small.write_h5ad(folder / "data.h5ad")
    runner = CliRunner()
    for args in (["fit", folder / "data.h5ad", "--mode", "integrate", "--max-epochs", "2",
                  "--latent-dim", "4", "-o", folder / "m.pt"],
                 ["predict", folder / "m.pt", folder / "data.h5ad", "-o", folder / "p.h5ad"]):
        result = runner.invoke(app, [str(x) for x in args])
        assert result.exit_code == 0, result.stderr
    return folder


def _check(r, code, *phrases):
    assert r.exit_code == code, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    for phrase in phrases:
        assert phrase in r.stderr, (phrase, r.stderr)


def test_broken_model_files(fitted, tmp_path, invoke):
    data = fitted / "data.h5ad"
    (tmp_path / "zero.pt").write_bytes(b"")
    _check(invoke("predict", tmp_path / "zero.pt", data, "-o", tmp_path / "o.h5ad"), 2,
           "is empty (0 bytes)")
    payload = torch.load(fitted / "m.pt", weights_only=True)
    for key, value, phrase in (("format_version", "two", "format_version has the wrong type"),
                               ("genes", "g1,g2", "genes has the wrong type"),
                               ("mode", "other", "mode has the wrong type or value")):
        broken = {**payload, key: value}
        torch.save(broken, tmp_path / "b.pt")
        _check(invoke("predict", tmp_path / "b.pt", data, "-o", tmp_path / "o.h5ad"), 2, phrase)
    nan = {**payload, "state": dict(payload["state"])}
    name = next(k for k, v in nan["state"].items() if v.is_floating_point() and v.dim() == 2)
    nan["state"][name] = nan["state"][name].clone().fill_(float("nan"))
    torch.save(nan, tmp_path / "nan.pt")
    _check(invoke("predict", tmp_path / "nan.pt", data, "-o", tmp_path / "o.h5ad"), 2,
           "holds non-finite values")
    assert not (tmp_path / "o.h5ad").exists()


def test_outputs_that_cannot_be_written(fitted, tmp_path, invoke):
    data, model = fitted / "data.h5ad", fitted / "m.pt"
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    _check(invoke("simulate", "confounder", "-o", tmp_path / "folder"), 2, "is a folder")
    _check(invoke("predict", model, data, "-o", tmp_path / "folder"), 2, "is a folder")
    _check(invoke("predict", model, data, "-o", tmp_path / "file" / "o.h5ad"), 2,
           "is a file, not a folder")
    _check(invoke("diagnose", fitted / "p.h5ad", "-o", tmp_path / "file"), 2,
           "Report folder", "is a file")
    _check(invoke("diagnose", fitted / "p.h5ad", "-o", fitted / "p.h5ad"), 2, "is the input")


def test_predict_ignores_extra_genes_and_keeps_the_files_order(fitted, tmp_path, invoke):
    a = ad.read_h5ad(fitted / "data.h5ad")
    extra = ad.AnnData(X=sp.csr_matrix(np.ones((a.n_obs, 3), dtype=np.float32)), obs=a.obs,
                       var=pd.DataFrame(index=["extra1", "extra2", "extra3"]))
    wide = ad.concat([extra, a], axis=1, merge="same")
    wide = wide[:, np.r_[3:wide.n_vars, 0:3]].copy()  # model genes first, extras last
    wide = wide[:, ::-1].copy()  # and every gene in reverse order
    wide.write_h5ad(tmp_path / "wide.h5ad")
    _check(invoke("predict", fitted / "m.pt", tmp_path / "wide.h5ad", "-o", tmp_path / "w.h5ad"),
           0)
    out = ad.read_h5ad(tmp_path / "w.h5ad")
    ref = ad.read_h5ad(fitted / "p.h5ad")
    np.testing.assert_allclose(out.obsm["X_advcli"], ref.obsm["X_advcli"], rtol=1e-5, atol=1e-6)
    means = pd.DataFrame(out.layers["nb_mean"], columns=out.var_names)
    assert means[["extra1", "extra2", "extra3"]].isna().all().all()
    np.testing.assert_allclose(means[list(ref.var_names)].to_numpy(), ref.layers["nb_mean"],
                               rtol=1e-5)


def test_diagnose_on_odd_prediction_files(fitted, tmp_path, invoke):
    predicted = ad.read_h5ad(fitted / "p.h5ad")

    def run(adata, *extra):
        adata.write_h5ad(tmp_path / "in.h5ad")
        return invoke("diagnose", tmp_path / "in.h5ad", "-o", tmp_path / "report", *extra)

    bad = predicted.copy()
    bad.obsm["X_advcli"][3, 1] = np.nan
    _check(run(bad), 2, "NaN or infinite")
    _check(run(predicted.copy(), "--label-key", "celltype"), 2, "--label-key 'celltype' is not",
           "'cell_type'")
    floaty = predicted.copy()
    floaty.obs["batch"] = np.random.default_rng(0).normal(size=floaty.n_obs)
    _check(run(floaty), 2, "non-integer numbers")
    collapsed = predicted.copy()
    collapsed.obsm["X_advcli"] = np.zeros_like(collapsed.obsm["X_advcli"])
    r = run(collapsed)
    _check(r, 0, "latent space collapsed", "No map is drawn")
    assert not (tmp_path / "report" / "embedding.png").exists()
    _check(run(predicted[:0].copy()), 2, "nothing to diagnose")


def test_diagnose_again_removes_the_files_of_the_earlier_report(fitted, tmp_path, invoke):
    report = tmp_path / "report"
    _check(invoke("diagnose", fitted / "p.h5ad", "-o", report, "--model", fitted / "m.pt"), 0)
    assert (report / "loss_curves.png").exists()
    (report / "notes.txt").write_text("mine")  # a file the user put there stays
    _check(invoke("diagnose", fitted / "p.h5ad", "-o", report), 0)
    assert not (report / "loss_curves.png").exists() and (report / "notes.txt").exists()


def test_errors_name_the_file_and_json_reports_them(fitted, tmp_path, invoke):
    import json

    a = ad.read_h5ad(fitted / "data.h5ad")
    a.X = a.X.astype(np.float32)
    a.X.data[0] = 0.5
    a.write_h5ad(tmp_path / "frac.h5ad")
    r = invoke("predict", fitted / "m.pt", tmp_path / "frac.h5ad", "-o", tmp_path / "o.h5ad",
               "--json")
    _check(r, 2, f"In '{tmp_path / 'frac.h5ad'}'", "non-integer")
    reported = json.loads(r.stdout)
    assert reported["exit_code"] == 2 and "non-integer" in reported["error"]


def test_bad_scaling_options(fitted, tmp_path, invoke):
    data = str(fitted / "data.h5ad")
    out = str(tmp_path / "m.pt")
    _check(invoke("fit", data, "--mode", "integrate", "-o", out, "--threads", "0"), 2,
           "--threads must be 1 or more")
    _check(invoke("fit", data, "--mode", "integrate", "-o", out, "--nproc", "-1"), 2,
           "--nproc must be 1 or more")
    _check(invoke("fit", data, "--mode", "integrate", "-o", out, "--device", "gpu"), 2,
           "--device must be auto, cpu, cuda or cuda:N")
    _check(invoke("predict", str(fitted / "m.pt"), data, "-o", str(tmp_path / "p.h5ad"),
                  "--threads", "0"), 2, "--threads must be 1 or more")
    assert not list(tmp_path.iterdir())
    before = torch.get_num_threads()
    try:
        r = invoke("predict", str(fitted / "m.pt"), data, "-o", str(tmp_path / "p.h5ad"),
                   "--threads", "1")
        assert r.exit_code == 0, r.stderr
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_diagnose_compares_with_the_unintegrated_pca(fitted, tmp_path, invoke):
    """An embedding that keeps only the domains scores below PCA of the counts, and the
    report says so."""
    import json

    a = ad.read_h5ad(fitted / "p.h5ad")
    shape = a.obsm["X_advcli"].shape
    domain = (a.obs["batch"].astype(str).to_numpy() == a.obs["batch"].astype(str).iloc[0])
    a.obsm["X_advcli"] = (np.random.default_rng(0).normal(size=shape) * 0.1
                          + 10.0 * domain[:, None])
    a.write_h5ad(tmp_path / "noise.h5ad")
    r = invoke("diagnose", tmp_path / "noise.h5ad", "-o", tmp_path / "report")
    assert r.exit_code == 0, r.stderr
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    baseline = summary["unintegrated_metrics"]
    assert set(baseline) == set(summary["metrics"])
    assert summary["metrics"]["overall_score"] < baseline["overall_score"]
    assert any("scores below the unintegrated PCA" in n for n in summary["notes"])


def test_diagnose_says_when_cell_types_came_together(fitted, tmp_path, invoke):
    """An embedding that scatters the cell types over each other: they are less separated than
    in PCA of the counts, and the report says so; one that holds each type at its own point
    does not get the note."""
    import json

    a = ad.read_h5ad(fitted / "p.h5ad")
    noise = np.random.default_rng(0).normal(size=a.obsm["X_advcli"].shape)
    types = a.obs["cell_type"].astype("category").cat.codes.to_numpy()
    for name, embedding in (("mixed", noise), ("kept", noise * 0.1 + 5.0 * types[:, None])):
        a.obsm["X_advcli"] = embedding
        a.write_h5ad(tmp_path / f"{name}.h5ad")
    said = {}
    for name, noted in (("mixed", True), ("kept", False)):
        report = tmp_path / f"report_{name}"
        r = invoke("diagnose", tmp_path / f"{name}.h5ad", "-o", report)
        assert r.exit_code == 0, r.stderr
        summary = json.loads((report / "summary.json").read_text())
        said[noted] = [n for n in summary["notes"] if "less separated than in the unintegrated" in n]
        assert bool(said[noted]) is noted, summary["notes"]
    assert "cLISI" in said[True][0] and "--adv-weight" in said[True][0]


def test_diagnose_names_two_cell_types_laid_on_one_another(fitted, tmp_path, invoke):
    """Each type at its own point but the two largest at one: cLISI and label ASW, averaged
    over the types, may pass, but the report names the pair; with every type kept apart it
    says nothing of the kind."""
    import json

    a = ad.read_h5ad(fitted / "p.h5ad")
    noise = np.random.default_rng(0).normal(size=a.obsm["X_advcli"].shape) * 0.1
    types = a.obs["cell_type"].astype(str).to_numpy()
    first, second = a.obs["cell_type"].astype(str).value_counts().index[:2]
    codes = np.unique(types, return_inverse=True)[1].astype(float)
    joined = np.where(types == second, codes[types == first][0], codes)
    said = {}
    for name, position in (("joined", joined), ("kept", codes)):
        a.obsm["X_advcli"] = noise + 5.0 * position[:, None]
        a.write_h5ad(tmp_path / f"{name}.h5ad")
        report = tmp_path / f"report_{name}"
        r = invoke("diagnose", tmp_path / f"{name}.h5ad", "-o", report)
        assert r.exit_code == 0, r.stderr
        summary = json.loads((report / "summary.json").read_text())
        said[name] = [n for n in summary["notes"] if "now lie on one another" in n]
        pairs = json.loads((report / "integration_metrics.json").read_text())[
            "types_brought_together"]
        assert bool(pairs) is (name == "joined")
    assert not said["kept"] and len(said["joined"]) == 1
    assert first in said["joined"][0] and second in said["joined"][0]
    assert "--decoder-layers 1" in said["joined"][0]
