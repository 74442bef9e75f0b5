"""End to end through the `advcli` command on small files in a tmp dir."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from advcli import __version__
from conftest import SAMPLE, make_adata, make_bad_counts

FAST = ["--outer-iterations", "6"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, confounder_file):
    """fit -> predict -> diagnose once; tests look at what was written."""
    from typer.testing import CliRunner

    from advcli.cli import app

    run = CliRunner()
    out = tmp_path_factory.mktemp("run")
    model = out / "models" / "m.pt"
    fit = run.invoke(app, ["fit", str(confounder_file), "--mode", "confounder", "-o", str(model),
                           "--json", *FAST])
    assert fit.exit_code == 0, fit.output
    pred = out / "pred" / "p.h5ad"
    csv = out / "pred" / "p.csv"
    p = run.invoke(app, ["predict", str(model), str(confounder_file), "-o", str(pred), "--csv",
                         str(csv), "--json"])
    assert p.exit_code == 0, p.output
    report = out / "report"
    d = run.invoke(app, ["diagnose", str(pred), "-o", str(report), "--model", str(model),
                         "--json"])
    assert d.exit_code == 0, d.output
    return {"fit": fit, "predict": p, "diagnose": d, "model": model, "pred": pred, "csv": csv,
            "report": report, "dir": out}


def test_help_and_version(invoke):
    assert invoke("--version").stdout.strip() == f"advcli {__version__}"
    for args in (["--help"], ["fit", "--help"], ["simulate", "--help"], ["predict", "--help"],
                 ["diagnose", "--help"], ["simulate", "integrate", "--help"]):
        r = invoke(*args)
        assert r.exit_code == 0 and "Usage" in r.output


def test_fit_json_has_the_spec_fields(fitted):
    out = json.loads(fitted["fit"].stdout)
    for key in ("mode", "n_cells", "n_genes", "epochs", "train_seconds", "final_losses"):
        assert key in out
    from advcli.config import make_config
    from advcli.models.confounder import planned_confounder_epochs

    planned = planned_confounder_epochs(make_config("confounder", outer_iterations=6))
    assert out["mode"] == "confounder" and out["n_cells"] == 300
    assert 7 < out["epochs"] <= planned  # warm start and first head fit counted
    assert "corr_z_d" in out and "corr_z_covariates" in out


def test_model_file_loads_with_weights_only(fitted):
    payload = torch.load(fitted["model"], weights_only=True)
    assert payload["mode"] == "confounder" and payload["format_version"] == 2
    assert len(payload["genes"]) == 30 and payload["version"] == __version__
    hist = payload["history"]
    assert {"epoch", "phase", "bce", "nb", "total"} <= set(hist)
    assert {"warm_start", "heads", "generator"} == set(hist["phase"])
    assert len(hist["epoch"]) == len(hist["bce"]) == payload["summary"]["epochs"]


def test_predict_writes_every_confounder_key_in_row_order(fitted, confounder_file):
    src = ad.read_h5ad(confounder_file)
    a = ad.read_h5ad(fitted["pred"])
    assert list(a.obs_names) == list(src.obs_names)
    assert a.obsm["Z_hat"].shape == (300, 1) and a.obsm["Z_prob"].shape == (300, 1)
    for key in ("D_logit", "D_prob", "log_lik_Y"):
        assert key in a.obs and np.isfinite(a.obs[key]).all()
    assert a.layers["nb_mean"].dtype == np.float32 and a.layers["nb_mean"].shape == (300, 30)
    assert a.uns["advcli"]["predict"]["mode"] == "confounder"
    assert len(a.uns["advcli"]["predict"]["model_sha256"]) == 64
    # the input's own contents are kept
    assert "Z_true" in a.obsm and (a.X != src.X).nnz == 0
    csv = open(fitted["csv"]).readline().strip().split(",")
    assert csv == ["cell", "Z_hat_0", "Z_prob_0", "D_logit", "D_prob", "log_lik_Y"]


def test_diagnose_writes_every_report(fitted):
    report = fitted["report"]
    for name in ("summary.json", "per_gene_correlation.csv", "per_gene_correlation_hist.png",
                 "z_vs_true.png", "d_logit_vs_true.png", "loss_curves.png",
                 "treatment_effects.csv"):
        assert (report / name).is_file() and (report / name).stat().st_size > 1000 or \
            name.endswith(".csv"), name
    with open(report / "summary.json") as f:
        summary = json.load(f)
    assert 0 <= summary["metrics"]["abs_r_z"][0] <= 1
    header = (report / "treatment_effects.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["gene", "effect_naive", "effect_adjusted", "se_adjusted", "pvalue",
                          "qvalue"]
    assert not [p for p in report.iterdir() if p.name.startswith(".")]  # no staging left


def test_same_seed_same_z_hat(tmp_path, invoke, confounder_file):
    for name in ("a", "b"):
        assert invoke("fit", confounder_file, "--mode", "confounder", "-o", tmp_path / f"{name}.pt",
                      *FAST).exit_code == 0
        assert invoke("predict", tmp_path / f"{name}.pt", confounder_file, "-o",
                      tmp_path / f"{name}.h5ad").exit_code == 0
    za = ad.read_h5ad(tmp_path / "a.h5ad").obsm["Z_hat"]
    zb = ad.read_h5ad(tmp_path / "b.h5ad").obsm["Z_hat"]
    assert np.array_equal(za, zb)


def test_predict_with_reordered_genes_matches(fitted, tmp_path, invoke, confounder_file):
    a = ad.read_h5ad(confounder_file)
    shuffled = a[:, a.var_names[::-1]].copy()
    shuffled.write_h5ad(tmp_path / "rev.h5ad")
    assert invoke("predict", fitted["model"], tmp_path / "rev.h5ad", "-o",
                  tmp_path / "p.h5ad").exit_code == 0
    got = ad.read_h5ad(tmp_path / "p.h5ad")
    ref = ad.read_h5ad(fitted["pred"])
    np.testing.assert_allclose(got.obsm["Z_hat"], ref.obsm["Z_hat"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[:, ref.var_names].layers["nb_mean"], ref.layers["nb_mean"],
                               rtol=1e-4)


def test_predict_with_missing_genes_names_them(fitted, tmp_path, invoke, confounder_file):
    a = ad.read_h5ad(confounder_file)
    a[:, 3:].copy().write_h5ad(tmp_path / "fewer.h5ad")
    r = invoke("predict", fitted["model"], tmp_path / "fewer.h5ad", "-o", tmp_path / "p.h5ad")
    assert r.exit_code == 2
    assert "gene_00" in r.stderr and "gene_02" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "p.h5ad").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_predict_with_damaged_model(fitted, tmp_path, invoke, confounder_file, damage):
    data = fitted["model"].read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"junk" * 100)
    r = invoke("predict", bad, confounder_file, "-o", tmp_path / "p.h5ad")
    assert r.exit_code == 2 and "model file" in r.stderr
    assert not (tmp_path / "p.h5ad").exists()


@pytest.mark.parametrize("kind,match", [("nan", "NaN"), ("negative", "negative"),
                                        ("fraction", "non-integer")])
def test_fit_rejects_bad_counts_without_output(kind, match, tmp_path, invoke, write):
    path = write(make_bad_counts(kind))
    before = path.read_bytes()
    r = invoke("fit", path, "--mode", "confounder", "-o", tmp_path / "m.pt")
    assert r.exit_code == 2 and match in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "m.pt").exists()
    assert path.read_bytes() == before  # the input is never modified


def test_fit_bad_inputs(tmp_path, invoke, write):
    good = write(make_adata(n=60, genes=10))
    cases = [
        (["fit", tmp_path / "missing.h5ad", "--mode", "confounder"], "does not exist"),
        (["fit", good, "--mode", "confounder", "--treatment-key", "treat"], "'D', 'group'"),
        (["fit", good, "--mode", "confounder", "--covariate-keys", "group,age"],
         "Covariate key 'age' not found"),
        (["fit", good, "--mode", "wrong"], "--mode must be"),
        (["fit", good, "--mode", "confounder", "--z-type", "odd"], "--z-type"),
        (["fit", good, "--mode", "confounder", "--latent-dim", "4"], "--latent-dim"),
        (["fit", good, "--mode", "integrate", "--z-dim", "2"], "--z-dim"),
        (["fit", good, "--mode", "confounder", "--generator-inputs", "x,q"], "generator-inputs"),
        (["fit", good, "--mode", "confounder", "--dispersion-key", "alpha"], "not a var column"),
        (["fit", good, "--mode", "confounder", "--lr", "-1"], "--lr must be positive"),
        (["fit", good, "--mode", "confounder", "--preset", "fast"], "--preset"),
    ]
    text = tmp_path / "text.h5ad"
    text.write_text("hello")
    cases.append((["fit", text, "--mode", "confounder"], "not a readable .h5ad"))
    empty = write(make_adata(n=60, genes=10)[:0].copy(), "empty.h5ad")
    cases.append((["fit", empty, "--mode", "confounder"], "at least one"))
    for args, match in cases:
        r = invoke(*args, "-o", tmp_path / "m.pt")
        assert r.exit_code == 2, (args, r.output)
        assert match in r.stderr, (args, r.stderr)
        assert not (tmp_path / "m.pt").exists()


def test_categorical_treatment_and_covariate(tmp_path, invoke, write):
    a = make_adata(n=80, genes=10, cond=np.where(np.arange(80) % 2, "stim", "ctrl"))
    path = write(a)
    r = invoke("fit", path, "--mode", "confounder", "--treatment-key", "cond",
               "--covariate-keys", "group", "-o", tmp_path / "m.pt", "--json", *FAST)
    assert r.exit_code == 0, r.output
    assert list(json.loads(r.stdout)["corr_z_covariates"]) == ["group=b", "group=c"]
    assert invoke("predict", tmp_path / "m.pt", path, "-o", tmp_path / "p.h5ad").exit_code == 0
    d = invoke("diagnose", tmp_path / "p.h5ad", "-o", tmp_path / "rep", "--json")
    assert d.exit_code == 0, d.output
    summary = json.loads(d.stdout)
    assert "treatment_effects.csv" in summary["files"] and "z_vs_true.png" not in summary["files"]
    assert any("Z_true" in n for n in summary["notes"])


def test_predict_refuses_to_overwrite_its_input(fitted, invoke, confounder_file):
    r = invoke("predict", fitted["model"], confounder_file, "-o", confounder_file)
    assert r.exit_code == 2 and "never overwrites" in r.stderr


def test_diagnose_needs_a_prediction(tmp_path, invoke, confounder_file):
    r = invoke("diagnose", confounder_file, "-o", tmp_path / "rep")
    assert r.exit_code == 2 and "advcli predict" in r.stderr


def test_diagnose_of_a_prediction_without_nb_means_says_how_to_get_them(fitted, tmp_path,
                                                                         invoke, confounder_file):
    pred = tmp_path / "p.h5ad"
    r = invoke("predict", fitted["model"], confounder_file, "-o", pred, "--no-nb-mean")
    assert r.exit_code == 0, r.output
    r = invoke("diagnose", pred, "-o", tmp_path / "rep")
    assert r.exit_code == 2 and "--no-nb-mean" in r.stderr and "nb_mean" in r.stderr
    assert not (tmp_path / "rep" / "summary.json").exists()


def test_simulate_commands(tmp_path, invoke):
    r = invoke("simulate", "confounder", "-o", tmp_path / "deep" / "c.h5ad", "--n", "50",
               "--genes", "5", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["n_cells"] == 50
    r = invoke("simulate", "integrate", "-o", tmp_path / "i.h5ad", "--n-a", "30", "--n-b", "40",
               "--genes", "20", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["n_cells"] == 70
    r = invoke("simulate", "confounder", "-o", tmp_path / "x.h5ad", "--setting", "odd")
    assert r.exit_code == 2 and "--setting" in r.stderr


def test_bundled_sample_data_is_small_and_valid():
    for name in ("confounder.h5ad", "integrate.h5ad"):
        path = SAMPLE / name
        assert path.stat().st_size < 5 * 1024 * 1024
        a = ad.read_h5ad(path)
        assert a.n_obs > 0 and a.n_vars > 0


def test_loaded_model_can_be_saved_again(fitted, tmp_path):
    from advcli import ConfounderModel

    model = ConfounderModel.load(fitted["model"])
    model.save(tmp_path / "again.pt")
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    original = torch.load(fitted["model"], weights_only=True)
    assert again["encoding"] == original["encoding"]
    assert all(torch.equal(again["state"][k], v) for k, v in original["state"].items())


@pytest.mark.parametrize("bad", [np.nan, -0.5, "high"])
def test_dispersion_key_with_bad_values(bad, tmp_path, invoke, write):
    a = make_adata(n=60, genes=10)
    if isinstance(bad, str):  # a text column: "0.5", ..., "high"
        a.var["alpha"] = ["0.5"] * 3 + [bad] + ["0.5"] * 6
    else:
        a.var["alpha"] = np.r_[np.full(3, 0.5), bad, np.full(6, 0.5)]
    r = invoke("fit", write(a), "--mode", "confounder", "-o", tmp_path / "m.pt",
               "--dispersion-key", "alpha")
    assert r.exit_code == 2 and "finite, positive NB dispersion" in r.stderr
    assert not (tmp_path / "m.pt").exists()


def test_fixed_dispersion_is_kept(tmp_path, invoke, confounder_file):
    r = invoke("fit", confounder_file, "--mode", "confounder", "-o", tmp_path / "m.pt",
               "--dispersion-key", "alpha_true", *FAST)
    assert r.exit_code == 0, r.output
    state = torch.load(tmp_path / "m.pt", weights_only=True)["state"]
    alpha = ad.read_h5ad(confounder_file).var["alpha_true"].to_numpy()
    np.testing.assert_allclose(torch.exp(-state["nb.log_theta"]).numpy(), alpha, rtol=1e-5)


def test_mixed_covariates_of_different_level_counts(tmp_path, invoke, write):
    """Two categorical covariates with 3 and 2 levels beside a numeric one: fit, predict (with
    --effects) and diagnose all succeed (predict used to crash writing the ragged levels)."""
    rng = np.random.default_rng(0)
    adata = make_adata(n=120, genes=15, num=rng.normal(size=120))
    data = write(adata)
    model = tmp_path / "m.pt"
    r = invoke("fit", data, "--mode", "confounder", "-o", model, "--covariate-keys",
               "group,batch,num", "--outer-iterations", "2")
    assert r.exit_code == 0, r.output
    pred, effects = tmp_path / "p.h5ad", tmp_path / "effects.csv"
    r = invoke("predict", model, data, "-o", pred, "--effects", effects, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert 0.0 <= out["z_deviance_explained"] < 1.0 and out["genes_q_below_0.05"] >= 0
    table = pd.read_csv(effects)
    for col in ("gene", "effect_naive", "effect_adjusted", "se_adjusted", "pvalue", "qvalue",
                "log2fc_adjusted", "base_mean", "converged"):
        assert col in table.columns
    assert len(table) == 15 and not np.isfinite(table.loc[~table.converged, "qvalue"]).any()
    r = invoke("diagnose", pred, "-o", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rep" / "treatment_effects.csv").exists()


def test_predict_effects_needs_a_confounder_model(tmp_path, invoke, integrate_file):
    model = tmp_path / "i.pt"
    assert invoke("fit", integrate_file, "--mode", "integrate", "-o", model,
                  "--max-epochs", "1").exit_code == 0
    r = invoke("predict", model, integrate_file, "-o", tmp_path / "p.h5ad", "--effects",
               tmp_path / "e.csv")
    assert r.exit_code == 2 and "confounder" in r.output
    assert not (tmp_path / "p.h5ad").exists() and not (tmp_path / "e.csv").exists()


@pytest.mark.parametrize("value,match", [("nope", "not found"), ("bad_sf", "positive"),
                                         ("D", None)])
def test_size_factors_option(value, match, tmp_path, invoke, write):
    adata = make_adata(n=60, bad_sf=np.r_[np.zeros(1), np.ones(59)])
    adata.obs["D"] = (np.arange(60) % 2).astype(int)
    data = write(adata)
    r = invoke("fit", data, "--mode", "confounder", "-o", tmp_path / "m.pt",
               "--size-factors", value, "--outer-iterations", "2")
    if match is None:  # D is 0/1, so 0 is not a valid size factor either
        assert r.exit_code == 2
    else:
        assert r.exit_code == 2 and match in r.output
    assert not (tmp_path / "m.pt").exists()


def test_empty_cell_with_library_size_factors_is_bad_input(tmp_path, invoke, write):
    adata = make_adata(n=50)
    counts = adata.X.toarray()
    counts[3, :] = 0
    adata.X = sp.csr_matrix(counts)
    r = invoke("fit", write(adata), "--mode", "confounder", "-o", tmp_path / "m.pt")
    assert r.exit_code == 2 and "library size is 0" in r.output


def test_sample_key_tests_pseudobulk(tmp_path, invoke, write):
    adata = make_adata(n=160, genes=10)
    adata.obs["donor"] = np.repeat([f"s{i}" for i in range(8)], 20)
    adata.obs["D"] = np.repeat([0, 1] * 4, 20)
    data = write(adata)
    model = tmp_path / "m.pt"
    r = invoke("fit", data, "--mode", "confounder", "-o", model, "--sample-key", "donor",
               "--outer-iterations", "2", "--z-dim", "1")
    assert r.exit_code == 0, r.output
    r = invoke("predict", model, data, "-o", tmp_path / "p.h5ad", "--effects",
               tmp_path / "e.csv")
    assert r.exit_code == 0, r.output
    adata.obs["D"] = np.tile([0, 1], 80)  # now every donor holds both arms
    r = invoke("fit", write(adata, "mixed.h5ad"), "--mode", "confounder", "-o",
               tmp_path / "m2.pt", "--sample-key", "donor", "--outer-iterations", "2")
    assert r.exit_code == 0  # fitting is fine; testing is where it fails
    r = invoke("predict", tmp_path / "m2.pt", tmp_path / "mixed.h5ad", "-o",
               tmp_path / "p2.h5ad", "--effects", tmp_path / "e2.csv")
    assert r.exit_code == 2 and "both treated and control" in r.output
    assert not (tmp_path / "p2.h5ad").exists() and not (tmp_path / "e2.csv").exists()


def test_python_treatment_effects_and_loaded_model(fitted, confounder_file):
    from advcli import ConfounderModel

    adata = ad.read_h5ad(confounder_file)
    loaded = ConfounderModel.load(fitted["model"])
    table = loaded.treatment_effects(adata)
    assert len(table) == adata.n_vars and np.isfinite(table["effect_adjusted"]).any()
    with pytest.raises(Exception, match="needs the AnnData"):
        loaded.treatment_effects()


def test_control_genes_option(tmp_path, invoke, write):
    data = write(make_adata(n=80, genes=12))
    r = invoke("fit", data, "--mode", "confounder", "-o", tmp_path / "m.pt", "--control-genes",
               "g0,nope", "--z-dim", "1")
    assert r.exit_code == 2 and "nope" in r.output and not (tmp_path / "m.pt").exists()
    listing = tmp_path / "controls.txt"
    listing.write_text("# housekeeping\ng0\ng1\ng2\ng3\n")
    r = invoke("fit", data, "--mode", "confounder", "-o", tmp_path / "m.pt", "--control-genes",
               listing, "--z-dim", "1", "--outer-iterations", "2")
    assert r.exit_code == 0, r.output
    r = invoke("predict", tmp_path / "m.pt", data, "-o", tmp_path / "p.h5ad", "--effects",
               tmp_path / "e.csv")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("column,match", [(None, "not found"), ("nan", "missing values")])
def test_sample_key_bad_values(column, match, tmp_path, invoke, write):
    adata = make_adata(n=60)
    if column == "nan":
        adata.obs["donor"] = np.where(np.arange(60) == 5, None, "s1").astype(object)
    r = invoke("fit", write(adata), "--mode", "confounder", "-o", tmp_path / "m.pt",
               "--sample-key", "donor", "--z-dim", "1")
    assert r.exit_code == 2 and match in r.output and not (tmp_path / "m.pt").exists()


def test_control_genes_empty_list_is_bad_input(tmp_path, invoke, write):
    listing = tmp_path / "controls.txt"
    listing.write_text("# nothing here\n\n")
    r = invoke("fit", write(make_adata()), "--mode", "confounder", "-o", tmp_path / "m.pt",
               "--control-genes", listing)
    assert r.exit_code == 2 and "names no genes" in r.output


def test_fit_that_ends_within_the_warm_start_says_so(confounder_file, tmp_path, invoke):
    """--max-epochs 1 used to crash the summary (no epoch of the heads to report)."""
    import json

    r = invoke("fit", confounder_file, "--mode", "confounder", "-o", tmp_path / "m.pt",
               "--max-epochs", "1", "--json")
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["final_losses"] == {}
    assert "within the warm start" in summary["warnings"][0]
    assert summary["epochs"] == 1  # --max-epochs caps the warm start too


def test_z_hat_associations_name_what_z_hat_follows():
    import anndata as ad
    import numpy as np
    import pandas as pd

    from advcli.report.confounder import z_hat_associations

    rng = np.random.default_rng(0)
    n = 300
    donor = np.repeat(["d1", "d2", "d3"], n // 3)
    depth = rng.normal(size=n)
    obs = pd.DataFrame({"donor": donor, "depth": depth, "D_logit": rng.normal(size=n)},
                       index=[f"c{i}" for i in range(n)])
    adata = ad.AnnData(X=rng.poisson(2.0, size=(n, 5)).astype(np.float32), obs=obs)
    z = np.column_stack([pd.Series(donor).map({"d1": 0.0, "d2": 1.0, "d3": 2.0}).to_numpy()
                         + 0.01 * rng.normal(size=n), depth ** 3])
    table = z_hat_associations(adata, z)
    best = table.loc[table.groupby("z_column")["strength"].idxmax()]
    assert best["obs_column"].tolist() == ["donor", "depth"]
    assert best["measure"].tolist() == ["eta", "|Spearman|"]
    assert (best["strength"] > 0.99).all()
    assert "D_logit" not in set(table["obs_column"])  # advcli's own outputs are not obs facts
    assert "log library size" in set(table["obs_column"])


def test_layer_raw_through_fit_predict_effects_and_diagnose(tmp_path, invoke, write):
    """Counts in .raw (all genes), X normalised on a subset: every step reads .raw's genes."""
    counts = make_adata(n=120, genes=15)
    a = counts[:, counts.var_names[:10]].copy()
    a.X = np.log1p(a.X.toarray() if hasattr(a.X, "toarray") else a.X).astype(np.float32)
    a.raw = counts
    data = write(a)
    model, pred, effects = tmp_path / "m.pt", tmp_path / "p.h5ad", tmp_path / "e.csv"
    r = invoke("fit", data, "--mode", "confounder", "--layer", "raw", "-o", model,
               "--covariate-keys", "group", "--outer-iterations", "2")
    assert r.exit_code == 0, r.output
    assert len(torch.load(model, weights_only=True)["genes"]) == 15
    r = invoke("predict", model, data, "-o", pred, "--effects", effects)
    assert r.exit_code == 0, r.output
    assert len(pd.read_csv(effects)) == 15
    assert ad.read_h5ad(pred).layers["nb_mean"].shape == (120, 10)
    r = invoke("diagnose", pred, "-o", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    assert len(pd.read_csv(tmp_path / "rep" / "treatment_effects.csv")) == 15
