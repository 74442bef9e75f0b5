"""Which players learn in which step: the contract between modules and strategies, checked on
both models' modules with the same strategy classes."""

import copy

import pytest
import torch

from advcli import losses
from advcli.models.confounder import ConfounderModule
from advcli.models.integrate import PairedVAE
from advcli.nn import NBRegression, TreatmentClassifier, ZGenerator
from advcli.strategies import STRATEGIES, AlternatingFreeze, Simultaneous, Strategy

CTX = {"phase": "train", "temperature": 1.0, "weights": {"bce": 1.0, "nb": 6.0, "dbpr": 0.0}}
ALL = ("classifier", "nb", "generator")


def _confounder(z_type="soft"):
    torch.manual_seed(0)
    n, x_dim, genes = 64, 3, 6
    gen = ZGenerator(x_dim, genes, 1, 16, ["x", "d", "y"], torch.zeros(genes), torch.ones(genes))
    module = ConfounderModule(gen, TreatmentClassifier(x_dim + 1), NBRegression(x_dim + 2, genes),
                              z_type)
    batch = {"x": torch.bernoulli(torch.full((n, x_dim), 0.5)),
             "d": torch.bernoulli(torch.full((n,), 0.5)),
             "y": torch.poisson(torch.full((n, genes), 3.0)), "offset": None}
    return module, batch


def _lrs(module):
    return {name: 1e-2 for name in module.players()}


def _moved(before, after):
    return any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters()))


def test_head_turn_moves_heads_not_generator():
    module, batch = _confounder()
    strategy = AlternatingFreeze(module, _lrs(module))
    snap = copy.deepcopy(module)
    record = strategy.step(batch, ("classifier", "nb"), CTX)
    assert set(record) == {"bce", "nb"}
    assert not _moved(snap.generator, module.generator)
    assert _moved(snap.classifier, module.classifier) and _moved(snap.nb, module.nb)


def test_generator_turn_moves_generator_not_heads():
    module, batch = _confounder()
    strategy = AlternatingFreeze(module, _lrs(module))
    snap = copy.deepcopy(module)
    record = strategy.step(batch, ("generator",), CTX)
    assert {"bce", "nb", "total"} <= set(record)
    assert _moved(snap.generator, module.generator)
    assert not _moved(snap.classifier, module.classifier) and not _moved(snap.nb, module.nb)
    # everyone is trainable again afterwards (frozen only during the turn)
    assert all(p.requires_grad for p in module.parameters())


def test_generator_gets_gradient_through_frozen_heads_with_straight_through():
    module, batch = _confounder(z_type="binary")
    strategy = AlternatingFreeze(module, _lrs(module))
    snap = copy.deepcopy(module)
    strategy.step(batch, ("generator",), CTX)
    assert _moved(snap.generator, module.generator)


def test_each_player_loss_reaches_only_its_own_parameters():
    """The contract that makes strategies interchangeable."""
    module, batch = _confounder()
    out, _ = module.objective(batch, ALL, CTX)
    players = module.players()
    for name, loss in out.items():
        grads = torch.autograd.grad(loss, [p for ps in players.values() for p in ps],
                                    retain_graph=True, allow_unused=True)
        flat = iter(grads)
        for other, params in players.items():
            got = [next(flat) for _ in params]
            reached = any(g is not None and g.abs().sum() > 0 for g in got)
            assert reached == (other == name), (name, other)


def test_simultaneous_moves_every_player():
    module, batch = _confounder()
    strategy = Simultaneous(module, _lrs(module))
    snap = copy.deepcopy(module)
    strategy.step(batch, ALL, CTX)
    for name in ("generator", "classifier", "nb"):
        assert _moved(getattr(snap, name), getattr(module, name)), name


def test_a_new_strategy_is_one_class_and_one_entry():
    """A strategy that only trains the NB model: one class, one registration, nothing else."""

    class OnlyNB(Strategy):
        def step(self, batch, players, ctx):
            return self._update(batch, ["nb"], ctx)

    STRATEGIES["only_nb"] = OnlyNB
    try:
        module, batch = _confounder()
        strategy = STRATEGIES["only_nb"](module, _lrs(module))
        snap = copy.deepcopy(module)
        strategy.step(batch, ALL, CTX)
        assert _moved(snap.nb, module.nb)
        assert not _moved(snap.classifier, module.classifier)
        assert not _moved(snap.generator, module.generator)
    finally:
        del STRATEGIES["only_nb"]


def test_max_grad_norm_bounds_the_step():
    module, batch = _confounder()
    big = copy.deepcopy(module)
    for m, norm in ((module, 1e-6), (big, None)):
        strategy = Simultaneous(m, {k: 1.0 for k in m.players()}, max_grad_norm=norm)
        strategy.optimizers = {k: torch.optim.SGD(p, lr=1.0) for k, p in strategy.players.items()}
        strategy.step(batch, ("classifier",), CTX)
    start = _confounder()[0]
    small_step = (module.classifier.linear.weight - start.classifier.linear.weight).norm()
    big_step = (big.classifier.linear.weight - start.classifier.linear.weight).norm()
    assert small_step <= 1e-6 + 1e-9 < big_step


def test_a_non_finite_loss_stops_before_any_step():
    from advcli.strategies import TrainingDiverged

    module, batch = _confounder()
    batch["y"][0, 0] = float("nan")
    strategy = Simultaneous(module, _lrs(module))
    snap = copy.deepcopy(module)
    with pytest.raises(TrainingDiverged) as info:
        strategy.step(batch, ALL, CTX)
    assert info.value.term in ("nb", "total", "bce")
    assert not _moved(snap, module)


# ---------------------------------------------------------------- the integration module


def _integrate(paired=False, adv_loss="negce"):
    torch.manual_seed(0)
    n, genes = 48, 10
    counts = torch.poisson(torch.full((n, genes), 4.0))
    library = counts.sum(1)
    batch = {"counts": counts, "library": library,
             "x_norm": torch.log1p(counts / library[:, None] * 1e4),
             "domain": torch.arange(n) % 3}
    return PairedVAE(genes, 4, 16, 3, "nb", paired=paired, adv_loss=adv_loss), batch


ICTX = {"kl_weight": 1.0, "adv_weight": 5.0}


def test_discriminator_turn_moves_discriminator_only():
    module, batch = _integrate()
    strategy = AlternatingFreeze(module, _lrs(module))
    snap = copy.deepcopy(module)
    strategy._freeze_all_but(["discriminator"])
    strategy._update(batch, ["discriminator"], ICTX)
    assert _moved(snap.discriminator, module.discriminator)
    assert not _moved(snap.encoders, module.encoders) and not _moved(snap.decoders, module.decoders)


@pytest.mark.parametrize("paired", [False, True])
def test_vae_turn_moves_vaes_not_discriminator(paired):
    module, batch = _integrate(paired)
    strategy = AlternatingFreeze(module, _lrs(module))
    snap = copy.deepcopy(module)
    strategy._freeze_all_but(["vae"])
    strategy._update(batch, ["vae"], ICTX)
    assert not _moved(snap.discriminator, module.discriminator)
    assert _moved(snap.encoders, module.encoders) and _moved(snap.decoders, module.decoders)


@pytest.mark.parametrize("kind", ["negce", "uniform", "flip"])
def test_simultaneous_step_moves_both_sides(kind):
    module, batch = _integrate(adv_loss=kind)
    strategy = Simultaneous(module, _lrs(module))
    snap = copy.deepcopy(module)
    record = strategy.step(batch, ("vae", "discriminator"), ICTX)
    assert {"elbo", "disc_ce", "disc_acc"} <= set(record)
    assert _moved(snap.discriminator, module.discriminator)
    assert _moved(snap.encoders, module.encoders)


def test_simultaneous_negce_is_gradient_reversal():
    """With negce, what the encoder receives from the adversarial term is exactly -weight x the
    discriminator loss's gradient with respect to the posterior means: gradient reversal."""
    module, batch = _integrate()
    module.eval()  # no dropout, no running statistics: two forwards see the same network
    mean, _ = module.encode(batch["x_norm"], batch["domain"])
    mean = mean.detach().requires_grad_(True)
    losses.domain_ce(module.discriminator(mean), batch["domain"]).backward()
    plain = mean.grad.clone()
    mean.grad = None
    from advcli.strategies import constant_call

    (0.5 * module.adversarial(constant_call(module.discriminator, mean), batch["domain"],
                               None)).backward()
    assert torch.allclose(mean.grad, -0.5 * plain, atol=1e-7)


def test_constant_call_leaves_running_statistics_alone():
    module, batch = _integrate()
    before = module.discriminator.center.clone()
    from advcli.strategies import constant_call

    constant_call(module.discriminator, torch.randn(8, 4) + 3.0)
    assert torch.equal(module.discriminator.center, before)
