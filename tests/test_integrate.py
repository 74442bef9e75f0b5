"""Integrate mode's mechanisms: when training may stop, the discriminator's extra steps, the
paired design's tie, the neighbourhood mixing signal and the unmixed warning."""

import copy
import math

import anndata as ad
import numpy as np
import pytest
import torch

from advcli import IntegrationModel
from advcli.data import log_normalised
from advcli.errors import InputError
from advcli.models.base import epoch_cap
from advcli.models.integrate import CompositionWeights, PairedVAE, neighbourhood_mixing
from advcli.strategies import Simultaneous
from conftest import SAMPLE


@pytest.fixture(scope="module")
def integrate():
    a = ad.read_h5ad(SAMPLE / "integrate.h5ad")
    return a[np.r_[0:300, a.n_obs - 300:a.n_obs]].copy()


def test_neighbourhood_mixing_is_zero_apart_and_near_one_interleaved():
    g = torch.Generator().manual_seed(0)
    domain = torch.arange(400) % 2
    apart = torch.randn(400, 5, generator=g) + 20.0 * domain[:, None]
    mixed = torch.randn(400, 5, generator=g)
    assert neighbourhood_mixing(apart, domain, 2)[0] < 0.01
    value, se = neighbourhood_mixing(mixed, domain, 2)
    assert value > 0.9 and 0 < se < 0.02
    assert math.isnan(neighbourhood_mixing(mixed[:2], domain[:2], 2)[0])


def _drive(model, records):
    """Feed ``records`` to the schedule; return how many epochs it ran."""
    schedule = model.schedule()
    next(schedule)
    for epoch, record in enumerate(records, start=1):
        try:
            schedule.send(record)
        except StopIteration:
            return epoch
    return len(records) + 1


FLAT = {"val_elbo": 100.0, "val_disc_ce": 0.1, "val_disc_acc": 0.6, "val_mixing": 0.5}


def test_training_stops_when_nothing_improves(integrate):
    model = IntegrationModel(integrate, max_epochs=200, patience=5, kl_warmup_epochs=1,
                             adv_warmup_epochs=1)
    assert _drive(model, [dict(FLAT)] * 100) == 6  # the first epoch sets the bests


@pytest.mark.parametrize("rising", ["val_disc_ce", "val_mixing"])
def test_training_goes_on_while_the_adversary_gains(integrate, rising):
    """A flat ELBO does not end training while the discriminator's validation loss or the
    validation neighbourhoods' mixing is still rising."""
    model = IntegrationModel(integrate, max_epochs=200, patience=5, kl_warmup_epochs=1,
                             adv_warmup_epochs=1)
    top = FLAT[rising] + 0.02 * 29
    records = [{**FLAT, rising: min(FLAT[rising] + 0.02 * i, top)} for i in range(100)]
    assert _drive(model, records) == 30 + 5


def test_training_goes_on_while_the_validation_elbo_falls(integrate):
    """From the first counted epoch on: the best validation ELBO starts at infinity, and a
    margin taken from it would never let an epoch count as an improvement."""
    model = IntegrationModel(integrate, max_epochs=200, patience=5, kl_warmup_epochs=1,
                             adv_warmup_epochs=1)
    bottom = FLAT["val_elbo"] - 0.1 * 29
    records = [{**FLAT, "val_elbo": max(FLAT["val_elbo"] - 0.1 * i, bottom)} for i in range(100)]
    assert _drive(model, records) == 30 + 5
    creeping = [{**FLAT, "val_elbo": FLAT["val_elbo"] - 1e-6 * i} for i in range(100)]
    assert _drive(model, creeping) == 6  # below the 1e-4 relative margin: stale


@pytest.mark.parametrize("training_elbo, rising", [("falls", "val_disc_ce"),
                                                   ("rises", "val_disc_ce"),
                                                   ("falls", "val_mixing")])
def test_the_adversary_keeps_a_fit_going_unless_the_vae_overfits(integrate, training_elbo,
                                                                 rising):
    """The discriminator's loss (or the mixing) rises until epoch 30; the validation ELBO is
    best at epoch 10 and worsens after it. If the training ELBO improves meanwhile, the VAE is
    fitting the training cells' noise, and training stops --patience epochs after the best;
    if it worsens too, mixing costs ELBO, and the adversary's gains keep the fit going. So do
    the domains still coming together: a rising validation mixing is not overfitting."""
    model = IntegrationModel(integrate, max_epochs=200, patience=5, kl_warmup_epochs=1,
                             adv_warmup_epochs=1)
    top = FLAT[rising] + 0.02 * 29
    sign = -1.0 if training_elbo == "falls" else 1.0
    records = [{**FLAT, rising: min(FLAT[rising] + 0.02 * i, top),
                "val_elbo": 100.0 - i if i < 10 else 91.0 + 0.5 * (i - 9),
                "elbo": 95.0 - i if i < 10 else 86.0 + sign * (i - 9)} for i in range(100)]
    stopped = _drive(model, records)
    if training_elbo == "falls" and rising == "val_disc_ce":
        assert stopped == 10 + 5 and model.overfitting_
        model.train_state_ = type("State", (), {"records": records[:stopped]})()
        assert model._summarise(1.0, 1.0)["stopped_overfitting"]
    else:  # once the mixing has settled too, the widening gap is called overfitting
        assert stopped == 30 + 5 and model.overfitting_ == (training_elbo == "falls")


def test_a_fit_cut_off_by_its_epoch_cap_while_gaining_says_so(integrate):
    model = IntegrationModel(integrate, max_epochs=20, patience=5, kl_warmup_epochs=1,
                             adv_warmup_epochs=1)
    falling = [{**FLAT, "val_elbo": FLAT["val_elbo"] - i} for i in range(20)]
    assert _drive(model, falling) == 20 and model.still_gaining_  # ran to the cap
    model.train_state_ = type("State", (), {"records": falling})()
    summary = model._summarise(1.0, 1.0)
    assert summary["still_gaining"] and "--max-epochs" in summary["warnings"][-1]
    settled = IntegrationModel(integrate, max_epochs=20, patience=5, kl_warmup_epochs=1,
                               adv_warmup_epochs=1)
    assert _drive(settled, [dict(FLAT)] * 20) == 6 and not settled.still_gaining_


def test_without_max_epochs_a_fit_still_gaining_may_run_to_twice_the_plan(integrate):
    """The warm-ups are laid out over the planned epochs; the cap is twice that, so the
    stopping rule, not the plan, ends a fit that still improves."""
    model = IntegrationModel(integrate, patience=5)
    plan = model.warmup_epochs
    assert model.max_epochs == 2 * plan and model.planned_epochs == plan
    schedule, kl = model.schedule(), []
    kl.append(next(schedule).ctx["kl_weight"])
    for i in range(3 * plan):
        try:
            kl.append(schedule.send({**FLAT, "val_elbo": FLAT["val_elbo"] - i}).ctx["kl_weight"])
        except StopIteration:
            break
    assert len(kl) == 2 * plan  # ran to the cap
    assert kl[plan // 4 - 2] < model.config.beta_kl == kl[plan // 4 - 1]  # warm over the plan
    given = IntegrationModel(integrate, max_epochs=40)
    assert given.max_epochs == given.warmup_epochs == 40  # --max-epochs is the cap


def test_the_room_past_the_plan_stays_within_the_cells_seen_budget():
    """An atlas's few planned epochs are not doubled: no patience could end them early."""
    assert epoch_cap(100, 6_000) == 200
    assert epoch_cap(100, 60_000) == 134  # 8 x 10^6 cells seen
    assert epoch_cap(8, 1_000_000) == 8  # the plan itself, never less
    assert epoch_cap(375, 450) == 750


def test_minibatches_hold_at_most_128_cells(integrate):
    """The adversarial game needs steps: 256-cell batches left a few thousand cells about 17
    steps an epoch. Small data keep at least ~8 steps an epoch."""
    rng = np.random.default_rng(0)
    many = ad.AnnData(rng.poisson(2.0, (4000, 30)).astype(np.float32))
    many.obs["batch"] = np.repeat(["a", "b"], 2000)
    assert IntegrationModel(many).config.batch_size == 128
    assert IntegrationModel(integrate).config.batch_size == 64  # 540 training cells


def test_a_discriminator_worse_than_chance_is_not_progress(integrate):
    """Held-out CE rising above ln K means the encoders made the discriminator confidently
    wrong (overshoot), not the domains more mixed."""
    model = IntegrationModel(integrate, max_epochs=200, patience=5, kl_warmup_epochs=1,
                             adv_warmup_epochs=1)
    chance = math.log(2)
    records = [{**FLAT, "val_disc_ce": chance + 0.02 * i} for i in range(100)]
    assert _drive(model, records) == 6


def test_a_mixing_rise_within_its_noise_is_not_progress(integrate):
    model = IntegrationModel(integrate, max_epochs=200, patience=5, kl_warmup_epochs=1,
                             adv_warmup_epochs=1)
    records = [{**FLAT, "val_mixing": 0.5 + 0.02 * i, "val_mixing_se": 0.2} for i in range(100)]
    assert _drive(model, records) == 6  # 0.02 a step against a noise of 0.4: stale
    records = [{**r, "val_mixing_se": 0.005} for r in records]
    assert _drive(model, records) == 101  # the same rise, measured precisely: progress


def test_training_goes_on_while_the_domains_are_told_apart(integrate):
    model = IntegrationModel(integrate, max_epochs=60, patience=5, kl_warmup_epochs=1,
                             adv_warmup_epochs=1)
    assert _drive(model, [{**FLAT, "val_disc_acc": 0.97}] * 80) == 60  # ran to max_epochs


def _batch(n=48, genes=10, domains=3):
    torch.manual_seed(0)
    counts = torch.poisson(torch.full((n, genes), 4.0))
    library = counts.sum(1)
    return {"counts": counts, "library": library,
            "x_norm": torch.log1p(counts / library[:, None] * 1e4),
            "domain": torch.arange(n) % domains}


def _lrs(module):
    return {name: 1e-2 for name in module.players()}


def test_under_gradient_reversal_the_discriminator_takes_its_extra_steps():
    module = PairedVAE(10, 4, 16, 3, "nb")
    module.d_steps = 3
    strategy = Simultaneous(module, _lrs(module))
    strategy.step(_batch(), ("vae", "discriminator"), {"kl_weight": 1.0, "adv_weight": 1.0})
    steps = lambda name: max(int(s["step"]) for s in strategy.optimizers[name].state.values())
    assert steps("discriminator") == 3 and steps("vae") == 1


@pytest.mark.parametrize("tie", [0.0, 0.5, 1.0])
def test_the_paired_design_is_tied_towards_the_domains_average(tie):
    module = PairedVAE(10, 4, 16, 3, "nb", paired=True, tie=tie)
    first = [p.detach().clone() for p in module.encoders.parameters()]
    strategy = Simultaneous(module, _lrs(module))
    for _ in range(3):
        strategy.step(_batch(), ("vae", "discriminator"), {"kl_weight": 1.0, "adv_weight": 1.0})
    gaps = [max((a - b).abs().max().item() for a, b in zip(module.encoders[0].parameters(),
                                                           other.parameters()))
            for other in module.encoders[1:]]
    moved = any(not torch.equal(a, b) for a, b in zip(first, module.encoders.parameters()))
    assert moved
    if tie == 1.0:
        assert max(gaps) < 1e-6  # identical encoders
    elif tie == 0.0:
        assert max(gaps) > 1e-4  # each domain's VAE learns on its own


def test_a_shared_design_has_nothing_to_tie():
    module = PairedVAE(10, 4, 16, 2, "nb", tie=0.5)
    snap = copy.deepcopy(module.state_dict())
    module.after_step(["vae"])
    assert all(torch.equal(snap[k], v) for k, v in module.state_dict().items())


def test_the_summary_warns_when_the_held_out_domains_are_told_apart(integrate):
    model = IntegrationModel(integrate, latent_dim=4, max_epochs=2).train()
    model.train_state_.records[-1]["val_disc_acc"] = 0.99
    model.active_dims = lambda: 4  # a spread latent space (two epochs leave it near one point)
    summary = model._summarise(1.0, 1.0)
    assert any("not mixed" in w and "99%" in w for w in summary["warnings"])
    assert "val_disc_acc" in model.fit_summary()["final_losses"]


@pytest.mark.parametrize("tie", [-0.1, 1.5, float("nan")])
def test_a_tie_outside_zero_to_one_is_refused(integrate, tie):
    from advcli.errors import InputError

    with pytest.raises(InputError, match="--tie"):
        IntegrationModel(integrate, design="paired", tie=tie)


def test_a_collapsed_latent_space_is_its_own_warning_not_a_mixing_one(integrate):
    model = IntegrationModel(integrate, latent_dim=4, max_epochs=2).train()
    summary = model._summarise(1.0, 1.0)
    assert summary["active_dims"] == model.active_dims() and 0 <= summary["active_dims"] <= 4
    model.active_dims = lambda: 0
    model.mixing_scores = lambda: (0.0, 0.0, {"a": 0.0, "b": 0.0})  # what a collapse looks like
    warnings = model._summarise(1.0, 1.0)["warnings"]
    assert any("latent space collapsed" in w and "--composition-clusters 0" in w
               for w in warnings)
    assert not any("not mixed" in w for w in warnings)


def test_a_collapsed_fit_restarts_once_with_the_adversary_unweighted(integrate, tmp_path):
    model = IntegrationModel(integrate, latent_dim=4, max_epochs=40, patience=1)
    first = model.module
    model.active_dims = lambda: 0  # collapsed after the first fit, and after the restart too
    model.train()
    assert model.module is not first and model.module.composition is None
    summary = model.fit_summary()
    first_epochs = summary["restarted_unweighted_after"]
    assert first_epochs < 40 and "composition_weights" not in summary  # stopped by the rule
    assert any("restarted" in w for w in summary["warnings"])  # once: the second run stands
    assert any("latent space collapsed" in w and "lower --adv-weight" in w
               and "--composition-clusters 0 (" not in w for w in summary["warnings"])
    model.save(tmp_path / "m.pt")
    again = IntegrationModel.load(tmp_path / "m.pt", integrate)
    assert again.unweighted_ and again.restarted_after_ == first_epochs


@pytest.mark.parametrize("active, max_epochs", [(4, 40), (0, 2)])
def test_a_fit_that_did_not_collapse_or_ran_to_its_cap_is_not_restarted(integrate, active,
                                                                        max_epochs):
    model = IntegrationModel(integrate, latent_dim=4, max_epochs=max_epochs, patience=1)
    first = model.module
    model.active_dims = lambda: active
    summary = model.train().fit_summary()
    assert model.module is first and summary["restarted_unweighted_after"] is None
    assert "composition_weights" in summary


def test_the_warning_leaves_out_the_discriminator_without_held_out_cells(integrate):
    model = IntegrationModel(integrate, latent_dim=4, max_epochs=2, val_fraction=0.0).train()
    model.active_dims = lambda: 4  # a spread latent space (two epochs leave it near one point)
    model.mixing_scores = lambda: (0.0, 0.0, {"a": 0.0, "b": 0.0})  # an unmixed embedding
    warning = " ".join(model._summarise(1.0, 1.0)["warnings"])
    assert "not mixed" in warning and "nan" not in warning
    model.mixing_scores = lambda: (0.3, 0.3, {"a": 0.3, "b": 0.3})  # a third of random mixing
    warnings = model._summarise(1.0, 1.0)["warnings"]
    assert len(warnings) == 1 and "only partly mixed" in warnings[0] and "30%" in warnings[0]


def test_a_reference_with_types_the_query_lacks_is_not_called_unmixed(integrate):
    """Most cells may lie apart from other domains in a fit that worked, when one domain holds
    types the others lack: the domains' own medians say so, and the summary does not claim the
    adversary lost or ask for a higher weight. Where every domain lies apart, or the
    discriminator still separates held-out cells, it does."""
    model = IntegrationModel(integrate, latent_dim=4, max_epochs=2).train()
    model.train_state_.records[-1]["val_disc_acc"] = 0.55
    model.active_dims = lambda: 4  # a spread latent space (two epochs leave it near one point)
    model.mixing_scores = lambda: (0.0, 0.0, {"reference": 0.0, "query": 0.7})
    summary = model._summarise(1.0, 1.0)
    assert summary["mixing_ilisi_by_domain"] == {"reference": 0.0, "query": 0.7}
    (warning,) = [w for w in summary["warnings"] if "iLISI" in w]
    assert "the typical cell of query does" in warning and "reference holds cell states" in warning
    assert "adversary lost" not in warning
    model.mixing_scores = lambda: (0.0, 0.0, {"reference": 0.0, "query": 0.02})
    (warning,) = [w for w in model._summarise(1.0, 1.0)["warnings"] if "iLISI" in w]
    assert "not mixed" in warning and "adversary lost" in warning
    model.mixing_scores = lambda: (0.0, 0.0, {"reference": 0.0, "query": 0.7})
    model.train_state_.records[-1]["val_disc_acc"] = 0.95
    (warning,) = [w for w in model._summarise(1.0, 1.0)["warnings"] if "iLISI" in w]
    assert "not mixed" in warning and "95%" in warning


def test_active_dimensions_counts_the_dimensions_the_cells_spread_along():
    from advcli.metrics import active_dimensions

    rng = np.random.default_rng(0)
    spread = rng.normal(size=(500, 5)) * np.array([1.0, 0.5, 0.2, 0.05, 0.0])
    assert active_dimensions(spread) == 3  # variances 1, 0.25, 0.04 above 0.01; 0.0025, 0 not
    assert active_dimensions(0.9 + 0.003 * rng.normal(size=(500, 10))) == 0


def test_each_domains_median_ilisi_tells_a_query_of_shared_types_from_domains_apart():
    """A reference of ten types and a query holding three of them, mixed: the overall median
    iLISI is that of unmixed domains, the query's own median is not; held apart, neither is."""
    from advcli.metrics import integration_metrics, is_unmixed, mixing_note

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 5)) * 30.0
    ref_types, query_types = rng.choice(10, 3000), rng.choice(3, 600)
    points = np.vstack([centres[ref_types], centres[query_types]]) + rng.normal(size=(3600, 5))
    batch = np.r_[["reference"] * 3000, ["query"] * 600]
    mixed = integration_metrics(points, batch, None)
    assert is_unmixed(mixed["ilisi"], mixed["ilisi_random_mixing"])
    assert not is_unmixed(mixed["ilisi_by_domain"]["query"], mixed["ilisi_random_mixing"])
    note = mixing_note(mixed["ilisi"], mixed["ilisi_random_mixing"], mixed["mixing_fraction"],
                       mixed["ilisi_by_domain"])
    assert note.startswith("Most cells have no neighbours") and "reference holds" in note
    apart = integration_metrics(points + (batch == "query")[:, None] * 100.0, batch, None)
    assert max(apart["ilisi_by_domain"].values()) < 0.01
    note = mixing_note(apart["ilisi"], apart["ilisi_random_mixing"], apart["mixing_fraction"],
                       apart["ilisi_by_domain"])
    assert note.startswith("The domains are not mixed")
    assert mixing_note(0.5, 1.0, 0.9, {"a": 0.5, "b": 0.5}) is None


def test_a_minority_domain_left_apart_is_named_though_the_typical_cell_mixed():
    """Two domains mixed and a third, a tenth of the cells, apart: the overall medians pass
    over it, its own median does not."""
    from advcli.metrics import integration_metrics, mixing_note

    rng = np.random.default_rng(0)
    points = rng.normal(size=(2200, 3))
    batch = np.r_[["a"] * 1000, ["b"] * 1000, ["c"] * 200]
    points[batch == "c"] += 100.0
    m = integration_metrics(points, batch, None)
    note = mixing_note(m["ilisi"], m["ilisi_random_mixing"], m["mixing_fraction"],
                       m["ilisi_by_domain"])
    assert note.startswith("The typical cell of c has no neighbours from another domain")
    assert "a," not in note and "Refit with a higher --adv-weight" in note
    mixed = integration_metrics(rng.normal(size=(2200, 3)), batch, None)
    assert mixing_note(mixed["ilisi"], mixed["ilisi_random_mixing"], mixed["mixing_fraction"],
                       mixed["ilisi_by_domain"]) is None


def test_mixing_fraction_is_relative_to_the_domains_sizes():
    """Random mixing of domains of very unequal sizes scores near 1 (iLISI would not), domains
    apart score 0, and one domain-specific type in a minority of cells leaves the median."""
    from advcli.metrics import knn, mixing_fraction

    rng = np.random.default_rng(0)
    codes = rng.choice(3, 3000, p=[10 / 14, 3 / 14, 1 / 14])
    points = rng.normal(size=(3000, 2))
    _, idx = knn(points, 50)
    assert mixing_fraction(idx, codes, 3) > 0.9
    apart = points + codes[:, None] * 100.0
    _, idx = knn(apart, 50)
    assert mixing_fraction(idx, codes, 3) == 0.0
    extra = np.vstack([points, rng.normal(size=(500, 2)) + 100.0])  # a type in domain 0 only
    _, idx = knn(extra, 50)
    assert mixing_fraction(idx, np.r_[codes, np.zeros(500, int)], 3) > 0.85


def test_unmixed_is_judged_against_random_mixing_of_the_domains_sizes():
    """A 10:1 pair mixed at random reaches an iLISI of about 0.2, not 1: that is mixed, and the
    same pair held apart is not."""
    from advcli.metrics import integration_metrics, is_unmixed, random_mixing_ilisi

    assert random_mixing_ilisi(np.r_[np.zeros(50, int), np.ones(50, int)], 2) == pytest.approx(1)
    rng = np.random.default_rng(0)
    codes = np.r_[np.zeros(2000, int), np.ones(200, int)]
    assert random_mixing_ilisi(codes, 2) == pytest.approx(1 / (1 - 2 * 10 / 121) - 1)
    batch = np.array(["big", "small"])[codes]
    points = rng.normal(size=(len(codes), 3))
    mixed = integration_metrics(points, batch, None)
    assert mixed["ilisi"] < 0.25 and mixed["ilisi_random_mixing"] == pytest.approx(0.198, abs=1e-3)
    assert not is_unmixed(mixed["ilisi"], mixed["ilisi_random_mixing"])
    apart = integration_metrics(points + codes[:, None] * 100.0, batch, None)
    assert is_unmixed(apart["ilisi"], apart["ilisi_random_mixing"])


def test_the_summary_judges_mixing_by_the_domains_sizes(integrate):
    """The same iLISI is a warning for equal domains and a mixed fit for a 10:1 pair."""
    a = integrate[np.r_[0:300, 300:330]].copy()  # domains of 300 and 30 cells
    model = IntegrationModel(a, latent_dim=4, max_epochs=2, val_fraction=0.0).train()
    model.active_dims = lambda: 4  # a spread latent space (two epochs leave it near one point)
    model.mixing_scores = lambda: (0.09, 0.9, {})
    summary = model._summarise(1.0, 1.0)
    assert summary["mixing_ilisi_random"] == pytest.approx(1 / (1 - 2 * 300 * 30 / 330 ** 2) - 1)
    assert not summary["warnings"]
    model.mixing_scores = lambda: (0.01, 0.9, {})
    assert any("not mixed" in w and "would give 0.20" in w
               for w in model._summarise(1.0, 1.0)["warnings"])


@pytest.mark.parametrize("backed", [False, True])
def test_an_epoch_shows_every_training_cell_once(tmp_path, integrate, backed, monkeypatch):
    """Minibatches follow the data: each training cell once per epoch, none of the held-out
    cells, so a small domain is not replayed (it comes in its own proportion)."""
    import advcli
    from advcli import backed as backed_rows

    a = integrate[np.r_[0:300, 300:360]].copy()  # domains of 300 and 60 cells
    if backed:
        monkeypatch.setattr(backed_rows, "CHUNK_ROWS", 32)  # several buffers, each shuffled
        monkeypatch.setattr(backed_rows, "BUFFER_ROWS", 128)
        path = tmp_path / "d.h5ad"
        a.write_h5ad(path)
        a = advcli.read_backed(path)
    model = IntegrationModel(a, batch_size=64, seed=0)
    epoch = torch.cat(model.batches(torch.Generator().manual_seed(1))).numpy()
    training = np.setdiff1d(np.arange(360), model._val_idx.numpy())
    assert np.array_equal(np.sort(epoch), training)
    steps = len(model.batches(torch.Generator()))
    assert model.steps_per_epoch == math.ceil(len(training) / 64)
    assert steps == model.steps_per_epoch if not backed else steps <= model.steps_per_epoch + 3


def _clusters(shares: list[list[int]], seed: int = 0):
    """Posterior means in well-separated clusters; shares[c][d]: cells of domain d in c."""
    rng = np.random.default_rng(seed)
    means, domain, cluster = [], [], []
    for c, counts in enumerate(shares):
        for d, n in enumerate(counts):
            means.append(rng.normal(0.0, 0.1, (n, 3)) + 10.0 * np.eye(3)[c % 3] * (1 + c // 3))
            domain += [d] * n
            cluster += [c] * n
    return np.concatenate(means).astype(np.float32), np.array(domain), np.array(cluster)


def _weighted_shares(weights, means, domain, cluster):
    w = weights(torch.from_numpy(means), torch.from_numpy(domain))[0].numpy()
    return w, {c: np.bincount(domain[cluster == c], w[cluster == c], minlength=2)
               / w[cluster == c].sum() for c in np.unique(cluster)}


def test_composition_weights_give_each_domain_its_overall_share_in_every_cluster():
    """Two shared types held 4:1 and 1:4, a third in domain 0 only: weighted, both shared
    clusters hold the domains at their overall shares, the private cluster keeps weight one
    (also for a cell of the other domain that strays into it), and the weights average to one
    over the cells."""
    means, domain, cluster = _clusters([[2400, 600], [600, 2400], [1800, 0]])
    weights = CompositionWeights.fit(means, domain, 2, k=3, seed=0)
    w, shares = _weighted_shares(weights, means, domain, cluster)
    overall = np.bincount(domain) / len(domain)
    for c in (0, 1):
        np.testing.assert_allclose(shares[c], overall, atol=0.02)
    np.testing.assert_allclose(w[cluster == 2], 1.0, atol=1e-5)
    assert abs(w.mean() - 1.0) < 1e-5
    stray = torch.from_numpy(means[cluster == 2][:1])  # a domain-1 cell among domain 0's type
    weight, scarce = weights(stray, torch.tensor([1]))
    assert weight.item() == 1.0 and scarce.item()  # domain 1 is scarce in the private cluster
    # in the shared clusters neither domain is scarce, 4:1 though they are held
    _, scarce = weights(torch.from_numpy(means), torch.from_numpy(domain))
    assert not scarce[torch.from_numpy(cluster < 2)].any()
    assert not scarce[torch.from_numpy((cluster == 2) & (domain == 0))].any()


def test_composition_weights_are_one_where_the_compositions_agree():
    means, domain, cluster = _clusters([[300, 600], [200, 400], [100, 200]])
    weights = CompositionWeights.fit(means, domain, 2, k=3, seed=0)
    w, _ = _weighted_shares(weights, means, domain, cluster)
    np.testing.assert_allclose(w, 1.0, atol=1e-5)


def test_composition_weights_survive_a_checkpoint_and_fewer_cells_than_clusters():
    means, domain, _ = _clusters([[3, 2]])
    weights = CompositionWeights.fit(means, domain, 2, k=10, seed=0)
    assert weights.table.shape == (2, 5)  # at most one cluster per cell
    again = CompositionWeights.from_state(weights.state())
    z, d = torch.from_numpy(means), torch.from_numpy(domain)
    for kept, fitted in zip(again(z, d), weights(z, d)):
        assert torch.equal(kept, fitted)
    older = {k: v for k, v in weights.state().items() if k != "scarce"}
    assert not CompositionWeights.from_state(older)(z, d)[1].any()  # a checkpoint from before


def test_the_adversary_is_weighted_by_composition_unless_turned_off(integrate, tmp_path):
    model = IntegrationModel(integrate, latent_dim=4, max_epochs=2).train()
    assert model.module.composition.table.shape == (2, 10)
    shown = model.fit_summary()["composition_weights"]
    assert shown["clusters"] == 10 and 0.1 <= shown["min"] <= 1.0 <= shown["max"] <= 10.0
    model.save(tmp_path / "m.pt")
    loaded = IntegrationModel.load(tmp_path / "m.pt", integrate)
    assert torch.equal(loaded.module.composition.table, model.module.composition.table)
    off = IntegrationModel(integrate, latent_dim=4, max_epochs=2, composition_clusters=0).train()
    assert off.module.composition is None


def _saved_without(key: str, adata, tmp_path, **options):
    """A trained model and the path of its file with ``key`` taken out of the saved config, as
    a file written before that option existed."""
    model = IntegrationModel(adata, latent_dim=4, max_epochs=2, **options).train()
    model.save(tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=False)
    del payload["config"][key]
    torch.save(payload, tmp_path / "old.pt")
    return model, tmp_path / "old.pt"


def test_a_model_file_from_before_composition_weights_resumes_unweighted(integrate, tmp_path):
    _, path = _saved_without("composition_clusters", integrate, tmp_path, composition_clusters=0)
    old = IntegrationModel.load(path, integrate)
    assert old.config.composition_clusters == 0


def test_the_decoder_has_two_hidden_layers_unless_asked(integrate):
    def hidden_layers(model):
        return sum(isinstance(m, torch.nn.Linear) for m in model.module.decoders[0].hidden)

    assert hidden_layers(IntegrationModel(integrate, latent_dim=4)) == 2
    assert hidden_layers(IntegrationModel(integrate, latent_dim=4, decoder_layers=1)) == 1
    with pytest.raises(InputError, match="--decoder-layers must be positive"):
        IntegrationModel(integrate, decoder_layers=0)


def test_a_model_file_from_before_the_decoder_option_predicts_with_two_layers(integrate, tmp_path):
    model, path = _saved_without("decoder_layers", integrate, tmp_path)
    old = IntegrationModel.load(path)
    assert old.config.decoder_layers == 2
    np.testing.assert_allclose(old.get_latent_representation(integrate),
                               model.get_latent_representation(integrate), atol=1e-5)


def test_free_bits_change_the_training_loss_but_not_the_elbo():
    """The floor is on what is penalised; the ELBO the stopping rule and the summary read is the
    plain one."""
    module = PairedVAE(10, 4, 16, 3, "nb").eval()  # eval: no dropout, the same posterior twice
    batch = _batch()
    torch.manual_seed(0)
    plain = module.elbo_terms(batch, beta_kl=1.0)
    module.kl_free_bits = 1.0
    torch.manual_seed(0)
    floored = module.elbo_terms(batch, beta_kl=1.0)
    assert torch.allclose(floored["elbo"], plain["elbo"])
    assert torch.allclose(floored["kl"], plain["kl"])
    # an untrained encoder's dimensions carry well under a nat: each counts as one
    assert plain["kl"].item() < 4.0
    assert torch.allclose(floored["loss"], floored["recon"] + 4.0)


def test_every_latent_dimension_has_free_bits_unless_asked(integrate):
    assert IntegrationModel(integrate, latent_dim=4).module.kl_free_bits == 1.0
    assert IntegrationModel(integrate, latent_dim=4, kl_free_bits=0).module.kl_free_bits == 0.0
    with pytest.raises(InputError, match="--kl-free-bits"):
        IntegrationModel(integrate, kl_free_bits=-1)
    with pytest.raises(InputError, match="--kl-free-bits"):
        IntegrationModel(integrate, kl_free_bits=float("nan"))


def test_a_model_file_from_before_free_bits_resumes_without_them(integrate, tmp_path):
    _, path = _saved_without("kl_free_bits", integrate, tmp_path)
    old = IntegrationModel.load(path, integrate)
    assert old.config.kl_free_bits == 0.0 and old.module.kl_free_bits == 0.0


def test_input_thinning_reads_a_shallower_copy_of_each_cell_in_training_only():
    module = PairedVAE(200, 4, 16, 3, "nb")
    torch.manual_seed(0)
    counts = torch.poisson(torch.full((48, 200), 3.0))
    batch = {"counts": counts, "library": counts.sum(1), "x_norm": log_normalised(counts),
             "domain": torch.arange(48) % 3}
    assert module.train().encoder_input(batch) is batch["x_norm"]  # off by default here
    module.input_thinning = 0.5
    assert module.eval().encoder_input(batch) is batch["x_norm"]  # inference: the observed cell
    torch.manual_seed(1)
    thinned = module.train().encoder_input(batch)
    torch.manual_seed(1)
    assert torch.equal(module.encoder_input(batch), thinned)  # seeded
    assert not torch.allclose(thinned, batch["x_norm"])
    # thinning only takes counts away: no gene the cell lacked appears, and fewer are detected
    assert not thinned[batch["x_norm"] == 0].any()
    assert ((thinned > 0).sum(1) <= (batch["x_norm"] > 0).sum(1)).all()
    assert ((thinned > 0).sum() < (batch["x_norm"] > 0).sum())


def test_input_thinning_is_checked_and_absent_from_older_model_files(integrate, tmp_path):
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(InputError, match="--input-thinning"):
            IntegrationModel(integrate, input_thinning=bad)
    model = IntegrationModel(integrate, latent_dim=4, input_thinning=0.3)
    assert model.module.input_thinning == 0.3
    _, path = _saved_without("input_thinning", integrate, tmp_path, input_thinning=0.3)
    old = IntegrationModel.load(path, integrate)
    assert old.config.input_thinning == 0.0 and old.module.input_thinning == 0.0


def test_batch_norm_trains_saves_and_predicts_like_the_saved_model(integrate, tmp_path):
    model = IntegrationModel(integrate, latent_dim=4, max_epochs=2, norm="batch").train()
    norms = [m for m in model.module.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(norms) == 4 and all(m.num_batches_tracked > 0 for m in norms)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.module.modules())
    model.save(tmp_path / "m.pt")
    loaded = IntegrationModel.load(tmp_path / "m.pt")
    assert loaded.config.norm == "batch"
    np.testing.assert_allclose(loaded.get_latent_representation(integrate),
                               model.get_latent_representation(integrate), atol=1e-5)
    with pytest.raises(InputError, match="--norm"):
        IntegrationModel(integrate, norm="group")


def test_the_decoder_can_be_normalised_apart_from_the_encoder(integrate, tmp_path):
    """``decoder_norm`` none: LayerNorm in the encoder only; saved and loaded alike. A file
    from before the option loads with the decoder normalised as the encoder."""
    model = IntegrationModel(integrate, latent_dim=4, max_epochs=2, decoder_norm="none").train()
    encoder, decoder = model.module.encoders[0], model.module.decoders[0]
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in encoder.modules()) == 2
    assert not any(isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm1d))
                   for m in decoder.modules())
    model.save(tmp_path / "m.pt")
    loaded = IntegrationModel.load(tmp_path / "m.pt")
    assert loaded.config.decoder_norm == "none"
    np.testing.assert_allclose(loaded.get_latent_representation(integrate),
                               model.get_latent_representation(integrate), atol=1e-5)
    _, path = _saved_without("decoder_norm", integrate, tmp_path, norm="batch")
    old = IntegrationModel.load(path, integrate)
    assert old.config.decoder_norm == "batch"
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in old.module.decoders[0].modules()) == 2
    with pytest.raises(InputError, match="--decoder-norm"):
        IntegrationModel(integrate, decoder_norm="group")


def test_the_default_decoder_is_layer_normalised_after_its_first_hidden_layer(integrate,
                                                                                tmp_path):
    """The default is written into the config, so the file says how the model was trained; a
    file whose config leaves it open (saved before this default) loads with the decoder
    normalised after every hidden layer, as such files were trained."""
    model = IntegrationModel(integrate, latent_dim=4, max_epochs=2)
    assert model.config.decoder_norm == "layer-first"
    count = lambda net, kind: sum(isinstance(m, kind) for m in net.modules())  # noqa: E731
    assert count(model.module.encoders[0], torch.nn.LayerNorm) == 2
    assert count(model.module.decoders[0], torch.nn.LayerNorm) == 1
    assert IntegrationModel(integrate, latent_dim=4, norm="batch").config.decoder_norm == "batch"
    model.train().save(tmp_path / "m.pt")
    assert torch.load(tmp_path / "m.pt", weights_only=False)["config"]["decoder_norm"] == \
        "layer-first"
    trained = IntegrationModel(integrate, latent_dim=4, max_epochs=2, decoder_norm="layer").train()
    trained.save(tmp_path / "layer.pt")
    payload = torch.load(tmp_path / "layer.pt", weights_only=False)
    payload["config"]["decoder_norm"] = None
    torch.save(payload, tmp_path / "before.pt")
    before = IntegrationModel.load(tmp_path / "before.pt")
    assert before.config.decoder_norm == "layer"
    assert count(before.module.decoders[0], torch.nn.LayerNorm) == 2
    np.testing.assert_allclose(before.get_latent_representation(integrate),
                               trained.get_latent_representation(integrate), atol=1e-5)


def test_batch_norm_with_paired_encoders_and_a_one_cell_tail(integrate):
    """Per-domain encoders see their domain's share of each minibatch, which can be one cell."""
    n_train = IntegrationModel(integrate, latent_dim=4).n_train
    model = IntegrationModel(integrate, latent_dim=4, max_epochs=1, norm="batch",
                             design="paired", batch_size=n_train - 1)
    assert [len(b) for b in model.batches(torch.Generator().manual_seed(0))] == [n_train - 1, 1]
    model.train()
    assert np.isfinite(model.get_latent_representation(integrate)).all()


def test_a_model_file_from_before_the_norm_option_loads_with_layer_norm(integrate, tmp_path):
    model, path = _saved_without("norm", integrate, tmp_path)
    old = IntegrationModel.load(path)
    assert old.config.norm == "layer"
    np.testing.assert_allclose(old.get_latent_representation(integrate),
                               model.get_latent_representation(integrate), atol=1e-5)


def test_cell_types_count_as_less_separated_only_beyond_the_tolerance():
    from advcli.metrics import TYPES_KEPT_TOLERANCE, types_less_separated, types_mixed_note

    pca = {"clisi": 0.980, "label_asw": 0.60}
    assert types_less_separated({"clisi": 0.978, "label_asw": 0.65}, pca) == []
    assert types_less_separated({"clisi": 0.929, "label_asw": 0.65}, pca) == ["clisi"]
    worse = {"clisi": 0.9, "label_asw": 0.60 - 2 * TYPES_KEPT_TOLERANCE}
    assert types_less_separated(worse, pca) == ["clisi", "label_asw"]
    assert types_less_separated({"ilisi": 0.5}, pca) == []  # no labels, nothing to judge
    note = types_mixed_note(worse, pca)
    assert "cLISI 0.900 against 0.980" in note and "label ASW 0.580 against 0.600" in note


def test_two_types_laid_on_one_another_are_named_and_small_or_kept_types_are_not():
    from advcli.metrics import JOINED_NEIGHBOURS, types_brought_together

    rng = np.random.default_rng(0)
    tiny = JOINED_NEIGHBOURS - 5  # its neighbours are 5 or more other cells wherever it lies
    labels = np.repeat(["a", "b", "c", "tiny"], [60, 80, 60, tiny])
    apart = {"a": 0.0, "b": 10.0, "c": 20.0, "tiny": 40.0}
    baseline = np.array([apart[t] for t in labels])[:, None] + rng.normal(size=(len(labels), 3))
    assert types_brought_together(baseline, baseline, labels) == []
    joined = baseline.copy()
    joined[labels == "b"] -= 10.0  # b laid on a
    joined[labels == "tiny"] -= 45.0  # the tiny type's nearest others are now a's, not c's
    pairs = types_brought_together(joined, baseline, labels)
    assert {(p["type"], p["with"]) for p in pairs} == {("a", "b"), ("b", "a")}
    assert all(p["share"] >= 0.25 and p["share_unintegrated"] == 0.0 for p in pairs)


def test_the_chance_cap_applies_only_where_the_domain_is_scarce():
    """Two cells the discriminator puts far past chance: the one whose domain is scarce where
    it lies gains only chance, the other negce's full cross-entropy."""
    module = PairedVAE(5, 3, 8, 2, "nb", adv_loss="chance")
    logits = torch.tensor([[-4.0, 4.0], [-4.0, 4.0]], requires_grad=True)
    domain = torch.tensor([0, 0])
    loss = module.adversarial(logits, domain, None, scarce=torch.tensor([True, False]))
    ce = torch.nn.functional.cross_entropy(logits, domain, reduction="none")
    assert math.isclose(loss.item(), -(math.log(2.0) + ce[1].item()) / 2, rel_tol=1e-6)
    loss.backward()
    assert (logits.grad[0] == 0).all() and (logits.grad[1] != 0).all()


def test_the_chance_capped_adversary_takes_the_domains_shares_from_the_data(integrate, tmp_path):
    """Chance for each cell is its domain's share of the cells, not 1/K; the shares are not
    part of the model file (it predicts the same) and come back from the data on loading."""
    part = integrate[100:].copy()  # 200 cells of one domain, 300 of the other
    model = IntegrationModel(part, latent_dim=4, max_epochs=2, adv_loss="chance").train()
    _, codes = np.unique(part.obs["batch"], return_inverse=True)
    expected = np.bincount(codes) / len(codes)
    assert np.allclose(model.module.domain_shares.cpu().numpy(), expected)
    assert "domain_shares" not in model.module.state_dict()
    even = torch.zeros(1, 2)  # the discriminator at p = 1/2 for either domain
    small, large = int(np.argmin(expected)), int(np.argmax(expected))
    # the smaller domain (share 0.4) is still recognised at 1/2: negce's full -ln 2
    loss = model.module.adversarial(even, torch.tensor([small]), None)
    assert math.isclose(loss.item(), -math.log(2.0), rel_tol=1e-6)
    # the larger (share 0.6) is past chance at 1/2: capped at -ln(1 / 0.6)
    loss = model.module.adversarial(even, torch.tensor([large]), None)
    assert math.isclose(loss.item(), math.log(expected[large]), rel_tol=1e-6)
    model.save(tmp_path / "m.pt")
    loaded = IntegrationModel.load(tmp_path / "m.pt", part)
    assert np.allclose(loaded.get_latent_representation(), model.get_latent_representation(),
                       atol=1e-5)
    assert loaded.config.adv_loss == "chance"
    assert np.allclose(loaded.module.domain_shares.cpu().numpy(), expected)
