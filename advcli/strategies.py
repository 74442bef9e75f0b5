"""How one pass over the data updates which modules. The strategies ARE the control flow of
adversarial and alternating training, so each is straight-line code over the same modules.

Confounder mode: ``AlternatingFreeze`` (heads learn with the generator frozen, then the
generator learns through the frozen heads) and ``JointUpdate`` (one backward on the weighted sum).
Integrate mode: ``GradientReversalStep`` and ``AlternatingAdversary`` (freeze-and-alternate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import losses
from .nn import ConfounderNet, set_trainable


# ---------------------------------------------------------------- confounder mode


@dataclass
class Baselines:
    """Heads fit once without Z ([X] -> D and [X, D] -> Y), for the DBPR reward."""

    classifier: torch.nn.Module
    nb: torch.nn.Module


def generator_objective(net: ConfounderNet, x, d, y, off, weights: dict[str, float],
                        temperature: float, baselines: Baselines | None = None
                        ) -> dict[str, torch.Tensor]:
    """The Z-generator's loss: bce_w * BCE + nb_w * NB - dbpr_w * (w' + v').

    BCE is per cell, NB per cell and gene; the DBPR terms are rewarded (subtracted), the sign
    the design's critique asks for.
    """
    z, _ = net.z(x, d, y, off, temperature)
    d_logit, log_mu = net.heads(x, d, z, off)
    out = {"bce": losses.bce(d_logit, d), "nb": losses.nb_nll(y, log_mu, net.nb.theta)}
    total = weights["bce"] * out["bce"] + weights["nb"] * out["nb"]
    if baselines is not None and weights["dbpr"] > 0:
        with torch.no_grad():
            d_logit_base = baselines.classifier(x)
            log_mu_base = baselines.nb(torch.cat([x, d[:, None]], dim=1), off)
        w, v = losses.dbpr_terms(d_logit, d_logit_base, d, y, log_mu, log_mu_base, net.nb.theta)
        out["dbpr_d"], out["dbpr_y"] = w, v
        total = total - weights["dbpr"] * (w + v)
    out["total"] = total
    return out


class AlternatingFreeze:
    """The alternating scheme of the original design, with its own optimizer for each module (warm-started).

    Head phase: the generator is frozen and run under no_grad; the classifier (BCE) and the NB
    model (NB) each take a step on their own loss. Generator phase: both heads are frozen
    (requires_grad False, no detach) and only the generator learns, its gradient flowing through
    the frozen heads. No graph is reused, so no retain_graph.
    """

    def __init__(self, net: ConfounderNet, lr: float, lr_generator: float, weight_decay: float):
        self.net = net
        self.opt_classifier = torch.optim.Adam(net.classifier.parameters(), lr=lr,
                                               weight_decay=weight_decay)
        self.opt_nb = torch.optim.Adam(net.nb.parameters(), lr=lr, weight_decay=weight_decay)
        self.opt_generator = torch.optim.Adam(net.generator.parameters(), lr=lr_generator,
                                              weight_decay=weight_decay)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"classifier": self.opt_classifier, "nb": self.opt_nb,
                "generator": self.opt_generator}

    def head_epoch(self, batches, get_batch: Callable, temperature: float) -> dict[str, float]:
        net = self.net
        set_trainable(net.generator, False)
        set_trainable(net.classifier, True)
        set_trainable(net.nb, True)
        sums = {"bce": 0.0, "nb": 0.0}
        for idx in batches:
            x, d, y, off = get_batch(idx)
            with torch.no_grad():
                z, _ = net.z(x, d, y, off, temperature)
            loss_d = losses.bce(net.classifier(torch.cat([x, z], dim=1)), d)
            self.opt_classifier.zero_grad(set_to_none=True)
            loss_d.backward()
            self.opt_classifier.step()
            loss_y = losses.nb_nll(y, net.nb(torch.cat([x, d[:, None], z], dim=1), off),
                                   net.nb.theta)
            self.opt_nb.zero_grad(set_to_none=True)
            loss_y.backward()
            self.opt_nb.step()
            sums["bce"] += loss_d.item() * len(idx)
            sums["nb"] += loss_y.item() * len(idx)
        n = sum(len(idx) for idx in batches)
        return {k: v / n for k, v in sums.items()}

    def generator_epoch(self, batches, get_batch: Callable, temperature: float,
                        weights: dict[str, float], baselines: Baselines | None) -> dict[str, float]:
        net = self.net
        set_trainable(net.generator, True)
        set_trainable(net.classifier, False)
        set_trainable(net.nb, False)
        sums: dict[str, float] = {}
        for idx in batches:
            x, d, y, off = get_batch(idx)
            out = generator_objective(net, x, d, y, off, weights, temperature, baselines)
            self.opt_generator.zero_grad(set_to_none=True)
            out["total"].backward()
            self.opt_generator.step()
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v.item() * len(idx)
        set_trainable(net.classifier, True)
        set_trainable(net.nb, True)
        n = sum(len(idx) for idx in batches)
        return {k: v / n for k, v in sums.items()}


class JointUpdate(AlternatingFreeze):
    """Every module learns at every step from one backward on the generator's weighted loss."""

    def joint_epoch(self, batches, get_batch: Callable, temperature: float,
                    weights: dict[str, float], baselines: Baselines | None) -> dict[str, float]:
        set_trainable(self.net, True)
        sums: dict[str, float] = {}
        opts = list(self.optimizers().values())
        for idx in batches:
            x, d, y, off = get_batch(idx)
            out = generator_objective(self.net, x, d, y, off, weights, temperature, baselines)
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            out["total"].backward()
            for opt in opts:
                opt.step()
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v.item() * len(idx)
        n = sum(len(idx) for idx in batches)
        return {k: v / n for k, v in sums.items()}


# ---------------------------------------------------------------- integrate mode


class PairedVAE(torch.nn.Module):
    """The domains' VAEs, per-domain NB dispersions and the domain discriminator on the posterior
    means.

    ``paired``: one encoder and one decoder per domain, the original design's separate VAEs. Otherwise
    (``shared``) one encoder for every cell and one decoder conditioned on the domain: each
    domain's VAE is the shared pair seen with its own condition. Measured in docs/integrate.md:
    with separate encoders each domain can move its whole cloud through one bias vector, and the
    adversarial game chases instead of mixing.
    """

    def __init__(self, n_genes: int, latent_dim: int, hidden: int, n_domains: int,
                 likelihood: str, paired: bool = False, dropout: float = 0.0):
        super().__init__()
        from .nn import Decoder, DomainDiscriminator, Encoder

        shared_decoder = not paired
        self.encoders = torch.nn.ModuleList(Encoder(n_genes, latent_dim, hidden, dropout)
                                            for _ in range(n_domains if paired else 1))
        n_dec = 1 if shared_decoder else n_domains
        self.decoders = torch.nn.ModuleList(
            Decoder(latent_dim, n_genes, hidden, likelihood, n_domains if shared_decoder else 0)
            for _ in range(n_dec))
        for module in list(self.encoders[1:]) + list(self.decoders[1:]):  # a tied start
            module.load_state_dict((self.encoders if module in self.encoders else self.decoders)[0]
                                   .state_dict())
        self.log_theta = torch.nn.Parameter(torch.ones(n_domains, n_genes))
        self.discriminator = DomainDiscriminator(latent_dim, n_domains)
        self.likelihood = likelihood
        self.shared_decoder = shared_decoder

    def theta(self) -> torch.Tensor:
        """Inverse dispersion per domain (rows) and gene."""
        return torch.exp(self.log_theta.clamp(-10.0, 10.0))

    def vae_parameters(self):
        return list(self.encoders.parameters()) + list(self.decoders.parameters()) + [self.log_theta]

    def encode(self, x_norm: torch.Tensor, domain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance, each cell through its own domain's encoder."""
        if len(self.encoders) == 1:
            return self.encoders[0](x_norm)
        mean = x_norm.new_empty(x_norm.shape[0], self.encoders[0].mean.out_features)
        logvar = torch.empty_like(mean)
        for k, encoder in enumerate(self.encoders):
            rows = domain == k
            if rows.any():
                m, lv = encoder(x_norm[rows])
                mean = mean.index_put((rows,), m)
                logvar = logvar.index_put((rows,), lv)
        return mean, logvar

    def decode(self, z: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """Decoder output of each cell as a cell of ``domain``."""
        if self.shared_decoder:
            return self.decoders[0](z, domain)
        out = None
        for k, decoder in enumerate(self.decoders):
            rows = domain == k
            if rows.any():
                part = decoder(z[rows])
                out = part.new_empty(z.shape[0], part.shape[1]) if out is None else out
                out = out.index_put((rows,), part)
        return out

    def elbo_terms(self, batch: dict, beta_kl: float) -> dict[str, torch.Tensor]:
        """Negative ELBO per cell (reconstruction + beta * KL) and the posterior means."""
        mean, logvar = self.encode(batch["x_norm"], batch["domain"])
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        out = self.decode(z, batch["domain"])
        if self.likelihood == "nb":
            log_mu = out + torch.log(batch["library"])[:, None]
            recon = -losses.nb_log_prob(batch["counts"], log_mu, self.theta(),
                                        rows=batch["domain"]).sum(dim=1).mean()
        else:
            recon = losses.mse_per_cell(out, batch["x_norm"])
        kl = losses.gaussian_kl(mean, logvar)
        return {"recon": recon, "kl": kl, "elbo": recon + kl, "loss": recon + beta_kl * kl,
                "mean": mean}


def adam(params, lr: float) -> torch.optim.Optimizer:
    """Adam, fused into one kernel where the torch build supports it (CPU since torch 2.4): on
    thousands of genes its per-tensor loops otherwise cost a sixth of each step."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(params, lr=lr)


def _frozen_logits(discriminator: torch.nn.Module, means: torch.Tensor) -> torch.Tensor:
    """The discriminator's logits with its parameters treated as constants (gradient to means only)."""
    params = {k: v.detach() for k, v in discriminator.named_parameters()}
    return torch.func.functional_call(discriminator, params, (means,))


class GradientReversalStep:
    """One forward, one backward: the discriminator minimises its cross-entropy while the encoders
    receive its reversed gradient, scaled by grl_lambda x the adversarial weight, through a
    GradientReversal layer. With --adv-loss uniform or flip the encoders' term is that loss
    through the discriminator's parameters held constant, in the same backward. The
    discriminator's own loss is never scaled, so it keeps learning while the adversary warms up.
    Two optimizers step together."""

    def __init__(self, model: PairedVAE, lr: float, lr_disc: float, grl_lambda: float,
                 adv_loss: str):
        from .nn import GradientReversal

        self.model = model
        self.reverse = GradientReversal(grl_lambda)
        self.grl_lambda, self.adv_loss = grl_lambda, adv_loss
        self.opt_vae = adam(model.vae_parameters(), lr)
        self.opt_disc = adam(model.discriminator.parameters(), lr_disc)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"vae": self.opt_vae, "discriminator": self.opt_disc}

    def step(self, batch: dict, beta_kl: float, adv_weight: float) -> dict[str, float]:
        m = self.model
        terms = m.elbo_terms(batch, beta_kl)
        domain = batch["domain"]
        if self.adv_loss == "negce":
            self.reverse.lambd = self.grl_lambda * adv_weight
            logits = m.discriminator(self.reverse(terms["mean"]))
            disc_ce = losses.domain_ce(logits, domain)
            loss = terms["loss"] + disc_ce
        else:
            logits = m.discriminator(terms["mean"].detach())
            disc_ce = losses.domain_ce(logits, domain)
            fool = losses.encoder_adversarial_loss(_frozen_logits(m.discriminator, terms["mean"]),
                                                   domain, self.adv_loss)
            loss = terms["loss"] + disc_ce + adv_weight * self.grl_lambda * fool
        self.opt_vae.zero_grad(set_to_none=True)
        self.opt_disc.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_vae.step()
        self.opt_disc.step()
        return _record(terms, disc_ce, logits, domain)


class AlternatingAdversary:
    """Freeze and alternate: D-steps train the discriminator on posterior means computed under
    no_grad (encoders untouched); E-steps freeze the discriminator (requires_grad False) and train
    the VAEs on the ELBO plus the adversarial term, its gradient flowing through the frozen
    discriminator into the encoders."""

    def __init__(self, model: PairedVAE, lr: float, lr_disc: float, d_steps: int, e_steps: int,
                 adv_loss: str):
        self.model = model
        self.d_steps, self.e_steps, self.adv_loss = d_steps, e_steps, adv_loss
        self.opt_vae = adam(model.vae_parameters(), lr)
        self.opt_disc = adam(model.discriminator.parameters(), lr_disc)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"vae": self.opt_vae, "discriminator": self.opt_disc}

    def d_step(self, batch: dict) -> torch.Tensor:
        m = self.model
        set_trainable(m.discriminator, True)
        with torch.no_grad():
            mean, _ = m.encode(batch["x_norm"], batch["domain"])
        logits = m.discriminator(mean)
        disc_ce = losses.domain_ce(logits, batch["domain"])
        self.opt_disc.zero_grad(set_to_none=True)
        disc_ce.backward()
        self.opt_disc.step()
        return disc_ce

    def e_step(self, batch: dict, beta_kl: float, adv_weight: float):
        m = self.model
        set_trainable(m.discriminator, False)
        terms = m.elbo_terms(batch, beta_kl)
        logits = m.discriminator(terms["mean"])
        fool = losses.encoder_adversarial_loss(logits, batch["domain"], self.adv_loss)
        loss = terms["loss"] + adv_weight * fool
        self.opt_vae.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_vae.step()
        set_trainable(m.discriminator, True)
        return terms, logits

    def step(self, batch: dict, beta_kl: float, adv_weight: float) -> dict[str, float]:
        for _ in range(self.d_steps):
            disc_ce = self.d_step(batch)
        for _ in range(self.e_steps):
            terms, logits = self.e_step(batch, beta_kl, adv_weight)
        return _record(terms, disc_ce, logits, batch["domain"])


def _record(terms: dict, disc_ce: torch.Tensor, logits: torch.Tensor,
            domain: torch.Tensor) -> dict[str, float]:
    accuracy = (logits.detach().argmax(dim=1) == domain).float().mean()
    return {"elbo": terms["elbo"].item(), "recon": terms["recon"].item(), "kl": terms["kl"].item(),
            "disc_ce": disc_ce.item(), "disc_acc": accuracy.item()}
