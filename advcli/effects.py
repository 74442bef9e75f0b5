"""Per-gene treatment effects from a negative-binomial GLM, fitted for all genes at once.

For each gene, log E[y] = A beta with A = [1, X, D] (naive) or [1, X, D, Z-hat] (adjusted).
IRLS runs on blocks of genes together: the weighted normal equations of every gene in a block
come from one matrix product, so 100,000 cells x 2,000 genes take seconds, not minutes. The
dispersion alpha of each gene is re-estimated between IRLS steps by the Pearson moment estimator.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scipy import stats

GENE_BLOCK = 256


def nb_glm(counts, design: np.ndarray, max_iter: int = 30, tol: float = 1e-6,
           alpha: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Fit an NB GLM with log link to every column of ``counts`` on the same ``design``.

    Returns ``coef`` and ``se`` (genes x covariates, Wald standard errors from the observed
    information at the fit), ``alpha`` (per gene; fixed if given) and ``converged``.
    """
    A = torch.as_tensor(np.asarray(design, dtype=np.float64))
    n, p = A.shape
    pairs = (A[:, :, None] * A[:, None, :]).reshape(n, p * p)
    n_genes = counts.shape[1]
    coef = np.full((n_genes, p), np.nan)
    se = np.full((n_genes, p), np.nan)
    alphas = np.full(n_genes, np.nan)
    converged = np.zeros(n_genes, dtype=bool)
    for start in range(0, n_genes, GENE_BLOCK):
        cols = slice(start, min(start + GENE_BLOCK, n_genes))
        block = counts[:, cols]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        fixed = None if alpha is None else np.asarray(alpha, dtype=np.float64)[cols]
        out = _irls_block(A, pairs, torch.as_tensor(block, dtype=torch.float64), max_iter, tol,
                          fixed)
        coef[cols], se[cols], alphas[cols], converged[cols] = out
    return {"coef": coef, "se": se, "alpha": alphas, "converged": converged}


def _irls_block(A, pairs, Y, max_iter, tol, fixed_alpha):
    n, p = A.shape
    g = Y.shape[1]
    ybar = Y.mean(dim=0)
    empty = ybar == 0
    mu = (Y + ybar.clamp_min(1e-3)) / 2.0
    eta = torch.log(mu)
    alpha = (torch.full((g,), 0.1, dtype=A.dtype) if fixed_alpha is None
             else torch.as_tensor(fixed_alpha, dtype=A.dtype))
    beta = torch.zeros(g, p, dtype=A.dtype)
    prev_dev = torch.full((g,), float("inf"), dtype=A.dtype)
    done = torch.zeros(g, dtype=torch.bool)
    ridge = 1e-9 * torch.eye(p, dtype=A.dtype)
    for it in range(max_iter):
        W = mu / (1.0 + alpha * mu)
        z = eta + (Y - mu) / mu
        xtwx = (pairs.T @ W).T.reshape(g, p, p) + ridge
        xtwz = (A.T @ (W * z)).T
        beta = torch.linalg.solve(xtwx, xtwz.unsqueeze(-1)).squeeze(-1)
        eta = (A @ beta.T).clamp(-30.0, 30.0)
        mu = torch.exp(eta)
        if fixed_alpha is None and it >= 1:
            resid = ((Y - mu) ** 2 - mu) / mu.pow(2)
            alpha = (resid.sum(dim=0) / max(n - p, 1)).clamp(1e-6, 1e3)
        dev = _nb_deviance(Y, mu, alpha)
        done = (prev_dev - dev).abs() <= tol * (dev.abs() + 1.0)
        prev_dev = dev
        if bool(done.all()) and it >= 2:
            break
    W = mu / (1.0 + alpha * mu)
    cov = torch.linalg.inv((pairs.T @ W).T.reshape(g, p, p) + ridge)
    se = torch.sqrt(torch.diagonal(cov, dim1=1, dim2=2).clamp_min(0.0))
    beta[empty] = float("nan")
    se[empty] = float("nan")
    return beta.numpy(), se.numpy(), alpha.numpy(), (done & ~empty).numpy()


def _nb_deviance(Y, mu, alpha):
    theta = 1.0 / alpha
    y_log = torch.where(Y > 0, Y * torch.log(Y.clamp_min(1e-12) / mu), torch.zeros_like(Y))
    return 2.0 * (y_log - (Y + theta) * torch.log((1.0 + alpha * Y) / (1.0 + alpha * mu))).sum(0)


def bh_qvalues(pvalues: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (NaN stays NaN and is not counted)."""
    p = np.asarray(pvalues, dtype=float)
    q = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return q
    order = np.argsort(p[ok])
    ranked = p[ok][order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
    out = np.empty(m)
    out[order] = ranked
    q[ok] = out
    return q


def treatment_effects(counts, d: np.ndarray, x: np.ndarray, z_hat: np.ndarray | None,
                      genes) -> pd.DataFrame:
    """The effect of D on each gene's log mean, naive ([1, X, D]) and adjusted ([1, X, D, Z-hat]).

    p- and q-values are those of the adjusted effect when Z-hat is given (Wald, two-sided;
    Benjamini-Hochberg over genes).
    """
    n = len(d)
    naive_design = np.column_stack([np.ones(n), x, d])
    j = naive_design.shape[1] - 1
    naive = nb_glm(counts, naive_design)
    frame = pd.DataFrame({"gene": list(genes), "effect_naive": naive["coef"][:, j]})
    if z_hat is not None:
        adjusted = nb_glm(counts, np.column_stack([naive_design, z_hat]))
        fit = adjusted
    else:
        fit = naive
    frame["effect_adjusted"] = fit["coef"][:, j] if z_hat is not None else np.nan
    frame["se_adjusted"] = fit["se"][:, j] if z_hat is not None else np.nan
    wald = fit["coef"][:, j] / fit["se"][:, j]
    frame["pvalue"] = 2.0 * stats.norm.sf(np.abs(wald))
    frame["qvalue"] = bh_qvalues(frame["pvalue"].to_numpy())
    frame["se_naive"] = naive["se"][:, j]
    frame["pvalue_naive"] = 2.0 * stats.norm.sf(np.abs(naive["coef"][:, j] / naive["se"][:, j]))
    frame["converged"] = fit["converged"]
    return frame
