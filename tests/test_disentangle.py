"""Disentangle mode: which players each turn moves, the adversary's sign, the API and CLI."""

import copy

import anndata as ad
import numpy as np
import pytest
import torch

from advcli import DisentangleModel
from advcli.models.disentangle import DisentangleModule, label_accuracies
from advcli.strategies import AlternatingFreeze, Simultaneous
from conftest import SAMPLE

CTX = {"kl_weight": 1.0, "swap_weight": 1.0, "adv_weight": 1.0, "gan_weight": 1.0,
       "label_weight": 1.0}
PLAYERS = ("vae", "label_adversary", "x_discriminator")


def _setup():
    torch.manual_seed(0)
    n, genes = 24, 15

    def cells():
        counts = torch.poisson(torch.full((n, genes), 3.0))
        library = counts.sum(1)
        return {"counts": counts, "library": library,
                "x_norm": torch.log1p(counts / library[:, None] * 1e4)}

    batch = {**cells(), "label": torch.arange(n) % 3, "partner": cells()}
    return DisentangleModule(genes, 3, 4, 16, 3, "nb", 0.0, "uniform"), batch


def _moved(before, after):
    return any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters()))


def test_adversaries_turn_leaves_the_vae_and_vae_turn_leaves_the_adversaries():
    module, batch = _setup()
    strategy = AlternatingFreeze(module, {p: 1e-2 for p in PLAYERS})
    snap = copy.deepcopy(module)
    strategy._freeze_all_but(["label_adversary", "x_discriminator"])
    record = strategy._update(batch, ["label_adversary", "x_discriminator"], CTX)
    assert {"z_label_ce", "z_label_acc", "x_disc_ce"} <= set(record)
    assert _moved(snap.label_adversary, module.label_adversary)
    assert _moved(snap.x_discriminator, module.x_discriminator)
    assert not _moved(snap.s_encoder, module.s_encoder) and not _moved(snap.decoder, module.decoder)
    snap = copy.deepcopy(module)
    strategy._freeze_all_but(["vae"])
    record = strategy._update(batch, ["vae"], CTX)
    assert {"elbo", "swap", "clean", "fool", "s_label_ce"} <= set(record)
    assert _moved(snap.s_encoder, module.s_encoder) and _moved(snap.z_encoder, module.z_encoder)
    assert _moved(snap.s_classifier, module.s_classifier)
    assert not _moved(snap.label_adversary, module.label_adversary)
    assert not _moved(snap.x_discriminator, module.x_discriminator)


def test_every_player_loss_reaches_only_its_own_parameters():
    module, batch = _setup()
    module.eval()
    out, _ = module.objective(batch, PLAYERS, CTX)
    players = module.players()
    params = [p for ps in players.values() for p in ps]
    for name, loss in out.items():
        grads = iter(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))
        for other, ps in players.items():
            reached = any(g is not None and g.abs().sum() > 0 for g in
                          [next(grads) for _ in ps])
            assert reached == (other == name), (name, other)


def test_simultaneous_step_moves_every_player():
    module, batch = _setup()
    snap = copy.deepcopy(module)
    Simultaneous(module, {p: 1e-2 for p in PLAYERS}).step(batch, PLAYERS, CTX)
    for name in ("s_encoder", "z_encoder", "decoder", "label_adversary", "x_discriminator"):
        assert _moved(getattr(snap, name), getattr(module, name)), name


def test_label_accuracies_tell_an_informative_feature_from_noise():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, 300)
    informative = np.eye(3)[label] + 0.1 * rng.standard_normal((300, 3))
    acc_s, acc_z, majority = label_accuracies(informative, rng.standard_normal((300, 3)), label)
    assert acc_s > 0.95 and abs(acc_z - majority) < 0.12


@pytest.fixture(scope="module")
def labelled():
    a = ad.read_h5ad(SAMPLE / "integrate.h5ad")
    return a[np.r_[0:200, a.n_obs - 200:a.n_obs]].copy()


def test_api_and_cli_end_to_end(labelled, tmp_path, invoke, write):
    model = DisentangleModel(labelled, label_key="cell_type", latent_dim=4, s_dim=3,
                             max_epochs=3).train()
    out = model.predict(labelled)
    assert out["s"].shape == (labelled.n_obs, 3) and out["z"].shape == (labelled.n_obs, 4)
    summary = model.fit_summary()
    assert {"label_accuracy_s", "label_accuracy_z", "majority_rate"} <= set(summary)
    data = write(labelled, "d.h5ad")
    r = invoke("fit", data, "--mode", "disentangle", "--label-key", "cell_type", "--latent-dim",
               "4", "--s-dim", "3", "--max-epochs", "2", "-o", tmp_path / "m.pt")
    assert r.exit_code == 0, r.stderr
    r = invoke("predict", tmp_path / "m.pt", data, "-o", tmp_path / "p.h5ad")
    assert r.exit_code == 0, r.stderr
    predicted = ad.read_h5ad(tmp_path / "p.h5ad")
    assert predicted.obsm["X_advcli_s"].shape[1] == 3
    r = invoke("diagnose", tmp_path / "p.h5ad", "-o", tmp_path / "report", "--model",
               tmp_path / "m.pt")
    assert r.exit_code == 0, r.stderr
    assert {"s_and_z.png", "loss_curves.png", "disentangle_metrics.json"} <= {
        p.name for p in (tmp_path / "report").iterdir()}
    r = invoke("fit", data, "--mode", "disentangle", "--label-key", "celltype", "-o",
               tmp_path / "n.pt")
    assert r.exit_code == 2 and "celltype" in r.stderr and "'cell_type'" in r.stderr


def test_the_label_read_out_of_s_teaches_s_the_labels():
    """Descending the s read-out's cross-entropy alone makes the labels readable from s."""
    module, batch = _setup()
    module.eval()
    ctx = {**CTX, "swap_weight": 0.0, "adv_weight": 0.0, "gan_weight": 0.0, "kl_weight": 0.0}
    optimizer = torch.optim.Adam(module.players()["vae"], lr=1e-2)
    first = None
    for _ in range(60):
        _, logs = module.objective(batch, ("vae",), ctx)
        s, _, _ = module.encode(batch["x_norm"])
        ce = torch.nn.functional.cross_entropy(module.s_classifier(s), batch["label"])
        first = ce.item() if first is None else first
        optimizer.zero_grad()
        ce.backward()
        optimizer.step()
    assert logs["s_label_ce"].item() < 0.5 * first


def test_a_file_without_the_s_read_out_still_loads(tmp_path):
    from advcli.io import load_model, save_model

    a = ad.read_h5ad(SAMPLE / "integrate.h5ad")[:200].copy()
    a.obs["cell_type"] = a.obs["cell_type"].astype(str)
    model = DisentangleModel(a, label_key="cell_type", max_epochs=1).train()
    model.save(tmp_path / "m.pt")
    payload = load_model(tmp_path / "m.pt")
    payload["state"] = {k: v for k, v in payload["state"].items()
                        if not k.startswith("s_classifier.")}
    save_model(payload, tmp_path / "old.pt")
    loaded = DisentangleModel.load(tmp_path / "old.pt")
    assert loaded.module.s_classifier is None
    out = loaded.predict(a)
    np.testing.assert_allclose(out["s"], model.predict(a)["s"], rtol=1e-5, atol=1e-6)
