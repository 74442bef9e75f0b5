"""Confounder mode: infer a hidden confounder Z of a binary treatment D and counts Y, given X.

    >>> model = advcli.ConfounderModel(adata, covariate_keys=["cell_type"])
    >>> model.train()
    >>> out = model.predict(adata)   # dict of Z_hat, Z_prob, D_logit, ...
    >>> table = model.treatment_effects()

Players: the Z-generator on [X, D, Y], the D-classifier on [X, Z] and the NB Y-model on
[X, D, Z] (and, with a DBPR reward, baseline heads without Z). The generator minimises
bce_w * BCE + nb_w * NB - dbpr_w * (w' + v') through the heads; each head minimises its own
loss. Trained by alternating freeze (heads, then generator) or simultaneously (--strategy joint).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any, Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy.special import expit

from .. import keys, losses
from ..config import ConfounderConfig
from ..backed import LogNormalisedRows, streamed_gene_statistics
from ..data import (CountRows, CovariateEncoding, count_rows, counts_anndata,
                    default_covariate_keys, encode_treatment, factor_count, gene_moments,
                    gene_order, in_file_order, load_counts, minibatches, residual_factors,
                    sample_labels, set_uns, size_factors, validate_counts)
from ..effects import treatment_effects
from ..errors import InputError
from ..nn import NBRegression, TreatmentClassifier, ZGenerator, represent_z
from ..strategies import constant_call
from ..train import EpochPlan
from .base import BaseModel, resolve_device

BASELINE_EPOCHS = 10
WARM_START_EPOCHS = 5  # the generator learns the residual-factor start
FIRST_HEAD_EPOCHS = 10  # the heads fit [X, D, start Z] before the generator first moves
WARM_START_SCALE = 3.0  # start logits at +-3 per sd of the factor: a clear split, not saturated
MAX_RESTARTS = 2
FEATURE_CACHE_ENTRIES = 50_000_000  # cells x genes up to which the generator's inputs are kept
STEPS_PER_EPOCH = 24  # the most the defaults were chosen at (8-24 on 1,000-3,000 cells)


class ConfounderModule(torch.nn.Module):
    """The players and their losses. State-dict keys: generator.*, classifier.*, nb.* (and
    baseline_classifier.*, baseline_nb.* with a DBPR reward)."""

    def __init__(self, generator: ZGenerator, classifier: TreatmentClassifier,
                 nb: NBRegression, z_type: str, baselines: bool = False):
        super().__init__()
        self.generator, self.classifier, self.nb = generator, classifier, nb
        self.z_type = z_type
        if baselines:
            x_dim = classifier.linear.in_features - generator.net[-1].out_features
            self.baseline_classifier = TreatmentClassifier(x_dim, classifier.linear.bias is not None)
            self.baseline_nb = NBRegression(x_dim + 1, nb.linear.out_features,
                                            nb.linear.bias is not None)

    @property
    def z_dim(self) -> int:
        return self.generator.net[-1].out_features

    @property
    def x_dim(self) -> int:
        """Covariate columns, read off the classifier (which sees [X, Z])."""
        return self.classifier.linear.in_features - self.z_dim

    def players(self) -> dict[str, list]:
        out = {"classifier": list(self.classifier.parameters()),
               "nb": list(self.nb.parameters()), "generator": list(self.generator.parameters())}
        if hasattr(self, "baseline_nb"):
            out["baseline"] = (list(self.baseline_classifier.parameters())
                               + list(self.baseline_nb.parameters()))
        return out

    @staticmethod
    def turns() -> list[tuple[tuple[str, ...], int]]:
        return [(("baseline",), 1), (("classifier", "nb"), 1), (("generator",), 1)]

    def z(self, features: torch.Tensor, temperature: float = 1.0
          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Z the heads consume, Z probability) from the generator's input features."""
        logits = self.generator.net(features)
        return represent_z(logits, self.z_type, temperature, self.training), torch.sigmoid(logits)

    def heads(self, x, d, z, offset=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(D logit, log mean of Y)."""
        return (self.classifier(torch.cat([x, z], dim=1)),
                self.nb(torch.cat([x, d[:, None], z], dim=1), offset))

    def objective(self, batch: dict, players, ctx: dict) -> tuple[dict, dict]:
        """Each active player's loss and the terms to log. ``ctx['phase']``: baseline (the
        DBPR baselines), warm_start (the generator learns ``batch['start']``), or training."""
        x, d, y, off = batch["x"], batch["d"], batch["y"], batch["offset"]
        features = batch.get("features")  # the batch computes them once for every turn
        if features is None:
            features = self.generator.features(x, d, y, off)
        # The generator's NB loss takes the count term from all cells' histogram: theta is a
        # constant there, so only the logged value changes, not a gradient. The heads learn
        # theta, so they take the minibatch's own term (from its histogram when there is one):
        # the full-data term takes the noise out of theta's gradient, which changes how far
        # Adam moves theta, and on Kang it moved the fits (overlap warnings).
        lf, hist, pair_ids = (batch.get(k) for k in ("log_factorial", "count_histogram",
                                                     "pair_ids"))

        def batch_histogram():
            return None if pair_ids is None else hist.of_pairs(pair_ids, len(y))

        phase = ctx["phase"]
        if phase == "baseline":
            bce = losses.bce(self.baseline_classifier(x), d)
            nb = losses.nb_nll(y, self.baseline_nb(torch.cat([x, d[:, None]], dim=1), off),
                               self.baseline_nb.theta, lf, batch_histogram())
            return {"baseline": bce + nb}, {"bce": bce.detach(), "nb": nb.detach()}
        if phase == "warm_start":
            mse = F.mse_loss(self.generator.net(features), batch["start"])
            return {"generator": mse}, {"mse": mse.detach()}
        out, logs = {}, {}
        if "generator" in players:
            z, _ = self.z(features, ctx["temperature"])
            out["generator"] = self._generator_loss(x, d, y, off, z, ctx["weights"], logs, lf,
                                                    hist)
            z = z.detach()
        else:
            with torch.no_grad():
                z, _ = self.z(features, ctx["temperature"])
        if "classifier" in players:
            out["classifier"] = losses.bce(self.classifier(torch.cat([x, z], dim=1)), d)
            logs["bce"] = out["classifier"].detach()
        if "nb" in players:
            log_mu = self.nb(torch.cat([x, d[:, None], z], dim=1), off)
            out["nb"] = losses.nb_nll(y, log_mu, self.nb.theta, lf, batch_histogram())
            logs["nb"] = out["nb"].detach()
        return out, logs

    def _generator_loss(self, x, d, y, off, z, weights: dict, logs: dict,
                        log_factorial: torch.Tensor | None = None,
                        histogram: losses.CountHistogram | None = None) -> torch.Tensor:
        """bce_w * BCE + nb_w * NB - dbpr_w * (w' + v') through the heads held constant. BCE
        is per cell, NB per cell and gene; the DBPR terms are rewarded (subtracted)."""
        d_logit = constant_call(self.classifier, torch.cat([x, z], dim=1))
        log_mu = constant_call(self.nb, torch.cat([x, d[:, None], z], dim=1), off)
        theta = self.nb.theta.detach()
        bce = losses.bce(d_logit, d)
        nb = losses.nb_nll(y, log_mu, theta, log_factorial, histogram)
        total = weights["bce"] * bce + weights["nb"] * nb
        if weights["dbpr"] > 0:
            with torch.no_grad():
                d_logit_base = self.baseline_classifier(x)
                log_mu_base = self.baseline_nb(torch.cat([x, d[:, None]], dim=1), off)
            w, v = losses.dbpr_terms(d_logit, d_logit_base, d, y, log_mu, log_mu_base, theta)
            logs["dbpr_d"], logs["dbpr_y"] = w.detach(), v.detach()
            total = total - weights["dbpr"] * (w + v)
        logs.update(bce=bce.detach(), nb=nb.detach(), total=total.detach())
        return total


def planned_confounder_epochs(cfg: ConfounderConfig) -> int:
    """Passes over the data the configuration asks for (an upper bound with early stopping)."""
    t = cfg.outer_iterations
    if cfg.strategy == "joint":
        planned = t * cfg.generator_epochs
    else:
        planned = math.ceil(t / 2) * cfg.predictor_epochs + (t // 2) * cfg.generator_epochs
        if t % 2 == 0:
            planned += cfg.predictor_epochs  # the heads are refit to the final Z
    if cfg.dbpr_weight > 0:
        planned += BASELINE_EPOCHS
    if cfg.warm_start:
        planned += WARM_START_EPOCHS
        if cfg.strategy == "alternating":
            planned += max(FIRST_HEAD_EPOCHS - cfg.predictor_epochs, 0)
    return min(planned, cfg.max_epochs) if cfg.max_epochs else planned


def temperature_at(cfg: ConfounderConfig, outer: int) -> float:
    """Gumbel temperature, annealed geometrically from start to end over the outer iterations."""
    if cfg.outer_iterations <= 1:
        return cfg.temperature_end
    frac = (outer - 1) / (cfg.outer_iterations - 1)
    return cfg.temperature_start * (cfg.temperature_end / cfg.temperature_start) ** frac


_EFFECTS_IN_MEMORY = ("The treatment-effect GLMs read every cell's counts in memory, so they "
                      "are not computed on a backed file. Run them on the file in memory, or on "
                      "a subsample of cells (`advcli diagnose --backed` does).")


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    from ..metrics import columnwise_pearson

    return float(columnwise_pearson(np.ravel(a)[:, None], np.ravel(b)[:, None])[0])


class ConfounderModel(BaseModel):
    """Infer a hidden confounder Z of a binary treatment D and counts Y, given covariates X."""

    mode = "confounder"
    progress_keys = ("bce", "nb", "total")
    monitored_losses = ("bce", "nb", "mse")

    def _setup(self, adata) -> None:
        cfg = self.config
        backed = getattr(adata, "isbacked", False)
        # in memory, the counts as CSR; on disk (--backed), rows read in blocks. Both are
        # checked here, before anything else is read.
        counts = count_rows(adata, cfg.layer, self.device, histogram=True) if backed else None
        if not backed:
            validate_counts(adata, cfg.layer)
        cov_keys = cfg.covariate_keys if cfg.covariate_keys is not None \
            else default_covariate_keys(adata)
        self.config = cfg = replace(cfg, covariate_keys=list(cov_keys))
        self.genes_ = [str(g) for g in adata.var_names]
        self.encoding_ = CovariateEncoding.fit(adata, cov_keys)
        d, self.treatment_levels_ = encode_treatment(adata, cfg.treatment_key, cfg.treated_level)
        x = self.encoding_.transform(adata)
        if not backed:
            counts = load_counts(adata, cfg.layer)
        fixed_alpha = self._dispersion(adata)
        log_sf = np.log(size_factors(adata, counts, cfg.size_factors))
        self.log_sf_center_ = float(log_sf.mean())
        offset = log_sf - self.log_sf_center_
        if backed:
            y_mean, y_sd, moment_sums = streamed_gene_statistics(counts, offset)
            log_y = LogNormalisedRows(counts, offset)
        else:
            log_y = sp.csr_matrix(sp.diags(np.exp(-offset)) @ counts)  # a new matrix: counts kept
            log_y.data = np.log1p(log_y.data)
            y_mean = np.asarray(log_y.mean(axis=0)).ravel()
            y_sd = np.sqrt(np.maximum(np.asarray(log_y.multiply(log_y).mean(axis=0)).ravel()
                                      - y_mean ** 2, 0.0))
            moment_sums = None
        y_sd = np.maximum(y_sd, 0.1)  # sparse genes: no division by a near-zero sd
        design = np.column_stack([x, d])
        if cfg.z_dim is None:  # Z's columns: the hidden factors the counts hold beyond [X, D]
            self.config = cfg = replace(cfg, z_dim=factor_count(counts, offset, design, cfg.seed))
        self._start = None
        if cfg.warm_start:  # Z starts at the residual factors of the generator's inputs
            start = residual_factors(log_y, y_mean, y_sd, design, cfg.z_dim, cfg.seed)
            scale = 1.0 if cfg.z_type == "continuous" else WARM_START_SCALE
            self._start = torch.from_numpy(start * scale).float().to(self.device)
        log_mean, alpha = gene_moments(counts, np.exp(offset), moment_sums)
        self._init = (x.shape[1], torch.from_numpy(y_mean), torch.from_numpy(y_sd), fixed_alpha,
                      torch.from_numpy(log_mean).float(), torch.from_numpy(alpha).float())
        self.attempt_, self.restarts_ = 0, []
        self.module = self._fresh_module(cfg.seed)
        self._x = torch.from_numpy(x).to(self.device)
        self._d = torch.from_numpy(d).to(self.device)
        self._off = torch.from_numpy(offset.astype(np.float32)).to(self.device)
        self._y = counts if backed else CountRows(counts, self.device, histogram=True)
        if cfg.batch_size is None:
            self.config = cfg = replace(cfg, batch_size=confounder_batch_size(*self._y.shape))
        self._histogram = _histogram_if_cheaper(self._y.count_histogram, cfg.batch_size)
        self._features = self._all_features() if (
            not backed and self._y.dense is not None
            and self._y.shape[0] * self._y.shape[1] <= FEATURE_CACHE_ENTRIES) else None
        self._counts = None if backed else counts  # the effects GLMs read them in memory
        self._obs = adata.obs
        if cfg.sample_key is not None:
            sample_labels(adata.obs, cfg.sample_key)
        if cfg.control_genes:
            unknown = sorted(set(cfg.control_genes) - set(self.genes_))
            if unknown:
                raise InputError(f"--control-genes names {len(unknown)} gene(s) not in the "
                                 f"data: {', '.join(unknown[:10])}.")
            if len(cfg.control_genes) <= cfg.z_dim:
                raise InputError(f"--control-genes needs more genes than Z has columns "
                                 f"({cfg.z_dim}); {len(cfg.control_genes)} given.")

    def _data_summary(self) -> bytes:
        return (self._y.col_sums.tobytes() + self._d.cpu().numpy().tobytes()
                + self._x.cpu().numpy().tobytes())

    def _dispersion(self, adata) -> torch.Tensor | None:
        key = self.config.dispersion_key
        if key is None:
            return None
        if key not in adata.var.columns:
            raise InputError(f"--dispersion-key '{key}' is not a var column. The file has: "
                             f"{', '.join(map(repr, adata.var.columns)) or 'none'}.")
        alpha = pd.to_numeric(adata.var[key], errors="coerce").to_numpy(dtype=float)
        if not (np.isfinite(alpha).all() and (alpha > 0).all()):
            raise InputError(f"var['{key}'] must hold a finite, positive NB dispersion for every "
                             "gene.")
        return torch.from_numpy(alpha.astype(np.float32))

    def _build(self, x_dim: int, n_genes: int, y_mean, y_sd, fixed_alpha) -> ConfounderModule:
        cfg = self.config
        generator = ZGenerator(x_dim, n_genes, cfg.z_dim, cfg.hidden, cfg.generator_inputs,
                               y_mean, y_sd)
        classifier = TreatmentClassifier(x_dim + cfg.z_dim, cfg.intercept)
        nb = NBRegression(x_dim + 1 + cfg.z_dim, n_genes, cfg.intercept, fixed_alpha)
        return ConfounderModule(generator, classifier, nb, cfg.z_type, cfg.dbpr_weight > 0)

    def _fresh_module(self, seed: int) -> ConfounderModule:
        """A network with the data-driven start (heads at the genes' log means and dispersions)."""
        x_dim, y_mean, y_sd, fixed_alpha, log_mean, alpha = self._init
        torch.manual_seed(seed)
        module = self._build(x_dim, len(self.genes_), y_mean, y_sd, fixed_alpha).to(self.device)
        module.nb.start_from_data(log_mean.to(self.device), alpha.to(self.device))
        return module

    @torch.no_grad()
    def _all_features(self) -> torch.Tensor:
        """The generator's input for every cell. It has no trainable parameters (its centring
        and scaling are fixed at setup), so on data that fits it is computed once rather than
        for every minibatch of every epoch (a log1p and four more passes over the counts)."""
        generator = self.module.generator
        return torch.cat([generator.features(self._x[b], self._d[b], self._y.rows(b),
                                             self._off[b])
                          for b in torch.arange(self._x.shape[0], device=self._x.device)
                          .split(8192)])

    # ------------------------------------------------------------------ the loop's pieces

    @property
    def strategy_name(self) -> str:
        return "simultaneous" if self.config.strategy == "joint" else "alternating"

    @property
    def planned_epochs(self) -> int:
        return planned_confounder_epochs(self.config)

    @property
    def weights(self) -> dict[str, float]:
        cfg = self.config
        nb = float(len(self.genes_)) if cfg.nb_weight is None else cfg.nb_weight
        return {"bce": cfg.bce_weight, "nb": nb, "dbpr": cfg.dbpr_weight}

    @property
    def training_seed(self) -> int:
        """Each restart draws other random numbers."""
        return self.config.seed + self.attempt_

    def _lr_generator(self) -> float:
        cfg = self.config
        return (cfg.lr_generator or cfg.lr) / 10 ** self.attempt_

    def learning_rates(self) -> dict[str, float]:
        lr = self.config.lr
        return {"classifier": lr, "nb": lr, "generator": self._lr_generator(), "baseline": lr}

    def batches(self, sampler: torch.Generator) -> list[torch.Tensor]:
        """Seeded random minibatches; on a backed file, drawn within each buffer of rows read
        from disk."""
        n = self._x.shape[0]
        if not self._y.backed:
            return minibatches(n, self.config.batch_size, sampler)
        out = []
        for rows in self._y.shuffled_buffers(sampler, np.ones(n, dtype=bool)):
            order = torch.from_numpy(rows)[torch.randperm(len(rows), generator=sampler)]
            out += list(order.split(self.config.batch_size))
        return out

    def batch(self, idx: torch.Tensor) -> dict:
        idx = idx.to(self._x.device)
        out = {"x": self._x[idx], "d": self._d[idx], "y": self._y.rows(idx),
               "offset": self._off[idx], "log_factorial": self._y.log_factorial[idx],
               "count_histogram": self._histogram}  # all cells' (or None): the same every batch
        if self._histogram is not None and not self._y.backed:
            out["pair_ids"] = self._y.pair_ids(idx)  # the heads' count term: of_pairs
        if self._features is not None:
            out["features"] = self._features[idx]
        else:
            with torch.no_grad():
                out["features"] = self.module.generator.features(out["x"], out["d"], out["y"],
                                                                 out["offset"])
        if self._start is not None:
            out["start"] = self._start[idx]
        return out

    def schedule(self) -> Iterator[EpochPlan]:
        """Baselines (with DBPR), the warm start, then the outer iterations: heads and generator
        in turn (odd / even), or every player at once with --strategy joint. Temperatures anneal
        and learning rates decay over the iterations; a head phase stops early when neither
        loss improves by 0.1% for --patience epochs; the heads are refit to the final Z."""
        cfg = self.config
        budget = cfg.max_epochs or planned_confounder_epochs(cfg)
        weights = self.weights
        done = 0

        def plan(players, phase, outer=0, temperature=cfg.temperature_end, scale=1.0,
                 fresh=()) -> EpochPlan:
            return EpochPlan(players, {"phase": phase, "temperature": temperature,
                                       "weights": weights}, scale,
                             {"phase": phase, "outer": outer}, fresh)

        if cfg.dbpr_weight > 0:
            for _ in range(min(BASELINE_EPOCHS, budget)):
                yield plan(("baseline",), "baseline")
                done += 1
        fresh: tuple[str, ...] = ()
        if self._start is not None:
            # at the heads' rate, then a fresh optimizer; --max-epochs caps it too
            for _ in range(min(WARM_START_EPOCHS, budget - done)):
                yield plan(("generator",), "warm_start", scale=cfg.lr / self._lr_generator())
                done += 1
            fresh = ("generator",)
        head_budget = cfg.predictor_epochs if cfg.strategy == "alternating" else 0
        last = None
        for outer in range(1, cfg.outer_iterations + 1):
            temperature = temperature_at(cfg, outer)
            frac = (outer - 1) / max(cfg.outer_iterations - 1, 1)
            scale = 1.0 - (1.0 - cfg.lr_final_fraction) * frac  # linear decay
            if cfg.strategy == "joint":
                for _ in range(cfg.generator_epochs):
                    if done >= budget:
                        break
                    yield plan(("classifier", "nb", "generator"), "joint", outer, temperature,
                               scale, fresh)
                    done, fresh = done + 1, ()
            elif outer % 2 == 1:
                n_epochs = (max(cfg.predictor_epochs, FIRST_HEAD_EPOCHS)
                            if outer == 1 and cfg.warm_start else cfg.predictor_epochs)
                heads = plan(("classifier", "nb"), "heads", outer, temperature, scale, fresh)
                done += yield from self._head_phase(heads, n_epochs, budget - done)
                fresh, last = (), "heads"
            else:
                if done >= budget - head_budget:
                    break
                for _ in range(cfg.generator_epochs):
                    if done >= budget - head_budget:
                        break
                    yield plan(("generator",), "generator", outer, temperature, scale)
                    done += 1
                last = "generator"
            if done >= budget:
                break
        if last == "generator":  # refit the heads to the generator's final Z
            heads = plan(("classifier", "nb"), "heads", cfg.outer_iterations + 1,
                         temperature_at(cfg, cfg.outer_iterations))
            yield from self._head_phase(heads, cfg.predictor_epochs, max(budget - done, 1))

    def _head_phase(self, template: EpochPlan, max_epochs: int, room: int):
        """Up to ``max_epochs`` head epochs, stopping when neither loss improves by 0.1% for
        ``patience`` epochs (patience 0: run them all). Returns the epochs used."""
        best = {"bce": math.inf, "nb": math.inf}
        stale = used = 0
        for i in range(min(max_epochs, room)):
            record = yield (template if i == 0 else replace(template, fresh_optimizers=()))
            used += 1
            improved = any(record[k] < best[k] - 1e-3 * abs(best[k]) for k in best
                           if math.isfinite(best[k])) or not math.isfinite(best["bce"])
            best = {k: min(best[k], record[k]) for k in best}
            stale = 0 if improved else stale + 1
            if self.config.patience and stale >= self.config.patience:
                break
        return used

    def _fit(self, on_epoch, checkpoint_path, checkpoint_every) -> None:
        """If a column of Z-hat ends constant or with over 99% of cells in one group, training
        restarts from a fresh network with the generator's learning rate divided by 10 (at most
        MAX_RESTARTS times); the summary records the restarts, and a collapse that survives
        them is a warning."""
        while True:
            self._run_loop(on_epoch, checkpoint_path, checkpoint_every)
            collapsed = self._collapsed(self.predict_training_z())
            if not collapsed or self.attempt_ == MAX_RESTARTS:
                return
            self.restarts_.append({"columns": collapsed, "lr_generator": self._lr_generator(),
                                   "epochs": self.epochs_})
            self.attempt_ += 1
            self.module = self._fresh_module(self.config.seed + self.attempt_)
            self.train_state_, self.optimizer_state_ = None, None

    def _train_extras(self) -> dict:
        return {"attempt": self.attempt_, "restarts": self.restarts_}

    def _restore_extras(self, extras: dict) -> None:
        self.attempt_ = int(extras.get("attempt", 0))
        self.restarts_ = list(extras.get("restarts", []))

    def predict_training_z(self) -> np.ndarray:
        """Z-hat of the training cells (no means): what the collapse check reads."""
        return self._forward_all(self._x, self._d, self._off, self._y, 4096,
                                 keep_means=False)[keys.Z_HAT]

    def _collapsed(self, z: np.ndarray) -> list[int]:
        """Columns of Z-hat that are constant, or (for group-like Z) hold over 99% of cells in
        one group."""
        flat = z.std(axis=0) < 1e-3
        if self.config.z_type != "continuous":
            flat |= np.maximum((z > 0.5).mean(axis=0), (z <= 0.5).mean(axis=0)) > 0.99
        return [int(j) for j in np.flatnonzero(flat)]

    # ------------------------------------------------------------------ prediction

    @torch.inference_mode()
    def _forward_all(self, x: torch.Tensor, d: torch.Tensor, off: torch.Tensor, rows,
                     batch_size: int, keep_means: bool = True, on_means=None
                     ) -> dict[str, np.ndarray]:
        """Every cell's outputs, in row order; ``on_means(start, block)`` takes the NB means
        block by block instead of keeping them (a backed file's layer)."""
        module = self.module.eval()
        temperature = self.config.temperature_end
        if rows.backed:
            rows.sequential_plan()
        n, k = rows.shape[0], module.z_dim
        # filled in place: per-batch pieces kept alive between the large temporary blocks
        # fragment the heap (RSS grew 7 GB over 10^6 cells in one pass)
        out = {keys.Z_HAT: np.empty((n, k), np.float32), keys.Z_PROB: np.empty((n, k), np.float32),
               keys.D_LOGIT: np.empty(n, np.float32), keys.LOG_LIK_Y: np.empty(n, np.float32)}
        if keep_means and on_means is None:
            out[keys.NB_MEAN] = np.empty(rows.shape, np.float32)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            idx = torch.arange(start, stop, device=x.device)
            xb, db, yb, ob = x[idx], d[idx], rows.rows(idx), off[idx]
            logits = module.generator(xb, db, yb, ob)
            z = represent_z(logits, module.z_type, temperature, training=False)
            d_logit, log_mu = module.heads(xb, db, z, ob)
            out[keys.Z_HAT][start:stop] = z.cpu().numpy()
            out[keys.Z_PROB][start:stop] = torch.sigmoid(logits).cpu().numpy()
            out[keys.D_LOGIT][start:stop] = d_logit.cpu().numpy()
            out[keys.LOG_LIK_Y][start:stop] = (losses.nb_log_prob(yb, log_mu, module.nb.theta)
                                               .sum(1).cpu().numpy())
            if on_means is not None:
                on_means(start, torch.exp(log_mu).float().cpu().numpy())
            elif keep_means:
                out[keys.NB_MEAN][start:stop] = torch.exp(log_mu).cpu().numpy()
        out[keys.D_PROB] = expit(out[keys.D_LOGIT].astype(np.float64))
        return out

    def _inputs(self, adata):
        """X, D, offsets, the counts in memory (None for a backed file) and the count rows of
        ``adata``, in the model's gene order and encoding."""
        cfg = self.config
        adata = counts_anndata(adata, cfg.layer)
        if getattr(adata, "isbacked", False):
            order = gene_order(adata, self.genes_)
            counts, rows = None, count_rows(adata, cfg.layer, self.device, order)
        else:
            validate_counts(adata, cfg.layer)
            order = gene_order(adata, self.genes_)
            counts = load_counts(adata, cfg.layer)[:, order]
            rows = CountRows(counts, self.device)
        d, _ = encode_treatment(adata, cfg.treatment_key, self.treatment_levels_[1])
        x = self.encoding_.transform(adata)
        log_sf = np.log(size_factors(adata, rows if counts is None else counts,
                                     cfg.size_factors))
        offset = (log_sf - self.log_sf_center_).astype(np.float32)  # the training data's scale
        return torch.from_numpy(x), torch.from_numpy(d), torch.from_numpy(offset), counts, rows

    def predict(self, adata=None, batch_size: int = 1024, device: str | None = None,
                keep_means: bool = True, inplace: bool = False, on_means=None
                ) -> dict[str, np.ndarray] | list[str]:
        """Per-cell outputs (keys in docs/data_format.md) for ``adata`` (default: the training
        data), in row order; ``inplace``: written into ``adata``, the keys returned."""
        if inplace:
            return self._predict_inplace(adata, batch_size=batch_size, device=device,
                                         nb_mean=keep_means)
        self._require_trained()
        if device is not None:
            self.to(resolve_device(device))
        if adata is None:
            self._require_data("predict()")
            x, d, off, rows = self._x, self._d, self._off, self._y
        else:
            x, d, off, _, rows = self._inputs(adata)
            x, d, off = x.to(self.device), d.to(self.device), off.to(self.device)
        return self._forward_all(x, d, off, rows, batch_size, keep_means, on_means)

    def predict_into(self, adata, batch_size: int = 1024, device: str = "auto",
                     nb_mean: bool = True) -> list[str]:
        """Add the predictions to ``adata`` (obsm, obs, layers); return the keys written.
        Genes the model does not know get a NaN NB mean (``nb_mean=False``: no NB means). On
        a backed file the NB means are written block by block."""
        from ..backed import LayerSink

        sink = LayerSink(adata, [keys.NB_MEAN] if nb_mean else [])

        def on_means(start: int, block: np.ndarray) -> None:
            sink.write(keys.NB_MEAN, start, in_file_order(adata, self.genes_, block))

        out = self.predict(adata, batch_size=batch_size, device=device, keep_means=nb_mean,
                           on_means=on_means if nb_mean else None)
        sink.finish()
        adata.obsm[keys.Z_HAT] = out[keys.Z_HAT].astype(np.float32)
        adata.obsm[keys.Z_PROB] = out[keys.Z_PROB].astype(np.float32)
        adata.obs[keys.D_LOGIT] = out[keys.D_LOGIT].astype(np.float32)
        adata.obs[keys.D_PROB] = out[keys.D_PROB].astype(np.float32)
        adata.obs[keys.LOG_LIK_Y] = out[keys.LOG_LIK_Y].astype(np.float64)
        set_uns(adata, keys.CONFOUNDER_INPUTS, self.input_description())
        return [f"obsm['{keys.Z_HAT}']", f"obsm['{keys.Z_PROB}']", f"obs['{keys.D_LOGIT}']",
                f"obs['{keys.D_PROB}']", f"obs['{keys.LOG_LIK_Y}']"] + (
                    [f"layers['{keys.NB_MEAN}']"] if nb_mean else [])

    def input_description(self) -> dict:
        """What diagnose needs to refit the treatment-effect GLM without the model file. The
        covariate encoding is one JSON string: its per-covariate level lists differ in length,
        which an .h5ad cannot store as an array."""
        cfg = self.config
        return {"treatment_key": cfg.treatment_key, "treated_level": self.treatment_levels_[1],
                "layer": cfg.layer or "", "size_factors": cfg.size_factors,
                "sample_key": cfg.sample_key or "",
                "control_genes_json": json.dumps(list(cfg.control_genes or [])),
                "covariates_json": json.dumps(self.encoding_.to_dict())}

    def treatment_effects(self, adata=None, sample_key: str | None = None) -> pd.DataFrame:
        """Per-gene effects of D: naive ([X, D]) and adjusted for Z-hat ([X, D, Z-hat]), NB GLMs
        with the model's size factors (see ``advcli.effects.treatment_effects``).

        ``adata`` defaults to the training data; ``sample_key`` (default: the configured one)
        sums cells to pseudobulk samples before testing.
        """
        self._require_trained()
        if adata is None:
            self._require_data("treatment_effects()")
            if self._counts is None:
                raise InputError(_EFFECTS_IN_MEMORY)
            x, d, off, counts = (self._x.cpu().numpy(), self._d.cpu().numpy(),
                                 self._off.cpu().numpy(), self._counts)
            z, obs = self.predict(keep_means=False)[keys.Z_HAT], self._obs
        else:
            xt, dt, offt, counts, _ = self._inputs(adata)
            if counts is None:
                raise InputError(_EFFECTS_IN_MEMORY)
            x, d, off = xt.numpy(), dt.numpy(), offt.numpy()
            z, obs = self.predict(adata, keep_means=False)[keys.Z_HAT], adata.obs
        key = sample_key if sample_key is not None else self.config.sample_key
        sample = None if key is None else sample_labels(obs, key)
        return treatment_effects(counts, d, x, z, self.genes_, np.exp(off.astype(np.float64)),
                                 sample, control_genes=self.config.control_genes)

    def to(self, device: torch.device) -> "ConfounderModel":
        self.device = device
        self.module.to(device)
        return self

    # ------------------------------------------------------------------ reporting

    def _summarise(self, wall: float, cpu: float) -> dict[str, Any]:
        out = self.predict(batch_size=4096, keep_means=False)
        z, d = out[keys.Z_HAT], self._d.cpu().numpy()
        x = self._x.cpu().numpy()
        records = self.train_state_.records
        heads = [r for r in records if r["phase"] == "heads"]
        gen = [r for r in records if r["phase"] in ("generator", "joint")]
        last = heads[-1] if heads else gen[-1] if gen else None
        final = {} if last is None else {"bce": last["bce"], "nb": last["nb"]}
        if gen:
            final["generator_total"] = gen[-1]["total"]
        corr_d = [_pearson(z[:, j], d) for j in range(z.shape[1])]
        corr_x = {col: max(abs(_pearson(z[:, j], x[:, c])) for j in range(z.shape[1]))
                  for c, col in enumerate(self.encoding_.columns)}
        from sklearn.metrics import roc_auc_score

        auroc = float(roc_auc_score(d, out[keys.D_LOGIT]))
        warnings = self.leakage_warnings(corr_d, auroc)
        auroc_x = float(roc_auc_score(d, _propensity(x, d)))
        p = _propensity(np.column_stack([x, z]), d)
        extreme = float(np.mean((p < 0.05) | (p > 0.95)))  # the usual positivity diagnostic
        if extreme > 0.1 and not warnings:
            warnings.append(
                f"{extreme:.0%} of cells have a treatment probability below 0.05 or above 0.95 "
                "given [X, Z-hat]: treated and control cells overlap poorly, so the adjusted "
                "effects compare cells that are not alike and rest on extrapolation.")
        if auroc_x > 0.95:
            warnings.append(
                f"The covariates alone separate treated from control cells (AUROC {auroc_x:.2f}):"
                " there is little overlap, so adjusted effects rest on extrapolation between "
                "groups that never share covariate values.")
        collapsed = self._collapsed(z)
        if collapsed:
            warnings.append(
                f"Z-hat column(s) {collapsed} are constant or put over 99% of cells in one "
                "group: adjusting for them changes little. Try another --seed, a lower --lr, "
                "or --z-type continuous if the hidden factor is a gradient rather than groups.")
        if last is None:
            warnings.insert(0, (
                f"Training ended after {self.epochs_} epoch(s), within the warm start: the "
                "treatment and count models were never trained, so Z-hat is only the starting "
                "point. Raise --max-epochs."))
        if self.restarts_:
            first = self.restarts_[0]
            warnings.insert(0, (
                f"Z-hat collapsed (column(s) {first['columns']}) with a generator learning "
                f"rate of {first['lr_generator']:g}; training restarted {len(self.restarts_)} "
                f"time(s) with a lower rate (final {self._lr_generator():g})."))
        return {"mode": self.mode, "n_cells": int(self._x.shape[0]), "n_genes": len(self.genes_),
                "epochs": self.epochs_ + sum(r["epochs"] for r in self.restarts_),
                "train_seconds": wall, "train_cpu_seconds": cpu,
                "final_losses": final, "strategy": self.config.strategy,
                "z_type": self.config.z_type, "z_dim": int(z.shape[1]), "corr_z_d": corr_d,
                "corr_z_covariates": corr_x, "auroc_d": auroc, "auroc_d_from_x": auroc_x,
                "extreme_propensity_fraction": extreme, "restarts": self.restarts_,
                "warnings": warnings}

    def leakage_warnings(self, corr_d: list[float], auroc: float) -> list[str]:
        """Warn when Z-hat explains D far better than a confounder plausibly can.

        A confounder shifts the odds of treatment; it does not decide it. If Z-hat alone almost
        determines D, the generator (which sees D) has most likely copied D into Z, and adjusting
        for Z-hat would erase the very treatment effect being estimated.
        """
        warnings = []
        worst = max((abs(r) for r in corr_d if np.isfinite(r)), default=0.0)
        if worst > 0.7 or auroc > 0.95:
            hint = " --generator-inputs x,y" if "d" in self.config.generator_inputs else ""
            warnings.append(
                f"Z-hat nearly determines the treatment: |corr(Z-hat, D)| = {worst:.2f} and the "
                f"D-classifier on [X, Z-hat] reaches AUROC {auroc:.2f}. Either Z-hat copied D, "
                f"or the hidden factor decides treatment and treated and control cells do not "
                f"overlap; in both cases the adjusted effects cannot be trusted. Refit with"
                f"{hint or ' other settings'} (see docs/confounder.md).")
        return warnings

    # ------------------------------------------------------------------ files

    def _encoding(self) -> dict:
        return {"covariates": self.encoding_.to_dict(),
                "treatment_levels": list(self.treatment_levels_),
                "x_dim": self.module.x_dim, "log_sf_center": self.log_sf_center_}

    @staticmethod
    def _upgrade_config(config: dict) -> dict:
        config = dict(config)
        config.setdefault("size_factors", "none")  # files from before size factors
        config.setdefault("warm_start", False)
        return config

    def _rebuild(self, payload: dict) -> None:
        enc = payload["encoding"]
        self.encoding_ = CovariateEncoding.from_dict(enc["covariates"])
        self.treatment_levels_ = [str(v) for v in enc["treatment_levels"]]
        self.log_sf_center_ = float(enc.get("log_sf_center", 0.0))
        self._start, self.attempt_, self.restarts_ = None, 0, []
        state = payload["state"]
        fixed = torch.exp(-state["nb.log_theta"]) if self.config.dispersion_key else None
        self.module = self._build(int(enc["x_dim"]), len(self.genes_), state["generator.y_mean"],
                                  state["generator.y_scale"], fixed)


def confounder_batch_size(n_cells: int, n_genes: int) -> int:
    """128 cells, or about STEPS_PER_EPOCH steps an epoch on larger data, at most 1,024 cells
    and ~10^6 counts a minibatch. An epoch is one phase of the alternation, and on large data
    a phase of 128-cell steps is many more steps than the heads need to follow Z; larger
    minibatches spread the fixed cost of a step (the optimizers, the per-gene terms) over more
    cells and give the same fits (docs/confounder.md)."""
    return int(max(128, min(n_cells // STEPS_PER_EPOCH, 1024, (1 << 20) // max(n_genes, 1))))


def _histogram_if_cheaper(histogram: losses.CountHistogram, batch_size: int
                          ) -> losses.CountHistogram | None:
    """The count histogram when it has fewer (gene, count) pairs than a minibatch has nonzero
    counts (true of most data: counts recur), else None: the minibatch's counts are then the
    cheaper way to the NB count term."""
    per_batch = batch_size * float(histogram.nonzero_share.sum())
    return histogram if histogram.pairs <= per_batch else None


def _propensity(features: np.ndarray, d: np.ndarray) -> np.ndarray:
    """In-sample P(D = 1 | features) from a logistic regression (0.5 everywhere with none)."""
    if features.shape[1] == 0:
        return np.full(len(d), 0.5)
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=1.0, max_iter=500).fit(features, d).predict_proba(features)[:, 1]
