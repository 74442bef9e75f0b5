"""The Python API of confounder mode: data-driven starts, restarts after a collapse, effects."""

import anndata as ad
import numpy as np
import pytest
import torch

from advcli.models.confounder import MAX_RESTARTS, ConfounderModel
from conftest import SAMPLE


@pytest.fixture(scope="module")
def sample():
    return ad.read_h5ad(SAMPLE / "confounder.h5ad")


def test_heads_start_at_the_genes_log_means(sample):
    model = ConfounderModel(sample, z_dim=1)
    counts = sample.X.toarray()
    lib = counts.sum(1)
    sf = np.exp(np.log(lib) - np.log(lib).mean())
    expected = np.log(counts.sum(0) / sf.sum())
    bias = model.module.nb.linear.bias.detach().numpy()
    np.testing.assert_allclose(bias, expected, rtol=1e-4, atol=1e-4)
    assert torch.all(model.module.nb.linear.weight == 0)


def test_warm_start_puts_z_on_the_residual_factor(sample):
    model = ConfounderModel(sample, z_dim=1, outer_iterations=1)
    model.train()
    z = model.predict_training_z()[:, 0]
    start = model._start[:, 0].cpu().numpy()
    assert abs(np.corrcoef(z, start)[0, 1]) > 0.8
    phases = [r["phase"] for r in model.train_state_.records]
    assert phases[:5] == ["warm_start"] * 5 and phases[5] == "heads"


def test_nb_count_term_comes_from_the_histogram_when_it_is_smaller(sample):
    """Training takes the NB count term from all cells' count histogram when that has fewer
    (gene, count) pairs than a minibatch has nonzero counts; the losses a batch reports are
    the same either way, up to the count term's minibatch noise."""
    model = ConfounderModel(sample, z_dim=1)
    hist = model._y.count_histogram
    per_cell = float(hist.nonzero_share.sum())
    assert model._histogram is hist and hist.pairs <= model.config.batch_size * per_cell
    tiny = ConfounderModel(sample, z_dim=1, batch_size=2)
    assert hist.pairs > 2 * per_cell and tiny._histogram is None
    batch = model.batch(torch.arange(sample.n_obs))  # every cell: the two forms agree
    ctx = {"phase": "heads", "temperature": 1.0, "weights": model.weights}
    with_hist, _ = model.module.objective(batch, ("classifier", "nb"), ctx)
    without, _ = model.module.objective({**batch, "count_histogram": None},
                                        ("classifier", "nb"), ctx)
    torch.testing.assert_close(with_hist["nb"], without["nb"])


def test_default_minibatch_grows_with_the_data_within_its_bounds(sample):
    """128 cells up to 3,072 cells, then about 24 steps an epoch, at most 1,024 cells and
    ~10^6 counts (never under 128); the model records the size it used."""
    from advcli.models.confounder import confounder_batch_size

    assert confounder_batch_size(1_000, 2_000) == 128
    assert confounder_batch_size(10_000, 1_000) == 10_000 // 24
    assert confounder_batch_size(10**6, 500) == 1024
    assert confounder_batch_size(10**6, 2_000) == (1 << 20) // 2_000
    assert confounder_batch_size(10**6, 30_000) == 128
    assert ConfounderModel(sample, z_dim=1).config.batch_size == 128
    assert ConfounderModel(sample, z_dim=1, batch_size=50).config.batch_size == 50


def test_factor_count_is_one_on_a_one_factor_simulation(sample):
    assert ConfounderModel(sample).config.z_dim == 1


def test_collapse_triggers_a_restart_with_a_lower_rate(sample, monkeypatch):
    calls = []

    def collapsed_once(self, z):
        calls.append(self.module)
        return [0] if len(calls) == 1 else []

    monkeypatch.setattr(ConfounderModel, "_collapsed", collapsed_once)
    model = ConfounderModel(sample, z_dim=1, outer_iterations=2).train()
    summary = model.fit_summary()
    assert len(summary["restarts"]) == 1 and summary["restarts"][0]["lr_generator"] == 1e-3
    assert "restarted 1 time" in summary["warnings"][0]
    assert calls[0] is not calls[1]  # a fresh network, not the collapsed one


def test_collapse_that_survives_restarts_is_a_warning(sample, monkeypatch):
    monkeypatch.setattr(ConfounderModel, "_collapsed", lambda self, z: [0])
    model = ConfounderModel(sample, z_dim=1, outer_iterations=2).train()
    summary = model.fit_summary()
    assert len(summary["restarts"]) == MAX_RESTARTS
    assert any("constant or put over 99%" in w for w in summary["warnings"])


def test_collapsed_detects_lopsided_and_constant_columns(sample):
    model = ConfounderModel(sample, z_dim=1)
    z = np.column_stack([np.r_[np.ones(999), 0.0], np.full(1000, 0.3),
                         np.tile([0.1, 0.9], 500)])
    assert model._collapsed(z) == [0, 1]


def test_predict_inplace_writes_what_the_command_line_writes(sample):
    from advcli.errors import InputError

    model = ConfounderModel(sample, z_dim=1, max_epochs=8).train()
    adata = sample.copy()
    written = model.predict(adata, inplace=True)
    assert "obsm['Z_hat']" in written
    np.testing.assert_allclose(adata.obsm["Z_hat"], model.predict(sample)["Z_hat"], rtol=1e-6)
    with pytest.raises(InputError, match="inplace=True"):
        model.predict(inplace=True)
