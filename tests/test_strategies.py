"""Which modules learn in which phase: the contract of the alternating-freeze strategy."""

import copy

import pytest
import torch

from advcli import losses

from advcli.nn import ConfounderNet, NBRegression, TreatmentClassifier, ZGenerator
from advcli.strategies import AlternatingFreeze, JointUpdate


def _setup(cls=AlternatingFreeze, z_type="soft"):
    torch.manual_seed(0)
    n, x_dim, genes = 64, 3, 6
    x = torch.bernoulli(torch.full((n, x_dim), 0.5))
    d = torch.bernoulli(torch.full((n,), 0.5))
    y = torch.poisson(torch.full((n, genes), 3.0))
    gen = ZGenerator(x_dim, genes, 1, 16, ["x", "d", "y"], torch.zeros(genes), torch.ones(genes))
    net = ConfounderNet(gen, TreatmentClassifier(x_dim + 1), NBRegression(x_dim + 2, genes), z_type)
    strategy = cls(net, lr=1e-2, lr_generator=1e-2, weight_decay=0.0)
    batches = list(torch.randperm(n).split(16))
    return net, strategy, batches, (lambda idx: (x[idx], d[idx], y[idx], None))


def _changed(before, module):
    return [not torch.equal(a, b) for a, b in zip(before.parameters(), module.parameters())]


def test_head_phase_moves_heads_not_generator():
    net, strategy, batches, get = _setup()
    snap = copy.deepcopy(net)
    record = strategy.head_epoch(batches, get, temperature=1.0)
    assert set(record) == {"bce", "nb"}
    assert not any(_changed(snap.generator, net.generator))
    assert all(_changed(snap.classifier, net.classifier))
    assert any(_changed(snap.nb, net.nb))


def test_generator_phase_moves_generator_not_heads():
    net, strategy, batches, get = _setup()
    snap = copy.deepcopy(net)
    weights = {"bce": 1.0, "nb": 6.0, "dbpr": 0.0}
    record = strategy.generator_epoch(batches, get, 1.0, weights, None)
    assert {"bce", "nb", "total"} <= set(record)
    assert any(_changed(snap.generator, net.generator))
    assert not any(_changed(snap.classifier, net.classifier))
    assert not any(_changed(snap.nb, net.nb))
    # the heads are trainable again afterwards (frozen only during the phase)
    assert all(p.requires_grad for p in net.classifier.parameters())


def test_generator_gets_gradient_through_frozen_heads_with_straight_through():
    net, strategy, batches, get = _setup(z_type="binary")
    snap = copy.deepcopy(net)
    strategy.generator_epoch(batches, get, 1.0, {"bce": 1.0, "nb": 1.0, "dbpr": 0.0}, None)
    assert any(_changed(snap.generator, net.generator))


def test_joint_update_moves_every_module():
    net, strategy, batches, get = _setup(JointUpdate)
    snap = copy.deepcopy(net)
    strategy.joint_epoch(batches, get, 1.0, {"bce": 1.0, "nb": 1.0, "dbpr": 0.0}, None)
    for name in ("generator", "classifier", "nb"):
        assert any(_changed(getattr(snap, name), getattr(net, name))), name


# ---------------------------------------------------------------- integrate mode

from advcli.strategies import AlternatingAdversary, GradientReversalStep, PairedVAE  # noqa: E402


def _integrate_setup(paired=False):
    torch.manual_seed(0)
    n, genes = 48, 10
    counts = torch.poisson(torch.full((n, genes), 4.0))
    library = counts.sum(1)
    batch = {"counts": counts, "library": library,
             "x_norm": torch.log1p(counts / library[:, None] * 1e4),
             "domain": torch.arange(n) % 3}
    model = PairedVAE(genes, 4, 16, 3, "nb", paired=paired)
    return model, batch


def _moved(before, after):
    return any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters()))


def test_d_step_moves_discriminator_only():
    model, batch = _integrate_setup()
    strategy = AlternatingAdversary(model, 1e-2, 1e-2, 1, 1, "uniform")
    snap = copy.deepcopy(model)
    strategy.d_step(batch)
    assert _moved(snap.discriminator, model.discriminator)
    assert not _moved(snap.encoders, model.encoders)
    assert not _moved(snap.decoders, model.decoders)


@pytest.mark.parametrize("paired", [False, True])
def test_e_step_moves_vaes_not_discriminator(paired):
    model, batch = _integrate_setup(paired)
    strategy = AlternatingAdversary(model, 1e-2, 1e-2, 1, 1, "negce")
    snap = copy.deepcopy(model)
    strategy.e_step(batch, beta_kl=1.0, adv_weight=5.0)
    assert not _moved(snap.discriminator, model.discriminator)
    assert _moved(snap.encoders, model.encoders) and _moved(snap.decoders, model.decoders)
    assert all(p.requires_grad for p in model.discriminator.parameters())


@pytest.mark.parametrize("kind", ["negce", "uniform", "flip"])
def test_grl_step_moves_both_sides(kind):
    model, batch = _integrate_setup()
    strategy = GradientReversalStep(model, 1e-2, 1e-2, 1.0, kind)
    snap = copy.deepcopy(model)
    record = strategy.step(batch, beta_kl=1.0, adv_weight=1.0)
    assert {"elbo", "disc_ce", "disc_acc"} <= set(record)
    assert _moved(snap.discriminator, model.discriminator) and _moved(snap.encoders, model.encoders)


def test_grl_gives_encoders_the_reversed_discriminator_gradient():
    """With negce the encoders' adversarial gradient is exactly -lambda x the discriminator
    loss's gradient with respect to the posterior means."""
    from advcli.nn import GradientReversal

    model, batch = _integrate_setup()
    mean, _ = model.encode(batch["x_norm"], batch["domain"])
    mean = mean.detach().requires_grad_(True)
    losses.domain_ce(model.discriminator(mean), batch["domain"]).backward()
    plain = mean.grad.clone()
    mean.grad = None
    losses.domain_ce(model.discriminator(GradientReversal(0.5)(mean)), batch["domain"]).backward()
    assert torch.allclose(mean.grad, -0.5 * plain, atol=1e-7)
