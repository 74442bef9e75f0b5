"""AAE mode: an adversarial autoencoder on counts.

    >>> model = advcli.AAEModel(adata, condition_key="batch", attribute_key="log_library")
    >>> model.train()
    >>> codes = model.predict(adata)["latent"]
    >>> new_cells = model.sample(500, condition="10x v2", attribute=8.0)

The encoder maps a cell to a deterministic code; a discriminator tells codes from draws of the
prior N(0, I) and the encoder learns to fool it, so the codes fill the prior and decoding prior
draws gives new cells. The decoder is conditioned on a class (``condition_key``). With an
``attribute_key``, one latent dimension is tied to a numeric attribute by attribute
regularisation: within each minibatch, the mean absolute difference between the pairwise
distances of the attribute (as normal scores of its ranks) and those of that dimension.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .. import keys, losses
from ..data import (CountRows, count_batch, counts_anndata, encode_domains, expression_pcs,
                    gene_order, highly_variable_genes, in_file_order, load_counts, minibatches,
                    obs_column, set_uns, validate_counts)
from ..errors import InputError
from ..nn import Decoder, Encoder, PriorDiscriminator
from ..strategies import constant_call
from ..train import EpochPlan
from .base import BaseModel, default_batch_size, default_epochs, resolve_device

FAKE, REAL = 0, 1  # the discriminator's classes: an encoded code, a prior draw
PRIOR_MATCH_STEPS = 6000  # the codes reach the prior in optimizer steps, not epochs: on PBMC
                          # (1,200 cells) held-out KS was 0.17 after 1,000 steps, 0.13 after
                          # 3,000 and 0.09 after 6,000
ATTRIBUTE_LEVELS = np.linspace(0.005, 0.995, 199)  # the attribute's quantiles kept for sampling
LIBRARY_QUANTILES = 101  # sampled cells draw their library size from these, per condition


def normal_scores(values: np.ndarray) -> np.ndarray:
    """The values' ranks as N(0, 1) quantiles (ties share their mean rank): what the attribute
    dimension is regularised towards, so that ordering cells by the attribute and matching the
    prior ask the same of it (a skewed attribute, standardised, would pull that dimension's
    marginal away from the prior)."""
    from scipy.stats import norm, rankdata

    return norm.ppf((rankdata(values) - 0.5) / len(values))


def _normal_score_of(value: float, quantiles: np.ndarray) -> float:
    """The normal score of an attribute value, from the training quantiles (clipped to them)."""
    from scipy.stats import norm

    level = np.interp(value, quantiles, ATTRIBUTE_LEVELS) if np.ptp(quantiles) > 0 else 0.5
    return float(norm.ppf(level))


def slicing_directions(code: torch.Tensor) -> torch.Tensor:
    """The latent axes (the marginals a user samples and reads) and as many random unit
    directions, fresh at each step (over steps they cover the joint distribution)."""
    dim = code.shape[1]
    axes = torch.eye(dim, device=code.device)
    return torch.cat([axes, F.normalize(torch.randn(dim, dim, device=code.device), dim=0)], 1)


class AAEModule(torch.nn.Module):
    """Players: the autoencoder (encoder, decoder, dispersions) and the prior discriminator."""

    def __init__(self, n_genes: int, latent_dim: int, hidden: int, n_conditions: int,
                 likelihood: str, dropout: float, adv_loss: str, attribute_dim: int | None,
                 reads_depth: bool = True, n_encoder_genes: int | None = None,
                 n_encoder_pcs: int | None = None):
        super().__init__()
        # the encoder reads the most variable genes only (their indices, a buffer), the
        # decoder reconstructs every gene: a first layer over 15,000 genes has 2 x 10^6
        # weights to fit on a few hundred cells, and its codes then generalise poorly
        if n_encoder_genes is not None:
            self.register_buffer("encoder_genes", torch.zeros(n_encoder_genes, dtype=torch.long))
        else:
            self.encoder_genes = None
        # ... and, of those, the first principal components (the mean and axes, buffers fitted
        # on the training cells): with thousands of inputs the encoder also learns each training
        # cell's sampling noise, and codes of unseen cells came out narrower and shifted
        # against the prior that the training codes matched (PBMC: held-out SDs 0.68-0.95)
        n_read = n_encoder_genes or n_genes
        if n_encoder_pcs is not None:
            self.register_buffer("pc_mean", torch.zeros(n_read))
            self.register_buffer("pc_axes", torch.zeros(n_read, n_encoder_pcs))
        else:
            self.pc_axes = None
        # the encoder also reads the cell's standardised log library size: normalised
        # expression hides sequencing depth, and an attribute that follows depth (log library
        # size itself) could then be ordered only through its indirect traces (held-out
        # Spearman 0.68-0.89 without this input)
        self.reads_depth = reads_depth
        self.encoder = Encoder((n_encoder_pcs or n_read) + reads_depth, latent_dim, hidden,
                               dropout, variational=False)
        if reads_depth:
            self.register_buffer("depth_center", torch.zeros(()))
            self.register_buffer("depth_scale", torch.ones(()))
            # depth also enters the code linearly (zero at the start): a per-cell scalar that
            # the layers over thousands of genes pass on only loosely, so an attribute that
            # follows depth was ordered on training cells and not on held-out ones
            self.depth_to_code = torch.nn.Linear(1, latent_dim, bias=False)
            torch.nn.init.zeros_(self.depth_to_code.weight)
        self.decoder = Decoder(latent_dim, n_genes, hidden, likelihood, n_conditions)
        self.log_theta = torch.nn.Parameter(torch.ones(n_genes))
        self.discriminator = PriorDiscriminator(latent_dim, hidden)
        self.likelihood, self.attribute_dim = likelihood, attribute_dim
        self.adv_loss = losses.ADV_LOSSES[adv_loss]

    def players(self) -> dict[str, list]:
        autoencoder = [p for name, p in self.named_parameters()
                       if not name.startswith("discriminator.")]
        return {"autoencoder": autoencoder, "discriminator": list(self.discriminator.parameters())}

    @staticmethod
    def turns() -> list[tuple[tuple[str, ...], int]]:
        return [(("discriminator",), 1), (("autoencoder",), 1)]

    def theta(self) -> torch.Tensor:
        return torch.exp(self.log_theta.clamp(-10.0, 10.0))

    def encode(self, batch: dict) -> torch.Tensor:
        """The cells' codes."""
        x = batch["x_norm"]
        if self.encoder_genes is not None:
            x = x[:, self.encoder_genes]
        if self.pc_axes is not None:
            x = (x - self.pc_mean) @ self.pc_axes
        if not self.reads_depth:
            return self.encoder(x)[0]
        depth = ((torch.log(batch["library"]) - self.depth_center) / self.depth_scale)[:, None]
        return self.encoder(torch.cat([x, depth], dim=1))[0] + self.depth_to_code(depth)

    def reconstruction(self, batch: dict, code: torch.Tensor) -> torch.Tensor:
        """Per-entry reconstruction loss (NB nats, or squared error of log1p values) averaged
        over cells and genes, so that the adversarial and AR weights mean the same on 500
        genes as on 15,000."""
        out = self.decoder(code, batch.get("condition"))
        n_genes = out.shape[1]
        if self.likelihood == "nb":
            return losses.nb_reconstruction(batch["counts"], out, batch["library"],
                                            self.theta(),
                                            log_factorial=batch.get("log_factorial")) / n_genes
        return losses.mse_per_cell(out, batch["x_norm"]) / n_genes

    def objective(self, batch: dict, players, ctx: dict) -> tuple[dict, dict]:
        out, logs = {}, {}
        fake = torch.full((batch["x_norm"].shape[0],), FAKE, dtype=torch.long,
                          device=batch["x_norm"].device)
        if "autoencoder" in players:
            code = self.encode(batch)
            recon = self.reconstruction(batch, code)
            fool = self.adv_loss(constant_call(self.discriminator, code), fake)
            loss = recon + ctx["adv_weight"] * fool
            logs.update(recon=recon.detach(), fool=fool.detach())
            if ctx["sw_weight"] > 0:
                sw = losses.sliced_wasserstein_normal(code, slicing_directions(code))
                loss = loss + ctx["sw_weight"] * sw
                logs["sw"] = sw.detach()
            if self.attribute_dim is not None and ctx["ar_weight"] > 0:
                ar = losses.attribute_regularisation(code[:, self.attribute_dim],
                                                     batch["attribute"])
                loss = loss + ctx["ar_weight"] * ar
                logs["ar"] = ar.detach()
            out["autoencoder"] = loss
            code = code.detach()
        else:
            with torch.no_grad():
                code = self.encode(batch)
        if "discriminator" in players:
            prior = torch.randn_like(code)  # each half judged with its own minibatch spread
            logits = torch.cat([self.discriminator(code), self.discriminator(prior)])
            labels = torch.cat([fake, torch.full_like(fake, REAL)])
            out["discriminator"] = losses.domain_ce(logits, labels)
            logs["disc_ce"] = out["discriminator"].detach()
            logs["disc_acc"] = (logits.detach().argmax(dim=1) == labels).float().mean()
        return out, logs


class AAEModel(BaseModel):
    """Adversarial autoencoder: codes that match N(0, I), class-conditioned decoding, an
    attribute-ordered dimension, and new cells sampled from the prior."""

    mode = "aae"
    progress_keys = ("recon", "ar", "sw", "disc_ce", "disc_acc")
    monitored_losses = ("recon", "disc_ce")

    def _setup(self, adata) -> None:
        cfg = self.config
        validate_counts(adata, cfg.layer)
        self.genes_ = [str(g) for g in adata.var_names]
        n = adata.n_obs
        if cfg.condition_key is not None:
            condition, self.conditions_ = encode_domains(adata, cfg.condition_key,
                                                         what="Condition")
        else:
            condition, self.conditions_ = np.zeros(n, dtype=np.int64), []
        counts = load_counts(adata, cfg.layer)
        self._attribute = None
        self.attribute_quantiles_: list[float] = []
        if cfg.attribute_key is not None:
            values = self._attribute_values(adata)
            self.attribute_quantiles_ = np.quantile(values, ATTRIBUTE_LEVELS).tolist()
            self._attribute = torch.from_numpy(normal_scores(values).astype(np.float32)
                                               ).to(self.device)
        if cfg.batch_size is None:
            self.config = cfg = replace(cfg, batch_size=default_batch_size(n))
        library = np.log(np.maximum(np.asarray(counts.sum(axis=1)).ravel(), 1.0))
        self.library_quantiles_ = [
            np.quantile(library[condition == k], np.linspace(0, 1, LIBRARY_QUANTILES)).tolist()
            for k in range(max(len(self.conditions_), 1))]
        torch.manual_seed(cfg.seed)
        self._rows = CountRows(counts, self.device)
        chosen = (highly_variable_genes(counts, cfg.encoder_genes,
                                        condition if self.conditions_ else None)
                  if 0 < cfg.encoder_genes < len(self.genes_) else None)
        n_read = len(self.genes_) if chosen is None else len(chosen)
        n_pcs = min(cfg.encoder_pcs, n_read, n - 1)
        self.module = self._build(len(self.genes_), n_encoder_genes=None if chosen is None
                                  else len(chosen), n_encoder_pcs=n_pcs if n_pcs > 0 else None)
        if chosen is not None:
            self.module.encoder_genes.copy_(torch.from_numpy(chosen))
        if n_pcs > 0:
            mean, axes = expression_pcs(self._rows, n_pcs, self.module.encoder_genes)
            self.module.pc_mean.copy_(mean)
            self.module.pc_axes.copy_(axes)
        self.module.depth_center.fill_(float(np.mean(library)))
        self.module.depth_scale.fill_(max(float(np.std(library)), 1e-3))
        self.module.to(self.device)
        self._condition = torch.from_numpy(condition).to(self.device)
        self.attribute_map_ = None

    def _attribute_values(self, adata) -> np.ndarray:
        key = self.config.attribute_key
        column = obs_column(adata, key, "Attribute")
        values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
        if not np.isfinite(values).all():
            raise InputError(f"Attribute obs['{key}'] must be numeric and finite for every "
                             f"cell ({int((~np.isfinite(values)).sum())} are not).")
        return values

    def _data_summary(self) -> bytes:
        extra = b"" if self._attribute is None else self._attribute.cpu().numpy().tobytes()
        return self._rows.col_sums.tobytes() + self._condition.cpu().numpy().tobytes() + extra

    def _build(self, n_genes: int, reads_depth: bool = True, n_encoder_genes: int | None = None,
               n_encoder_pcs: int | None = None) -> AAEModule:
        cfg = self.config
        return AAEModule(n_genes, cfg.latent_dim, cfg.hidden, len(self.conditions_),
                         cfg.likelihood, cfg.dropout, cfg.adv_loss,
                         cfg.attribute_dim if cfg.attribute_key is not None else None,
                         reads_depth, n_encoder_genes, n_encoder_pcs)

    # ------------------------------------------------------------------ the loop's pieces

    @property
    def strategy_name(self) -> str:
        return "simultaneous" if self.config.adversary == "grl" else "alternating"

    def learning_rates(self) -> dict[str, float]:
        cfg = self.config
        return {"autoencoder": cfg.lr, "discriminator": cfg.lr_discriminator or cfg.lr}

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self._condition.shape[0] / self.config.batch_size)

    @property
    def hvg_batch_key(self) -> str | None:
        return self.config.condition_key

    @property
    def planned_epochs(self) -> int:
        return default_epochs(self.config.max_epochs, self.steps_per_epoch, PRIOR_MATCH_STEPS,
                              most=1000)

    def batches(self, sampler: torch.Generator) -> list[torch.Tensor]:
        return [b for b in minibatches(self._condition.shape[0], self.config.batch_size, sampler)
                if len(b) > 1]  # AR compares pairs of cells

    def batch(self, idx: torch.Tensor, rows: CountRows | None = None,
              condition: torch.Tensor | None = None) -> dict:
        rows = self._rows if rows is None else rows
        condition = self._condition if condition is None else condition
        idx = idx.to(self.device)
        out = count_batch(rows, idx)
        if self.conditions_:
            out["condition"] = condition[idx]
        if self._attribute is not None and rows is self._rows:
            out["attribute"] = self._attribute[idx]
        return out

    def schedule(self) -> Iterator[EpochPlan]:
        cfg = self.config
        for _ in range(self.planned_epochs):
            yield EpochPlan(("autoencoder", "discriminator"),
                            {"adv_weight": cfg.adv_weight, "ar_weight": cfg.ar_weight,
                             "sw_weight": cfg.sw_weight})

    def _summarise(self, wall: float, cpu: float) -> dict[str, Any]:
        from scipy.stats import kstest, spearmanr

        codes = self.predict()["latent"]
        ks = [float(kstest(codes[:, j], "norm").statistic) for j in range(codes.shape[1])]
        last = self.train_state_.records[-1]
        summary = {"mode": self.mode, "n_cells": int(codes.shape[0]),
                   "n_genes": len(self.genes_), "epochs": self.epochs_, "train_seconds": wall,
                   "train_cpu_seconds": cpu,
                   "final_losses": {k: last.get(k, math.nan) for k in self.progress_keys},
                   "conditions": list(self.conditions_), "latent_ks_mean": float(np.mean(ks)),
                   "latent_ks_max": float(np.max(ks)), "warnings": []}
        if self._attribute is not None:
            attribute = self._attribute.cpu().numpy()
            dim = codes[:, self.config.attribute_dim]
            summary["attribute_spearman"] = float(spearmanr(dim, attribute)[0])
            slope, intercept = np.polyfit(attribute, dim, 1)
            self.attribute_map_ = [float(intercept), float(slope)]
            if abs(summary["attribute_spearman"]) < 0.5:
                summary["warnings"].append(
                    f"Latent dimension {self.config.attribute_dim} follows the attribute only "
                    f"weakly (Spearman {summary['attribute_spearman']:.2f}): sampling at an "
                    "attribute value will not control it. Raise --ar-weight.")
        if summary["latent_ks_mean"] > 0.2:
            summary["warnings"].append(
                f"The codes do not match the prior N(0, 1) (mean KS distance "
                f"{summary['latent_ks_mean']:.2f}; 0 is a perfect match): decoded prior "
                "samples will not look like these cells. Train longer (--max-epochs) or raise "
                "--adv-weight.")
        return summary

    # ------------------------------------------------------------------ prediction

    def _inputs(self, adata):
        adata = counts_anndata(adata, self.config.layer)
        validate_counts(adata, self.config.layer)
        order = gene_order(adata, self.genes_)
        if self.conditions_:
            condition, _ = encode_domains(adata, self.config.condition_key, self.conditions_,
                                          what="Condition")
        else:
            condition = np.zeros(adata.n_obs, dtype=np.int64)
        counts = load_counts(adata, self.config.layer)[:, order]
        return CountRows(counts, self.device), torch.from_numpy(condition).to(self.device)

    @torch.inference_mode()
    def predict(self, adata=None, batch_size: int = 1024, device: str | None = None,
                inplace: bool = False) -> dict[str, np.ndarray] | list[str]:
        """Each cell's code and, with the NB likelihood, its decoded NB mean (``inplace``:
        written into ``adata`` as predict on the command line writes them)."""
        if inplace:
            return self._predict_inplace(adata, batch_size=batch_size, device=device)
        self._require_trained()
        if device is not None:
            self.device = resolve_device(device)
            self.module.to(self.device)
        if adata is None:
            self._require_data("predict()")
            rows, condition = self._rows, self._condition
        else:
            rows, condition = self._inputs(adata)
        module = self.module.eval()
        parts: dict[str, list] = {"latent": [], "nb_mean": []}
        n = rows.shape[0]
        for start in range(0, n, batch_size):
            batch = self.batch(torch.arange(start, min(start + batch_size, n)), rows, condition)
            code = module.encode(batch)
            parts["latent"].append(code.cpu())
            if self.config.likelihood == "nb":
                out = module.decoder(code, batch.get("condition"))
                parts["nb_mean"].append((torch.exp(out) * batch["library"][:, None]).cpu())
        return {k: torch.cat(v).numpy() for k, v in parts.items() if v}

    def predict_into(self, adata, batch_size: int = 1024, device: str = "auto",
                     nb_mean: bool = True) -> list[str]:
        out = self.predict(adata, batch_size=batch_size, device=device)
        adata.obsm[keys.X_LATENT] = out["latent"].astype(np.float32)
        written = [f"obsm['{keys.X_LATENT}']"]
        if "nb_mean" in out and nb_mean:
            adata.layers[keys.NB_MEAN] = in_file_order(adata, self.genes_, out["nb_mean"])
            written.append(f"layers['{keys.NB_MEAN}']")
        cfg = self.config
        set_uns(adata, keys.AAE_INPUTS, {"condition_key": cfg.condition_key or "",
                                         "attribute_key": cfg.attribute_key or "",
                                         "attribute_dim": cfg.attribute_dim})
        return written

    @torch.inference_mode()
    def sample(self, n: int, condition: str | None = None, attribute: float | None = None,
               seed: int = 0):
        """``n`` new cells decoded from prior draws: an AnnData with sampled NB counts in X,
        their codes in obsm['X_advcli'] and NB means in layers['nb_mean']. ``condition`` (a
        class of the condition key; default: drawn in the training proportions) and
        ``attribute`` (a value of the attribute, which sets the attribute dimension)."""
        import anndata as ad
        import scipy.sparse as sp

        self._require_trained()
        cfg = self.config
        if n <= 0:
            raise InputError(f"--n must be positive (got {n}).")
        gen = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        if condition is not None and condition not in self.conditions_:
            raise InputError(f"--condition '{condition}' is not a class of the model "
                             f"({', '.join(self.conditions_) or 'it has no condition key'}).")
        if self.conditions_:
            codes = (np.full(n, self.conditions_.index(condition)) if condition is not None
                     else rng.choice(len(self.conditions_), n))
        else:
            codes = np.zeros(n, dtype=np.int64)
        z = torch.randn(n, cfg.latent_dim, generator=gen)
        if attribute is not None:
            if self.attribute_map_ is None:
                raise InputError("--attribute needs a model trained with --attribute-key.")
            if not math.isfinite(attribute):
                raise InputError(f"--attribute must be a finite number (got {attribute}).")
            intercept, slope = self.attribute_map_
            score = _normal_score_of(attribute, np.asarray(self.attribute_quantiles_))
            z[:, cfg.attribute_dim] = intercept + slope * score
        library = np.exp(np.array([rng.choice(self.library_quantiles_[k]) for k in codes]))
        module = self.module.to("cpu").eval()
        condition_t = torch.from_numpy(codes.astype(np.int64)) if self.conditions_ else None
        out = module.decoder(z, condition_t)
        scale = torch.from_numpy(library).float()[:, None]
        if cfg.likelihood == "nb":
            mean = (torch.exp(out) * scale).numpy().astype(np.float64)
            theta = module.theta().numpy().astype(np.float64)[None, :]
            rate = rng.gamma(theta, np.maximum(mean, 1e-12) / theta)  # NB = Poisson-Gamma
        else:
            mean = (torch.expm1(out.clamp_min(0)) * scale / 1e4).numpy().astype(np.float64)
            rate = mean
        counts = torch.from_numpy(rng.poisson(rate).astype(np.float32))
        mean = torch.from_numpy(mean)
        obs = pd.DataFrame({"library_size": counts.sum(1).numpy()},
                           index=[f"sampled_{i}" for i in range(n)])
        if self.conditions_:
            obs[cfg.condition_key] = pd.Categorical(np.asarray(self.conditions_)[codes],
                                                    categories=self.conditions_)
        if attribute is not None:
            obs[cfg.attribute_key] = attribute
        adata = ad.AnnData(X=sp.csr_matrix(counts.numpy().astype(np.float32)), obs=obs,
                           var=pd.DataFrame(index=self.genes_))
        adata.obsm[keys.X_LATENT] = z.numpy()
        adata.layers[keys.NB_MEAN] = mean.numpy().astype(np.float32)
        return adata

    # ------------------------------------------------------------------ files

    def _encoding(self) -> dict:
        return {"conditions": list(self.conditions_),
                "attribute_quantiles": self.attribute_quantiles_,
                "attribute_map": self.attribute_map_,
                "library_quantiles": self.library_quantiles_}

    @staticmethod
    def _upgrade_config(config: dict) -> dict:
        config = dict(config)
        config.setdefault("encoder_genes", 0)  # files from before: the encoder read every gene
        config.setdefault("sw_weight", 0.0)  # ... and the discriminator alone matched the prior
        config.setdefault("encoder_pcs", 0)  # ... and the encoder read the genes themselves
        return config

    def resume_from(self, payload: dict, path="model") -> None:
        super().resume_from(payload, path)
        self.attribute_map_ = payload["encoding"].get("attribute_map")

    def _rebuild(self, payload: dict) -> None:
        enc = payload["encoding"]
        self.conditions_ = [str(c) for c in enc["conditions"]]
        self.attribute_quantiles_ = [float(v) for v in enc["attribute_quantiles"]]
        self.attribute_map_ = enc["attribute_map"]
        self.library_quantiles_ = [list(map(float, q)) for q in enc["library_quantiles"]]
        self._rows = self._attribute = None  # no training data
        # files written before the encoder read the library size have no depth statistics,
        # and before it read the most variable genes no gene indices
        state = payload["state"]
        if "depth_center" in state:  # before depth entered the code directly: a zero path
            state.setdefault("depth_to_code.weight", torch.zeros(self.config.latent_dim, 1))
        self.module = self._build(len(self.genes_), "depth_center" in state,
                                  len(state["encoder_genes"]) if "encoder_genes" in state
                                  else None,
                                  state["pc_axes"].shape[1] if "pc_axes" in state else None)
