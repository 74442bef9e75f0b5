"""Losses, each averaged per cell (and per gene) so that their weights mean something.

The NB is parameterised by its log mean and inverse dispersion theta = 1 / alpha, as in scVI:
Var(y) = mu + mu^2 / theta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def as_float(*tensors):
    """Half-precision tensors (the outputs of layers under ``--precision bf16``) as float32,
    the rest unchanged: every loss is computed in at least single precision."""
    out = tuple(t.float() if t is not None and t.dtype in (torch.bfloat16, torch.float16)
                else t for t in tensors)
    return out if len(out) > 1 else out[0]


def nb_log_prob(y: torch.Tensor, log_mu: torch.Tensor, theta: torch.Tensor,
                rows: torch.Tensor | None = None, factorial: bool = True) -> torch.Tensor:
    """Elementwise NB log-probability of counts ``y`` (same shape as ``log_mu``).

    ``factorial=False`` leaves out -log(y!), a constant of the data: the training losses add it
    back from per-cell sums computed once (``log_factorial_sums``) instead of running an lgamma
    over every minibatch entry at every step.

    ``theta`` broadcasts against ``y``; or, given ``rows``, it is a table with one row per group
    (a domain) and cell i uses row ``rows[i]``: the per-gene terms (log and lgamma of theta) are
    then computed once per group rather than once per cell (one of the three lgamma passes
    over cells x genes, and its digamma backward, saved).
    """
    log_theta, lgamma_theta = torch.log(theta), torch.lgamma(theta)
    if rows is not None:
        theta, log_theta, lgamma_theta = theta[rows], log_theta[rows], lgamma_theta[rows]
    log_theta_mu = torch.logaddexp(log_theta, log_mu)  # log(theta + mu), stable for large mu
    out = (theta * (log_theta - log_theta_mu) + y * (log_mu - log_theta_mu)
           + torch.lgamma(y + theta) - lgamma_theta)
    return out - torch.lgamma(y + 1.0) if factorial else out


def log_factorial_sums(y: torch.Tensor) -> torch.Tensor:
    """Each cell's sum over genes of log(y!)."""
    return torch.lgamma(y + 1.0).sum(dim=1)


@dataclass
class CountHistogram:
    """Each gene's distinct nonzero counts and the share of the training cells holding each.

    The NB term lgamma(y + theta) - lgamma(theta) depends on the data only through these
    pairs, which are usually fewer than a minibatch's nonzero counts (a count recurs across
    cells): a loss given the histogram takes that term's exact mean over all training cells,
    with its lgamma and digamma (the costliest functions of a step on a CPU) evaluated once per
    pair instead of once per count. Zeros add nothing to the term, so ``nonzero_share`` (per
    gene) is all lgamma(theta) needs.
    """

    genes: torch.Tensor  # int64, one entry per (gene, count) pair
    counts: torch.Tensor  # float32
    share: torch.Tensor  # float32: cells with that count / cells
    nonzero_share: torch.Tensor  # float32, per gene

    @property
    def pairs(self) -> int:
        return len(self.genes)

    def of_pairs(self, pair_ids: torch.Tensor, n_cells: int) -> "CountHistogram":
        """The histogram of some of the cells (a minibatch), from the pair of each of their
        nonzero counts (``pair_ids``; ``pairs`` marks a stored zero): one bincount, and the
        loss's count term is then exactly the minibatch's, its lgamma and digamma once per
        pair rather than once per count."""
        found = torch.bincount(pair_ids, minlength=self.pairs + 1)[:self.pairs]
        share = found.to(self.share.dtype) / n_cells
        nonzero_share = torch.zeros_like(self.nonzero_share).index_add_(0, self.genes, share)
        return CountHistogram(self.genes, self.counts, share, nonzero_share)

    def to(self, device) -> "CountHistogram":
        return CountHistogram(*(t.to(device) for t in (self.genes, self.counts, self.share,
                                                       self.nonzero_share)))


def nb_count_term(theta: torch.Tensor, histogram: CountHistogram) -> torch.Tensor:
    """Mean over the histogram's cells of sum over genes of lgamma(y + theta) - lgamma(theta)."""
    theta = as_float(theta)
    as_theta = (lambda t: t.to(theta.dtype))  # a no-op in training (float32)
    per_pair = torch.lgamma(as_theta(histogram.counts) + theta[histogram.genes])
    return (per_pair @ as_theta(histogram.share)
            - torch.lgamma(theta) @ as_theta(histogram.nonzero_share))


class _NBCellLogLik(torch.autograd.Function):
    """Per-cell NB log-likelihood without log(y!), with its gradient written out.

    With s = log(mu / theta) it is y * s - (y + theta) * softplus(s) + lgamma(y + theta) -
    lgamma(theta), whose gradient in log mu is y - (y + theta) * sigmoid(s): a few elementwise
    passes where autograd through nb_log_prob takes about twice as many. The lgamma terms (and
    the digamma of theta's gradient, the costliest functions on a CPU) vanish where y = 0, so on
    a CPU minibatch that is mostly zeros they are evaluated on the nonzero counts only; with
    ``count_term`` False they are left out (the caller adds them from a CountHistogram).
    """

    @staticmethod
    def forward(ctx, y, log_mu, theta, rows, count_term=True):
        by_row = (lambda t: t[rows]) if rows is not None else (lambda t: t)
        theta_b = by_row(theta)
        s = log_mu - by_row(torch.log(theta))
        softplus = F.softplus(s)
        y_theta = y + theta_b
        out = (y * s - y_theta * softplus).sum(dim=1)
        ctx.mode = "none"
        if count_term:
            nonzero = y > 0
            sparse = y.device.type == "cpu" and 3 * int(nonzero.sum()) < y.numel()
            ctx.mode = "sparse" if sparse else "dense"
        if ctx.mode == "sparse":
            r, c = nonzero.nonzero(as_tuple=True)
            theta_nz = theta_b.expand_as(y)[r, c]
            out.index_add_(0, r, torch.lgamma(y[r, c] + theta_nz) - torch.lgamma(theta_nz))
            ctx.save_for_backward(y, s, softplus, y_theta, theta_b, theta, rows, r, c, theta_nz)
        else:
            if ctx.mode == "dense":
                out += (torch.lgamma(y_theta) - by_row(torch.lgamma(theta))).sum(dim=1)
            ctx.save_for_backward(y, s, softplus, y_theta, theta_b, theta, rows)
        return out

    @staticmethod
    def backward(ctx, grad):
        y, s, softplus, y_theta, theta_b, theta, rows = ctx.saved_tensors[:7]
        grad_log_mu = grad_theta = None
        p = torch.sigmoid(s)
        if ctx.needs_input_grad[1]:
            grad_log_mu = grad[:, None] * (y - y_theta * p)
        if ctx.needs_input_grad[2]:
            per_entry = (y_theta * p - y) / theta_b - softplus
            if ctx.mode == "sparse":
                r, c, theta_nz = ctx.saved_tensors[7:]
                per_entry.index_put_((r, c), torch.digamma(y[r, c] + theta_nz)
                                     - torch.digamma(theta_nz), accumulate=True)
            elif ctx.mode == "dense":
                digamma_theta = torch.digamma(theta)
                per_entry += torch.digamma(y_theta) - (digamma_theta[rows] if rows is not None
                                                       else digamma_theta)
            per_entry *= grad[:, None]
            if rows is not None:
                grad_theta = torch.zeros_like(theta).index_add_(0, rows, per_entry)
            else:
                grad_theta = per_entry.sum_to_size(theta.shape)
        return None, grad_log_mu, grad_theta, None, None


def _cell_log_lik(y, log_mu, theta, rows, log_factorial, count_term: bool = True
                  ) -> torch.Tensor:
    """Per-cell NB log-likelihood summed over genes; ``log_factorial`` (per-cell sums of
    log(y!)) saves the elementwise lgamma when it is known; ``count_term`` False leaves out
    lgamma(y + theta) - lgamma(theta)."""
    y, log_mu, theta = as_float(y, log_mu, theta)
    if log_factorial is None:
        log_factorial = log_factorial_sums(y)
    log_mu = log_mu.expand_as(y)
    return _NBCellLogLik.apply(y, log_mu, theta, rows, count_term) - log_factorial


def nb_reconstruction(counts: torch.Tensor, log_prop: torch.Tensor, library: torch.Tensor,
                      theta: torch.Tensor, rows: torch.Tensor | None = None,
                      log_factorial: torch.Tensor | None = None) -> torch.Tensor:
    """Negative NB log-likelihood of each cell's counts given the decoder's log proportions
    and the cell's library size, summed over genes and averaged over cells (scVI's
    reconstruction term); ``theta`` per gene, or a table with ``rows`` as in nb_log_prob."""
    log_mu = as_float(log_prop) + torch.log(library)[:, None]
    return -_cell_log_lik(counts, log_mu, theta, rows, log_factorial).mean()


def zinb_reconstruction(counts: torch.Tensor, log_prop: torch.Tensor,
                        zero_logits: torch.Tensor, library: torch.Tensor, theta: torch.Tensor,
                        rows: torch.Tensor | None = None,
                        log_factorial: torch.Tensor | None = None) -> torch.Tensor:
    """As nb_reconstruction, for the zero-inflated NB (scVI's default likelihood): each count
    is zero with probability sigmoid(``zero_logits``), NB otherwise. Written as the NB term plus
    a correction on the zero entries, log(pi + (1 - pi) NB(0)) - log NB(0), and log(1 - pi) on
    every entry, so the NB part keeps its fast gradient."""
    log_mu = as_float(log_prop) + torch.log(library)[:, None]
    logits = as_float(zero_logits)
    nb = _cell_log_lik(counts, log_mu, theta, rows, log_factorial)
    log_theta = torch.log(theta)  # once per group, as in nb_log_prob, then a row per cell
    if rows is not None:
        theta, log_theta = theta[rows], log_theta[rows]
    log_nb_zero = -theta * F.softplus(log_mu - log_theta)
    correction = torch.where(counts == 0, torch.logaddexp(logits, log_nb_zero) - log_nb_zero,
                             torch.zeros_like(logits))
    return -(nb + (correction - F.softplus(logits)).sum(dim=1)).mean()


def nb_nll(y: torch.Tensor, log_mu: torch.Tensor, theta: torch.Tensor,
           log_factorial: torch.Tensor | None = None,
           histogram: CountHistogram | None = None) -> torch.Tensor:
    """NB negative log-likelihood averaged over cells and genes (nats per count entry). Given
    a count ``histogram``, the term that depends on theta and the counts alone comes from it,
    with lgamma and digamma once per (gene, count) pair: the minibatch's own histogram
    (CountHistogram.of_pairs) gives exactly the plain loss; all training cells' gives the same
    expected loss without that term's minibatch noise."""
    if histogram is None:
        return -_cell_log_lik(y, log_mu, theta, None, log_factorial).mean() / y.shape[1]
    data_fit = _cell_log_lik(y, log_mu, theta, None, log_factorial, count_term=False).mean()
    return -(data_fit + nb_count_term(theta, histogram)) / y.shape[1]


def nb_deviance(y: torch.Tensor, log_mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Per-gene NB deviance, 2 (loglik(saturated) - loglik(model)), summed over the cells given."""
    log_mu = as_float(log_mu)
    saturated = nb_log_prob(y, torch.log(y.clamp_min(1e-8)), theta)
    return 2.0 * (saturated - nb_log_prob(y, log_mu, theta)).sum(dim=0)


def bce(logit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy from logits, averaged over cells."""
    return F.binary_cross_entropy_with_logits(as_float(logit), target)


def dbpr_terms(d_logit: torch.Tensor, d_logit_base: torch.Tensor, d: torch.Tensor,
               y: torch.Tensor, log_mu: torch.Tensor, log_mu_base: torch.Tensor,
               theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The deviance-based partial R^2 of Z for D (w') and for Y (v', mean over genes).

    Each is 1 - deviance(with Z) / deviance(baseline without Z): positive when Z-hat improves on
    the baseline. The objective *subtracts* them (the seed added them, penalising improvement).
    """
    d_logit, d_logit_base = as_float(d_logit, d_logit_base)
    dev_d = F.binary_cross_entropy_with_logits(d_logit, d, reduction="sum")
    dev_d_base = F.binary_cross_entropy_with_logits(d_logit_base, d, reduction="sum")
    w = 1.0 - dev_d / dev_d_base.clamp_min(1e-8)
    dev_y = nb_deviance(y, log_mu, theta)
    dev_y_base = nb_deviance(y, log_mu_base, theta)
    v = (1.0 - dev_y / dev_y_base.clamp_min(1e-8)).mean()
    return w, v


def gaussian_kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) of each cell (rows) and latent dimension (columns)."""
    mu, logvar = as_float(mu, logvar)
    return -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp())


def kl_with_free_bits(per_dim: torch.Tensor, free_bits: float = 0.0) -> torch.Tensor:
    """The KL of ``gaussian_kl_per_dim``, summed over dimensions and averaged over cells.

    ``free_bits`` > 0: each dimension's KL, averaged over the cells, counts as at least that many
    nats, so a dimension below it gets no gradient toward the prior (Kingma et al. 2016)."""
    if free_bits <= 0:
        return per_dim.sum(dim=1).mean()
    return per_dim.mean(dim=0).clamp(min=free_bits).sum()


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over latent dimensions, averaged over cells."""
    return kl_with_free_bits(gaussian_kl_per_dim(mu, logvar))


def mse_per_cell(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Squared error summed over genes, averaged over cells (a Gaussian NLL up to constants)."""
    x_hat = as_float(x_hat)
    return (x_hat - x).pow(2).sum(dim=1).mean()


def cell_mean(values: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over cells, or mean of ``weight`` x value: weights whose mean over the data is 1
    keep the loss's scale, and the mean (not a sum divided by the minibatch's weights) keeps
    each cell's gradient the same however the minibatch is split across processes."""
    return values.mean() if weight is None else (weight * values).mean()


def domain_ce(logits: torch.Tensor, domain: torch.Tensor,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """The discriminator's cross-entropy for the true domains (what it minimises), each cell
    counted ``weight`` times (see ``cell_mean``)."""
    return cell_mean(F.cross_entropy(as_float(logits), domain, reduction="none"), weight)


def attribute_regularisation(dimension: torch.Tensor, attribute: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between the pairwise distances of one latent dimension and
    those of an attribute, within the minibatch: minimal when the dimension orders (and spaces)
    the cells as the attribute does, up to sign and shift."""
    dimension = as_float(dimension)
    d_latent = (dimension[:, None] - dimension[None, :]).abs()
    d_attribute = (attribute[:, None] - attribute[None, :]).abs()
    return (d_latent - d_attribute).abs().mean()


def sliced_wasserstein_normal(code: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Squared 1-D Wasserstein distance of a minibatch of codes to N(0, I) along each column of
    ``directions`` (unit vectors), averaged: each projection's sorted values against the normal
    quantiles at (i + 1/2) / n. Zero in expectation only when every projected marginal is
    standard normal; pairs with a prior discriminator, which judges the joint shape but lets
    the marginals' location and scale drift by tenths of a unit."""
    with torch.autocast(code.device.type, enabled=False):  # a loss: float32, as the others
        projected = as_float(code) @ as_float(directions)
    n = projected.shape[0]
    levels = (torch.arange(n, dtype=projected.dtype, device=projected.device) + 0.5) / n
    quantiles = math.sqrt(2.0) * torch.erfinv(2.0 * levels - 1.0)
    return ((projected.sort(dim=0).values - quantiles[:, None]) ** 2).mean()


def negce(logits: torch.Tensor, domain: torch.Tensor,
          weight: torch.Tensor | None = None) -> torch.Tensor:
    """Minus the discriminator's cross-entropy: the encoder maximises the discriminator's loss
    (the zero-sum game that gradient reversal plays). Its gradient fades where the discriminator
    is certain, which spares cell types that exist in one domain only."""
    return -domain_ce(logits, domain, weight)


def uniform(logits: torch.Tensor, domain: torch.Tensor,
            weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy to the uniform distribution, minus its minimum: zero at p = 1/K."""
    per_cell = -F.log_softmax(as_float(logits), dim=1).mean(dim=1)
    return cell_mean(per_cell, weight) - math.log(logits.shape[1])


def flip(logits: torch.Tensor, domain: torch.Tensor,
         weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy to every wrong domain, as scvi-tools' adversarial classifier trains its
    encoder."""
    log_p = F.log_softmax(as_float(logits), dim=1)
    wrong = torch.ones_like(log_p)
    wrong.scatter_(1, domain[:, None], 0.0)
    wrong = wrong / wrong.sum(dim=1, keepdim=True)
    return cell_mean(-(wrong * log_p).sum(dim=1), weight)


def negce_to_chance(logits: torch.Tensor, target: torch.Tensor,
                    weight: torch.Tensor | None = None, shares: torch.Tensor | None = None,
                    capped: torch.Tensor | None = None) -> torch.Tensor:
    """Minus the discriminator's cross-entropy, capped at chance (-log of the class's share of
    the data, ``shares``; 1/K without them) for the cells in ``capped`` (every cell when None).
    Uncapped, a cell's reward grows without bound as it moves to where the discriminator finds
    its class absent, so a domain that lacks a cell type is drawn into that type's region;
    capped, a cell gains nothing once its class is no more recognisable than its share makes
    it."""
    ce = F.cross_entropy(as_float(logits), target, reduction="none")
    chance = (torch.full_like(ce, math.log(logits.shape[1])) if shares is None
              else -torch.log(shares.to(ce.dtype)[target]))
    gain = torch.minimum(ce, chance)
    if capped is not None:
        gain = torch.where(capped, gain, ce)
    return -cell_mean(gain, weight)


# What an encoder minimises to fool a discriminator, by --adv-loss name; each decreases as the
# discriminator's probability of the true class falls, and takes optional per-cell weights.
# A new loss is one function and one entry.
ADV_LOSSES = {"negce": negce, "chance": negce_to_chance, "uniform": uniform, "flip": flip}
