"""AAE mode: the losses' signs, which players each turn moves, the API and the CLI end to end."""

import copy
import json

import anndata as ad
import numpy as np
import pytest
import torch
from scipy.stats import norm

from advcli import AAEModel, losses
from advcli.io import load_model, save_model
from advcli.models.aae import FAKE, AAEModule
from advcli.strategies import AlternatingFreeze
from conftest import SAMPLE


def test_attribute_regularisation_is_zero_when_the_dimension_is_the_attribute():
    a = torch.randn(50)
    assert losses.attribute_regularisation(a, a).item() == pytest.approx(0.0)
    assert losses.attribute_regularisation(-a + 3.0, a).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.attribute_regularisation(torch.randn(50), a).item() > 0.3


def _module_and_batch():
    torch.manual_seed(0)
    n, genes = 32, 20
    counts = torch.poisson(torch.full((n, genes), 3.0))
    library = counts.sum(1)
    batch = {"counts": counts, "library": library,
             "x_norm": torch.log1p(counts / library[:, None] * 1e4),
             "condition": torch.arange(n) % 2, "attribute": torch.randn(n)}
    return AAEModule(genes, 4, 16, 2, "nb", 0.0, "flip", attribute_dim=0), batch


def _moved(before, after):
    return any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters()))


def test_each_turn_moves_its_player_only():
    module, batch = _module_and_batch()
    ctx = {"adv_weight": 1.0, "ar_weight": 1.0, "sw_weight": 1.0}
    strategy = AlternatingFreeze(module, {"autoencoder": 1e-2, "discriminator": 1e-2})
    snap = copy.deepcopy(module)
    strategy._freeze_all_but(["discriminator"])
    record = strategy._update(batch, ["discriminator"], ctx)
    assert {"disc_ce", "disc_acc"} <= set(record)
    assert _moved(snap.discriminator, module.discriminator)
    assert not _moved(snap.encoder, module.encoder)
    snap = copy.deepcopy(module)
    strategy._freeze_all_but(["autoencoder"])
    record = strategy._update(batch, ["autoencoder"], ctx)
    assert {"recon", "ar", "fool", "sw"} <= set(record)
    assert _moved(snap.encoder, module.encoder) and _moved(snap.decoder, module.decoder)
    assert not _moved(snap.discriminator, module.discriminator)


def test_the_encoder_is_pushed_toward_what_the_discriminator_calls_prior():
    """The adversarial term falls as the discriminator's probability of 'prior' for a code
    rises: descending it fools the discriminator."""
    module, batch = _module_and_batch()
    code = module.encode(batch)
    fake = torch.full((code.shape[0],), FAKE)
    logits = module.discriminator(code)
    fooled = logits.detach().clone()
    fooled[:, 1 - FAKE] += 3.0  # the discriminator now says "prior" more
    assert module.adv_loss(fooled, fake) < module.adv_loss(logits.detach(), fake)


def test_sliced_wasserstein_is_small_for_the_prior_and_pulls_codes_toward_it():
    torch.manual_seed(0)
    directions = torch.cat([torch.eye(4), torch.nn.functional.normalize(torch.randn(4, 4), dim=0)], 1)
    prior = torch.randn(4096, 4)
    assert losses.sliced_wasserstein_normal(prior, directions).item() < 0.003
    # a unit shift on every axis: squared distance 1 along each axis (4 of the 8 directions)
    shifted = (prior + 1.0).requires_grad_()
    sw = losses.sliced_wasserstein_normal(shifted, directions)
    assert sw.item() > 0.5
    sw.backward()
    assert (shifted.grad.sum(0) > 0).all()  # descent moves every coordinate back toward 0
    narrow = 0.5 * prior
    assert losses.sliced_wasserstein_normal(narrow, directions).item() > 0.2


def test_the_sliced_wasserstein_term_enters_only_with_its_weight():
    module, batch = _module_and_batch()
    module.eval()  # the same codes in every call
    ctx = {"adv_weight": 0.0, "ar_weight": 0.0, "sw_weight": 0.0}
    plain, logs = module.objective(batch, ("autoencoder",), ctx)
    assert "sw" not in logs
    torch.manual_seed(1)
    weighted, logs = module.objective(batch, ("autoencoder",), {**ctx, "sw_weight": 2.0})
    assert logs["sw"] > 0
    assert weighted["autoencoder"].item() == pytest.approx(
        plain["autoencoder"].item() + 2.0 * logs["sw"].item(), rel=1e-5)


@pytest.fixture(scope="module")
def pbmc_like():
    a = ad.read_h5ad(SAMPLE / "integrate.h5ad")
    a = a[np.r_[0:250, a.n_obs - 250:a.n_obs]].copy()
    a.obs["log_library"] = np.log(np.asarray(a.X.sum(1)).ravel())
    return a


def test_attribute_normal_scores_keep_the_order_and_follow_the_prior():
    from scipy.stats import kstest, spearmanr

    from advcli.models.aae import normal_scores

    skewed = np.random.default_rng(0).lognormal(0, 1, 2000)
    scores = normal_scores(skewed)
    assert spearmanr(scores, skewed)[0] == pytest.approx(1.0)
    assert kstest(scores, "norm").statistic < 0.01
    assert kstest((skewed - skewed.mean()) / skewed.std(), "norm").statistic > 0.1


def test_api_train_predict_sample_and_reload(pbmc_like, tmp_path):
    model = AAEModel(pbmc_like, condition_key="batch", attribute_key="log_library",
                     latent_dim=4, max_epochs=20).train()
    summary = model.fit_summary()
    assert summary["mode"] == "aae" and summary["epochs"] == 20
    assert abs(summary["attribute_spearman"]) > 0.5  # the AR dimension follows the attribute
    codes = model.predict(pbmc_like)["latent"]
    assert codes.shape == (pbmc_like.n_obs, 4) and np.isfinite(codes).all()
    cells = model.sample(50, condition="B", attribute=7.0, seed=3)
    assert cells.shape == (50, pbmc_like.n_vars)
    assert (cells.obs["batch"] == "B").all() and (cells.X.data >= 0).all()
    assert np.array_equal(cells.X.data, np.round(cells.X.data))
    intercept, slope = model.attribute_map_
    score = norm.ppf(np.mean(pbmc_like.obs["log_library"] <= 7.0))  # 7.0's normal score
    assert np.allclose(cells.obsm["X_advcli"][:, 0], intercept + slope * score, atol=0.05)
    higher = model.sample(50, condition="B", attribute=8.0, seed=3).obsm["X_advcli"][:, 0]
    assert np.sign(higher[0] - cells.obsm["X_advcli"][0, 0]) == np.sign(slope)
    model.save(tmp_path / "aae.pt")
    loaded = AAEModel.load(tmp_path / "aae.pt")
    np.testing.assert_array_equal(loaded.predict(pbmc_like)["latent"], codes)
    np.testing.assert_array_equal(loaded.sample(50, condition="B", attribute=7.0, seed=3).X.data,
                                  cells.X.data)


def test_cli_fit_predict_sample_diagnose(pbmc_like, tmp_path, invoke, write):
    data = write(pbmc_like, "d.h5ad")
    r = invoke("fit", data, "--mode", "aae", "--condition-key", "batch", "--attribute-key",
               "log_library", "--latent-dim", "4", "--max-epochs", "5", "-o", tmp_path / "m.pt",
               "--json")
    assert r.exit_code == 0, r.stderr
    r = invoke("predict", tmp_path / "m.pt", data, "-o", tmp_path / "p.h5ad")
    assert r.exit_code == 0, r.stderr
    assert ad.read_h5ad(tmp_path / "p.h5ad").obsm["X_advcli"].shape == (pbmc_like.n_obs, 4)
    r = invoke("sample", tmp_path / "m.pt", "-o", tmp_path / "s.h5ad", "--n", "40")
    assert r.exit_code == 0, r.stderr
    assert ad.read_h5ad(tmp_path / "s.h5ad").shape == (40, pbmc_like.n_vars)
    r = invoke("diagnose", tmp_path / "p.h5ad", "-o", tmp_path / "report", "--model",
               tmp_path / "m.pt")
    assert r.exit_code == 0, r.stderr
    files = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"latent_vs_prior.png", "attribute_dimension.png", "loss_curves.png",
            "aae_metrics.json"} <= files


def test_cli_bad_inputs(pbmc_like, tmp_path, invoke, write):
    data = write(pbmc_like, "d.h5ad")
    bad = pbmc_like.copy()
    bad.obs["log_library"] = "high"
    r = invoke("fit", write(bad, "bad.h5ad"), "--mode", "aae", "--attribute-key", "log_library",
               "-o", tmp_path / "m.pt")
    assert r.exit_code == 2 and "numeric and finite" in r.stderr
    r = invoke("fit", data, "--mode", "aae", "--attribute-dim", "12", "-o", tmp_path / "m.pt")
    assert r.exit_code == 2 and "--attribute-dim must be a latent dimension" in r.stderr
    r = invoke("fit", data, "--mode", "aae", "--encoder-genes", "-5", "-o", tmp_path / "m.pt")
    assert r.exit_code == 2 and "--encoder-genes must be zero or more" in r.stderr
    r = invoke("fit", data, "--mode", "aae", "--sw-weight", "-1", "-o", tmp_path / "m.pt")
    assert r.exit_code == 2 and "--sw-weight must be zero or more" in r.stderr
    r = invoke("fit", data, "--mode", "aae", "--encoder-pcs", "-2", "-o", tmp_path / "m.pt")
    assert r.exit_code == 2 and "--encoder-pcs must be zero or more" in r.stderr
    r = invoke("fit", data, "--mode", "aae", "--treatment-key", "D", "-o", tmp_path / "m.pt")
    assert r.exit_code == 2 and "applies to --mode confounder only" in r.stderr
    r = invoke("fit", data, "--mode", "aae", "--max-epochs", "1", "-o", tmp_path / "m.pt",
               "--json")
    # strict JSON for pipelines (jq rejects NaN): the attribute loss it has not is null
    summary = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"{c} in --json"))
    assert summary["final_losses"]["ar"] is None and summary["final_losses"]["sw"] > 0
    r = invoke("sample", tmp_path / "m.pt", "-o", tmp_path / "s.h5ad", "--attribute", "3")
    assert r.exit_code == 2 and "--attribute-key" in r.stderr
    r = invoke("sample", tmp_path / "m.pt", "-o", tmp_path / "s.h5ad", "--condition", "X")
    assert r.exit_code == 2 and "not a class" in r.stderr
    r = invoke("sample", tmp_path / "m.pt", "-o", tmp_path / "s.h5ad", "--n", "0")
    assert r.exit_code == 2 and "--n must be positive" in r.stderr
    assert not (tmp_path / "s.h5ad").exists()


def test_the_encoder_reads_depth_and_files_without_it_still_load(pbmc_like, tmp_path):
    """Two cells with the same normalised expression and different depths get different codes
    (the encoder sees the library size); a file whose encoder did not read it loads and
    predicts with the encoder it has."""
    model = AAEModel(pbmc_like, condition_key="batch", latent_dim=4, max_epochs=2).train()
    module = model.module.eval()
    counts = torch.tensor(pbmc_like.X[:1].toarray(), dtype=torch.float32)
    batch = {"counts": torch.cat([counts, 3 * counts])}
    batch["library"] = batch["counts"].sum(1)
    batch["x_norm"] = torch.log1p(batch["counts"] / batch["library"][:, None] * 1e4)
    batch["condition"] = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        codes = module.encode(batch)
    assert torch.equal(batch["x_norm"][0], batch["x_norm"][1])
    assert not torch.allclose(codes[0], codes[1])
    assert module.depth_center.item() == pytest.approx(
        np.log(np.asarray(pbmc_like.X.sum(1)).ravel()).mean(), rel=1e-5)

    model.save(tmp_path / "aae.pt")
    payload = load_model(tmp_path / "aae.pt")
    old = AAEModule(pbmc_like.n_vars, 4, model.config.hidden, 2, "nb", model.config.dropout,
                    model.config.adv_loss, None, reads_depth=False)
    payload["state"] = {k: v.clone() for k, v in old.state_dict().items()}
    save_model(payload, tmp_path / "old.pt")
    loaded = AAEModel.load(tmp_path / "old.pt")
    assert not loaded.module.reads_depth
    assert np.isfinite(loaded.predict(pbmc_like)["latent"]).all()


def test_the_encoder_reads_the_most_variable_genes_and_decodes_all(pbmc_like, tmp_path):
    """With encoder_genes below the gene count the encoder sees only the most variable genes
    (within conditions); the decoder and the predicted means still cover every gene, and the
    selection travels in the model file."""
    from advcli.data import highly_variable_genes

    model = AAEModel(pbmc_like, condition_key="batch", latent_dim=4, encoder_genes=40,
                     max_epochs=2).train()
    module = model.module.eval()
    chosen = highly_variable_genes(pbmc_like.X, 40, pbmc_like.obs["batch"].to_numpy())
    assert module.encoder_genes.tolist() == chosen.tolist()
    assert module.encoder.net[0].in_features == 40 + 1  # the genes and the depth
    out = model.predict(pbmc_like)
    assert out["nb_mean"].shape == pbmc_like.shape

    # the cell's counts of two unselected genes swapped: same library, same selected genes
    counts = torch.tensor(pbmc_like.X[:1].toarray(), dtype=torch.float32).repeat(2, 1)
    other = np.setdiff1d(np.arange(pbmc_like.n_vars), chosen)
    g1 = other[counts[0, other] > 0][0]
    g2 = other[counts[0, other] != counts[0, g1]][0]
    counts[1, [g1, g2]] = counts[0, [g2, g1]]
    batch = {"counts": counts, "library": counts.sum(1),
             "condition": torch.zeros(2, dtype=torch.long)}
    batch["x_norm"] = torch.log1p(counts / batch["library"][:, None] * 1e4)
    assert not torch.equal(batch["x_norm"][0], batch["x_norm"][1])
    with torch.no_grad():
        codes = module.encode(batch)
    torch.testing.assert_close(codes[0], codes[1])

    model.save(tmp_path / "aae.pt")
    loaded = AAEModel.load(tmp_path / "aae.pt")
    assert loaded.config.encoder_genes == 40
    np.testing.assert_array_equal(loaded.predict(pbmc_like)["latent"], out["latent"])


def test_the_encoder_reads_principal_components_of_the_selected_genes(pbmc_like, tmp_path):
    """The encoder reads the first encoder_pcs PCs of the selected genes' normalised expression
    (fitted on the training cells, at most one fewer than the cells), and the axes travel in
    the model file."""
    from advcli.data import expression_pcs

    model = AAEModel(pbmc_like, condition_key="batch", latent_dim=4, encoder_genes=40,
                     encoder_pcs=8, max_epochs=2).train()
    module = model.module.eval()
    assert tuple(module.pc_axes.shape) == (40, 8)
    assert module.encoder.net[0].in_features == 8 + 1  # the components and the depth
    mean, axes = expression_pcs(model._rows, 8, module.encoder_genes)
    torch.testing.assert_close(module.pc_axes, axes)
    idx = torch.arange(10)
    batch = model.batch(idx)
    pcs = (batch["x_norm"][:, module.encoder_genes] - mean) @ axes
    depth = ((torch.log(batch["library"]) - module.depth_center) / module.depth_scale)[:, None]
    with torch.no_grad():
        expected = module.encoder(torch.cat([pcs, depth], 1))[0] + module.depth_to_code(depth)
        torch.testing.assert_close(module.encode(batch), expected)
    codes = model.predict(pbmc_like)["latent"]
    model.save(tmp_path / "aae.pt")
    loaded = AAEModel.load(tmp_path / "aae.pt")
    assert loaded.config.encoder_pcs == 8
    np.testing.assert_array_equal(loaded.predict(pbmc_like)["latent"], codes)

    few = pbmc_like[[0, 1, 2, -1, -2, -3]].copy()
    small = AAEModel(few, condition_key="batch", latent_dim=2, encoder_genes=40, max_epochs=1)
    assert small.module.pc_axes.shape[1] == 5  # six cells have five components


def test_files_from_before_the_gene_selection_and_the_depth_path_load(pbmc_like, tmp_path):
    """A file whose encoder read every gene and had no direct depth path predicts as it did:
    the missing path is a zero one, and its config says every gene."""
    model = AAEModel(pbmc_like, condition_key="batch", latent_dim=4, encoder_genes=0,
                     encoder_pcs=0, max_epochs=2).train()
    assert model.module.encoder_genes is None and model.module.pc_axes is None
    with torch.no_grad():
        model.module.depth_to_code.weight.zero_()
    codes = model.predict(pbmc_like)["latent"]
    model.save(tmp_path / "aae.pt")
    payload = load_model(tmp_path / "aae.pt")
    del payload["state"]["depth_to_code.weight"], payload["config"]["encoder_genes"]
    del payload["config"]["sw_weight"], payload["config"]["encoder_pcs"]
    save_model(payload, tmp_path / "old.pt")
    loaded = AAEModel.load(tmp_path / "old.pt")
    assert loaded.config.encoder_genes == 0
    assert loaded.config.sw_weight == 0.0  # it was trained without the term
    assert loaded.config.encoder_pcs == 0 and loaded.module.pc_axes is None
    np.testing.assert_array_equal(loaded.predict(pbmc_like)["latent"], codes)
