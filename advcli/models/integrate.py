"""Integrate mode: VAEs over the domains, mixed in one latent space by a domain discriminator.

    >>> model = advcli.IntegrationModel(adata, batch_key="batch")
    >>> model.train()
    >>> adata.obsm["X_advcli"] = model.get_latent_representation(adata)

Players: the VAE (encoders, decoders, dispersions) minimises the negative ELBO plus the
adversarial loss of the discriminator's verdict on its posterior means; the discriminator
minimises its cross-entropy on those means. --adversary grl steps both at once; alternate
lets them take turns (D-steps, then E-steps), each with the other frozen.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Iterator

import numpy as np
import torch

from .. import distributed, keys, losses
from ..data import (CountRows, count_batch, count_rows, counts_anndata, encode_domains,
                    gene_order, in_file_order, log_normalised, seeded_subset, set_uns,
                    stratified_minibatches, stratified_split)
from ..errors import InputError
from ..metrics import domain_shares
from ..nn import Decoder, DomainDiscriminator, Encoder
from ..strategies import constant_call
from ..train import EpochPlan
from .base import BaseModel, default_batch_size, default_epochs, epoch_cap, resolve_device

MIXING_CELLS = 5000
SEPARATED_ACC = 0.9  # held-out discriminator accuracy at which the domains are called apart
SETTLED_ELBO = 1e-4  # of its value: a change of the validation ELBO smaller than this is noise
SETTLED_CE = 0.01  # nats: a rise of the discriminator's validation loss smaller than this is noise
SETTLED_MIXING = 0.01  # a rise of the validation cells' neighbourhood mixing smaller than this
                       # (or than two of its standard errors over the validation cells) is noise
MIXING_NEIGHBOURS, MIXING_VAL_CELLS = 15, 1500
LARGEST_BATCH = 128  # on a few thousand cells, batches of 256 gave the adversarial game too few
                     # steps: the fit was still gaining at its last epoch (docs/integrate.md)
COUNT_LIKELIHOODS = ("nb", "zinb")  # decoders of counts: their NB means are an output
COMPOSITION_CELLS = 10_000  # training cells whose posterior means place the clusters each epoch
COMPOSITION_PRIOR = 20.0  # cells added to a domain's count in a cluster, and to its expected count
COMPOSITION_CLIP = 10.0  # no cell counts more than this many times, or less than its inverse
SCARCE = 0.25  # a domain holding fewer than this share of the cells a cluster would hold at its
               # overall share is scarce there: --adv-loss chance caps its cells' gain


def default_decoder_norm(norm: str) -> str:
    """The decoder's normalisation when --decoder-norm is not given. With LayerNorm, only after
    its first hidden layer: normalised after both, the decoder let a programme shared by the
    cell types take one long latent axis that clustering cut across; unnormalised, it lost a
    cell line across two sequencing protocols (docs/integrate.md). BatchNorm stays after each
    hidden layer, as in scVI."""
    return "layer-first" if norm == "layer" else norm


class CompositionWeights:
    """Per-cell weights of the adversary's cross-entropy under which every domain, within each
    cluster of the latent space, holds its share of all cells.

    Domains often hold the same cell types in different proportions. A discriminator that reads
    those proportions (this cluster is 80 % domain A, against 50 % overall) pushes the encoder
    to hide them, and the only way to hide them is to merge the cell types. Weighted, the
    domains' shares are the same in every cluster that holds them, so the proportions carry no
    signal, and the adversary's pull is left to what is batch effect: where in a cluster each
    domain's cells lie. Each cluster keeps its total weight, so clusters of one domain (a cell
    type the other domains lack, or domains not yet mixed) count as before.
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, centres: torch.Tensor,
                 table: torch.Tensor, scarce: torch.Tensor | None = None):
        self.loc, self.scale, self.centres, self.table = loc, scale, centres, table
        # (domain, cluster): the domain holds few of the cells it would at its share
        self.scarce = torch.zeros_like(table, dtype=torch.bool) if scarce is None else scarce

    @classmethod
    def fit(cls, means: np.ndarray, domain: np.ndarray, n_domains: int, k: int, seed: int,
            start: "CompositionWeights | None" = None) -> "CompositionWeights":
        """k-means (started from ``start``'s centres when given) on the standardised posterior
        means of a sample of cells, then each (domain, cluster)'s weight: the number of the
        domain's cells the cluster would hold at the domain's overall share, over the number
        it holds, each plus COMPOSITION_PRIOR cells (few cells, little reweighting); scaled so
        that each cluster keeps its cells' total weight, and clipped. A cell of a domain that
        the sample found nowhere in its cluster weighs 1: were it weighted up, the adversary
        would be drawn to the few cells that stray into a cluster of another domain."""
        from sklearn.cluster import KMeans

        loc, scale = means.mean(axis=0), means.std(axis=0) + 1e-6
        z = (means - loc) / scale
        k = min(k, len(z))
        if start is not None and start.centres.shape[0] == k:
            km = KMeans(k, init=start.centres.cpu().numpy().astype(z.dtype), n_init=1,
                        random_state=seed).fit(z)
        else:
            km = KMeans(k, n_init=3, random_state=seed).fit(z)
        n = np.zeros((n_domains, k))
        np.add.at(n, (domain, km.labels_), 1.0)
        at_share = n.sum(axis=1, keepdims=True) / n.sum() * n.sum(axis=0)
        w = (at_share + COMPOSITION_PRIOR) / (n + COMPOSITION_PRIOR)
        w *= n.sum(axis=0) / (n * w).sum(axis=0)
        w = np.where(n > 0, np.clip(w, 1 / COMPOSITION_CLIP, COMPOSITION_CLIP), 1.0)
        scarce = (n + 1.0) < SCARCE * (at_share + 1.0)
        as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
        return cls(as_tensor(loc), as_tensor(scale), as_tensor(km.cluster_centers_),
                   as_tensor(w), torch.as_tensor(scarce))

    def cluster(self, mean: torch.Tensor) -> torch.Tensor:
        """The cluster nearest each posterior mean."""
        z = (mean.detach().float() - self.loc) / self.scale
        return torch.cdist(z, self.centres).argmin(dim=1)

    def __call__(self, mean: torch.Tensor, domain: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each cell's weight (its domain's in the cluster nearest its posterior mean) and
        whether its domain is scarce in that cluster."""
        cluster = self.cluster(mean)
        return self.table[domain, cluster], self.scarce[domain, cluster]

    def to(self, device) -> "CompositionWeights":
        return CompositionWeights(*(t.to(device) for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.loc, self.scale, self.centres, self.table, self.scarce

    def state(self) -> dict:
        return {"loc": self.loc.tolist(), "scale": self.scale.tolist(),
                "centres": self.centres.tolist(), "table": self.table.tolist(),
                "scarce": self.scarce.tolist()}

    @classmethod
    def from_state(cls, state: dict) -> "CompositionWeights":
        """(A checkpoint from before the scarce table: no domain is scarce anywhere.)"""
        scarce = state.get("scarce")
        return cls(*(torch.tensor(state[k], dtype=torch.float32)
                     for k in ("loc", "scale", "centres", "table")),
                   None if scarce is None else torch.tensor(scarce, dtype=torch.bool))


def neighbourhood_mixing(latent: torch.Tensor, domain: torch.Tensor, n_domains: int
                         ) -> tuple[float, float]:
    """kNN domain entropy (0: every neighbourhood from one domain, 1: evenly mixed) of up to
    MIXING_VAL_CELLS cells (seeded), and its standard error over those cells. Local mixing is
    what integration is for; a discriminator can be fooled globally (accuracy near chance)
    while each domain still sits in its own patch of every cluster."""
    from ..metrics import knn, knn_domain_entropy

    n = latent.shape[0]
    if n < 3 or n_domains < 2:
        return math.nan, math.nan
    keep = seeded_subset(n, MIXING_VAL_CELLS, 0)
    _, idx = knn(latent.cpu().double().numpy()[keep], MIXING_NEIGHBOURS)
    per_cell = knn_domain_entropy(idx, domain.cpu().numpy()[keep], n_domains, per_cell=True)
    return float(per_cell.mean()), float(per_cell.std(ddof=1) / math.sqrt(len(per_cell)))


class PairedVAE(torch.nn.Module):
    """The domains' VAEs, per-domain NB dispersions and the domain discriminator on the
    posterior means.

    ``paired``: one encoder and one decoder per domain, the original design's separate VAEs.
    Otherwise (``shared``) one encoder for every cell and one decoder conditioned on the domain:
    each domain's VAE is the shared pair seen with its own condition. Measured in
    docs/integrate.md: with separate encoders each domain can move its whole cloud through one
    bias vector, and the adversarial game chases instead of mixing.
    """

    def __init__(self, n_genes: int, latent_dim: int, hidden: int, n_domains: int,
                 likelihood: str, paired: bool = False, dropout: float = 0.0,
                 adv_loss: str = "negce", tie: float = 0.0, decoder_layers: int = 2,
                 norm: str = "layer", decoder_norm: str | None = None):
        super().__init__()
        self.tie = tie
        shared_decoder = not paired
        self.encoders = torch.nn.ModuleList(Encoder(n_genes, latent_dim, hidden, dropout,
                                                    norm=norm)
                                            for _ in range(n_domains if paired else 1))
        n_dec = 1 if shared_decoder else n_domains
        self.decoders = torch.nn.ModuleList(
            Decoder(latent_dim, n_genes, hidden, likelihood, n_domains if shared_decoder else 0,
                    layers=decoder_layers, norm=decoder_norm or default_decoder_norm(norm))
            for _ in range(n_dec))
        for module in list(self.encoders[1:]) + list(self.decoders[1:]):  # a tied start
            module.load_state_dict((self.encoders if module in self.encoders else self.decoders)[0]
                                   .state_dict())
        self.log_theta = torch.nn.Parameter(torch.ones(n_domains, n_genes))
        self.discriminator = DomainDiscriminator(latent_dim, n_domains)
        self.likelihood = likelihood
        self.shared_decoder = shared_decoder
        # each domain's share of the cells: chance for the discriminator (set from the data)
        self.register_buffer("domain_shares", torch.full((n_domains,), 1.0 / n_domains),
                             persistent=False)
        self.adv_loss = losses.ADV_LOSSES[adv_loss]

    @torch.no_grad()
    def after_step(self, players) -> None:
        """Paired design: after each VAE step, every domain's encoder and decoder weights move a
        fraction ``tie`` of the way to the domains' average, so the domains' VAEs differ only
        where their data keep pulling them apart (a proximal step, free of the optimizer's
        noise floor that a penalty term under Adam has)."""
        if not self.tie or "vae" not in players:
            return
        for group in (self.encoders, self.decoders):
            if len(group) < 2:
                continue
            for params in zip(*(m.parameters() for m in group)):
                mean = torch.stack(params).mean(dim=0)
                for p in params:
                    p.lerp_(mean, self.tie)

    def theta(self) -> torch.Tensor:
        """Inverse dispersion per domain (rows) and gene."""
        return torch.exp(self.log_theta.clamp(-10.0, 10.0))

    def players(self) -> dict[str, list]:
        return {"vae": list(self.encoders.parameters()) + list(self.decoders.parameters())
                + [self.log_theta], "discriminator": list(self.discriminator.parameters())}

    def turns(self) -> list[tuple[tuple[str, ...], int]]:
        return [(("discriminator",), self.d_steps), (("vae",), self.e_steps)]

    d_steps = e_steps = 1
    kl_free_bits = 0.0
    input_thinning = 0.0
    composition: CompositionWeights | None = None  # set each epoch by IntegrationModel

    @property
    def solo_steps(self) -> dict[str, int]:
        """Under gradient reversal, the discriminator's steps beyond the joint one."""
        return {"discriminator": self.d_steps - 1}

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

    def decode(self, z: torch.Tensor, domain: torch.Tensor, with_zero_logits: bool = False
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Decoder output of each cell as a cell of ``domain`` (and the zero logits, zinb)."""
        if self.shared_decoder:
            return self.decoders[0](z, domain, with_zero_logits)
        outs = None
        for k, decoder in enumerate(self.decoders):
            rows = domain == k
            if rows.any():
                parts = decoder(z[rows], with_zero_logits=with_zero_logits)
                parts = parts if with_zero_logits else (parts,)
                outs = outs or [p.new_empty(z.shape[0], p.shape[1]) for p in parts]
                outs = [o.index_put((rows,), p) for o, p in zip(outs, parts)]
        return tuple(outs) if with_zero_logits else outs[0]

    def encoder_input(self, batch: dict) -> torch.Tensor:
        """What the encoders read: log-normalised counts. In training, with ``input_thinning``,
        each cell's counts are first binomially thinned to a depth fraction drawn from
        U(1 - input_thinning, 1), the same cell as if sequenced less deeply: an augmentation
        that keeps the encoder from relying on any one cell's sampling noise. The
        reconstruction targets stay the observed counts."""
        if not (self.training and self.input_thinning):
            return batch["x_norm"]
        counts = batch["counts"]
        keep = 1.0 - self.input_thinning * torch.rand(counts.shape[0], 1, device=counts.device,
                                                      dtype=counts.dtype)
        return log_normalised(torch.binomial(counts, keep.expand_as(counts)))

    def elbo_terms(self, batch: dict, beta_kl: float) -> dict[str, torch.Tensor]:
        """Negative ELBO per cell (reconstruction + beta * KL) and the posterior means."""
        mean, logvar = self.encode(self.encoder_input(batch), batch["domain"])
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        if self.likelihood == "zinb":
            out, zero_logits = self.decode(z, batch["domain"], with_zero_logits=True)
            recon = losses.zinb_reconstruction(batch["counts"], out, zero_logits,
                                               batch["library"], self.theta(),
                                               rows=batch["domain"],
                                               log_factorial=batch.get("log_factorial"))
        elif self.likelihood == "nb":
            out = self.decode(z, batch["domain"])
            recon = losses.nb_reconstruction(batch["counts"], out, batch["library"],
                                             self.theta(), rows=batch["domain"],
                                             log_factorial=batch.get("log_factorial"))
        else:
            recon = losses.mse_per_cell(self.decode(z, batch["domain"]), batch["x_norm"])
        per_dim = losses.gaussian_kl_per_dim(mean, logvar)
        kl = losses.kl_with_free_bits(per_dim)
        penalised = losses.kl_with_free_bits(per_dim, self.kl_free_bits)
        return {"recon": recon, "kl": kl, "elbo": recon + kl, "loss": recon + beta_kl * penalised,
                "mean": mean}

    def objective(self, batch: dict, players, ctx: dict) -> tuple[dict, dict]:
        """vae: -ELBO (KL weighted) + adv_weight * adversarial loss of the discriminator held
        constant; discriminator: its cross-entropy on the detached posterior means."""
        domain = batch["domain"]
        out, logs = {}, {}
        if "vae" in players:
            terms = self.elbo_terms(batch, ctx["kl_weight"])
            mean = terms["mean"]
            weight, scarce = self._composition(mean, domain)
            logits = constant_call(self.discriminator, mean)
            out["vae"] = terms["loss"] + ctx["adv_weight"] * self.adversarial(logits, domain,
                                                                              weight, scarce)
            logs.update(elbo=terms["elbo"].detach(), recon=terms["recon"].detach(),
                        kl=terms["kl"].detach())
            mean = mean.detach()
        else:
            with torch.no_grad():
                mean, _ = self.encode(self.encoder_input(batch), domain)
            weight, _ = self._composition(mean, domain)
        if "discriminator" in players:
            logits = self.discriminator(mean)
            out["discriminator"] = losses.domain_ce(logits, domain, weight)
            logs["disc_ce"] = out["discriminator"].detach()
        logs["disc_acc"] = (logits.detach().argmax(dim=1) == domain).float().mean()
        return out, logs

    def adversarial(self, logits: torch.Tensor, domain: torch.Tensor,
                    weight: torch.Tensor | None, scarce: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """The encoders' adversarial loss (``adv_loss``) of the discriminator's verdict. With
        ``chance`` the cap applies to the cells whose domain is scarce in their composition
        cluster (``scarce``), so a domain is not drawn into the region of a type it lacks,
        while everywhere else the cells keep negce's reward for mixing finely. Without
        composition weights nothing tells where a domain is scarce, and every cell is capped."""
        if self.adv_loss is losses.negce_to_chance:
            return self.adv_loss(logits, domain, weight, shares=self.domain_shares,
                                 capped=scarce)
        return self.adv_loss(logits, domain, weight)

    def _composition(self, mean: torch.Tensor, domain: torch.Tensor
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Each cell's composition weight and whether its domain is scarce where it lies."""
        return (None, None) if self.composition is None else self.composition(mean, domain)


class IntegrationModel(BaseModel):
    """Adversarial VAE over the domains in ``obs[batch_key]``."""

    mode = "integrate"
    progress_keys = ("elbo", "val_elbo", "disc_ce", "disc_acc")
    monitored_losses = ("elbo", "disc_ce")

    def _setup(self, adata) -> None:
        cfg = self.config
        rows = count_rows(adata, cfg.layer, self.device)
        self.genes_ = [str(g) for g in adata.var_names]
        domain, self.domains_ = encode_domains(adata, cfg.batch_key)
        if cfg.batch_size is None:
            n_train = int(round(len(domain) * (1 - cfg.val_fraction)))
            self.config = cfg = replace(cfg, batch_size=default_batch_size(n_train, LARGEST_BATCH))
        if cfg.decoder_norm is None:  # written out, so that a saved model says what it trained
            self.config = cfg = replace(cfg, decoder_norm=default_decoder_norm(cfg.norm))
        self._train_idx, self._val_idx = stratified_split(
            domain, self.domains_, cfg.val_fraction, cfg.seed, cfg.batch_key)
        self._rows = rows
        self._domain = torch.from_numpy(domain).to(self.device)
        self.module = self._fresh_module(cfg.seed)
        train = torch.cat(self._train_idx).numpy()
        self._composition_idx = torch.from_numpy(
            np.sort(train[seeded_subset(len(train), COMPOSITION_CELLS, cfg.seed)]))
        if rows.backed:
            rows.hold(np.union1d(self._val_idx.numpy(), self._composition_idx.numpy()))
            self._training = np.zeros(len(domain), dtype=bool)
            self._training[train] = True

    def _data_summary(self) -> bytes:
        return self._rows.col_sums.tobytes() + self._domain.cpu().numpy().tobytes()

    def _fresh_module(self, seed: int) -> PairedVAE:
        """A newly initialised network (seeded), with the domains' shares as chance."""
        torch.manual_seed(seed)
        module = self._build(len(self.genes_)).to(self.device)
        module.domain_shares.copy_(torch.as_tensor(
            domain_shares(self._domain.cpu().numpy(), len(self.domains_))))
        return module

    restarted_after_: int | None = None  # a collapsed fit's epochs, once it restarted unweighted

    @property
    def unweighted_(self) -> bool:
        """A collapsed fit restarted: the adversary is unweighted from then on."""
        return self.restarted_after_ is not None

    @property
    def composition_weighted(self) -> bool:
        """Whether the adversary's cross-entropy is weighted by ``CompositionWeights``."""
        return (bool(self.config.composition_clusters) and len(self.domains_) >= 2
                and not self.unweighted_)

    def _fit(self, on_epoch, checkpoint_path, checkpoint_every) -> None:
        """If the latent space ends collapsed (no active dimension, ``active_dims``) with the
        composition weights on, training restarts once from a fresh network with the
        adversary unweighted. Where the domains start apart, each composition cluster is
        nearly one domain and the few cells of other domains in it weigh up to the clip; on
        such data the encoder made every cell alike within the first epochs, and without the
        weights it did not (docs/integrate.md). A fit that did not collapse is unchanged, and
        so is one that ran to its epoch cap: a few epochs leave every latent space narrow."""
        self._run_loop(on_epoch, checkpoint_path, checkpoint_every)
        if (not self.composition_weighted or self.epochs_ >= self.max_epochs
                or self.active_dims()):
            return
        self.restarted_after_ = self.epochs_
        self.module = self._fresh_module(self.config.seed)
        self.train_state_, self.optimizer_state_ = None, None
        self._run_loop(on_epoch, checkpoint_path, checkpoint_every)

    def _build(self, n_genes: int) -> PairedVAE:
        cfg = self.config
        module = PairedVAE(n_genes, cfg.latent_dim, cfg.hidden, len(self.domains_),
                           cfg.likelihood, paired=cfg.design == "paired", dropout=cfg.dropout,
                           adv_loss=cfg.adv_loss, tie=cfg.tie, decoder_layers=cfg.decoder_layers,
                           norm=cfg.norm, decoder_norm=cfg.decoder_norm)
        module.d_steps, module.e_steps = cfg.d_steps, cfg.e_steps
        module.kl_free_bits = cfg.kl_free_bits
        module.input_thinning = cfg.input_thinning
        return module

    # ------------------------------------------------------------------ the loop's pieces

    def begin_epoch(self) -> None:
        """Cluster a sample of training cells' posterior means and weigh the adversary's
        cross-entropy by the domains' shares in each cluster (``CompositionWeights``)."""
        if not self.composition_weighted:
            self.module.composition = None
            return
        idx = self._composition_idx
        weights = CompositionWeights.fit(
            self._posterior_means(idx), self._domain[idx.to(self.device)].cpu().numpy(),
            len(self.domains_), self.config.composition_clusters, self.config.seed,
            start=self.module.composition)
        self.module.composition = weights = weights.to(self.device)
        distributed.broadcast_tensors(weights.tensors())

    def _train_extras(self) -> dict:
        composition = self.module.composition
        extras = {} if composition is None else {"composition": composition.state()}
        if self.unweighted_:
            extras["restarted_after"] = self.restarted_after_
        return extras

    def _restore_extras(self, extras: dict) -> None:
        self.restarted_after_ = extras.get("restarted_after")
        state = extras.get("composition")
        self.module.composition = (None if state is None else
                                   CompositionWeights.from_state(state).to(self.device))

    @property
    def strategy_name(self) -> str:
        return "simultaneous" if self.config.adversary == "grl" else "alternating"

    def learning_rates(self) -> dict[str, float]:
        cfg = self.config
        return {"vae": cfg.lr, "discriminator": cfg.lr_discriminator or cfg.lr}

    @property
    def n_train(self) -> int:
        return sum(len(i) for i in self._train_idx)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.config.batch_size)

    @property
    def warmup_epochs(self) -> int:
        """The epochs the KL and adversarial warm-ups are laid out over: --max-epochs, else
        100 (or enough for 1,500 steps; fewer on large data)."""
        return default_epochs(self.config.max_epochs, self.steps_per_epoch,
                              n_cells=int(self._domain.shape[0]))

    @property
    def max_epochs(self) -> int:
        """Without --max-epochs, up to twice the warm-up plan: the stopping rule ends training,
        and a fit still gaining at the planned length (a regularised encoder on close subtypes)
        gets room to settle instead of being cut off."""
        if self.config.max_epochs is not None:
            return self.config.max_epochs
        return epoch_cap(self.warmup_epochs, int(self._domain.shape[0]))

    @property
    def hvg_batch_key(self) -> str | None:
        return self.config.batch_key

    @property
    def planned_epochs(self) -> int:
        return self.warmup_epochs  # the progress bar's length; it grows if training runs on

    def batches(self, sampler: torch.Generator) -> list[torch.Tensor]:
        """Every training cell once per epoch, seeded, each minibatch holding the domains in
        their own proportions; on a backed file, within each buffer of rows read from disk.
        Domain-balanced minibatches were the first design: they replay a small domain many
        times an epoch, and on three domains of 10:3:1 the small ones mixed less
        (docs/integrate.md)."""
        bs = self.config.batch_size
        if not self._rows.backed:
            return stratified_minibatches(self._train_idx, bs, sampler)
        domain = self._domain.cpu().numpy()
        out = []
        for rows in self._rows.shuffled_buffers(sampler, self._training):
            out += stratified_minibatches([torch.from_numpy(rows[domain[rows] == k])
                                           for k in range(len(self.domains_))], bs, sampler)
        return out

    def batch(self, idx: torch.Tensor, rows: CountRows | None = None,
              domain: torch.Tensor | None = None) -> dict:
        rows = self._rows if rows is None else rows
        domain = self._domain if domain is None else domain
        idx = idx.to(self.device)
        return {**count_batch(rows, idx), "domain": domain[idx]}

    still_gaining_ = False  # set by the schedule: the epoch cap came before training settled
    overfitting_ = False  # set by the schedule: it stopped because the VAE began to overfit

    def schedule(self) -> Iterator[EpochPlan]:
        """The KL weight warms up over the first quarter of the planned epochs; the adversary
        acts from the first epoch (ramped in over a twentieth), so that the domains never part: a
        discriminator that first meets an already-separated latent space is certain of every
        cell and the negative cross-entropy gives the encoders no gradient. Training stops when,
        for --patience epochs after both warm-ups, neither has the validation ELBO improved nor
        the discriminator's validation cross-entropy or the validation cells' neighbourhood
        mixing risen: mixing the domains costs ELBO, so
        stopping on the ELBO alone ends training while the adversary is still winning. Nor does
        it stop while the discriminator still tells the domains of held-out cells apart: with a
        strong batch effect the domains start apart and mix late. But the adversary's signals
        do not keep a fit going once the VAE overfits: --patience epochs after the best
        validation ELBO, with the validation ELBO worse and the training ELBO better by at
        least as much, training stops. Mixing that costs ELBO worsens both; fitting the
        training cells' noise widens the gap between them, and blurs the cell types. Both can
        happen at once, so this stop also waits until the validation cells' mixing has not
        risen for --patience epochs: while the domains are still coming together, a fit that
        stopped would leave them part-mixed (a strong batch effect mixes late)."""
        cfg = self.config
        n = self.warmup_epochs
        kl_warm = max(1, n // 4) if cfg.kl_warmup_epochs is None else cfg.kl_warmup_epochs
        ramp = max(1, n // 20) if cfg.adv_warmup_epochs is None else cfg.adv_warmup_epochs
        factor = cfg.grl_lambda if cfg.adversary == "grl" else 1.0
        best_elbo, best_ce, best_mixing, stale = math.inf, -math.inf, -math.inf, 0
        since_best, train_at_best = 0, math.nan  # the training ELBO at the best validation ELBO
        since_mixing = 0  # epochs since the validation cells' mixing last rose
        self.overfitting_ = False
        chance_ce = math.log(len(self.domains_))
        for epoch in range(1, self.max_epochs + 1):
            kl = cfg.beta_kl * min(1.0, epoch / max(kl_warm, 1))
            adv = cfg.adv_weight * min(1.0, max(0.0, (epoch - cfg.adv_start_epoch) / max(ramp, 1)))
            record = yield EpochPlan(("vae", "discriminator"),
                                     {"kl_weight": kl, "adv_weight": adv * factor},
                                     log={"kl_weight": kl, "adv_weight": adv})
            val, ce = record.get("val_elbo", math.nan), record.get("val_disc_ce", math.nan)
            ce = min(ce, chance_ce)  # above chance the discriminator is wrong, not fooled
            if epoch >= max(kl_warm, cfg.adv_start_epoch + ramp) and math.isfinite(val):
                stale += 1
                since_best += 1
                since_mixing += 1
                if val < best_elbo - SETTLED_ELBO * abs(val):  # (best_elbo starts at inf)
                    best_elbo, stale, since_best = val, 0, 0
                    train_at_best = record.get("elbo", math.nan)
                if math.isfinite(ce) and ce > best_ce + SETTLED_CE:
                    best_ce, stale = ce, 0
                mixing = record.get("val_mixing", math.nan)
                noise = max(SETTLED_MIXING, 2.0 * record.get("val_mixing_se", 0.0))
                if math.isfinite(mixing) and mixing > best_mixing + noise:
                    best_mixing, stale, since_mixing = mixing, 0, 0
                separated = record.get("val_disc_acc", 0.0) >= SEPARATED_ACC
                if separated:
                    stale = 0  # the domains are still apart: the adversary has work to do
                worse = val - best_elbo
                overfitting = (since_best >= cfg.patience and since_mixing >= cfg.patience
                               and worse > SETTLED_ELBO * abs(val)
                               and train_at_best - record.get("elbo", math.nan) >= worse)
                if cfg.patience and overfitting and not separated:
                    self.overfitting_ = True
                    return
            self.still_gaining_ = bool(cfg.patience) and math.isfinite(val) and stale < cfg.patience
            if cfg.patience and stale >= cfg.patience:
                return

    @torch.inference_mode()
    def validate(self) -> dict[str, float]:
        """The validation cells' negative ELBO (full KL weight), the discriminator's
        cross-entropy and accuracy on their posterior means (domains weighted equally) and how
        mixed their neighbourhoods are (``val_mixing``: kNN domain entropy, 0 to 1)."""
        if len(self._val_idx) == 0:
            return {"val_elbo": math.nan, "val_disc_ce": math.nan, "val_disc_acc": math.nan,
                    "val_mixing": math.nan, "val_mixing_se": math.nan}
        self.module.eval()
        total, ce, hit, means = 0.0, [], [], []
        for idx in self._val_idx.split(2048):
            batch = self.batch(idx)
            terms = self.module.elbo_terms(batch, 1.0)
            total += terms["elbo"].item() * len(idx)
            logits = self.module.discriminator(terms["mean"])
            ce.append(torch.nn.functional.cross_entropy(logits, batch["domain"], reduction="none"))
            hit.append((logits.argmax(dim=1) == batch["domain"]).float())
            means.append(terms["mean"])
        domain = self._domain[self._val_idx]
        ce, hit = torch.cat(ce), torch.cat(hit)
        present = [k for k in range(len(self.domains_)) if (domain == k).any()]
        return {"val_elbo": total / len(self._val_idx),
                "val_disc_ce": float(np.mean([ce[domain == k].mean().item() for k in present])),
                "val_disc_acc": float(np.mean([hit[domain == k].mean().item() for k in present])),
                **dict(zip(("val_mixing", "val_mixing_se"),
                           neighbourhood_mixing(torch.cat(means), domain, len(self.domains_))))}

    def _summarise(self, wall: float, cpu: float) -> dict[str, Any]:
        records = self.train_state_.records
        cells_seen = len(records) * self.n_train
        summary = {
            "mode": self.mode, "n_cells": int(self._domain.shape[0]), "n_genes": len(self.genes_),
            "domains": {d: int((self._domain == k).sum()) for k, d in enumerate(self.domains_)},
            "epochs": self.epochs_, "train_seconds": wall, "train_cpu_seconds": cpu,
            "cells_x_epochs_per_second": cells_seen / max(wall, 1e-9),
            "final_losses": {k: records[-1].get(k, math.nan)
                             for k in ("elbo", "recon", "kl", "disc_ce", "disc_acc", "val_elbo",
                                       "val_disc_ce", "val_disc_acc")},
            "adversary": self.config.adversary, "likelihood": self.config.likelihood,
            "design": self.config.design, "latent_dim": self.config.latent_dim,
            **self._stopping(records),
            "warnings": []}
        from ..metrics import collapsed_note, mixing_note, random_mixing_ilisi

        summary["active_dims"] = active = self.active_dims()
        mixing, fraction, by_domain = self.mixing_scores()
        random_mixing = random_mixing_ilisi(self._domain.cpu().numpy(), len(self.domains_))
        summary["mixing_ilisi"], summary["mixing_fraction"] = mixing, fraction
        summary["mixing_ilisi_random"] = random_mixing
        summary["mixing_ilisi_by_domain"] = by_domain
        composition = self.module.composition
        if composition is not None:  # how far the domains' compositions differed, last epoch
            summary["composition_weights"] = {
                "clusters": int(composition.table.shape[1]),
                "min": float(composition.table.min()), "max": float(composition.table.max())}
        held_out = records[-1].get("val_disc_acc", math.nan)
        told = (f"; the discriminator tells the domain of {held_out:.0%} of held-out cells "
                f"(chance {1 / len(self.domains_):.0%})" if math.isfinite(held_out) else "")
        note = (collapsed_note(self.config.latent_dim, self.composition_weighted) if active == 0
                else mixing_note(mixing, random_mixing, fraction, by_domain,
                                 separated=held_out >= SEPARATED_ACC,
                                 detail=f"{told}. The adversary lost"))
        if note:
            summary["warnings"].append(note)
        summary["restarted_unweighted_after"] = self.restarted_after_
        if self.unweighted_:
            summary["warnings"].append(
                f"The latent space collapsed after {self.restarted_after_} epochs with the "
                "composition weights on (every cell at nearly one point), so training restarted "
                "from a fresh network with the adversary unweighted (as --composition-clusters "
                "0). Where the domains hold the cell types in different proportions, check with "
                "`advcli diagnose` and labels that no types were merged.")
        if summary["still_gaining"]:
            summary["warnings"].append(
                f"Training reached its cap of {self.max_epochs} epochs while the fit was still "
                "improving (the validation ELBO, the discriminator's loss or the mixing had "
                f"gained within the last {self.config.patience} epochs); a refit with a higher "
                "--max-epochs may mix or fit better.")
        return summary

    def _stopping(self, records: list[dict]) -> dict[str, Any]:
        """Whether early stopping ended training, and the epoch with the best validation
        ELBO (the model kept is the last epoch's)."""
        values = [r.get("val_elbo", math.nan) for r in records]
        finite = [v for v in values if math.isfinite(v)]
        best = values.index(min(finite)) + 1 if finite else None
        return {"stopped_early": len(records) < self.max_epochs, "best_val_epoch": best,
                "stopped_overfitting": self.overfitting_,
                "max_epochs": self.max_epochs,
                "still_gaining": len(records) >= self.max_epochs and self.still_gaining_}

    def active_dims(self, max_cells: int = MIXING_CELLS) -> int:
        """``metrics.active_dimensions`` of the training cells' posterior means (a seeded
        subsample): zero is a collapsed latent space, which the mixing figures cannot tell
        from an unmixed one."""
        from ..metrics import active_dimensions

        return active_dimensions(self._sample_means(max_cells)[1])

    def _sample_means(self, max_cells: int) -> tuple[np.ndarray, np.ndarray]:
        """A seeded sample of up to ``max_cells`` training cells and their posterior means:
        what the summary's checks of the latent space read."""
        keep = seeded_subset(int(self._domain.shape[0]), max_cells, self.config.seed)
        return keep, self._posterior_means(torch.from_numpy(keep))

    def mixing_scores(self, max_cells: int = MIXING_CELLS
                      ) -> tuple[float, float, dict[str, float]]:
        """Median iLISI (scIB-normalised), ``metrics.mixing_fraction`` and each domain's median
        iLISI over its own cells, of the training cells' posterior means on a seeded subsample:
        a check that the domains share the latent space. Domain-specific cell types lower them
        only for their own cells, which the medians pass over unless they are most of the
        cells; the domains' own medians tell that case apart."""
        from ..metrics import ilisi_by_domain, knn, lisi, mixing_fraction

        keep, latent = self._sample_means(max_cells)
        domain = self._domain.cpu().numpy()[keep]
        if len(np.unique(domain)) < 2 or len(keep) < 10:
            return float("nan"), float("nan"), {}
        dist, idx = knn(latent.astype(np.float64), 90)
        k = len(self.domains_)
        per_cell = lisi(dist, idx, domain)
        names = np.asarray(self.domains_)[domain]
        return (float((np.median(per_cell) - 1.0) / (k - 1.0)),
                mixing_fraction(idx[:, :50], domain, k), ilisi_by_domain(per_cell, names, k))

    # ------------------------------------------------------------------ prediction

    @torch.inference_mode()
    def _posterior_means(self, idx: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
        """Posterior means of the training data's cells ``idx``."""
        self.module.eval()
        return torch.cat([self.module.encode(b["x_norm"], b["domain"])[0].cpu()
                          for b in (self.batch(part) for part in idx.split(batch_size))]).numpy()

    def _inputs(self, adata):
        adata = counts_anndata(adata, self.config.layer)
        order = gene_order(adata, self.genes_)
        domain, _ = encode_domains(adata, self.config.batch_key, self.domains_)
        rows = count_rows(adata, self.config.layer, self.device, order)
        return rows, torch.from_numpy(domain).to(self.device)

    def predict(self, adata=None, batch_size: int = 1024, device: str | None = None,
                decode_as: str | None = None, inplace: bool = False, nb_mean: bool = True
                ) -> dict[str, np.ndarray] | list[str]:
        """Posterior means, the discriminator's probability of each cell's own domain and, with
        a count likelihood, the NB means (zinb: of its NB part, the counts without dropout;
        unless ``nb_mean=False``); ``decode_as`` decodes every cell with that domain's decoder;
        ``inplace``: written into ``adata`` (obsm['X_advcli'] for scanpy)."""
        if inplace:
            return self._predict_inplace(adata, batch_size=batch_size, device=device,
                                         decode_as=decode_as, nb_mean=nb_mean)
        parts: dict[str, list] = {}
        for _, block in self._predict_blocks(adata, batch_size, device, decode_as, nb_mean):
            for k, v in block.items():
                parts.setdefault(k, []).append(v)
        return {k: np.concatenate(v) for k, v in parts.items()}

    def _predict_blocks(self, adata, batch_size: int, device: str | None,
                        decode_as: str | None, nb_mean: bool):
        """(first cell, outputs) for one block of cells after another, so that a backed file is
        predicted in bounded memory."""
        self._require_trained()
        if device is not None:
            self.device = resolve_device(device)
            self.module.to(self.device)
        if adata is None:
            self._require_data("predict()")
            rows, domain = self._rows, self._domain
        else:
            rows, domain = self._inputs(adata)
        if decode_as is not None and decode_as not in self.domains_:
            raise InputError(f"--decode-as '{decode_as}' is not a domain of the model "
                             f"({', '.join(self.domains_)}).")
        if rows.backed:
            rows.sequential_plan()
        module = self.module.eval()
        nb = self.config.likelihood in COUNT_LIKELIHOODS
        n = rows.shape[0]
        for start in range(0, n, batch_size):
            with torch.inference_mode():
                batch = self.batch(torch.arange(start, min(start + batch_size, n)), rows, domain)
                mean, _ = module.encode(batch["x_norm"], batch["domain"])
                probs = torch.softmax(module.discriminator(mean), dim=1)
                block = {"latent": mean.cpu().numpy(),
                         "domain_prob": probs.gather(1, batch["domain"][:, None])[:, 0].cpu().numpy()}
                if nb and nb_mean:
                    out = module.decode(mean, batch["domain"])
                    block["nb_mean"] = (torch.exp(out) * batch["library"][:, None]).cpu().numpy()
                if decode_as is not None:
                    target = torch.full_like(batch["domain"], self.domains_.index(decode_as))
                    out = module.decode(mean, target)
                    if nb:
                        out = torch.exp(out) * batch["library"][:, None]
                    block["decoded"] = out.cpu().numpy()
            yield start, block

    def get_latent_representation(self, adata=None, batch_size: int = 1024) -> np.ndarray:
        return self.predict(adata, batch_size=batch_size, nb_mean=False)["latent"]

    def predict_into(self, adata, batch_size: int = 1024, device: str = "auto",
                     decode_as: str | None = None, nb_mean: bool = True) -> list[str]:
        """Add the predictions to ``adata``; return the keys written. Genes the model does not
        know get NaN in the per-gene layers. On a backed AnnData (opened with backed="r+")
        the per-gene layers go to its file block by block; ``save_backed(adata)`` then writes
        the rest."""
        from ..backed import LayerSink

        layers = {}
        if nb_mean and self.config.likelihood in COUNT_LIKELIHOODS:
            layers["nb_mean"] = keys.NB_MEAN
        if decode_as is not None:
            layers["decoded"] = f"{keys.DECODED_AS}{decode_as}"
        sink = LayerSink(adata, list(layers.values()))
        latent, prob = [], []
        for start, block in self._predict_blocks(adata, batch_size, device, decode_as, nb_mean):
            latent.append(block["latent"])
            prob.append(block["domain_prob"])
            for part, name in layers.items():
                sink.write(name, start, in_file_order(adata, self.genes_, block[part]))
        sink.finish()
        adata.obsm[keys.X_LATENT] = np.concatenate(latent).astype(np.float32)
        adata.obs[keys.DOMAIN_PROB] = np.concatenate(prob).astype(np.float32)
        written = [f"obsm['{keys.X_LATENT}']", f"obs['{keys.DOMAIN_PROB}']"]
        written += [f"layers['{name}']" for name in layers.values()]
        set_uns(adata, keys.INTEGRATE_INPUTS, {"batch_key": self.config.batch_key,
                                               "domains": list(self.domains_),
                                               "layer": self.config.layer or ""})
        return written

    # ------------------------------------------------------------------ files

    def _encoding(self) -> dict:
        return {"domains": list(self.domains_)}

    @staticmethod
    def _upgrade_config(config: dict) -> dict:
        config = dict(config)
        config.setdefault("composition_clusters", 0)  # files from before: unweighted adversary
        config.setdefault("decoder_layers", 2)  # and a decoder of two hidden layers
        config.setdefault("kl_free_bits", 0.0)  # and the plain KL
        config.setdefault("input_thinning", 0.0)  # and the encoder read the observed counts
        config.setdefault("norm", "layer")  # and LayerNorm in the encoder and decoder
        if config.get("decoder_norm") is None:  # and the decoder normalised as the encoder
            config["decoder_norm"] = config["norm"]
        return config

    def _rebuild(self, payload: dict) -> None:
        self.domains_ = [str(d) for d in payload["encoding"]["domains"]]
        self.module = self._build(len(self.genes_))
