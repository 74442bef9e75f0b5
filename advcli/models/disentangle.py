"""Disentangle mode: a VAE whose latent splits into s, which carries a label, and z, which an
adversary cleans of it.

    >>> model = advcli.DisentangleModel(adata, label_key="cell_type")
    >>> model.train()
    >>> out = model.predict(adata)     # {"s": ..., "z": ...}

s = f_s(x) is deterministic; q(z | x, s) is Gaussian; the decoder reads [z, s]. Four losses:
1. the ELBO of x1;
2. x1 reconstructed from its own z1 and the s of another cell of its class (s must carry what
   the class shares, so z need not);
3. a discriminator tells decoded cells of the data (x2 through the autoencoder) from decoded
   cells made with s2 and a prior draw of z, or with s2 and z1; the autoencoder learns to fool
   it, so that any z with a class's s decodes to a cell of that class. It judges decoded
   profiles on both sides, because raw counts carry sampling noise no decoded mean has;
4. a label adversary predicts the label from z's posterior mean and the encoders learn to
   make it fail, so z keeps what varies within a class and not the class.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Iterator

import numpy as np
import torch

from .. import keys, losses
from ..data import (CountRows, count_batch, counts_anndata, encode_domains, gene_order, load_counts,
                    minibatches, seeded_subset, set_uns, validate_counts)
from ..nn import Decoder, DomainDiscriminator, Encoder, mlp
from ..strategies import constant_call
from ..train import EpochPlan
from .base import BaseModel, default_batch_size, default_epochs, resolve_device

REAL, GENERATED = 0, 1  # the decoded-cell discriminator's classes
ADVERSARY_LR_FACTOR = 3.0  # the adversaries' learning rate, in units of the VAE's


class DisentangleModule(torch.nn.Module):
    """Players: the VAE (both encoders, decoder, dispersions), the label adversary on z and the
    discriminator of decoded cells."""

    def __init__(self, n_genes: int, s_dim: int, z_dim: int, hidden: int, n_labels: int,
                 likelihood: str, dropout: float, adv_loss: str, s_classifier: bool = True):
        super().__init__()
        self.s_encoder = Encoder(n_genes, s_dim, hidden, dropout, variational=False)
        # a linear read-out of the label from s (part of the VAE): the swap reconstruction
        # asks s to carry what a label's cells share, this asks it to tell the labels apart
        self.s_classifier = torch.nn.Linear(s_dim, n_labels) if s_classifier else None
        self.z_encoder = Encoder(n_genes + s_dim, z_dim, hidden, dropout)
        self.decoder = Decoder(z_dim + s_dim, n_genes, hidden, likelihood)
        self.log_theta = torch.nn.Parameter(torch.ones(n_genes))
        self.label_adversary = DomainDiscriminator(z_dim, n_labels, hidden)
        self.x_discriminator = mlp(n_genes, hidden, 2, layers=2)
        self.likelihood = likelihood
        self.adv_loss = losses.ADV_LOSSES[adv_loss]

    def players(self) -> dict[str, list]:
        vae = [self.s_encoder, self.z_encoder, self.decoder] + (
            [self.s_classifier] if self.s_classifier is not None else [])
        return {"vae": [p for m in vae for p in m.parameters()] + [self.log_theta],
                "label_adversary": list(self.label_adversary.parameters()),
                "x_discriminator": list(self.x_discriminator.parameters())}

    @staticmethod
    def turns() -> list[tuple[tuple[str, ...], int]]:
        return [(("label_adversary", "x_discriminator"), 1), (("vae",), 1)]

    def theta(self) -> torch.Tensor:
        return torch.exp(self.log_theta.clamp(-10.0, 10.0))

    def encode(self, x_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(s, z's posterior mean, its log-variance)."""
        s, _ = self.s_encoder(x_norm)
        mean, logvar = self.z_encoder(torch.cat([x_norm, s], dim=1))
        return s, mean, logvar

    def decode(self, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([z, s], dim=1))

    def reconstruction(self, batch: dict, out: torch.Tensor) -> torch.Tensor:
        if self.likelihood == "nb":
            return losses.nb_reconstruction(batch["counts"], out, batch["library"], self.theta(),
                                            log_factorial=batch.get("log_factorial"))
        return losses.mse_per_cell(out, batch["x_norm"])

    def profile(self, out: torch.Tensor) -> torch.Tensor:
        """A decoded cell as the discriminator sees it: log1p of expression per 10^4."""
        return torch.log1p(torch.exp(out) * 1e4) if self.likelihood == "nb" else out

    def objective(self, batch: dict, players, ctx: dict) -> tuple[dict, dict]:
        out, logs = {}, {}
        label = batch["label"]
        other = torch.roll(torch.arange(label.shape[0], device=label.device), 1)  # the x2s
        if "vae" in players:
            s, mean, logvar = self.encode(batch["x_norm"])
            z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
            recon = self.reconstruction(batch, self.decode(z, s))
            kl = losses.gaussian_kl(mean, logvar)
            s_partner, _ = self.s_encoder(batch["partner"]["x_norm"])
            swap = self.reconstruction(batch, self.decode(z, s_partner))
            clean = self.adv_loss(constant_call(self.label_adversary, mean), label)
            fakes = torch.cat([self.decode(torch.randn_like(z), s[other]),
                               self.decode(z, s[other])])
            judged = constant_call(self.x_discriminator, self.profile(fakes))
            fool = losses.flip(judged, torch.full((len(fakes),), GENERATED, device=z.device))
            out["vae"] = (recon + ctx["kl_weight"] * kl + ctx["swap_weight"] * swap
                          + ctx["adv_weight"] * clean + ctx["gan_weight"] * fool)
            logs.update(elbo=(recon + kl).detach(), recon=recon.detach(), kl=kl.detach(),
                        swap=swap.detach(), clean=clean.detach(), fool=fool.detach())
            if self.s_classifier is not None and ctx.get("label_weight", 0) > 0:
                s_ce = losses.domain_ce(self.s_classifier(s), label)
                out["vae"] = out["vae"] + ctx["label_weight"] * s_ce
                logs["s_label_ce"] = s_ce.detach()
            s, mean, z = s.detach(), mean.detach(), z.detach()
        else:
            with torch.no_grad():
                s, mean, logvar = self.encode(batch["x_norm"])
                z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        if "label_adversary" in players:
            logits = self.label_adversary(mean)
            out["label_adversary"] = losses.domain_ce(logits, label)
            logs["z_label_ce"] = out["label_adversary"].detach()
            logs["z_label_acc"] = (logits.detach().argmax(1) == label).float().mean()
        if "x_discriminator" in players:
            with torch.no_grad():
                real = self.profile(self.decode(z[other], s[other]))
                fake = self.profile(torch.cat([self.decode(torch.randn_like(z), s[other]),
                                               self.decode(z, s[other])]))
            logits = self.x_discriminator(torch.cat([real, fake]))
            target = torch.cat([torch.full((len(real),), REAL), torch.full((len(fake),),
                                                                           GENERATED)])
            target = target.to(logits.device)
            out["x_discriminator"] = losses.domain_ce(logits, target)
            logs["x_disc_ce"] = out["x_discriminator"].detach()
        return out, logs


class DisentangleModel(BaseModel):
    """s carries ``label_key``; z holds what varies within a label, cleaned of it."""

    mode = "disentangle"
    progress_keys = ("elbo", "swap", "z_label_acc")
    monitored_losses = ("recon", "z_label_ce", "x_disc_ce")

    def _setup(self, adata) -> None:
        cfg = self.config
        validate_counts(adata, cfg.layer)
        self.genes_ = [str(g) for g in adata.var_names]
        label, self.labels_ = encode_domains(adata, cfg.label_key, what="Label")
        counts = load_counts(adata, cfg.layer)
        if cfg.batch_size is None:
            self.config = cfg = replace(cfg, batch_size=default_batch_size(adata.n_obs))
        torch.manual_seed(cfg.seed)
        self.module = self._build(len(self.genes_)).to(self.device)
        self._rows = CountRows(counts, self.device)
        self._label = torch.from_numpy(label).to(self.device)
        self._members = [torch.from_numpy(np.flatnonzero(label == k)).to(self.device)
                         for k in range(len(self.labels_))]

    def _data_summary(self) -> bytes:
        return self._rows.col_sums.tobytes() + self._label.cpu().numpy().tobytes()

    def _build(self, n_genes: int, s_classifier: bool = True) -> DisentangleModule:
        cfg = self.config
        return DisentangleModule(n_genes, cfg.s_dim, cfg.latent_dim, cfg.hidden,
                                 len(self.labels_), cfg.likelihood, cfg.dropout, cfg.adv_loss,
                                 s_classifier)

    # ------------------------------------------------------------------ the loop's pieces

    @property
    def strategy_name(self) -> str:
        return "simultaneous" if self.config.adversary == "grl" else "alternating"

    def learning_rates(self) -> dict[str, float]:
        cfg = self.config
        # the adversaries learn three times faster than the VAE (two time-scale updates): at
        # the VAE's rate the label adversary on z lagged the encoder and z kept the label
        # (Kang, held-out z accuracy 0.43 and 0.52 on two seeds of three, majority 0.26)
        lr_d = cfg.lr_discriminator or ADVERSARY_LR_FACTOR * cfg.lr
        return {"vae": cfg.lr, "label_adversary": lr_d, "x_discriminator": lr_d}

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self._label.shape[0] / self.config.batch_size)

    @property
    def planned_epochs(self) -> int:
        return default_epochs(self.config.max_epochs, self.steps_per_epoch)

    def batches(self, sampler: torch.Generator) -> list[torch.Tensor]:
        return [b for b in minibatches(self._label.shape[0], self.config.batch_size, sampler)
                if len(b) > 1]

    def batch(self, idx: torch.Tensor) -> dict:
        """The cells, their labels, and a partner for each: another cell of the same label
        (drawn from the global generator, so a resumed run draws the same partners)."""
        idx = idx.to(self.device)
        label = self._label[idx]
        partner = torch.empty_like(idx)
        for k, members in enumerate(self._members):
            rows = label == k
            if rows.any():
                pick = torch.randint(len(members), (int(rows.sum()),), device=self.device)
                partner[rows] = members[pick]
        return {**count_batch(self._rows, idx), "label": label,
                "partner": count_batch(self._rows, partner)}

    def schedule(self) -> Iterator[EpochPlan]:
        """The KL weight warms up over the first quarter of the epochs, the adversaries over
        the first twentieth (as in integrate mode)."""
        cfg = self.config
        n = self.planned_epochs
        for epoch in range(1, n + 1):
            ramp = min(1.0, epoch / max(1, n // 20))
            yield EpochPlan(("vae", "label_adversary", "x_discriminator"),
                            {"kl_weight": cfg.beta_kl * min(1.0, epoch / max(1, n // 4)),
                             "swap_weight": cfg.swap_weight, "adv_weight": cfg.adv_weight * ramp,
                             "label_weight": cfg.label_weight,
                             "gan_weight": cfg.gan_weight * ramp})

    def _summarise(self, wall: float, cpu: float) -> dict[str, Any]:
        out = self.predict()
        label = self._label.cpu().numpy()
        acc_s, acc_z, majority = label_accuracies(out["s"], out["z"], label)
        last = self.train_state_.records[-1]
        summary = {"mode": self.mode, "n_cells": int(label.shape[0]), "n_genes": len(self.genes_),
                   "epochs": self.epochs_, "train_seconds": wall, "train_cpu_seconds": cpu,
                   "final_losses": {k: last.get(k, math.nan) for k in
                                    ("elbo", "swap", "z_label_ce", "z_label_acc", "x_disc_ce")},
                   "labels": list(self.labels_), "label_accuracy_s": acc_s,
                   "label_accuracy_z": acc_z, "majority_rate": majority, "warnings": []}
        if acc_z > majority + 0.1:
            summary["warnings"].append(
                f"z still predicts the label (accuracy {acc_z:.2f}, majority class "
                f"{majority:.2f}): the adversary did not clean it. Raise --adv-weight or train "
                "longer.")
        if acc_s < 0.8:
            summary["warnings"].append(
                f"s predicts the label poorly (accuracy {acc_s:.2f}): it does not carry it. "
                "Raise --swap-weight or --s-dim.")
        return summary

    # ------------------------------------------------------------------ prediction

    def _inputs(self, adata) -> CountRows:
        adata = counts_anndata(adata, self.config.layer)
        validate_counts(adata, self.config.layer)
        counts = load_counts(adata, self.config.layer)[:, gene_order(adata, self.genes_)]
        return CountRows(counts, self.device)

    @torch.inference_mode()
    def predict(self, adata=None, batch_size: int = 1024, device: str | None = None,
                inplace: bool = False) -> dict[str, np.ndarray] | list[str]:
        """s and z's posterior mean of every cell (``inplace``: written into ``adata``)."""
        if inplace:
            return self._predict_inplace(adata, batch_size=batch_size, device=device)
        self._require_trained()
        if device is not None:
            self.device = resolve_device(device)
            self.module.to(self.device)
        if adata is None:
            self._require_data("predict()")
            rows = self._rows
        else:
            rows = self._inputs(adata)
        module = self.module.eval()
        parts: dict[str, list] = {"s": [], "z": []}
        for start in range(0, rows.shape[0], batch_size):
            idx = torch.arange(start, min(start + batch_size, rows.shape[0]), device=self.device)
            s, mean, _ = module.encode(count_batch(rows, idx)["x_norm"])
            parts["s"].append(s.cpu())
            parts["z"].append(mean.cpu())
        return {k: torch.cat(v).numpy() for k, v in parts.items()}

    def predict_into(self, adata, batch_size: int = 1024, device: str = "auto",
                     nb_mean: bool = True) -> list[str]:
        out = self.predict(adata, batch_size=batch_size, device=device)
        adata.obsm[keys.X_LATENT_S] = out["s"].astype(np.float32)
        adata.obsm[keys.X_LATENT_Z] = out["z"].astype(np.float32)
        set_uns(adata, keys.DISENTANGLE_INPUTS, {"label_key": self.config.label_key,
                                                 "labels": list(self.labels_)})
        return [f"obsm['{keys.X_LATENT_S}']", f"obsm['{keys.X_LATENT_Z}']"]

    # ------------------------------------------------------------------ files

    def _encoding(self) -> dict:
        return {"labels": list(self.labels_)}

    def _rebuild(self, payload: dict) -> None:
        self.labels_ = [str(v) for v in payload["encoding"]["labels"]]
        # files written before s had a label read-out lack its weights
        self.module = self._build(len(self.genes_), "s_classifier.weight" in payload["state"])


def label_accuracies(s: np.ndarray, z: np.ndarray, label: np.ndarray,
                     max_cells: int = 5000) -> tuple[float, float, float]:
    """5-fold cross-validated accuracy of a logistic regression predicting the label from s
    and from z, and the majority-class rate (what a useless z scores)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    keep = np.arange(len(label))
    if len(keep) > max_cells:
        keep = seeded_subset(len(keep), max_cells, 0)
    label = label[keep]
    counts = np.bincount(label)
    folds = int(np.clip(counts[counts > 0].min(), 2, 5))  # stratified folds need members

    def accuracy(features):
        return float(cross_val_score(LogisticRegression(max_iter=2000), features[keep], label,
                                     cv=folds).mean())

    majority = float(counts.max() / len(label))
    return accuracy(s), accuracy(z), majority
