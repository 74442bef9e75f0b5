import math

import numpy as np
import pytest
import torch
from scipy import stats

from advcli import losses


def test_nb_log_prob_matches_scipy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 40, (50, 7)).astype(float)
    mu = rng.uniform(0.1, 30.0, (50, 7))
    theta = rng.uniform(0.2, 8.0, 7)
    ours = losses.nb_log_prob(torch.tensor(y), torch.log(torch.tensor(mu)), torch.tensor(theta))
    # scipy's nbinom(n, p): n = theta, p = theta / (theta + mu)
    ref = stats.nbinom.logpmf(y, theta, theta / (theta + mu))
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-9, atol=1e-9)
    nll = losses.nb_nll(torch.tensor(y), torch.log(torch.tensor(mu)), torch.tensor(theta))
    assert math.isclose(nll.item(), -ref.mean(), rel_tol=1e-9)


def test_nb_log_prob_is_stable_for_large_means():
    out = losses.nb_log_prob(torch.tensor([[5.0]]), torch.tensor([[80.0]]), torch.tensor([2.0]))
    assert torch.isfinite(out).all()


def test_nb_log_prob_with_a_per_domain_table_matches_scipy():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 40, (60, 5)).astype(float)
    mu = rng.uniform(0.1, 30.0, (60, 5))
    table = rng.uniform(0.2, 8.0, (3, 5))  # one inverse dispersion per domain and gene
    rows = rng.integers(0, 3, 60)
    ours = losses.nb_log_prob(torch.tensor(y), torch.log(torch.tensor(mu)), torch.tensor(table),
                              rows=torch.tensor(rows))
    theta = table[rows]
    ref = stats.nbinom.logpmf(y, theta, theta / (theta + mu))
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-9, atol=1e-9)


def test_dbpr_rewards_a_z_that_improves_prediction():
    torch.manual_seed(0)
    n, g = 400, 5
    z = torch.randint(0, 2, (n,)).float()
    d = torch.bernoulli(torch.sigmoid(2.5 * (2 * z - 1)))
    log_mu_true = (1.5 * z)[:, None].expand(n, g) + 0.5
    theta = torch.full((g,), 5.0)
    y = torch.distributions.NegativeBinomial(theta, logits=log_mu_true - torch.log(theta)).sample()
    base_logit = torch.zeros(n)
    base_log_mu = torch.full((n, g), math.log(y.mean().item()))
    good = losses.dbpr_terms(2.5 * (2 * z - 1), base_logit, d, y, log_mu_true, base_log_mu, theta)
    useless = losses.dbpr_terms(base_logit, base_logit, d, y, base_log_mu, base_log_mu, theta)
    assert good[0] > 0.1 and good[1] > 0.1          # a useful Z improves on the baselines
    assert abs(useless[0]) < 1e-6 and abs(useless[1]) < 1e-6
    # In the generator objective the terms are subtracted: the useful Z has the lower loss.
    weight = 1.0
    assert -weight * sum(good) < -weight * sum(useless)


def test_gaussian_kl_closed_form():
    mu = torch.tensor([[0.5, -1.0]])
    logvar = torch.tensor([[0.2, -0.3]])
    var = logvar.exp()
    expected = 0.5 * (var + mu ** 2 - 1 - logvar).sum()
    assert torch.isclose(losses.gaussian_kl(mu, logvar), expected)
    assert losses.gaussian_kl(torch.zeros(3, 4), torch.zeros(3, 4)).item() == 0.0


def test_gaussian_kl_free_bits_spares_dimensions_below_the_floor():
    # dimension 0 carries 2 nats on average, dimension 1 almost none
    mu = torch.tensor([[2.0, 0.1], [-2.0, -0.1]], requires_grad=True)
    logvar = torch.zeros(2, 2, requires_grad=True)
    kl = losses.kl_with_free_bits(losses.gaussian_kl_per_dim(mu, logvar), free_bits=0.5)
    assert torch.isclose(kl, torch.tensor(2.0 + 0.5))
    kl.backward()
    assert mu.grad[:, 1].abs().max().item() == 0.0  # below the floor: no pull to the prior
    assert mu.grad[:, 0].abs().min().item() > 0.0
    # a floor of zero is the plain KL
    assert torch.isclose(losses.kl_with_free_bits(losses.gaussian_kl_per_dim(mu, logvar), 0.0),
                         losses.gaussian_kl(mu, logvar))


def test_mse_per_cell_sums_genes():
    x = torch.zeros(2, 3)
    assert losses.mse_per_cell(torch.ones(2, 3), x).item() == 3.0


def _two_domain_logits(p_true: float, n: int = 8):
    """Logits giving probability ``p_true`` to the true domain (domain 0 for every cell)."""
    logit = math.log(p_true / (1 - p_true))
    return torch.tensor([[logit, 0.0]] * n, requires_grad=True), torch.zeros(n, dtype=torch.long)


@pytest.mark.parametrize("kind", ["negce", "chance", "uniform", "flip"])
def test_adversarial_losses_reward_fooling_the_discriminator(kind):
    """The encoders minimise this loss; it must be lower when the discriminator is fooled."""
    confident = losses.ADV_LOSSES[kind](*_two_domain_logits(0.95))
    fooled = losses.ADV_LOSSES[kind](*_two_domain_logits(0.5 if kind == "uniform" else 0.2))
    assert fooled < confident
    # and its gradient pushes the true domain's logit down (the sign that fools)
    logits, domain = _two_domain_logits(0.8)
    losses.ADV_LOSSES[kind](logits, domain).backward()
    assert (logits.grad[:, 0] > 0).all()  # gradient descent lowers the true-domain logit


def test_uniform_loss_is_zero_at_uniform_and_negce_is_minus_ce():
    logits = torch.zeros(4, 3)
    domain = torch.tensor([0, 1, 2, 0])
    assert abs(losses.uniform(logits, domain).item()) < 1e-6
    logits = torch.randn(6, 3)
    domain = torch.tensor([0, 1, 2, 0, 1, 2])
    ce = torch.nn.functional.cross_entropy(logits, domain)
    assert torch.isclose(losses.negce(logits, domain), -ce)
    assert torch.isclose(losses.domain_ce(logits, domain), ce)


def test_negce_to_chance_is_negce_until_chance_then_flat():
    """Cells the discriminator still recognises (p above their class's share) are pushed as by
    negce; cells past chance add a constant and no gradient."""
    shares = torch.tensor([0.75, 0.25])
    domain = torch.tensor([0, 0, 1, 1])
    logits = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]], requires_grad=True)
    loss = losses.negce_to_chance(logits, domain, shares=shares)
    ce = torch.nn.functional.cross_entropy(logits, domain, reduction="none")
    capped = torch.minimum(ce, -torch.log(shares[domain]))
    assert torch.isclose(loss, -capped.mean())
    loss.backward()
    past_chance = torch.softmax(logits, dim=1).gather(1, domain[:, None])[:, 0] < shares[domain]
    assert past_chance.tolist() == [False, True, False, True]
    assert (logits.grad[past_chance] == 0).all()
    assert (logits.grad[~past_chance].abs() > 0).all()
    # without shares, chance is 1/K; with equal shares the two agree
    assert torch.isclose(losses.negce_to_chance(logits, domain),
                         losses.negce_to_chance(logits, domain, shares=torch.full((2,), 0.5)))
    # below chance everywhere it is negce
    sure = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    assert torch.isclose(losses.negce_to_chance(sure, torch.tensor([0, 1])),
                         losses.negce(sure, torch.tensor([0, 1])))


@pytest.mark.parametrize("kind", ["negce", "chance", "uniform", "flip"])
def test_cell_weights_count_each_cell_that_many_times(kind):
    """Weight 2 on a cell is the cell twice; weights of one are no weights."""
    torch.manual_seed(0)
    logits, domain = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    loss = losses.ADV_LOSSES[kind]
    assert torch.isclose(loss(logits, domain, torch.ones(5)), loss(logits, domain))
    weight = torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0])
    doubled = torch.cat([logits[:1], logits]), torch.cat([domain[:1], domain])
    floor = math.log(3) if kind == "uniform" else 0.0  # uniform's constant, not a mean
    assert torch.isclose((loss(logits, domain, weight) + floor) * 5 / 6, loss(*doubled) + floor)
    assert torch.isclose(losses.domain_ce(logits, domain, weight) * 5 / 6,
                         losses.domain_ce(*doubled))


def test_precomputed_log_factorials_give_the_same_nb_losses():
    """The training losses take log(y!) from per-cell sums computed once; the values and the
    gradients are those of the elementwise form."""
    import scipy.sparse as sp

    from advcli.data import CountRows

    g = torch.Generator().manual_seed(0)
    y = torch.poisson(torch.rand(6, 9, generator=g) * 20)
    log_mu = torch.randn(6, 9, generator=g, requires_grad=True)
    theta = torch.rand(9, generator=g) + 0.5
    lf = CountRows(sp.csr_matrix(y.numpy()), "cpu").log_factorial
    torch.testing.assert_close(lf, losses.log_factorial_sums(y))
    a = losses.nb_nll(y, log_mu, theta)
    b = losses.nb_nll(y, log_mu, theta, lf)
    torch.testing.assert_close(a, b)
    ga, = torch.autograd.grad(a, log_mu)
    gb, = torch.autograd.grad(b, log_mu)
    torch.testing.assert_close(ga, gb)
    library = y.sum(1).clamp_min(1)
    torch.testing.assert_close(losses.nb_reconstruction(y, log_mu, library, theta),
                               losses.nb_reconstruction(y, log_mu, library, theta,
                                                        log_factorial=lf))


def test_nb_loss_with_the_count_histogram_is_the_full_data_loss():
    """Given the data's count histogram, the NB loss takes lgamma(y + theta) - lgamma(theta)
    from all cells: on a minibatch of every cell it is the plain loss (values and gradients in
    log mu and theta); averaged over the minibatches of an epoch it is the full-data loss."""
    import scipy.sparse as sp

    from advcli.data import CountRows

    g = torch.Generator().manual_seed(1)
    y = torch.poisson(torch.rand(40, 8, generator=g, dtype=torch.float64) * 90)
    y[torch.rand(40, 8, generator=g) < 0.5] = 0.0
    y[3, 2] = 5000.0
    log_mu = torch.randn(40, 8, generator=g, dtype=torch.float64, requires_grad=True)
    log_theta = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    rows = CountRows(sp.csr_matrix(y.numpy()), "cpu", histogram=True)
    hist = rows.count_histogram
    assert hist.pairs < int((y > 0).sum())  # counts recur
    plain = losses.nb_nll(y, log_mu, log_theta.exp())
    ours = losses.nb_nll(y, log_mu, log_theta.exp(), rows.log_factorial, hist)
    torch.testing.assert_close(ours, plain.float(), check_dtype=False)
    for a, b in zip(torch.autograd.grad(ours, (log_mu, log_theta)),
                    torch.autograd.grad(plain, (log_mu, log_theta))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    halves = [losses.nb_nll(y[i], log_mu[i], log_theta.exp(), rows.log_factorial[i], hist)
              for i in (slice(0, 20), slice(20, 40))]
    torch.testing.assert_close(sum(halves) / 2, plain.float(), check_dtype=False)


def test_nb_loss_with_a_minibatch_histogram_is_the_minibatch_loss():
    """A minibatch's own count histogram, from the pair of each of its stored counts (a stored
    zero and counts above the small-count table included), gives exactly the minibatch's NB
    loss and gradients in log mu and theta."""
    import scipy.sparse as sp

    from advcli.data import CountRows, entry_pair_ids

    g = torch.Generator().manual_seed(2)
    y = torch.poisson(torch.rand(60, 7, generator=g) * 40)
    y[torch.rand(60, 7, generator=g) < 0.4] = 0.0
    y[4, 1], y[9, 1] = 300.0, 7000.0
    counts = sp.csr_matrix(y.numpy())
    counts.data[counts.indptr[2]] = 0.0  # a stored zero
    y = torch.from_numpy(counts.toarray())
    rows = CountRows(counts, "cpu", histogram=True)
    in_chunks = entry_pair_ids(counts, rows.count_histogram, chunk=5)
    assert np.array_equal(in_chunks.data, entry_pair_ids(counts, rows.count_histogram).data)
    idx = torch.tensor([9, 2, 4, 30, 31, 59, 0])
    mb = rows.count_histogram.of_pairs(rows.pair_ids(idx), len(idx))
    log_mu = torch.randn(len(idx), 7, generator=g, requires_grad=True)
    log_theta = torch.randn(7, generator=g, requires_grad=True)
    plain = losses.nb_nll(y[idx], log_mu, log_theta.exp(), rows.log_factorial[idx])
    ours = losses.nb_nll(y[idx], log_mu, log_theta.exp(), rows.log_factorial[idx], mb)
    # float32 sums in another order: they differ run to run in the 7th digit (seen: 1.5e-6)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(ours, (log_mu, log_theta)),
                    torch.autograd.grad(plain, (log_mu, log_theta))):
        torch.testing.assert_close(a, b)
    np.testing.assert_allclose(mb.nonzero_share.numpy(), (y[idx] > 0).float().mean(0).numpy(),
                               rtol=1e-6)


@pytest.mark.parametrize("zeros", [0.2, 0.9])  # the dense and the nonzero-only lgamma paths
@pytest.mark.parametrize("table", [False, True])
def test_training_nb_likelihood_and_its_gradient_match_the_elementwise_form(zeros, table):
    """The per-cell likelihood the losses train on has its gradient written out; it must equal
    autograd through nb_log_prob (values and gradients in log mu and theta) and pass
    gradcheck, per gene and with a per-domain table of theta."""
    g = torch.Generator().manual_seed(3)
    n, genes = 12, 6
    y = torch.poisson(torch.rand(n, genes, generator=g, dtype=torch.float64) * 30)
    y[torch.rand(n, genes, generator=g) < zeros] = 0.0
    log_mu = torch.randn(n, genes, generator=g, dtype=torch.float64, requires_grad=True)
    shape = (3, genes) if table else (genes,)
    theta = (torch.rand(*shape, generator=g, dtype=torch.float64) * 5 + 0.1).requires_grad_()
    rows = torch.randint(0, 3, (n,), generator=g) if table else None

    ours = losses._cell_log_lik(y, log_mu, theta, rows, None)
    ref = losses.nb_log_prob(y, log_mu, theta, rows=rows).sum(dim=1)
    torch.testing.assert_close(ours, ref)
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((ours * weights).sum(), (log_mu, theta))
    ref_grads = torch.autograd.grad((ref * weights).sum(), (log_mu, theta))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(
        lambda m, t: losses._cell_log_lik(y, m, t, rows, None), (log_mu, theta))


def _zinb_by_hand(y, log_mu, logits, theta):
    nb = torch.distributions.NegativeBinomial(total_count=theta, logits=log_mu - torch.log(theta))
    pi = torch.sigmoid(logits)
    return torch.where(y == 0, torch.log(pi + (1 - pi) * nb.log_prob(y).exp()),
                       torch.log1p(-pi) + nb.log_prob(y))


def test_zinb_reconstruction_is_the_zero_inflated_nb_per_domain():
    gen = torch.Generator().manual_seed(0)
    y = torch.poisson(torch.rand(6, 5, generator=gen) * 3)
    y[0, :3] = 0
    log_prop = torch.log_softmax(torch.randn(6, 5, generator=gen), dim=1)
    logits = torch.randn(6, 5, generator=gen)
    library = torch.tensor([50.0, 10.0, 3.0, 20.0, 8.0, 30.0])
    theta = torch.rand(2, 5, generator=gen) + 0.5
    rows = torch.tensor([0, 1, 0, 1, 1, 0])
    log_mu = log_prop + torch.log(library)[:, None]
    expected = -_zinb_by_hand(y, log_mu, logits, theta[rows]).sum(dim=1).mean()
    got = losses.zinb_reconstruction(y, log_prop, logits, library, theta, rows=rows)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    never_zero = losses.zinb_reconstruction(y, log_prop, torch.full_like(logits, -40.0),
                                            library, theta, rows=rows)
    nb = losses.nb_reconstruction(y, log_prop, library, theta, rows=rows)
    assert never_zero.item() == pytest.approx(nb.item(), rel=1e-5)


def test_zinb_probabilities_sum_to_one():
    y = torch.arange(0.0, 400.0)[:, None]
    n = len(y)
    nll = [losses.zinb_reconstruction(y[i:i + 1], torch.zeros(1, 1), torch.tensor([[0.7]]),
                                      torch.tensor([12.0]), torch.tensor([1.5])).item()
           for i in range(n)]
    assert sum(math.exp(-v) for v in nll) == pytest.approx(1.0, abs=1e-5)
