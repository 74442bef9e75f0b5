import numpy as np
import pytest
import scipy.sparse as sp

from advcli.effects import (bh_qvalues, nb_glm, pseudobulk, sparse_calibration,
                            treatment_effects)
from advcli.errors import InputError


def test_single_binary_covariate_matches_closed_form():
    """With design [1, D] the NB MLE of each group's mean is its sample mean, so the effect is
    log(mean_treated / mean_control), and the Wald variance is 1/sum(W) per group (up to the
    weak ridge on the slopes: 1e-3 against an information of hundreds)."""
    rng = np.random.default_rng(1)
    n = 600
    d = (np.arange(n) % 3 == 0).astype(float)
    mu = np.where(d == 1, 12.0, 4.0)[:, None] * np.array([1.0, 0.5, 2.0])
    theta = 3.0
    y = rng.poisson(rng.gamma(theta, mu / theta))
    fit = nb_glm(y, np.column_stack([np.ones(n), d]))
    m1, m0 = y[d == 1].mean(axis=0), y[d == 0].mean(axis=0)
    np.testing.assert_allclose(fit["coef"][:, 1], np.log(m1 / m0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fit["coef"][:, 0], np.log(m0), rtol=1e-4, atol=1e-6)
    a = fit["alpha"]
    w1 = (d == 1).sum() * m1 / (1 + a * m1)
    w0 = (d == 0).sum() * m0 / (1 + a * m0)
    np.testing.assert_allclose(fit["se"][:, 1], np.sqrt(1 / w1 + 1 / w0), rtol=1e-5)
    assert fit["converged"].all()
    # the moment estimator of alpha is near the truth 1/theta
    assert np.all(np.abs(a - 1 / theta) < 0.12)


def test_fixed_dispersion_is_used():
    rng = np.random.default_rng(0)
    y = rng.poisson(5.0, (200, 2))
    fit = nb_glm(y, np.ones((200, 1)), alpha=np.array([0.5, 0.5]))
    assert np.allclose(fit["alpha"], 0.5)


def test_bh_qvalues_known_example():
    p = np.array([0.01, 0.04, 0.03, 0.5, np.nan])
    q = bh_qvalues(p)
    np.testing.assert_allclose(q[:4], [0.04, 0.16 / 3, 0.16 / 3, 0.5])
    assert np.isnan(q[4])


def test_adjusting_for_the_true_confounder_removes_bias():
    rng = np.random.default_rng(2)
    n, genes = 3000, 20
    z = rng.integers(0, 2, n).astype(float)
    d = (rng.random(n) < np.where(z == 1, 0.8, 0.2)).astype(float)
    effect = rng.normal(0, 0.3, genes)
    log_mu = 1.0 + d[:, None] * effect + z[:, None] * 1.0
    y = rng.poisson(rng.gamma(4.0, np.exp(log_mu) / 4.0))
    frame = treatment_effects(y, d, np.zeros((n, 0)), z[:, None], [f"g{i}" for i in range(genes)])
    naive_err = np.abs(frame["effect_naive"] - effect).mean()
    adj_err = np.abs(frame["effect_adjusted"] - effect).mean()
    assert naive_err > 0.5 and adj_err < 0.1
    assert list(frame.columns[:6]) == ["gene", "effect_naive", "effect_adjusted", "se_adjusted",
                                       "pvalue", "qvalue"]


def test_all_zero_gene_gives_nan_not_crash():
    y = np.zeros((50, 2))
    y[:, 1] = np.arange(50) % 4
    fit = nb_glm(y, np.column_stack([np.ones(50), np.arange(50) % 2]))
    assert np.isnan(fit["coef"][0]).all() and np.isfinite(fit["coef"][1]).all()


def test_separated_gene_is_reported_but_never_tested():
    """A gene with no counts in any control cell has an infinite MLE effect: its p and q must
    be NaN (never a q of 0), while the other genes are tested as usual."""
    rng = np.random.default_rng(3)
    n = 400
    d = (np.arange(n) % 2).astype(float)
    y = rng.poisson(3.0, (n, 3)).astype(float)
    y[d == 0, 0] = 0.0
    y[d == 1, 0] = rng.poisson(20.0, int(d.sum()))
    frame = treatment_effects(y, d, np.zeros((n, 0)), None, ["sep", "a", "b"])
    assert not frame["converged"][0] and np.isnan(frame["pvalue"][0])
    assert np.isnan(frame["qvalue"][0])
    assert frame["converged"][1:].all() and np.isfinite(frame["qvalue"][1:]).all()


def test_step_halving_keeps_heavy_outlier_gene_finite():
    """One huge count in a sparse gene (the HBB case) must not send the effect to thousands."""
    rng = np.random.default_rng(4)
    n = 500
    d = (rng.random(n) < 0.5).astype(float)
    y = rng.poisson(0.05, (n, 4)).astype(float)
    y[0, 0] = 5000.0
    frame = treatment_effects(y, d, np.zeros((n, 0)), rng.normal(size=(n, 1)), list("abcd"))
    eff = frame["effect_adjusted"].to_numpy()
    assert np.all(np.abs(eff[np.isfinite(eff)]) < 15)
    assert np.all(frame["dispersion"] <= 20.0)
    bad = (np.abs(eff) > 5) & (frame["qvalue"] < 0.05)
    assert not bad.any()


def test_library_offset_removes_depth_confounding():
    """D raises sequencing depth but not expression: with the library offset the effect is ~0,
    without it every gene seems to respond."""
    rng = np.random.default_rng(5)
    n, g = 2000, 30
    d = (rng.random(n) < 0.5).astype(float)
    depth = np.exp(rng.normal(0, 0.3, n) + 0.8 * d)
    y = rng.poisson(depth[:, None] * rng.uniform(1, 5, g))
    genes = [f"g{i}" for i in range(g)]
    with_offset = treatment_effects(y, d, np.zeros((n, 0)), None, genes, size_factors=y.sum(1))
    without = treatment_effects(y, d, np.zeros((n, 0)), None, genes)
    assert np.abs(with_offset["effect_naive"]).max() < 0.1
    assert np.abs(without["effect_naive"] - 0.8).max() < 0.1


def test_sparse_calibration_recovers_the_treatment_share():
    """Effects c0 (sparse) seen through a Z-hat that carries g x D: c = c0 + w g."""
    rng = np.random.default_rng(6)
    genes = 800
    w = rng.normal(0, 1, (genes, 2))
    c0 = np.where(rng.random(genes) < 0.1, rng.choice([-1.0, 1.0], genes), 0.0)
    g = np.array([0.5, -0.3])
    se = np.full(genes, 0.05)
    c = c0 + w @ g + rng.normal(0, 0.05, genes)
    est, cov = sparse_calibration(c, se, w, np.ones(genes, bool))
    np.testing.assert_allclose(est, g, atol=0.02)
    assert np.all(np.diag(cov) > 0)


def test_pseudobulk_sums_per_sample_and_level():
    n = 12
    counts = sp.csr_matrix(np.ones((n, 2)))
    sample = np.repeat(["s1", "s2", "s3", "s4"], 3)
    d = np.repeat([0.0, 0.0, 1.0, 1.0], 3)
    x = np.tile([[0.0], [1.0], [1.0]], (4, 1))  # a 0/1 covariate splits each sample in two
    agg, d_pb, x_pb, z_pb, sf = pseudobulk(counts, sample, d, x, None, np.ones(n))
    assert agg.shape == (8, 2) and z_pb is None
    assert sorted(np.asarray(agg.sum(axis=1)).ravel().tolist()) == [2.0] * 4 + [4.0] * 4
    assert set(d_pb.tolist()) == {0.0, 1.0}


def test_pseudobulk_refuses_mixed_samples():
    d = np.array([0.0, 1.0, 0.0, 1.0])
    with pytest.raises(InputError, match="both treated and control"):
        pseudobulk(sp.csr_matrix(np.ones((4, 2))), np.array(["a", "a", "b", "b"]), d,
                   np.zeros((4, 0)), None, np.ones(4))


def test_treatment_collinear_with_covariates_is_bad_input():
    d = np.array([0.0, 0.0, 1.0, 1.0] * 5)
    with pytest.raises(InputError, match="collinear"):
        treatment_effects(np.ones((20, 2)), d, d[:, None], None, ["a", "b"])


def test_negative_controls_fix_the_treatment_share_even_with_dense_effects():
    """When most genes respond, the sparse assumption fails; known unaffected genes still
    identify g."""
    rng = np.random.default_rng(7)
    genes = 600
    w = rng.normal(0, 1, (genes, 1))
    controls = np.arange(genes) < 60
    c0 = np.where(controls, 0.0, rng.normal(0.8, 0.5, genes))  # dense, mostly positive
    c = c0 + w @ np.array([0.4]) + rng.normal(0, 0.02, genes)
    se = np.full(genes, 0.02)
    est, _ = sparse_calibration(c, se, w, np.ones(genes, bool), controls=controls)
    assert abs(est[0] - 0.4) < 0.01
    with pytest.raises(InputError, match="negative-control"):
        sparse_calibration(c, se, w, np.ones(genes, bool), controls=np.arange(genes) < 1)


def test_a_gene_fits_the_same_alone_as_in_a_block_of_genes():
    """Genes are fitted in blocks whose working set shrinks as genes converge; a gene's fit
    must not depend on its block-mates (well-behaved, sparse, separated and empty genes)."""
    rng = np.random.default_rng(4)
    n, g = 6000, 240  # two blocks at 6,000 cells
    x = (rng.random((n, 2)) < 0.5).astype(float)
    d = (rng.random(n) < 0.5).astype(float)
    log_mu = rng.normal(-1.0, 1.5, g) + 0.4 * x[:, :1] + rng.normal(0, 0.5, g) * d[:, None]
    y = rng.poisson(rng.gamma(2.0, np.exp(log_mu) / 2.0)).astype(float)
    y[:, 0] = 0.0
    y[d == 1, 1:4] = 0.0  # separated along the treatment: slow to settle
    design = np.column_stack([np.ones(n), x, d])
    offset = rng.normal(0, 0.2, n)
    alpha = np.exp(rng.normal(np.log(0.3), 0.5, g))
    together = nb_glm(sp.csr_matrix(y), design, offset, alpha=alpha)
    for j in [0, 1, 2, 3, 10, 100, 200, 239]:
        alone = nb_glm(y[:, [j]], design, offset, alpha=alpha[[j]])
        assert together["converged"][j] == alone["converged"][0]
        np.testing.assert_allclose(together["coef"][j], alone["coef"][0], rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(together["se"][j], alone["se"][0], rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(together["deviance"][j], alone["deviance"][0], rtol=1e-9,
                                   atol=1e-9)


def test_under_dispersed_genes_are_fitted_with_an_allowed_dispersion():
    """Binomial counts have less variance than their mean: the moment estimate of the NB
    dispersion is negative (here -1/10, so 1 + alpha * y reaches 0 at y = 10) and no NB has it.
    The fits use the smallest allowed dispersion instead, and the effect is the sample one."""
    rng = np.random.default_rng(3)
    n = 1000
    d = (rng.random(n) < 0.5).astype(float)
    y = rng.binomial(10, np.where(d == 1, 0.9, 0.8)[:, None] * np.ones(3)).astype(float)
    frame = treatment_effects(y, d, np.zeros((n, 0)), None, ["a", "b", "c"])
    assert frame["converged"].all()
    np.testing.assert_allclose(frame["dispersion"], 1e-4)
    np.testing.assert_allclose(frame["effect_naive"],
                               np.log(y[d == 1].mean(0) / y[d == 0].mean(0)), atol=1e-4)


def test_a_start_from_a_nearby_fit_reaches_the_same_fit():
    """treatment_effects starts each GLM from the previous one (the adjusted fit from the naive
    one, Z-hat's coefficients at zero): the optimum is unique, so only the path changes."""
    rng = np.random.default_rng(5)
    n, g = 1500, 30
    d = (rng.random(n) < 0.5).astype(float)
    z = rng.normal(size=(n, 1))
    y = rng.poisson(np.exp(rng.normal(0, 1, g) + 0.5 * d[:, None] + 0.7 * z)).astype(float)
    naive_design = np.column_stack([np.ones(n), d])
    design = np.column_stack([naive_design, z])
    alpha = np.full(g, 0.2)
    cold = nb_glm(y, design, alpha=alpha)
    naive = nb_glm(y, naive_design, alpha=alpha)
    start = np.column_stack([naive["coef"], np.zeros(g)])
    start[3] = np.nan  # a gene without a start begins from the default
    warm = nb_glm(y, design, alpha=alpha, start=start)
    assert warm["converged"].all() and cold["converged"].all()
    np.testing.assert_allclose(warm["coef"], cold["coef"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(warm["se"], cold["se"], rtol=1e-5)
