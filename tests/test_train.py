"""The training loop: interrupted runs resume to the same model, divergence stops training, the
history is one record per epoch."""

import signal

import anndata as ad
import numpy as np
import pytest
import torch

from advcli import ConfounderModel, IntegrationModel
from advcli.errors import InputError
from advcli.train import DivergedAt, TrainingInterrupted, history_records, history_table
from conftest import SAMPLE


@pytest.fixture(scope="module")
def confounder():
    return ad.read_h5ad(SAMPLE / "confounder.h5ad")


@pytest.fixture(scope="module")
def integrate():
    a = ad.read_h5ad(SAMPLE / "integrate.h5ad")
    return a[np.r_[0:300, a.n_obs - 300:a.n_obs]].copy()


CASES = {"confounder": (ConfounderModel, dict(outer_iterations=4)),
         "integrate": (IntegrationModel, dict(latent_dim=4, max_epochs=4))}


def _same(a, b):
    sa, sb = a.module.state_dict(), b.module.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("mode", ["confounder", "integrate"])
@pytest.mark.parametrize("where", ["epoch", "step"])
def test_an_interrupted_run_resumes_to_the_same_model(mode, where, tmp_path, request):
    cls, options = CASES[mode]
    adata = request.getfixturevalue(mode)
    full = cls(adata, **options).train()

    part = cls(adata, **options)
    if where == "step":  # SIGINT in the middle of the second epoch
        calls = {"n": 0, "counting": True}
        batch, begin_epoch = part.batch, part.begin_epoch

        def batch_then_signal(idx, *args):
            calls["n"] += calls["counting"]
            if calls["n"] == len(part.batches(torch.Generator())) + 2:
                signal.raise_signal(signal.SIGINT)
            return batch(idx, *args)

        def begin_epoch_uncounted():  # what it reads is not a training step
            calls["counting"] = False
            begin_epoch()
            calls["counting"] = True

        part.batch, part.begin_epoch = batch_then_signal, begin_epoch_uncounted
        on_epoch = None
    else:  # SIGTERM at the end of the second epoch

        def on_epoch(epoch, record):
            if epoch == 2:
                signal.raise_signal(signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as info:
        part.train(on_epoch=on_epoch, checkpoint_path=tmp_path / "c.pt")
    assert info.value.epoch == 2 and info.value.saved
    assert not _same(full, part)

    resumed = cls.load(tmp_path / "c.pt", adata)
    assert not resumed.is_trained_
    with pytest.raises(InputError, match="not finished training"):
        resumed.predict()
    resumed.train()
    assert _same(full, resumed)
    assert resumed.train_state_.records == full.train_state_.records
    np.testing.assert_array_equal(resumed.predict(adata)[keys_of(mode)],
                                  full.predict(adata)[keys_of(mode)])


def keys_of(mode):
    return "Z_hat" if mode == "confounder" else "latent"


def test_a_loaded_model_predicts_continues_and_saves_again(integrate, tmp_path):
    model = IntegrationModel(integrate, latent_dim=4, max_epochs=3, patience=0).train()
    model.save(tmp_path / "m.pt")
    loaded = IntegrationModel.load(tmp_path / "m.pt")
    np.testing.assert_array_equal(loaded.predict(integrate)["latent"],
                                  model.predict(integrate)["latent"])
    with pytest.raises(InputError, match="loaded without data"):
        loaded.train()
    with_data = IntegrationModel.load(tmp_path / "m.pt", integrate)
    with_data.train(max_epochs=5)  # two more epochs, from the saved optimizer state
    assert with_data.epochs_ == 5 and not _same(with_data, model)
    with_data.save(tmp_path / "m2.pt")
    assert IntegrationModel.load(tmp_path / "m2.pt").epochs_ == 5


def test_resume_refuses_other_options_or_data(confounder, tmp_path):
    model = ConfounderModel(confounder, outer_iterations=2).train()
    model.save(tmp_path / "m.pt")
    from advcli.io import load_model

    payload = load_model(tmp_path / "m.pt")
    other = ConfounderModel(confounder, outer_iterations=3)
    with pytest.raises(InputError, match="--outer-iterations 2 there, 3 now"):
        other.resume_from(payload, tmp_path / "m.pt")
    fewer = confounder[:900].copy()
    with pytest.raises(InputError, match="other data"):
        ConfounderModel(fewer, outer_iterations=2, z_dim=model.config.z_dim).resume_from(
            payload, tmp_path / "m.pt")


def test_a_diverging_fit_stops_with_the_epoch_and_the_term(confounder):
    with pytest.raises(DivergedAt, match=r"epoch 1: mse became .* times its value at the start"):
        ConfounderModel(confounder, lr=1e6).train()


def test_history_table_round_trips():
    records = [{"epoch": 1, "phase": "heads", "bce": 0.5}, {"epoch": 2, "phase": "generator",
                                                           "bce": 0.4, "total": 3.0}]
    table = history_table(records)
    assert np.isnan(table["total"][0]) and table["phase"] == ["heads", "generator"]
    assert history_records(table) == records


def test_repr_and_early_stopping_in_the_summary(integrate):
    model = IntegrationModel(integrate, latent_dim=4, max_epochs=3)
    assert "not trained" in repr(model) and "IntegrationModel" in repr(model)
    model.train()
    summary = model.fit_summary()
    assert summary["stopped_early"] is False and summary["max_epochs"] == 3
    assert 1 <= summary["best_val_epoch"] <= 3 and summary["latent_dim"] == 4
    assert "trained" in repr(model)


def test_train_can_draw_a_progress_bar(integrate, capsys):
    IntegrationModel(integrate, latent_dim=4, max_epochs=2).train(progress=True)
    err = capsys.readouterr().err
    assert "train integrate" in err and "val_elbo" in err


@pytest.mark.parametrize("mode", ["integrate", "confounder"])
def test_bf16_mixed_precision_trains_to_the_fp32_result(mode, request):
    """--precision bf16 runs the layers in bfloat16 and every loss in float32: the same
    schedule ends close to the float32 run, and predictions stay float32."""
    adata = request.getfixturevalue(mode)
    model_cls = IntegrationModel if mode == "integrate" else ConfounderModel
    runs = {p: model_cls(adata, max_epochs=6, precision=p).train() for p in ("fp32", "bf16")}
    term = "val_elbo" if mode == "integrate" else "nb"
    full, half = (runs[p].fit_summary()["final_losses"][term] for p in ("fp32", "bf16"))
    assert np.isfinite(half) and half == pytest.approx(full, rel=0.01)
    assert half != full  # bfloat16 was in use
    key = "latent" if mode == "integrate" else "Z_hat"
    out = runs["bf16"].predict()[key]
    assert out.dtype == np.float32 and np.isfinite(out).all()


def test_losses_compute_half_precision_inputs_in_float32():
    from advcli import losses

    logits = torch.randn(8, 3).to(torch.bfloat16)
    domain = torch.randint(0, 3, (8,))
    assert losses.domain_ce(logits, domain).dtype == torch.float32
    y = torch.poisson(torch.full((8, 5), 2.0))
    log_mu = torch.zeros(8, 5, dtype=torch.bfloat16, requires_grad=True)
    loss = losses.nb_nll(y, log_mu, torch.ones(5))
    assert loss.dtype == torch.float32
    loss.backward()
    assert log_mu.grad.dtype == torch.bfloat16 and torch.isfinite(log_mu.grad.float()).all()
    # inside autocast too: the sliced Wasserstein projection is not cast down to bfloat16
    code = torch.randn(64, 4).to(torch.bfloat16)
    directions = torch.nn.functional.normalize(torch.randn(4, 8), dim=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = losses.sliced_wasserstein_normal(code, directions)
    assert half.dtype == torch.float32
    full = losses.sliced_wasserstein_normal(code.float(), directions)
    assert half.item() == pytest.approx(full.item(), rel=1e-6)
