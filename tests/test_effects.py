import numpy as np

from advcli.effects import bh_qvalues, nb_glm, treatment_effects


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
