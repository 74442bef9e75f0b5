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


def test_generator_takes_the_nb_count_term_from_the_histogram(sample):
    """The generator's NB loss takes lgamma(y + theta) - lgamma(theta) from all cells' count
    histogram when that has fewer (gene, count) pairs than a minibatch has nonzero counts. On
    every cell the loss is the same; on a minibatch only its value differs, not its gradient
    (theta is a constant for the generator)."""
    model = ConfounderModel(sample, z_dim=1)
    hist = model._y.count_histogram
    per_cell = float(hist.nonzero_share.sum())
    assert model._histogram is hist and hist.pairs <= model.config.batch_size * per_cell
    tiny = ConfounderModel(sample, z_dim=1, batch_size=2)
    assert hist.pairs > 2 * per_cell and tiny._histogram is None
    ctx = {"phase": "generator", "temperature": 1.0, "weights": model.weights}
    params = list(model.module.generator.parameters())

    def loss_and_grads(batch):
        torch.manual_seed(0)  # the same Gumbel noise
        out, _ = model.module.objective(batch, ("generator",), ctx)
        return out["generator"], torch.autograd.grad(out["generator"], params)

    every = model.batch(torch.arange(sample.n_obs))
    torch.testing.assert_close(loss_and_grads(every)[0],
                               loss_and_grads({**every, "count_histogram": None})[0])
    some = model.batch(torch.arange(64))
    (a, grads_a), (b, grads_b) = loss_and_grads(some), loss_and_grads(
        {**some, "count_histogram": None})
    assert abs(float(a - b)) > 1e-3  # the minibatch's count term is not all cells'
    for u, v in zip(grads_a, grads_b):
        torch.testing.assert_close(u, v)


def test_heads_take_the_minibatch_count_term_from_its_own_histogram(sample):
    """The heads learn theta from the minibatch's own count term; computed from the
    minibatch's histogram it is the same loss and the same gradients."""
    model = ConfounderModel(sample, z_dim=1)
    ctx = {"phase": "heads", "temperature": 1.0, "weights": model.weights}
    params = list(model.module.nb.parameters())
    batch = model.batch(torch.randperm(sample.n_obs, generator=torch.Generator().manual_seed(0))
                        [:100])
    assert batch["pair_ids"] is not None

    def loss_and_grads(b):
        torch.manual_seed(0)
        out, _ = model.module.objective(b, ("classifier", "nb"), ctx)
        return out["nb"], torch.autograd.grad(out["nb"], params)

    (a, grads_a), (b, grads_b) = loss_and_grads(batch), loss_and_grads(
        {**batch, "pair_ids": None})
    torch.testing.assert_close(a, b)
    for u, v in zip(grads_a, grads_b):
        torch.testing.assert_close(u, v)


def test_generator_inputs_computed_once_are_those_of_each_minibatch(sample, monkeypatch):
    """On data that fits, the generator's inputs are computed once for every cell; a
    minibatch reads the same values it would compute."""
    import advcli.models.confounder as confounder

    cached = ConfounderModel(sample, z_dim=1)
    monkeypatch.setattr(confounder, "FEATURE_CACHE_ENTRIES", 0)
    computed = ConfounderModel(sample, z_dim=1)
    assert cached._features is not None and computed._features is None
    idx = torch.tensor([5, 999, 0, 5, 400])
    torch.testing.assert_close(cached.batch(idx)["features"], computed.batch(idx)["features"])
    assert cached._features.shape == (sample.n_obs, computed.batch(idx)["features"].shape[1])


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


def test_without_warm_start_z_is_counted_but_not_started(sample):
    model = ConfounderModel(sample, warm_start=False, outer_iterations=1)
    assert model.config.z_dim == 1 and model._start is None
    model.train()
    assert "warm_start" not in {r["phase"] for r in model.train_state_.records}


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
