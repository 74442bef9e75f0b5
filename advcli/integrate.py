"""Integrate mode: one VAE per domain, mixed in one latent space by a domain discriminator.

    >>> model = advcli.IntegrationModel(adata, batch_key="batch")
    >>> model.train()
    >>> adata.obsm["X_advcli"] = model.get_latent_representation(adata)
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import keys
from .api import TrainedModel, resolve_device
from .config import IntegrationConfig, config_from_dict
from .data import (CountRows, encode_domains, gene_order, load_counts, set_uns,
                   validate_counts)
from .errors import InputError
from .strategies import AlternatingAdversary, GradientReversalStep, PairedVAE

TARGET_SUM = 1e4
MIXING_CELLS = 5000


DEFAULT_EPOCHS = 100  # passes over the data, as scVI's benchmarks train
MIN_STEPS = 1500  # but at least this many optimizer steps: on a few hundred cells the adversary
                  # needs steps, not epochs, to act


def default_batch_size(n_cells: int) -> int:
    """A power of two between 64 and 256 giving at least ~8 steps per epoch: on a few hundred
    cells, batches of 256 leave two steps an epoch and the adversary too few steps to act."""
    return int(min(256, max(64, 2 ** math.floor(math.log2(max(n_cells / 8, 1))))))


class IntegrationModel(TrainedModel):
    """Paired adversarial VAE over the domains in ``obs[batch_key]``."""

    mode = "integrate"

    def __init__(self, adata, config: IntegrationConfig | None = None, **options):
        cfg = self._configure(config, options, IntegrationConfig)
        validate_counts(adata, cfg.layer)
        self.config = cfg
        self.genes_ = [str(g) for g in adata.var_names]
        domain, self.domains_ = encode_domains(adata, cfg.batch_key)
        counts = load_counts(adata, cfg.layer)
        self.device = resolve_device(cfg.device)
        self._split(domain)
        torch.manual_seed(cfg.seed)
        self.net = self._build(len(self.genes_)).to(self.device)
        self._rows = CountRows(counts, self.device)
        self._domain = torch.from_numpy(domain).to(self.device)
        self.history_: dict | None = None
        self.summary_: dict | None = None
        self.optimizer_state_: dict | None = None
        self.is_trained_ = False

    def _split(self, domain: np.ndarray) -> None:
        """Seeded, domain-stratified train/validation split; every domain must fill its share of
        a minibatch."""
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        if cfg.batch_size is None:
            n_train = int(round(len(domain) * (1 - cfg.val_fraction)))
            self.config = cfg = replace(cfg, batch_size=default_batch_size(n_train))
        per_domain = max(1, cfg.batch_size // len(self.domains_))
        self._train_idx, val = [], []
        for k, name in enumerate(self.domains_):
            cells = rng.permutation(np.flatnonzero(domain == k))
            n_val = int(round(cfg.val_fraction * len(cells)))
            if len(cells) - n_val < per_domain:
                raise InputError(
                    f"Domain '{name}' of obs['{cfg.batch_key}'] has {len(cells)} cells, fewer than "
                    f"one minibatch needs ({per_domain} training cells per domain at --batch-size "
                    f"{cfg.batch_size} with {len(self.domains_)} domains). Lower --batch-size or "
                    "leave this domain out.")
            self._train_idx.append(torch.from_numpy(cells[n_val:]))
            val.append(cells[:n_val])
        self._val_idx = torch.from_numpy(np.sort(np.concatenate(val)))
        self._per_domain = per_domain

    def _build(self, n_genes: int) -> PairedVAE:
        cfg = self.config
        return PairedVAE(n_genes, cfg.latent_dim, cfg.hidden, len(self.domains_), cfg.likelihood,
                         paired=cfg.design == "paired", dropout=cfg.dropout)

    @property
    def steps_per_epoch(self) -> int:
        return max(math.ceil(len(i) / self._per_domain) for i in self._train_idx)

    @property
    def max_epochs(self) -> int:
        """--max-epochs, else DEFAULT_EPOCHS or as many as MIN_STEPS needs (at most 400)."""
        if self.config.max_epochs is not None:
            return self.config.max_epochs
        return int(min(400, max(DEFAULT_EPOCHS, math.ceil(MIN_STEPS / self.steps_per_epoch))))

    @property
    def planned_epochs(self) -> int:
        return self.max_epochs

    def _batch(self, idx: torch.Tensor, rows: CountRows, domain: torch.Tensor) -> dict:
        idx = idx.to(self.device)
        counts = rows.rows(idx)
        library = counts.sum(dim=1).clamp_min(1.0)
        x_norm = torch.log1p(counts / library[:, None] * TARGET_SUM)
        return {"counts": counts, "library": library, "x_norm": x_norm, "domain": domain[idx]}

    def _balanced_batches(self, generator: torch.Generator) -> list[torch.Tensor]:
        """One epoch of domain-balanced minibatches: equal cells per domain per step, smaller
        domains cycled (reshuffled each cycle) until the largest has been seen once."""
        steps = self.steps_per_epoch
        per_domain = []
        for cells in self._train_idx:
            need = steps * self._per_domain
            reps = math.ceil(need / len(cells))
            order = torch.cat([cells[torch.randperm(len(cells), generator=generator)]
                               for _ in range(reps)])[:need]
            per_domain.append(order.view(steps, self._per_domain))
        return [torch.cat([d[s] for d in per_domain]) for s in range(steps)]

    def train(self, on_epoch=None) -> "IntegrationModel":
        """Train with the configured adversary; ``on_epoch(done, losses)`` reports progress."""
        cfg = self.config
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        lr_disc = cfg.lr_discriminator or cfg.lr
        if cfg.adversary == "grl":
            strategy = GradientReversalStep(self.net, cfg.lr, lr_disc, cfg.grl_lambda, cfg.adv_loss)
        else:
            strategy = AlternatingAdversary(self.net, cfg.lr, lr_disc, cfg.d_steps, cfg.e_steps,
                                            cfg.adv_loss)
        history: dict[str, list] = {}
        best, stale = math.inf, 0
        kl_weight_at, adv_weight_at, warm = self.schedules()
        cells_seen = 0
        epoch = 0
        for epoch in range(1, self.max_epochs + 1):
            kl_weight, adv_weight = kl_weight_at(epoch), adv_weight_at(epoch)
            self.net.train()
            sums: dict[str, float] = {}
            batches = self._balanced_batches(generator)
            for idx in batches:
                record = strategy.step(self._batch(idx, self._rows, self._domain), kl_weight,
                                       adv_weight)
                for k, v in record.items():
                    sums[k] = sums.get(k, 0.0) + v
            cells_seen += sum(len(b) for b in batches)
            record = {k: v / len(batches) for k, v in sums.items()}
            record["val_elbo"] = self._validation_elbo()
            record.update(kl_weight=kl_weight, adv_weight=adv_weight)
            for k, v in record.items():
                history.setdefault(k, []).append(float(v))
            history.setdefault("epoch", []).append(epoch)
            if on_epoch is not None:
                on_epoch(epoch, {k: record[k] for k in ("elbo", "val_elbo", "disc_ce", "disc_acc")
                                 if math.isfinite(record[k])})
            if epoch >= warm and math.isfinite(record["val_elbo"]):
                if record["val_elbo"] < best - 1e-4 * abs(best):
                    best, stale = record["val_elbo"], 0
                else:
                    stale += 1
                    if cfg.patience and stale >= cfg.patience:
                        break
        self.net.eval()
        self.history_ = history
        self.optimizer_state_ = {k: o.state_dict() for k, o in strategy.optimizers().items()}
        self.is_trained_ = True
        wall = time.perf_counter() - start_wall
        self.summary_ = {
            "mode": self.mode, "n_cells": int(self._domain.shape[0]), "n_genes": len(self.genes_),
            "domains": {d: int((self._domain == k).sum()) for k, d in enumerate(self.domains_)},
            "epochs": epoch, "train_seconds": wall,
            "train_cpu_seconds": time.process_time() - start_cpu,
            "cells_x_epochs_per_second": cells_seen / max(wall, 1e-9),
            "final_losses": {k: history[k][-1] for k in ("elbo", "recon", "kl", "disc_ce",
                                                          "disc_acc", "val_elbo")},
            "adversary": cfg.adversary, "likelihood": cfg.likelihood, "warnings": []}
        mixing = self.mixing_ilisi()
        self.summary_["mixing_ilisi"] = mixing
        from .metrics import UNMIXED_ILISI

        if mixing < UNMIXED_ILISI:
            self.summary_["warnings"].append(
                f"The domains are not mixed: the embedding's iLISI is {mixing:.2f} (0 = each "
                f"cell's neighbours all from its own domain, 1 = as mixed as the domains' sizes "
                f"allow). The adversary lost. Try --patience 0 (train all epochs), a higher "
                f"--adv-weight, or --adversary alternate, and check the result with `advcli "
                f"diagnose`.")
        return self

    def mixing_ilisi(self, max_cells: int = MIXING_CELLS) -> float:
        """Median iLISI (scIB-normalised) of the training cells' posterior means, on a seeded
        subsample: a check that the domains share the latent space. Domain-specific cell types
        lower it only for their own cells, which the median passes over."""
        from .metrics import knn, lisi

        n = int(self._domain.shape[0])
        keep = np.sort(np.random.default_rng(self.config.seed).choice(n, min(n, max_cells),
                                                                       replace=False))
        latent = self.predict()["latent"][keep]
        domain = self._domain.cpu().numpy()[keep]
        if len(np.unique(domain)) < 2 or len(keep) < 10:
            return float("nan")
        dist, idx = knn(latent.astype(np.float64), 90)
        k = len(self.domains_)
        return float((np.median(lisi(dist, idx, domain)) - 1.0) / (k - 1.0))

    def schedules(self):
        """KL weight and adversarial weight per epoch, and the epoch after which early stopping
        may act. The KL term warms up over the first quarter of the epochs; the adversary acts
        from the first epoch (ramped in over a twentieth), so that the domains never part: a
        discriminator that first meets an already-separated latent space is certain of every
        cell and the negative cross-entropy gives the encoders no gradient."""
        cfg = self.config
        kl_warm = (max(1, self.max_epochs // 4) if cfg.kl_warmup_epochs is None
                   else cfg.kl_warmup_epochs)
        ramp = (max(1, self.max_epochs // 20) if cfg.adv_warmup_epochs is None
                else cfg.adv_warmup_epochs)
        start = cfg.adv_start_epoch

        def kl_weight(epoch: int) -> float:
            return cfg.beta_kl * min(1.0, epoch / max(kl_warm, 1))

        def adv_weight(epoch: int) -> float:
            return cfg.adv_weight * min(1.0, max(0.0, (epoch - start) / max(ramp, 1)))

        return kl_weight, adv_weight, max(kl_warm, start + ramp)

    @torch.inference_mode()
    def _validation_elbo(self) -> float:
        if len(self._val_idx) == 0:
            return float("nan")
        self.net.eval()
        total = 0.0
        for idx in self._val_idx.split(2048):
            batch = self._batch(idx, self._rows, self._domain)
            total += self.net.elbo_terms(batch, 1.0)["elbo"].item() * len(idx)
        return total / len(self._val_idx)

    # ------------------------------------------------------------------ prediction

    def _inputs(self, adata):
        validate_counts(adata, self.config.layer)
        order = gene_order(adata, self.genes_)
        domain, _ = encode_domains(adata, self.config.batch_key, self.domains_)
        counts = load_counts(adata, self.config.layer)[:, order]
        return CountRows(counts, self.device), torch.from_numpy(domain).to(self.device), order

    @torch.inference_mode()
    def predict(self, adata=None, batch_size: int = 1024, device: str | None = None,
                decode_as: str | None = None) -> dict[str, np.ndarray]:
        """Posterior means, the discriminator's probability of each cell's own domain and, with
        the NB likelihood, the NB means; ``decode_as`` decodes every cell with that domain's
        decoder."""
        self._require_trained()
        if device is not None:
            self.device = resolve_device(device)
            self.net.to(self.device)
        if adata is None:
            rows, domain = self._rows, self._domain
        else:
            rows, domain, _ = self._inputs(adata)
        if decode_as is not None and decode_as not in self.domains_:
            raise InputError(f"--decode-as '{decode_as}' is not a domain of the model "
                             f"({', '.join(self.domains_)}).")
        self.net.eval()
        parts: dict[str, list] = {"latent": [], "domain_prob": [], "nb_mean": [], "decoded": []}
        n = rows.shape[0]
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(start + batch_size, n), device=self.device)
            batch = self._batch(idx, rows, domain)
            mean, _ = self.net.encode(batch["x_norm"], batch["domain"])
            probs = torch.softmax(self.net.discriminator(mean), dim=1)
            parts["latent"].append(mean.cpu())
            parts["domain_prob"].append(probs.gather(1, batch["domain"][:, None])[:, 0].cpu())
            if self.config.likelihood == "nb":
                out = self.net.decode(mean, batch["domain"])
                parts["nb_mean"].append((torch.exp(out) * batch["library"][:, None]).cpu())
            if decode_as is not None:
                target = torch.full_like(batch["domain"], self.domains_.index(decode_as))
                out = self.net.decode(mean, target)
                if self.config.likelihood == "nb":
                    out = torch.exp(out) * batch["library"][:, None]
                parts["decoded"].append(out.cpu())
        return {k: torch.cat(v).numpy() for k, v in parts.items() if v}

    def get_latent_representation(self, adata=None, batch_size: int = 1024) -> np.ndarray:
        return self.predict(adata, batch_size=batch_size)["latent"]

    def predict_into(self, adata, batch_size: int = 1024, device: str = "auto",
                     decode_as: str | None = None) -> list[str]:
        out = self.predict(adata, batch_size=batch_size, device=device, decode_as=decode_as)
        adata.obsm[keys.X_LATENT] = out["latent"].astype(np.float32)
        adata.obs[keys.DOMAIN_PROB] = out["domain_prob"].astype(np.float32)
        written = [f"obsm['{keys.X_LATENT}']", f"obs['{keys.DOMAIN_PROB}']"]
        back = np.argsort(gene_order(adata, self.genes_))
        if "nb_mean" in out:
            adata.layers[keys.NB_MEAN] = out["nb_mean"][:, back].astype(np.float32)
            written.append(f"layers['{keys.NB_MEAN}']")
        if decode_as is not None:
            name = f"{keys.DECODED_AS}{decode_as}"
            adata.layers[name] = out["decoded"][:, back].astype(np.float32)
            written.append(f"layers['{name}']")
        set_uns(adata, keys.INTEGRATE_INPUTS, {"batch_key": self.config.batch_key,
                                               "domains": list(self.domains_)})
        return written

    # ------------------------------------------------------------------ files

    def save(self, path: str | Path) -> None:
        self._save(path, {"domains": list(self.domains_)})

    @classmethod
    def from_payload(cls, payload: dict, path: str | Path = "model") -> "IntegrationModel":
        self = cls.__new__(cls)
        try:
            self.config = config_from_dict(IntegrationConfig, payload["config"])
            self.genes_ = list(payload["genes"])
            self.domains_ = list(payload["encoding"]["domains"])
            self.net = self._build(len(self.genes_))
            self.net.load_state_dict(payload["state"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"Model file '{path}' is damaged or inconsistent ({exc}).") from None
        return self._restored(payload)
