"""Per-gene treatment effects from a negative-binomial GLM, fitted for all genes at once.

For each gene, log E[y] = log s + A beta with s the cell's size factor and A = [1, X, D] (naive)
or [1, X, D, Z-hat] (adjusted). IRLS runs on blocks of genes together: the weighted normal
equations of every gene in a block come from one matrix product. The cost is passes over the
cells x genes block in memory (docs/confounder.md, "Effects"). Three guards keep the table
honest on real counts:

- step-halving: a step that raises a gene's deviance is halved until it does not (glm2, DESeq2),
  so no gene oscillates off to a coefficient of thousands;
- dispersions are moment estimates shrunk on the log scale towards a trend over the mean
  (DESeq2 / edgeR style), capped, and then held fixed in both fits, so one gene cannot inflate
  its own dispersion until its standard error means nothing;
- a gene that did not converge, or whose fit separates (a coefficient beyond +-10 on the log
  scale, i.e. a fold change over 20,000), gets NaN p and q: it is reported, never ranked.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scipy import special, stats

from .errors import InputError

BLOCK_ENTRIES = 2 ** 20  # cells x genes of one IRLS block: 8 MB per float64 array, so the
# arrays an elementwise pass touches stay in a CPU's last-level cache (elementwise passes over
# 40 MB arrays ran 5-10x slower per entry on a 32 MB L3)
MAX_ABS_COEF = 10.0  # a natural-log treatment effect beyond this is separation, not an effect
RIDGE = 1e-3
ALPHA_RANGE = (1e-4, 20.0)


def _gene_block(n_cells: int) -> int:
    """Genes fitted together: BLOCK_ENTRIES entries, at least 16 and at most 256 genes."""
    return int(min(256, max(16, BLOCK_ENTRIES // max(n_cells, 1))))


def _by_columns(counts):
    """Sparse counts in CSC form, so each gene block is a cheap slice (a CSR column slice
    scans every stored count)."""
    return counts.tocsc() if sp.issparse(counts) and counts.format != "csc" else counts


def _dense_block(counts, cols) -> torch.Tensor:
    block = counts[:, cols]
    block = block.toarray() if sp.issparse(block) else np.asarray(block)
    return torch.as_tensor(block, dtype=torch.float64)


def nb_glm(counts, design: np.ndarray, offset: np.ndarray | None = None,
           alpha: np.ndarray | None = None, max_iter: int = 50,
           tol: float = 1e-8, start: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Fit an NB GLM with log link and a per-cell log offset to every column of ``counts``.

    ``alpha`` fixes the dispersion per gene; None estimates it (``estimate_dispersion``).
    ``start`` (genes x design columns) starts IRLS from a nearby fit, e.g. one with fewer
    columns; NaN rows start from the default.
    Returns ``coef`` and ``se`` (genes x design columns; Wald standard errors from the Fisher
    information at the fit), ``alpha``, ``deviance`` and ``converged`` (False for genes that did
    not converge; their coefficients are kept but must not be tested).
    """
    counts = _by_columns(counts)
    A = torch.as_tensor(np.asarray(design, dtype=np.float64))
    n, p = A.shape
    off = torch.zeros(n, dtype=torch.float64) if offset is None else \
        torch.as_tensor(np.asarray(offset, dtype=np.float64))
    if alpha is None:
        alpha = estimate_dispersion(counts, design, offset)
    alpha = np.asarray(alpha, dtype=np.float64)
    pairs = (A[:, :, None] * A[:, None, :]).reshape(n, p * p)
    n_genes = counts.shape[1]
    out = {"coef": np.full((n_genes, p), np.nan), "se": np.full((n_genes, p), np.nan),
           "deviance": np.full(n_genes, np.nan), "converged": np.zeros(n_genes, dtype=bool)}
    block = _gene_block(n)
    for first in range(0, n_genes, block):
        cols = slice(first, min(first + block, n_genes))
        Y = _dense_block(counts, cols)
        beta, se, dev, ok = _irls_block(A, pairs, off, Y, torch.as_tensor(alpha[cols]),
                                        max_iter, tol,
                                        None if start is None else torch.as_tensor(start[cols]))
        out["coef"][cols], out["se"][cols], out["deviance"][cols], out["converged"][cols] = \
            beta, se, dev, ok
    out["alpha"] = alpha
    return out


def _irls_block(A, pairs, off, Y, alpha, max_iter, tol, start=None):
    """Penalised Fisher scoring with step-halving for one block of genes (columns of Y) sharing
    the design A. Each pass over the n x genes block costs memory bandwidth, so the deviance's
    terms that do not move with beta are computed once, sum_i y log mu comes from A^T y (log mu
    is linear in beta), the means of the accepted step are kept for the next one, and converged
    genes leave the working set. ``start`` (genes x p, NaN rows ignored) replaces the default
    start: intercept at the mean rate, the rest at zero."""
    n, p = A.shape
    g = Y.shape[1]
    ybar = Y.mean(dim=0)
    empty = ybar == 0
    has_intercept = bool(torch.allclose(A[:, 0], torch.ones_like(A[:, 0])))
    # a weak ridge on the slopes keeps a coefficient finite where a gene is absent from one
    # level of a covariate (separation in a nuisance direction), so the others still converge
    penalty = torch.full((p,), RIDGE, dtype=A.dtype)
    if has_intercept:
        penalty[0] = 1e-8
    ridge = torch.diag(penalty)
    beta = torch.zeros(g, p, dtype=A.dtype)  # intercept at the mean rate, the rest at zero
    if has_intercept:
        beta[:, 0] = torch.log(ybar.clamp_min(1e-8) / torch.exp(off).mean())
    if start is not None:
        given = torch.isfinite(start).all(dim=1) & ~empty
        beta[given] = start[given].to(beta.dtype)
    deviance = _NBDeviance(A, off, Y, alpha, penalty)
    dev, mu = deviance(beta)
    done = empty.clone()
    # the genes still iterating: most converge in a few steps and a few (near-separated ones)
    # take many, so the working set shrinks whenever half of it has converged
    work = torch.arange(g)
    w_beta, w_dev, w_done, w_mu, w_deviance = beta, dev, done, mu, deviance
    for _ in range(max_iter):
        W, residual = _weights(w_mu, w_deviance.Y, w_deviance.alpha)
        xtwx = (pairs.T @ W).T.reshape(-1, p, p) + ridge
        del W
        score = (A.T @ residual).T - penalty * w_beta
        del residual
        step = torch.linalg.solve(xtwx, score.unsqueeze(-1)).squeeze(-1)
        step[w_done] = 0.0
        new_dev, new_mu = w_deviance(w_beta + step)
        for _ in range(20):  # halve the steps that made a gene's fit worse
            worse = ~(new_dev <= w_dev + 1e-10 * w_dev.abs()) & ~w_done
            if not bool(worse.any()):
                break
            step[worse] *= 0.5
            cols = worse.nonzero().squeeze(1)
            new_dev[cols], new_mu[:, cols] = w_deviance(w_beta + step, cols)
        w_beta = w_beta + step
        settled = (w_dev - new_dev).abs() <= tol * (new_dev.abs() + 0.1)
        w_dev, w_mu, w_done = new_dev, new_mu, w_done | settled
        beta[work], dev[work], done[work] = w_beta, w_dev, w_done
        if bool(w_done.all()):
            break
        if 2 * int((~w_done).sum()) <= len(work):
            keep = (~w_done).nonzero().squeeze(1)
            work, w_beta, w_dev, w_done = work[keep], w_beta[keep], w_dev[keep], w_done[keep]
            w_mu, w_deviance = w_mu[:, keep], w_deviance.columns(keep)
    W, _ = _weights(deviance.means(beta), Y, alpha)
    cov = torch.linalg.inv((pairs.T @ W).T.reshape(g, p, p) + ridge)
    se = torch.sqrt(torch.diagonal(cov, dim1=1, dim2=2).clamp_min(0.0))
    ok = done & ~empty & torch.isfinite(se).all(dim=1)
    beta[empty] = float("nan")
    se[empty] = float("nan")
    return beta.numpy(), se.numpy(), dev.numpy(), ok.numpy()


class _NBDeviance:
    """Penalised NB deviance of a block of genes at coefficients beta (genes x p), with the
    means mu = exp(A beta + offset) it was computed from (log mu clamped to +-30).

    2 sum_i [y log(y / mu) - (y + theta) log((1 + alpha y) / (1 + alpha mu))]: the y log y and
    log(1 + alpha y) terms are constants and sum_i y log mu = beta . (A^T y) + offset . y, so a
    call makes a few passes over the block. (Where the clamp binds, y is 0 in practice, so
    sum_i y log mu is unaffected.)"""

    def __init__(self, A, off, Y, alpha, penalty, _terms=None):
        self.A, self.off, self.Y, self.alpha, self.penalty = A, off, Y, alpha, penalty
        if _terms is None:
            y_theta = Y + 1.0 / alpha
            _terms = (y_theta, 2.0 * (torch.xlogy(Y, Y) - y_theta * torch.log1p(alpha * Y)).sum(0),
                      (A.T @ Y).T, off @ Y)
        self.y_theta, self.constant, self.aty, self.offy = _terms

    def columns(self, cols: torch.Tensor) -> "_NBDeviance":
        """The same deviance for the genes ``cols`` only."""
        return _NBDeviance(self.A, self.off, self.Y[:, cols], self.alpha[cols], self.penalty,
                           (self.y_theta[:, cols], self.constant[cols], self.aty[cols],
                            self.offy[cols]))

    def means(self, beta):
        """mu = exp(A beta + offset), log mu clamped to +-30."""
        return torch.mm(self.A, beta.T).add_(self.off[:, None]).clamp_(-30.0, 30.0).exp_()

    def __call__(self, beta, cols=None):
        """Deviance and mu of every gene, or of the genes ``cols`` only (step-halving)."""
        of = self if cols is None else self.columns(cols)
        beta = beta if cols is None else beta[cols]
        mu = self.means(beta)
        log_denominator = torch.mul(mu, of.alpha).log1p_()
        fit = torch.linalg.vecdot(of.y_theta, log_denominator, dim=0)
        dev = of.constant + 2.0 * (fit - (beta * of.aty).sum(1) - of.offy)
        return dev + (self.penalty * beta * beta).sum(1), mu


def _weights(mu, Y, alpha):
    """Fisher weights mu / (1 + alpha mu) and score residuals (y - mu) / (1 + alpha mu)."""
    denominator = torch.mul(mu, alpha).add_(1.0)
    return mu / denominator, torch.sub(Y, mu).div_(denominator)


def _tested(fit: dict, j: int) -> np.ndarray:
    """Genes whose coefficient j may be tested: converged and not separated along it."""
    return fit["converged"] & (np.abs(fit["coef"][:, j]) <= MAX_ABS_COEF)


def estimate_dispersion(counts, design: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """Per-gene NB dispersion: a moment estimate at a Poisson-like fit, then at the NB fit, shrunk
    towards a trend over log mean expression on the log scale (the shrinkage weight compares
    the genes' spread around the trend with the estimator's own sampling variance)."""
    return _dispersion_and_fit(counts, design, offset)[0]


def _dispersion_and_fit(counts, design, offset) -> tuple[np.ndarray, np.ndarray]:
    """estimate_dispersion, and the coefficients of its last fit (a start for the next)."""
    counts = _by_columns(counts)
    n, p = np.asarray(design).shape
    fit_alpha = np.full(counts.shape[1], 0.1)
    coef = None
    for _ in range(2):
        coef = nb_glm(counts, design, offset, alpha=fit_alpha, max_iter=15, tol=1e-6,
                      start=coef)["coef"]
        alpha = _moment_dispersion(counts, design, offset, coef)
        # an under-dispersed gene's moment estimate is negative: no NB has it, so the next fit
        # uses the nearest allowed dispersion
        fit_alpha = np.clip(np.where(np.isfinite(alpha), alpha, 0.1), *ALPHA_RANGE)
    raw = np.log(np.clip(alpha, *ALPHA_RANGE))
    mean = np.asarray(counts.mean(axis=0)).ravel()
    ok = np.isfinite(raw) & (mean > 0)
    if ok.sum() < 10:
        return np.exp(np.where(np.isfinite(raw), raw, np.log(0.1))), coef
    trend = _trend(np.log(mean[ok]), raw[ok])
    trend_all = np.interp(np.log(np.maximum(mean, 1e-12)), np.sort(np.log(mean[ok])),
                          trend[np.argsort(np.log(mean[ok]))])
    sampling = float(special.polygamma(1, max((n - p) / 2.0, 1.0)))
    spread = float(np.var(raw[ok] - trend))
    prior = max(spread - sampling, 0.25)
    weight = prior / (prior + sampling)
    shrunk = np.where(ok, trend_all + weight * (raw - trend_all), trend_all)
    return np.exp(np.clip(shrunk, *np.log(ALPHA_RANGE))), coef


def _moment_dispersion(counts, design, offset, coef) -> np.ndarray:
    """sum((y - mu)^2 - mu) / sum(mu^2) per gene: the weighted moment estimator, stable where
    most cells have tiny means."""
    A = np.asarray(design, dtype=np.float64)
    off = np.zeros(A.shape[0]) if offset is None else np.asarray(offset, dtype=np.float64)
    out = np.full(counts.shape[1], np.nan)
    block = _gene_block(A.shape[0])
    for start in range(0, counts.shape[1], block):
        cols = slice(start, min(start + block, counts.shape[1]))
        Y = _dense_block(counts, cols).numpy()
        beta = np.nan_to_num(coef[cols])
        mu = np.exp(np.clip(A @ beta.T + off[:, None], -30, 30))
        out[cols] = ((Y - mu) ** 2 - mu).sum(0) / np.maximum((mu ** 2).sum(0), 1e-12)
    return out


def _trend(x: np.ndarray, y: np.ndarray, bins: int = 20) -> np.ndarray:
    """A running median of y over x (quantile bins, linear interpolation between bin centres)."""
    order = np.argsort(x)
    groups = np.array_split(order, min(bins, max(len(x) // 5, 1)))
    centres = np.array([np.median(x[g]) for g in groups])
    medians = np.array([np.median(y[g]) for g in groups])
    return np.interp(x, centres, medians)


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


def size_factor_offset(size_factors: np.ndarray) -> np.ndarray:
    """log size factors, centred so the intercept stays on the scale of an average cell."""
    log_s = np.log(np.asarray(size_factors, dtype=np.float64))
    return log_s - log_s.mean()


def pseudobulk(counts, sample: np.ndarray, d: np.ndarray, x: np.ndarray, z: np.ndarray | None,
               size_factors: np.ndarray):
    """Sum the counts of each sample (within each level of the 0/1 covariate columns, so a
    cell-type covariate gives one profile per sample and cell type, as muscat does). D must be
    constant within a sample; numeric covariates and Z-hat are averaged; the offset is the
    group's summed size factor. Cells of one donor are not independent replicates; samples are."""
    labels, sample_codes = np.unique(np.asarray(sample).astype(str), return_inverse=True)
    d_by_sample = np.bincount(sample_codes, weights=d) / np.bincount(sample_codes)
    mixed = labels[(d_by_sample > 0) & (d_by_sample < 1)]
    if len(mixed):
        raise InputError(f"--sample-key: samples {list(mixed[:5])} hold both treated and control "
                         "cells; pseudobulk testing needs each sample under one treatment.")
    binary = np.all((x == 0) | (x == 1), axis=0) if x.size else np.zeros(0, dtype=bool)
    _, codes = np.unique(np.column_stack([sample_codes, x[:, binary]]), axis=0,
                         return_inverse=True)
    codes = codes.ravel()
    m = int(codes.max()) + 1
    member = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))),
                           shape=(m, len(codes)))
    size = np.asarray(member.sum(axis=1)).ravel()
    mean = lambda a: None if a is None else (member @ a) / size[:, None]  # noqa: E731
    return (sp.csr_matrix(member @ counts), member @ d / size, mean(x), mean(z),
            member @ size_factors)


def sparse_calibration(effect: np.ndarray, se: np.ndarray, loadings: np.ndarray,
                       tested: np.ndarray, k: float = 1.345,
                       controls: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The treatment's share of Z-hat, fixed by assuming most genes are unaffected (as CATE and
    RUV-4 do).

    Y ~ D c + Z w fits exactly as well as Y ~ D (c - w g) + (Z + g D) w for any g: how much
    of D the estimated Z carries is not identified by the fit. Among the genes' adjusted
    effects c and Z-loadings w, a Huber regression of c / se on w / se (across genes, no
    intercept) finds the g that leaves most effects at zero. With ``controls`` (negative-control
    genes, known not to respond, as RUV uses them) g is the least-squares fit on those alone.
    Returns g (k,) and its covariance.
    """
    if controls is not None:
        use = tested & controls
        if use.sum() <= loadings.shape[1]:
            raise InputError(f"Only {int(use.sum())} of the negative-control genes could be "
                             f"tested; at least {loadings.shape[1] + 1} are needed for "
                             f"{loadings.shape[1]} Z-hat column(s).")
        t, u = effect[use] / se[use], loadings[use] / se[use, None]
        g, *_ = np.linalg.lstsq(u, t, rcond=None)
        resid = t - u @ g
        dof = max(len(t) - u.shape[1], 1)
        return g, np.linalg.pinv(u.T @ u) * max(float(resid @ resid) / dof, 1.0)
    t = effect[tested] / se[tested]
    u = loadings[tested] / se[tested, None]
    if len(t) <= 3 * u.shape[1]:
        return np.zeros(u.shape[1]), np.zeros((u.shape[1], u.shape[1]))
    g, *_ = np.linalg.lstsq(u, t, rcond=None)
    for _ in range(50):
        r = t - u @ g
        scale = 1.4826 * np.median(np.abs(r - np.median(r))) + 1e-12
        w = np.minimum(1.0, k * scale / np.maximum(np.abs(r), 1e-12))
        new = np.linalg.lstsq(u * np.sqrt(w)[:, None], t * np.sqrt(w), rcond=None)[0]
        if np.allclose(new, g, atol=1e-8):
            g = new
            break
        g = new
    r = t - u @ g
    scale = 1.4826 * np.median(np.abs(r - np.median(r)))
    inside = np.abs(r) <= k * scale
    cov = np.linalg.pinv((u * w[:, None]).T @ u) * scale ** 2 / max(inside.mean(), 0.1)
    return g, cov


def treatment_effects(counts, d: np.ndarray, x: np.ndarray, z_hat: np.ndarray | None, genes,
                      size_factors: np.ndarray | None = None,
                      sample: np.ndarray | None = None, calibrate: bool = True,
                      control_genes: list[str] | None = None) -> pd.DataFrame:
    """The effect of D on each gene's log mean, naive ([1, X, D]) and adjusted ([1, X, D, Z-hat]).

    Effects are natural-log fold changes; ``log2fc_adjusted`` gives the same on the log2 scale.
    p- and q-values are those of the adjusted effect when Z-hat is given (Wald, two-sided;
    Benjamini-Hochberg over the genes whose fit converged), else of the naive one. With
    ``sample`` the cells are summed to one pseudobulk profile per sample first.
    """
    n = len(d)
    sf = np.ones(n) if size_factors is None else np.asarray(size_factors, dtype=np.float64)
    if sample is not None:
        counts, d, x, z_hat, sf = pseudobulk(counts, sample, d, x, z_hat, sf)
        n = len(d)
    counts = _by_columns(counts)
    offset = size_factor_offset(sf)
    naive_design = _full_rank(np.column_stack([np.ones(n), x, d]), keep_last=1)
    j = naive_design.shape[1] - 1
    p_needed = naive_design.shape[1] + (0 if z_hat is None else np.shape(z_hat)[1])
    if n <= p_needed:
        raise InputError(f"The effect GLM has {n} observations for {p_needed} coefficients"
                         f"{' (pseudobulk samples)' if sample is not None else ''}; it needs more "
                         "observations than coefficients.")
    alpha, coef = _dispersion_and_fit(counts, naive_design, offset)
    naive = nb_glm(counts, naive_design, offset, alpha=alpha, start=coef)
    frame = pd.DataFrame({"gene": list(genes), "effect_naive": naive["coef"][:, j]})
    fit = naive
    if z_hat is not None:
        adjusted_design = _full_rank(np.column_stack([naive_design, z_hat]))
        # the naive design's columns come first and are all kept, Z-hat's start at zero
        start = np.zeros((naive["coef"].shape[0], adjusted_design.shape[1]))
        start[:, :naive_design.shape[1]] = naive["coef"]
        fit = nb_glm(counts, adjusted_design, offset, alpha=alpha, start=start)
        effect, se = fit["coef"][:, j], fit["se"][:, j]
        loadings = fit["coef"][:, j + 1:]
        if calibrate and loadings.shape[1]:
            controls = None
            if control_genes:
                controls = np.isin(np.asarray(list(genes), dtype=str), list(control_genes))
            g, cov = sparse_calibration(effect, se, loadings, _tested(fit, j),
                                        controls=controls)
            effect = effect - loadings @ g
            se = np.sqrt(se ** 2 + np.einsum("gi,ij,gj->g", loadings, cov, loadings))
            fit = {**fit, "coef": fit["coef"].copy()}
            fit["coef"][:, j] = effect
            fit["se"] = fit["se"].copy()
            fit["se"][:, j] = se
        frame["effect_adjusted"] = effect
        frame["se_adjusted"] = se
    else:
        frame["effect_adjusted"] = np.nan
        frame["se_adjusted"] = np.nan
    wald = fit["coef"][:, j] / fit["se"][:, j]
    pvalue = 2.0 * stats.norm.sf(np.abs(wald))
    tested = _tested(fit, j)
    pvalue[~tested] = np.nan
    frame["pvalue"] = pvalue
    frame["qvalue"] = bh_qvalues(pvalue)
    frame["log2fc_adjusted"] = frame["effect_adjusted"] / np.log(2.0)
    # the mean size-factor-normalised count, as a product (no normalised copy of the counts)
    frame["base_mean"] = np.asarray(counts.T @ (1.0 / sf)).ravel() / n
    frame["se_naive"] = naive["se"][:, j]
    p_naive = 2.0 * stats.norm.sf(np.abs(naive["coef"][:, j] / naive["se"][:, j]))
    p_naive[~_tested(naive, j)] = np.nan
    frame["pvalue_naive"] = p_naive
    frame["qvalue_naive"] = bh_qvalues(p_naive)
    frame["dispersion"] = alpha
    frame["converged"] = tested
    both = tested & _tested(naive, j)
    frame.attrs["z_deviance_explained"] = (
        float(1.0 - fit["deviance"][both].sum() / naive["deviance"][both].sum())
        if z_hat is not None and both.any() else float("nan"))
    chi2 = (frame["effect_adjusted" if z_hat is not None else "effect_naive"]
            / frame["se_adjusted" if z_hat is not None else "se_naive"]).to_numpy()[tested] ** 2
    frame.attrs["inflation"] = float(np.median(chi2) / stats.chi2.ppf(0.5, 1)) \
        if tested.any() else float("nan")
    return frame


def _full_rank(design: np.ndarray, keep_last: int = 0) -> np.ndarray:
    """Drop design columns that are constant or linearly dependent on earlier ones (after
    pseudobulk averaging a covariate can become collinear); the last ``keep_last`` columns
    (the treatment) must survive or it is an error."""
    kept: list[int] = []
    for c in range(design.shape[1]):
        trial = design[:, kept + [c]]
        if np.linalg.matrix_rank(trial, tol=1e-8 * max(1.0, np.abs(trial).max())) == len(kept) + 1:
            kept.append(c)
        elif c >= design.shape[1] - keep_last:
            raise InputError(f"The treatment is collinear with the covariates over these "
                             f"{design.shape[0]} observations (cells or pseudobulk samples): "
                             "the covariates already separate treated from control units, so "
                             "no effect of the treatment can be estimated.")
    return design[:, kept]
