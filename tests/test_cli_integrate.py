"""Integrate mode end to end through the `advcli` command."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_adata

FAST = ["--max-epochs", "8", "--latent-dim", "8", "--batch-size", "128"]


@pytest.fixture(scope="module")
def three_domain_file(tmp_path_factory, integrate_file):
    """The two-domain simulation with domain B split in two: three domains."""
    a = ad.read_h5ad(integrate_file)
    batch = a.obs["batch"].astype(str).to_numpy().copy()
    b_cells = np.flatnonzero(batch == "B")
    batch[b_cells[::2]] = "C"
    a.obs["batch"] = pd.Categorical(batch)
    path = tmp_path_factory.mktemp("three") / "three.h5ad"
    a.write_h5ad(path)
    return path


@pytest.mark.parametrize("which,adversary", [("two", "grl"), ("three", "alternate")])
def test_end_to_end(which, adversary, tmp_path, invoke, integrate_file, three_domain_file):
    data = integrate_file if which == "two" else three_domain_file
    n_domains = 2 if which == "two" else 3
    r = invoke("fit", data, "--mode", "integrate", "-o", tmp_path / "m.pt", "--adversary",
               adversary, "--json", *FAST)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    for key in ("mode", "n_cells", "n_genes", "epochs", "train_seconds", "final_losses"):
        assert key in out
    assert out["mode"] == "integrate" and len(out["domains"]) == n_domains
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["mode"] == "integrate" and len(payload["history"]["elbo"]) == out["epochs"]
    r = invoke("predict", tmp_path / "m.pt", data, "-o", tmp_path / "p.h5ad", "--csv",
               tmp_path / "p.csv", "--decode-as", "A")
    assert r.exit_code == 0, r.output
    a = ad.read_h5ad(tmp_path / "p.h5ad")
    assert a.obsm["X_advcli"].shape == (a.n_obs, 8)
    assert ((a.obs["domain_prob"] >= 0) & (a.obs["domain_prob"] <= 1)).all()
    assert a.layers["nb_mean"].shape == a.shape and a.layers["decoded_as_A"].shape == a.shape
    assert a.uns["advcli"]["predict"]["mode"] == "integrate"
    header = open(tmp_path / "p.csv").readline().strip().split(",")
    assert header[:2] == ["cell", "X_advcli_0"] and header[-1] == "domain_prob"
    r = invoke("diagnose", tmp_path / "p.h5ad", "-o", tmp_path / "rep", "--model",
               tmp_path / "m.pt", "--json", "--map", "umap" if which == "three" else "tsne")
    assert r.exit_code == 0, r.output
    for name in ("integration_metrics.json", "embedding.png", "loss_curves.png", "summary.json"):
        assert (tmp_path / "rep" / name).stat().st_size > 100, name
    metrics = json.loads((tmp_path / "rep" / "integration_metrics.json").read_text())
    for key in ("ilisi", "clisi", "batch_asw", "label_asw", "ari", "nmi", "knn_batch_entropy",
                "bio_score", "batch_score", "overall_score"):
        assert key in metrics and 0 <= metrics[key] <= 1, key


def test_mse_likelihood_writes_no_nb_mean(tmp_path, invoke, integrate_file):
    r = invoke("fit", integrate_file, "--mode", "integrate", "-o", tmp_path / "m.pt",
               "--likelihood", "mse", *FAST)
    assert r.exit_code == 0, r.output
    assert invoke("predict", tmp_path / "m.pt", integrate_file, "-o",
                  tmp_path / "p.h5ad").exit_code == 0
    assert "nb_mean" not in ad.read_h5ad(tmp_path / "p.h5ad").layers


@pytest.mark.parametrize("design", ["shared", "paired"])
def test_zero_inflated_likelihood_end_to_end(design, tmp_path, invoke, integrate_file):
    r = invoke("fit", integrate_file, "--mode", "integrate", "-o", tmp_path / "m.pt",
               "--likelihood", "zinb", "--design", design, "--json", *FAST)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["likelihood"] == "zinb"
    state = torch.load(tmp_path / "m.pt", weights_only=True)["state"]
    assert state["decoders.0.zero_logits.weight"].shape[0] == ad.read_h5ad(integrate_file).n_vars
    r = invoke("predict", tmp_path / "m.pt", integrate_file, "-o", tmp_path / "p.h5ad",
               "--decode-as", "B")
    assert r.exit_code == 0, r.output
    a = ad.read_h5ad(tmp_path / "p.h5ad")
    assert np.isfinite(a.layers["nb_mean"]).all() and (a.layers["nb_mean"] > 0).all()
    assert a.layers["decoded_as_B"].shape == a.shape


@pytest.mark.parametrize("mode", ["aae", "disentangle"])
def test_other_modes_refuse_the_zero_inflated_likelihood(mode, tmp_path, invoke,
                                                         integrate_file):
    r = invoke("fit", integrate_file, "--mode", mode, "-o", tmp_path / "m.pt",
               "--likelihood", "zinb", *FAST)
    assert r.exit_code == 2 and "zinb" in r.output
    assert not (tmp_path / "m.pt").exists()


def test_training_mixes_well_separated_domains(tmp_path):
    """On strongly separated domains, iLISI of the trained embedding beats that of the data."""
    from sklearn.decomposition import PCA

    from advcli import IntegrationModel
    from advcli.metrics import integration_metrics
    from advcli.simulate import IntegrationSimulation, simulate_integration

    simulate_integration(IntegrationSimulation(n_a=500, n_b=500, genes=150, cell_types=3,
                                               batch_strength=2.0, seed=5), tmp_path / "s.h5ad")
    a = ad.read_h5ad(tmp_path / "s.h5ad")
    x = a.X.toarray()
    before = PCA(8, random_state=0).fit_transform(np.log1p(x / x.sum(1, keepdims=True) * 1e4))
    batch, labels = a.obs["batch"].to_numpy(), a.obs["cell_type"].to_numpy()
    ilisi_before = integration_metrics(before, batch, labels)["ilisi"]
    # early stopping off: the validation ELBO worsens while a strong batch effect is being
    # undone; 60 epochs (warm-ups laid out over them) reach iLISI ~0.4, the default cap ~0.85
    model = IntegrationModel(a, latent_dim=8, batch_size=64, patience=0, max_epochs=60,
                             seed=0).train()
    ilisi_after = integration_metrics(model.get_latent_representation(), batch, labels)["ilisi"]
    assert ilisi_before < 0.05
    assert ilisi_after > ilisi_before + 0.05


def test_bad_inputs(tmp_path, invoke, write, integrate_file):
    one = write(make_adata(n=60, batch=np.array(["x"] * 60)), "one.h5ad")
    r = invoke("fit", one, "--mode", "integrate", "-o", tmp_path / "m.pt")
    assert r.exit_code == 2 and "single level" in r.stderr
    small = make_adata(n=300, batch=np.where(np.arange(300) < 290, "big", "tiny"))
    r = invoke("fit", write(small, "small.h5ad"), "--mode", "integrate", "-o", tmp_path / "m.pt")
    assert r.exit_code == 2 and "Domain 'tiny'" in r.stderr and "too few to learn it from" in r.stderr
    r = invoke("fit", integrate_file, "--mode", "integrate", "--batch-key", "sample",
               "-o", tmp_path / "m.pt")
    assert r.exit_code == 2 and "'batch', 'cell_type'" in r.stderr
    for bad in ("1", "-0.1", "nan"):
        r = invoke("fit", integrate_file, "--mode", "integrate", "--dropout", bad,
                   "-o", tmp_path / "m.pt")
        expected = "must be a finite number" if bad == "nan" else "--dropout must be in [0, 1)"
        assert r.exit_code == 2 and expected in r.stderr
    for bad in ("1", "-0.1", "nan", "half"):
        r = invoke("fit", integrate_file, "--mode", "integrate", "--input-thinning", bad,
                   "-o", tmp_path / "m.pt")
        assert r.exit_code == 2
        if bad in ("1", "-0.1"):
            assert "--input-thinning must be in [0, 1)" in r.stderr
    r = invoke("fit", integrate_file, "--mode", "integrate", "--composition-clusters", "-1",
               "-o", tmp_path / "m.pt")
    assert r.exit_code == 2 and "--composition-clusters must be zero or more" in r.stderr
    r = invoke("fit", integrate_file, "--mode", "integrate", "--composition-clusters", "ten",
               "-o", tmp_path / "m.pt")
    assert r.exit_code == 2
    assert not (tmp_path / "m.pt").exists()


def test_predict_mismatches(tmp_path, invoke, integrate_file, confounder_file):
    assert invoke("fit", integrate_file, "--mode", "integrate", "-o", tmp_path / "i.pt",
                  *FAST).exit_code == 0
    a = ad.read_h5ad(integrate_file)
    a[:, 5:].copy().write_h5ad(tmp_path / "fewer.h5ad")
    r = invoke("predict", tmp_path / "i.pt", tmp_path / "fewer.h5ad", "-o", tmp_path / "p.h5ad")
    assert r.exit_code == 2 and "gene_000" in r.stderr
    # a model of the other mode where a prediction file of this mode is diagnosed
    assert invoke("fit", confounder_file, "--mode", "confounder", "-o", tmp_path / "c.pt",
                  "--outer-iterations", "2").exit_code == 0
    assert invoke("predict", tmp_path / "i.pt", integrate_file, "-o",
                  tmp_path / "p.h5ad").exit_code == 0
    r = invoke("diagnose", tmp_path / "p.h5ad", "-o", tmp_path / "rep", "--model",
               tmp_path / "c.pt")
    assert r.exit_code == 2 and "one of mode integrate is needed" in r.stderr
    # the integrate model on confounder data: its genes are not there
    r = invoke("predict", tmp_path / "i.pt", confounder_file, "-o", tmp_path / "q.h5ad")
    assert r.exit_code == 2 and "lack" in r.stderr
    r = invoke("predict", tmp_path / "i.pt", integrate_file, "-o", tmp_path / "q.h5ad",
               "--decode-as", "Z")
    assert r.exit_code == 2 and "not a domain" in r.stderr


def test_same_seed_same_embedding(integrate_file):
    from advcli import IntegrationModel

    a = ad.read_h5ad(integrate_file)
    runs = [IntegrationModel(a, latent_dim=4, max_epochs=3, seed=7).train()
            .get_latent_representation() for _ in range(2)]
    assert np.array_equal(runs[0], runs[1])
    other = IntegrationModel(a, latent_dim=4, max_epochs=3, seed=8).train()
    assert not np.array_equal(runs[0], other.get_latent_representation())


def test_python_api_roundtrip(tmp_path, integrate_file):
    """Notebook use: train, save, load, predict without the CLI."""
    import advcli

    a = ad.read_h5ad(integrate_file)
    model = advcli.IntegrationModel(a, latent_dim=4, max_epochs=2)
    model.train()
    model.save(tmp_path / "m.pt")
    again = advcli.IntegrationModel.load(tmp_path / "m.pt")
    np.testing.assert_allclose(again.get_latent_representation(a),
                               model.get_latent_representation(a), rtol=1e-5, atol=1e-6)


def test_unmixed_domains_are_a_warning_in_fit_and_diagnose(tmp_path, invoke, integrate_file):
    """Separate encoders and no adversary leave the domains apart: fit and diagnose say so."""
    import json

    model = tmp_path / "m.pt"
    r = invoke("fit", integrate_file, "--mode", "integrate", "-o", model, "--design", "paired",
               "--adv-weight", "0", "--max-epochs", "15", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["mixing_ilisi"] < 0.1
    assert any("not mixed" in w for w in summary["warnings"])
    pred = tmp_path / "p.h5ad"
    assert invoke("predict", model, integrate_file, "-o", pred).exit_code == 0
    r = invoke("diagnose", pred, "-o", tmp_path / "rep", "--json")
    assert r.exit_code == 0 and any("not mixed" in n for n in json.loads(r.stdout)["notes"])


def test_default_fit_reports_mixing_without_warning(tmp_path, invoke, integrate_file):
    import json

    r = invoke("fit", integrate_file, "--mode", "integrate", "-o", tmp_path / "m.pt", "--json")
    summary = json.loads(r.stdout)
    assert summary["mixing_ilisi"] > 0.2 and not summary["warnings"]


def test_n_top_genes_trains_on_the_variable_genes_and_predict_reads_them(integrate_file,
                                                                          tmp_path, invoke):
    import anndata as ad
    import numpy as np
    import torch

    model, pred = tmp_path / "m.pt", tmp_path / "p.h5ad"
    r = invoke("fit", integrate_file, "--mode", "integrate", "--n-top-genes", "15",
               "--max-epochs", "2", "-o", model)
    assert r.exit_code == 0, r.stderr
    genes = torch.load(model, weights_only=True)["genes"]
    assert len(genes) == 15
    r = invoke("predict", model, integrate_file, "-o", pred)
    assert r.exit_code == 0, r.stderr
    out = ad.read_h5ad(pred)
    assert out.obsm["X_advcli"].shape[0] == out.n_obs
    if "nb_mean" in out.layers:
        used = np.isin(out.var_names, genes)
        assert np.isfinite(out.layers["nb_mean"][:, used]).all()
        assert np.isnan(out.layers["nb_mean"][:, ~used]).all()
    r = invoke("fit", integrate_file, "--mode", "integrate", "--n-top-genes", "0", "-o", model)
    assert r.exit_code == 2 and "--n-top-genes" in r.stderr


@pytest.fixture(scope="module")
def scanpy_style_file(tmp_path_factory, integrate_file):
    """What scanpy users hand over: X log-normalised on a gene subset, the counts in .raw."""
    counts = ad.read_h5ad(integrate_file)
    keep = counts.var_names[::2]
    a = counts[:, keep].copy()
    x = np.asarray(a.X.todense() if hasattr(a.X, "todense") else a.X, dtype=np.float64)
    a.X = np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4).astype(np.float32)
    a.raw = counts
    path = tmp_path_factory.mktemp("raw") / "scanpy.h5ad"
    a.write_h5ad(path)
    return path, list(counts.var_names)


def test_layer_raw_reads_the_counts_and_genes_of_adata_raw(scanpy_style_file, tmp_path, invoke):
    path, raw_genes = scanpy_style_file
    model, pred, report = tmp_path / "m.pt", tmp_path / "p.h5ad", tmp_path / "rep"
    r = invoke("fit", path, "--mode", "integrate", *FAST, "-o", model)
    assert r.exit_code == 2 and "non-integer" in r.stderr and not model.exists()
    r = invoke("fit", path, "--mode", "integrate", "--layer", "raw", *FAST, "-o", model)
    assert r.exit_code == 0, r.stderr
    assert torch.load(model, weights_only=True)["genes"] == raw_genes
    r = invoke("predict", model, path, "-o", pred)
    assert r.exit_code == 0, r.stderr
    out = ad.read_h5ad(pred)
    assert out.obsm["X_advcli"].shape == (out.n_obs, 8)
    assert out.layers["nb_mean"].shape == out.shape and np.isfinite(out.layers["nb_mean"]).all()
    r = invoke("diagnose", pred, "-o", report, "--json")
    assert r.exit_code == 0, r.stderr
    metrics = json.loads((report / "integration_metrics.json").read_text())
    assert np.isfinite(metrics["unintegrated_pca"]["ilisi"])  # the baseline read .raw


def test_layer_raw_without_raw_is_refused(integrate_file, tmp_path, invoke):
    model = tmp_path / "m.pt"
    r = invoke("fit", integrate_file, "--mode", "integrate", "--layer", "raw", "-o", model)
    assert r.exit_code == 2 and "adata.raw" in r.stderr and not model.exists()


def test_a_layer_named_raw_comes_before_adata_raw(scanpy_style_file, tmp_path, invoke):
    path, raw_genes = scanpy_style_file
    a = ad.read_h5ad(path)
    a.layers["raw"] = np.round(np.expm1(a.X)).astype(np.float32)  # integer, X's genes
    both = tmp_path / "both.h5ad"
    a.write_h5ad(both)
    model = tmp_path / "m.pt"
    r = invoke("fit", both, "--mode", "integrate", "--layer", "raw", *FAST, "-o", model)
    assert r.exit_code == 0, r.stderr
    assert torch.load(model, weights_only=True)["genes"] == list(a.var_names)


def test_layer_raw_with_non_integer_raw_is_refused(scanpy_style_file, tmp_path, invoke):
    path, _ = scanpy_style_file
    a = ad.read_h5ad(path)
    raw = a.raw.to_adata()
    raw.X = raw.X.astype(np.float32) * 0.5
    a.raw = raw
    bad = tmp_path / "bad.h5ad"
    a.write_h5ad(bad)
    r = invoke("fit", bad, "--mode", "integrate", "--layer", "raw", "-o", tmp_path / "m.pt")
    assert r.exit_code == 2 and "non-integer" in r.stderr and not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("method", ["tsne", "umap"])
def test_the_map_keeps_apart_what_is_apart(method):
    from advcli.report.integrate import two_d

    rng = np.random.default_rng(0)
    points = np.vstack([rng.normal(0, 1, (60, 8)), rng.normal(12, 1, (60, 8))])
    xy = two_d(points, method)
    first, second = xy[:60], xy[60:]
    gap = np.linalg.norm(first.mean(0) - second.mean(0))
    assert gap > 3 * max(first.std(0).max(), second.std(0).max())
    np.testing.assert_array_equal(xy, two_d(points, method))  # seeded


def test_map_choice_is_checked_before_any_work(tmp_path, invoke, integrate_file, monkeypatch):
    import sys

    r = invoke("diagnose", integrate_file, "-o", tmp_path / "rep", "--map", "pca")
    assert r.exit_code == 2 and "tsne, umap" in r.stderr and not (tmp_path / "rep").exists()
    monkeypatch.setitem(sys.modules, "umap", None)  # as if umap-learn were not installed
    r = invoke("diagnose", integrate_file, "-o", tmp_path / "rep", "--map", "umap")
    assert r.exit_code == 2 and "umap-learn" in r.stderr and not (tmp_path / "rep").exists()


def test_predict_with_a_raw_model_checks_the_raw_genes(scanpy_style_file, integrate_file,
                                                       tmp_path, invoke):
    path, raw_genes = scanpy_style_file
    model = tmp_path / "m.pt"
    r = invoke("fit", path, "--mode", "integrate", "--layer", "raw", *FAST, "-o", model)
    assert r.exit_code == 0, r.stderr
    a = ad.read_h5ad(path)
    a.raw = a.raw.to_adata()[:, raw_genes[5:]]  # .raw lost five of the model's genes
    fewer = tmp_path / "fewer.h5ad"
    a.write_h5ad(fewer)
    r = invoke("predict", model, fewer, "-o", tmp_path / "p.h5ad")
    assert r.exit_code == 2 and "lack 5 of the 120 genes" in r.stderr
    assert not (tmp_path / "p.h5ad").exists()
    r = invoke("predict", model, integrate_file, "-o", tmp_path / "p.h5ad")  # no .raw at all
    assert r.exit_code == 2 and "adata.raw" in r.stderr and not (tmp_path / "p.h5ad").exists()


def test_an_unknown_norm_exits_2_with_nothing_written(tmp_path, invoke, integrate_file):
    r = invoke("fit", integrate_file, "--mode", "integrate", "--norm", "group",
               "-o", tmp_path / "m.pt")
    assert r.exit_code == 2 and "--norm" in r.stderr and "batch" in r.stderr
    assert not list(tmp_path.iterdir())


def test_an_unknown_decoder_norm_exits_2_with_nothing_written(tmp_path, invoke, integrate_file):
    r = invoke("fit", integrate_file, "--mode", "integrate", "--decoder-norm", "group",
               "-o", tmp_path / "m.pt")
    assert r.exit_code == 2 and "--decoder-norm" in r.stderr and "none" in r.stderr
    assert not list(tmp_path.iterdir())


def test_diagnose_tells_a_reference_with_private_types_from_unmixed_domains(tmp_path):
    """A query holding three of a reference's ten types, laid on them: most cells lie apart
    from the other domain, yet the report does not call the domains unmixed."""
    import anndata as ad

    from advcli import keys
    from advcli.report.integrate import integration_report

    rng = np.random.default_rng(0)
    types = np.r_[rng.choice(10, 600), rng.choice(3, 150)]
    profiles = rng.gamma(2.0, 1.0, (10, 200))
    a = ad.AnnData(rng.poisson(profiles[types]).astype(np.float32),
                   obs={"batch": np.r_[["reference"] * 600, ["query"] * 150],
                        "cell_type": [f"t{t}" for t in types]})
    a.obsm[keys.X_LATENT] = rng.normal(size=(10, 4))[types] * 30.0 + rng.normal(size=(750, 4))
    summary = integration_report(a, tmp_path, None, None, "batch")
    mixing = [n for n in summary["notes"] if "iLISI" in n]
    assert len(mixing) == 1 and "reference holds cell states" in mixing[0]
    assert summary["metrics"]["ilisi_by_domain"]["query"] > 0.1


def test_diagnose_calls_a_collapsed_latent_space_collapsed_not_unmixed(tmp_path):
    """Every cell at nearly one point, each domain a hair apart: the neighbourhoods find the
    domains unmixed, but the report says the space collapsed, not that the adversary lost."""
    import anndata as ad

    from advcli import keys
    from advcli.report.integrate import integration_report

    rng = np.random.default_rng(0)
    types = rng.choice(4, 400)
    domain = np.repeat([0, 1], 200)
    a = ad.AnnData(rng.poisson(rng.gamma(2.0, 1.0, (4, 100))[types]).astype(np.float32),
                   obs={"batch": np.where(domain, "b", "a"), "cell_type": types.astype(str)})
    a.obsm[keys.X_LATENT] = 0.5 + 0.01 * domain[:, None] + 0.001 * rng.normal(size=(400, 6))
    notes = integration_report(a, tmp_path, None, None, "batch")["notes"]
    assert any("latent space collapsed" in n and "6 dimensions" in n for n in notes)
    assert not any("not mixed" in n for n in notes)
    a.obsm[keys.X_LATENT] = rng.normal(size=(4, 6))[types] * 3.0 + rng.normal(size=(400, 6))
    assert not any("collapsed" in n for n in integration_report(a, tmp_path, None, None,
                                                                "batch")["notes"])
