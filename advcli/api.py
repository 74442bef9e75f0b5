"""The user-facing models, in the style of scvi-tools: construct on an AnnData (which validates it),
``train()``, ``save()``, ``load()``, ``predict()``. Fitted state ends in ``_``.

    >>> model = advcli.ConfounderModel(adata, covariate_keys=["cell_type"])
    >>> model.train()
    >>> out = model.predict(adata)   # dict of Z_hat, Z_prob, D_logit, ...
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from . import __version__, keys
from .config import ConfounderConfig, config_from_dict, config_to_dict
from .data import (CountRows, CovariateEncoding, default_covariate_keys, encode_treatment,
                   gene_moments, gene_order, load_counts, residual_factors, sample_labels,
                   set_uns, size_factors, validate_counts)
from .effects import treatment_effects
from .errors import InputError
from .io import load_model, plain, save_model
from .losses import nb_log_prob
from .nn import ConfounderNet, NBRegression, TreatmentClassifier, ZGenerator, represent_z
from .train import planned_confounder_epochs, train_confounder

SEED_PRESET = dict(batch_size=32, lr=1e-3, lr_generator=None, outer_iterations=10, predictor_epochs=1,
                   generator_epochs=1, intercept=False, z_type="binary", nb_weight=1.0,
                   patience=0, lr_final_fraction=1.0, size_factors="none", warm_start=False, z_dim=1,
                   preset="seed")


def confounder_config(preset: str | None = None, **options) -> ConfounderConfig:
    """A ConfounderConfig from the defaults, a preset, then explicit options (which win)."""
    if preset not in (None, "default", "seed"):
        raise InputError(f"--preset must be 'default' or 'seed' (got '{preset}').")
    base = ConfounderConfig(**SEED_PRESET) if preset == "seed" else ConfounderConfig()
    return replace(base, **options)


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but torch sees no CUDA device.")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    from .metrics import columnwise_pearson

    return float(columnwise_pearson(np.ravel(a)[:, None], np.ravel(b)[:, None])[0])


class TrainedModel:
    """What both models share: configuration, the trained flag, the fit summary, model files."""

    mode = ""

    @staticmethod
    def _configure(config, options: dict, make_default):
        """The given config (options override it) or a default one built from the options."""
        cfg = make_default(**options) if config is None else replace(config, **options)
        cfg.check()
        return cfg

    def _require_trained(self) -> None:
        if not self.is_trained_:
            raise InputError("The model has not been trained; call train() first.")

    def fit_summary(self) -> dict[str, Any]:
        self._require_trained()
        return dict(self.summary_)

    def _save(self, path: str | Path, encoding: dict) -> None:
        self._require_trained()
        save_model({
            "format": keys.MODEL_FORMAT, "format_version": keys.FORMAT_VERSION,
            "version": __version__, "mode": self.mode, "config": config_to_dict(self.config),
            "genes": list(self.genes_), "encoding": encoding,
            "state": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "optimizers": self.optimizer_state_, "history": self.history_,
            "summary": plain(self.summary_)}, path)

    def _restored(self, payload: dict):
        """Fitted state from a model file, once the network has been rebuilt and loaded."""
        self.device = torch.device("cpu")
        self.history_ = payload["history"]
        self.summary_ = payload.get("summary")
        self.optimizer_state_ = payload.get("optimizers")
        self.is_trained_ = True
        self.net.eval()
        return self

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_payload(load_model(path, mode=cls.mode), path)


MAX_RESTARTS = 2


class ConfounderModel(TrainedModel):
    """Infer a hidden confounder Z of a binary treatment D and counts Y, given covariates X."""

    mode = "confounder"

    def __init__(self, adata, config: ConfounderConfig | None = None, **options):
        cfg = self._configure(config, options, confounder_config)
        validate_counts(adata, cfg.layer)
        cov_keys = cfg.covariate_keys if cfg.covariate_keys is not None \
            else default_covariate_keys(adata)
        self.config = replace(cfg, covariate_keys=list(cov_keys))
        self.genes_ = [str(g) for g in adata.var_names]
        self.encoding_ = CovariateEncoding.fit(adata, cov_keys)
        d, self.treatment_levels_ = encode_treatment(adata, cfg.treatment_key, cfg.treated_level)
        x = self.encoding_.transform(adata)
        counts = load_counts(adata, cfg.layer)
        fixed_alpha = self._dispersion(adata)
        self.device = resolve_device(cfg.device)
        log_sf = np.log(size_factors(adata, counts, cfg.size_factors))
        self.log_sf_center_ = float(log_sf.mean())
        offset = log_sf - self.log_sf_center_
        log_y = sp.csr_matrix(sp.diags(np.exp(-offset)) @ counts)  # a new matrix: counts kept
        log_y.data = np.log1p(log_y.data)
        y_mean = np.asarray(log_y.mean(axis=0)).ravel()
        y_sd = np.sqrt(np.maximum(np.asarray(log_y.multiply(log_y).mean(axis=0)).ravel()
                                  - y_mean ** 2, 0.0))
        y_sd = np.maximum(y_sd, 0.1)  # sparse genes: no division by a near-zero sd
        start = None
        if cfg.warm_start or cfg.z_dim is None:  # the factors start Z and/or count its columns
            start = residual_factors(log_y, y_mean, y_sd, np.column_stack([x, d]), cfg.z_dim,
                                     cfg.seed)
            self.config = cfg = replace(self.config, z_dim=start.shape[1])
        self._start = start if cfg.warm_start else None
        log_mean, alpha = gene_moments(counts, np.exp(offset))
        self._init = (x.shape[1], torch.from_numpy(y_mean), torch.from_numpy(y_sd), fixed_alpha,
                      torch.from_numpy(log_mean).float(), torch.from_numpy(alpha).float())
        self.net = self._fresh_net(cfg.seed)
        self._x = torch.from_numpy(x).to(self.device)
        self._d = torch.from_numpy(d).to(self.device)
        self._off = torch.from_numpy(offset.astype(np.float32)).to(self.device)
        self._y = CountRows(counts, self.device)
        self._counts, self._obs = counts, adata.obs
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
        self.history_: dict | None = None
        self.optimizer_state_: dict | None = None
        self.summary_: dict | None = None
        self.is_trained_ = False

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

    def _build(self, x_dim: int, n_genes: int, y_mean, y_sd, fixed_alpha) -> ConfounderNet:
        cfg = self.config
        generator = ZGenerator(x_dim, n_genes, cfg.z_dim, cfg.hidden, cfg.generator_inputs,
                               y_mean, y_sd)
        classifier = TreatmentClassifier(x_dim + cfg.z_dim, cfg.intercept)
        nb = NBRegression(x_dim + 1 + cfg.z_dim, n_genes, cfg.intercept, fixed_alpha)
        return ConfounderNet(generator, classifier, nb, cfg.z_type)

    @property
    def planned_epochs(self) -> int:
        return planned_confounder_epochs(self.config)

    @property
    def weights(self) -> dict[str, float]:
        cfg = self.config
        nb = float(len(self.genes_)) if cfg.nb_weight is None else cfg.nb_weight
        return {"bce": cfg.bce_weight, "nb": nb, "dbpr": cfg.dbpr_weight}

    def _batch(self, idx: torch.Tensor):
        idx = idx.to(self._x.device)
        return self._x[idx], self._d[idx], self._y.rows(idx), self._off[idx]

    def _fresh_net(self, seed: int) -> ConfounderNet:
        """A network with the data-driven start (heads at the genes' log means and dispersions)."""
        x_dim, y_mean, y_sd, fixed_alpha, log_mean, alpha = self._init
        torch.manual_seed(seed)
        net = self._build(x_dim, len(self.genes_), y_mean, y_sd, fixed_alpha).to(self.device)
        net.nb.start_from_data(log_mean.to(self.device), alpha.to(self.device))
        return net

    def train(self, on_epoch=None) -> "ConfounderModel":
        """Train with the configured strategy; ``on_epoch(done, losses)`` reports progress.

        If a column of Z-hat ends constant or with over 99% of cells in one group, training
        restarts from a fresh network with the generator's learning rate divided by 10 (at most
        MAX_RESTARTS times); the summary records the restarts, and a collapse that survives
        them is a warning.
        """
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        start = None if self._start is None else torch.from_numpy(self._start).to(self.device)
        cfg, restarts = self.config, []
        epochs_total = 0
        for attempt in range(MAX_RESTARTS + 1):
            if attempt:
                cfg = replace(cfg, lr_generator=(cfg.lr_generator or cfg.lr) / 10)
                self.net = self._fresh_net(cfg.seed + attempt)
            torch.manual_seed(cfg.seed + attempt)
            self.history_, epochs, self.optimizer_state_ = train_confounder(
                self.net, self._x.shape[0], self._batch, cfg, self.weights, on_epoch, start)
            epochs_total += epochs
            collapsed = self._collapsed(self.predict_training_z())
            if not collapsed or attempt == MAX_RESTARTS:
                break
            restarts.append({"columns": collapsed, "lr_generator": cfg.lr_generator or cfg.lr})
        self.is_trained_ = True
        self.summary_ = self._summarise(epochs_total, time.perf_counter() - start_wall,
                                        time.process_time() - start_cpu)
        self.summary_["restarts"] = restarts
        if restarts:
            self.summary_["warnings"].insert(0, (
                f"Z-hat collapsed (column(s) {restarts[0]['columns']}) with a generator learning "
                f"rate of {restarts[0]['lr_generator']:g}; training restarted {len(restarts)} "
                f"time(s) with a lower rate (final {cfg.lr_generator:g})."))
        return self

    def predict_training_z(self) -> np.ndarray:
        """Z-hat of the training cells (no means): what the collapse check reads."""
        return self._forward_all(self._x, self._d, self._off, self._y.rows, self._x.shape[0],
                                 4096, keep_means=False)[keys.Z_HAT]

    def _collapsed(self, z: np.ndarray) -> list[int]:
        """Columns of Z-hat that are constant, or (for group-like Z) hold over 99% of cells in
        one group."""
        flat = z.std(axis=0) < 1e-3
        if self.config.z_type != "continuous":
            flat |= np.maximum((z > 0.5).mean(axis=0), (z <= 0.5).mean(axis=0)) > 0.99
        return [int(j) for j in np.flatnonzero(flat)]

    # ------------------------------------------------------------------ prediction

    @torch.inference_mode()
    def _forward_all(self, x: torch.Tensor, d: torch.Tensor, off: torch.Tensor, rows, n: int,
                     batch_size: int, keep_means: bool = True) -> dict[str, np.ndarray]:
        net = self.net.eval()
        temperature = self.config.temperature_end
        parts: dict[str, list] = {k: [] for k in (keys.Z_HAT, keys.Z_PROB, keys.D_LOGIT,
                                                  keys.NB_MEAN, keys.LOG_LIK_Y)}
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(start + batch_size, n), device=x.device)
            xb, db, yb, ob = x[idx], d[idx], rows(idx), off[idx]
            logits = net.generator(xb, db, yb, ob)
            z = represent_z(logits, net.z_type, temperature, training=False)
            d_logit, log_mu = net.heads(xb, db, z, ob)
            parts[keys.Z_HAT].append(z.cpu())
            parts[keys.Z_PROB].append(torch.sigmoid(logits).cpu())
            parts[keys.D_LOGIT].append(d_logit.cpu())
            if keep_means:
                parts[keys.NB_MEAN].append(torch.exp(log_mu).float().cpu())
            parts[keys.LOG_LIK_Y].append(nb_log_prob(yb, log_mu, net.nb.theta).sum(1).cpu())
        out = {k: torch.cat(v).numpy() for k, v in parts.items() if v}
        out[keys.D_PROB] = 1.0 / (1.0 + np.exp(-out[keys.D_LOGIT]))
        return out

    def _inputs(self, adata):
        """X, D and count rows of ``adata`` in the model's gene order and encoding."""
        cfg = self.config
        validate_counts(adata, cfg.layer)
        order = gene_order(adata, self.genes_)
        d, _ = encode_treatment(adata, cfg.treatment_key, self.treatment_levels_[1])
        x = self.encoding_.transform(adata)
        counts = load_counts(adata, cfg.layer)[:, order]
        offset = self._offset(adata, counts)
        return torch.from_numpy(x), torch.from_numpy(d), torch.from_numpy(offset), counts

    def _offset(self, adata, counts) -> np.ndarray:
        """Centred log size factors, on the training data's scale. Library sizes are counted
        over the model's genes, as at training, whatever else the file holds."""
        log_sf = np.log(size_factors(adata, counts, self.config.size_factors))
        return (log_sf - self.log_sf_center_).astype(np.float32)

    def predict(self, adata=None, batch_size: int = 1024, device: str | None = None,
                keep_means: bool = True) -> dict[str, np.ndarray]:
        """Per-cell outputs (keys in docs/data_format.md) for ``adata`` (default: the training data), in row order."""
        self._require_trained()
        if device is not None:
            self.to(resolve_device(device))
        if adata is None:
            x, d, off, rows, n = self._x, self._d, self._off, self._y.rows, self._x.shape[0]
        else:
            x, d, off, counts = self._inputs(adata)
            x, d, off = x.to(self.device), d.to(self.device), off.to(self.device)
            rows = CountRows(counts, self.device).rows
            n = counts.shape[0]
        return self._forward_all(x, d, off, rows, n, batch_size, keep_means)

    def predict_into(self, adata, batch_size: int = 1024, device: str = "auto") -> list[str]:
        """Add the predictions to ``adata`` (obsm, obs, layers); return the keys written."""
        out = self.predict(adata, batch_size=batch_size, device=device)
        adata.obsm[keys.Z_HAT] = out[keys.Z_HAT].astype(np.float32)
        adata.obsm[keys.Z_PROB] = out[keys.Z_PROB].astype(np.float32)
        adata.obs[keys.D_LOGIT] = out[keys.D_LOGIT].astype(np.float32)
        adata.obs[keys.D_PROB] = out[keys.D_PROB].astype(np.float32)
        adata.obs[keys.LOG_LIK_Y] = out[keys.LOG_LIK_Y].astype(np.float64)
        order = np.argsort(gene_order(adata, self.genes_))  # back to the file's gene order
        adata.layers[keys.NB_MEAN] = out[keys.NB_MEAN][:, order].astype(np.float32)
        set_uns(adata, keys.CONFOUNDER_INPUTS, self.input_description())
        return [f"obsm['{keys.Z_HAT}']", f"obsm['{keys.Z_PROB}']", f"obs['{keys.D_LOGIT}']",
                f"obs['{keys.D_PROB}']", f"obs['{keys.LOG_LIK_Y}']", f"layers['{keys.NB_MEAN}']"]

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
            if getattr(self, "_counts", None) is None:
                raise InputError("A loaded model has no training data; pass the AnnData.")
            x, d, off, counts = (self._x.cpu().numpy(), self._d.cpu().numpy(),
                                 self._off.cpu().numpy(), self._counts)
            z, obs = self.predict(keep_means=False)[keys.Z_HAT], self._obs
        else:
            xt, dt, offt, counts = self._inputs(adata)
            x, d, off = xt.numpy(), dt.numpy(), offt.numpy()
            z, obs = self.predict(adata, keep_means=False)[keys.Z_HAT], adata.obs
        key = sample_key if sample_key is not None else self.config.sample_key
        sample = None if key is None else sample_labels(obs, key)
        return treatment_effects(counts, d, x, z, self.genes_, np.exp(off.astype(np.float64)),
                                 sample, control_genes=self.config.control_genes)

    def to(self, device: torch.device) -> "ConfounderModel":
        self.device = device
        self.net.to(device)
        return self

    # ------------------------------------------------------------------ reporting

    def _summarise(self, epochs: int, wall: float, cpu: float) -> dict[str, Any]:
        out = self.predict(batch_size=4096, keep_means=False)
        z, d = out[keys.Z_HAT], self._d.cpu().numpy()
        x = self._x.cpu().numpy()
        gen = self.history_["generator"]
        pred = self.history_["predictor"]
        final = {"bce": pred["bce"][-1] if pred.get("bce") else gen["bce"][-1],
                 "nb": pred["nb"][-1] if pred.get("nb") else gen["nb"][-1]}
        if gen.get("total"):
            final["generator_total"] = gen["total"][-1]
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
        return {"mode": self.mode, "n_cells": int(self._x.shape[0]), "n_genes": len(self.genes_),
                "epochs": epochs, "train_seconds": wall, "train_cpu_seconds": cpu,
                "final_losses": final, "strategy": self.config.strategy,
                "z_type": self.config.z_type, "z_dim": int(z.shape[1]), "corr_z_d": corr_d,
                "corr_z_covariates": corr_x, "auroc_d": auroc, "auroc_d_from_x": auroc_x,
                "extreme_propensity_fraction": extreme,
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

    def save(self, path: str | Path) -> None:
        self._save(path, {"covariates": self.encoding_.to_dict(),
                          "treatment_levels": list(self.treatment_levels_),
                          "x_dim": self.net.x_dim, "log_sf_center": self.log_sf_center_})

    @classmethod
    def from_payload(cls, payload: dict, path: str | Path = "model") -> "ConfounderModel":
        self = cls.__new__(cls)
        try:
            config = dict(payload["config"])
            config.setdefault("size_factors", "none")  # files from before size factors
            config.setdefault("warm_start", False)
            self.config = config_from_dict(ConfounderConfig, config)
            self.genes_ = list(payload["genes"])
            enc = payload["encoding"]
            self.encoding_ = CovariateEncoding.from_dict(enc["covariates"])
            self.treatment_levels_ = list(enc["treatment_levels"])
            self.log_sf_center_ = float(enc.get("log_sf_center", 0.0))
            self._start = None
            state = payload["state"]
            fixed = torch.exp(-state["nb.log_theta"]) if self.config.dispersion_key else None
            self.net = self._build(int(enc["x_dim"]), len(self.genes_), state["generator.y_mean"],
                                   state["generator.y_scale"], fixed)
            self.net.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"Model file '{path}' is damaged or inconsistent ({exc}).") from None
        return self._restored(payload)


def _propensity(features: np.ndarray, d: np.ndarray) -> np.ndarray:
    """In-sample P(D = 1 | features) from a logistic regression (0.5 everywhere with none)."""
    if features.shape[1] == 0:
        return np.full(len(d), 0.5)
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=1.0, max_iter=500).fit(features, d).predict_proba(features)[:, 1]


def load(payload: dict, path: str | Path = "model"):
    """The model object for a loaded model file, whatever its mode."""
    if payload["mode"] == "confounder":
        return ConfounderModel.from_payload(payload, path)
    from .integrate import IntegrationModel

    return IntegrationModel.from_payload(payload, path)


def per_cell_frame(adata, written: list[str]) -> pd.DataFrame:
    """One row per cell: every per-cell column that predict wrote (obs columns and obsm matrices)."""
    frame = pd.DataFrame(index=adata.obs_names)
    for key in written:
        if key.startswith("obs['"):
            name = key[5:-2]
            frame[name] = adata.obs[name].to_numpy()
        elif key.startswith("obsm['"):
            name = key[6:-2]
            values = np.asarray(adata.obsm[name])
            for j in range(values.shape[1]):
                frame[f"{name}_{j}"] = values[:, j]
    return frame


def __getattr__(name: str):
    if name == "IntegrationModel":
        from .integrate import IntegrationModel

        return IntegrationModel
    raise AttributeError(name)
