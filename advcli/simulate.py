"""The two simulators: the design documents' latent-confounder data and a two-domain integration benchmark.

Both draw from one ``numpy.random.Generator`` seeded by ``seed`` alone, generate cells in blocks
of a fixed size (so the stream of draws, and the file, depend on the seed only) and stream the
counts to disk as CSR: 10^6 cells x 2,000 genes never exist as a dense matrix.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import __version__, keys
from .errors import InputError
from .io import atomic_path

SIM_BLOCK = 8192  # cells per generated block; fixed, because it orders the random draws


@dataclass
class ConfounderSimulation:
    """The latent-confounder simulation. ``setting='extreme'`` is the original design's last version (beta_1 = beta_2 = 0).

    With beta_1 = 0 the design's rescaling leaves beta_1 at 0 and its variance-ratio rule
    gamma_1 = sqrt(r*) sd(X beta_1) / sd(Z) then gives gamma_1 = 0 too: in the extreme setting D is
    a fair coin, independent of Z and X, and Z acts on Y alone. We keep that, as the seed does.
    """

    n: int = 1000
    genes: int = 100
    covariates: int = 4
    z_dim: int = 1
    setting: str = "extreme"
    seed: int = 0
    p_x: float = 0.5
    p_z: float = 0.5
    sd_target: float = 0.8
    r_star: float = 0.3
    beta_2_sd: float = 0.5

    def check(self) -> None:
        if self.setting not in ("extreme", "general"):
            raise InputError(f"--setting must be 'extreme' or 'general', not '{self.setting}'.")
        for name, value, low in (("--n", self.n, 2), ("--genes", self.genes, 1),
                                 ("--covariates", self.covariates, 0), ("--z-dim", self.z_dim, 1)):
            if value < low:
                raise InputError(f"{name} must be at least {low} (got {value}).")


@dataclass
class IntegrationSimulation:
    """Two domains A and B on the same genes, K cell types, a domain effect of tunable strength.

    Cell types differ by marker genes; proportions differ between domains and the last type
    exists in B only. Counts are NB around library size x type profile. The domain effect is a
    per-gene log-normal factor (sd 0.5 x strength), a library-size shift in B (x exp(-0.4 x
    strength)) and extra dropout in B (probability 0.1 x strength, at most 0.6).
    """

    n_a: int = 5000
    n_b: int = 6000
    genes: int = 2000
    cell_types: int = 5
    batch_strength: float = 1.0
    seed: int = 0
    marker_fraction: float = 0.06
    library_log_mean: float = math.log(3000.0)

    def check(self) -> None:
        for name, value, low in (("--n-a", self.n_a, 1), ("--n-b", self.n_b, 1),
                                 ("--genes", self.genes, 2), ("--cell-types", self.cell_types, 2)):
            if value < low:
                raise InputError(f"{name} must be at least {low} (got {value}).")
        if not (0 <= self.batch_strength <= 10) or not math.isfinite(self.batch_strength):
            raise InputError(f"--batch-strength must be between 0 and 10 (got {self.batch_strength}).")


def _names(prefix: str, n: int) -> list[str]:
    width = len(str(max(n - 1, 0)))
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


def nb_counts(rng: np.random.Generator, mu: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Gamma-Poisson draws with mean ``mu`` and inverse dispersion ``theta`` (broadcast per gene)."""
    lam = rng.gamma(shape=theta, scale=mu / theta)
    return rng.poisson(lam).astype(np.float32)


def simulate_confounder(cfg: ConfounderSimulation, path: str | Path) -> dict:
    """Write the latent-confounder simulation to ``path``; return a summary of what was drawn."""
    cfg.check()
    rng = np.random.default_rng(cfg.seed)
    n, p, d, k = cfg.n, cfg.genes, cfg.covariates, cfg.z_dim

    X = (rng.random((n, d)) < cfg.p_x).astype(np.float32)
    Z = (rng.random((n, k)) < cfg.p_z).astype(np.float32)

    beta_1 = rng.standard_normal((d, 1)) if cfg.setting == "general" else np.zeros((d, 1))
    xb = X @ beta_1
    beta_1 = beta_1 * (cfg.sd_target / (_sd(xb) + 1e-8))  # the design's rescaling
    sd_xb = _sd(X @ beta_1)
    gamma_1 = np.full((k, 1), math.sqrt(cfg.r_star) * sd_xb / (_sd(Z) + 1e-8))
    logit_d = (X @ beta_1 + Z @ gamma_1).ravel()
    D = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit_d))).astype(np.float32)

    if cfg.setting == "general":
        beta_2 = rng.standard_normal((d + 1, p)) * cfg.beta_2_sd
    else:
        beta_2 = np.zeros((d + 1, p))
    gamma_2 = rng.standard_normal((k, p))
    alpha = np.abs(rng.standard_normal(p)) + 0.5
    theta = 1.0 / alpha

    XD = np.concatenate([X, D[:, None]], axis=1)

    def blocks() -> Iterator[tuple[sp.csr_matrix, dict[str, np.ndarray]]]:
        for start in range(0, n, SIM_BLOCK):
            stop = min(start + SIM_BLOCK, n)
            log_mu = XD[start:stop] @ beta_2 + Z[start:stop] @ gamma_2
            counts = nb_counts(rng, np.exp(log_mu), theta)
            yield sp.csr_matrix(counts), {keys.LOG_MU_TRUE: log_mu.astype(np.float32)}

    cov_keys = [f"{keys.COVARIATE_PREFIX}{j}" for j in range(d)]
    obs = pd.DataFrame({keys.TREATMENT: D.astype(np.int64)}, index=_names("cell_", n))
    for j, key in enumerate(cov_keys):
        obs[key] = X[:, j].astype(np.int64)
    obs[keys.LOGIT_D_TRUE] = logit_d.astype(np.float32)
    var = pd.DataFrame({keys.ALPHA_TRUE: alpha.astype(np.float32)}, index=_names("gene_", p))
    sim = {**asdict(cfg), "beta_1": beta_1.astype(np.float64), "gamma_1": gamma_1,
           "beta_2": beta_2, "gamma_2": gamma_2, "alpha": alpha, "version": __version__}
    uns = {keys.UNS: {keys.SIMULATION: sim, keys.COVARIATE_KEYS: cov_keys}}
    write_streamed_h5ad(path, obs, var, uns, {keys.Z_TRUE: Z}, blocks(), [keys.LOG_MU_TRUE])
    return {"n_cells": n, "n_genes": p, "treated_fraction": float(D.mean()),
            "z_fraction": float(Z.mean()), "gamma_1": float(gamma_1[0, 0]),
            "setting": cfg.setting}


def simulate_integration(cfg: IntegrationSimulation, path: str | Path) -> dict:
    """Write a two-domain integration benchmark to ``path``; return a summary."""
    cfg.check()
    rng = np.random.default_rng(cfg.seed)
    K, G = cfg.cell_types, cfg.genes
    s = cfg.batch_strength

    base = rng.normal(0.0, 1.2, G)
    profiles = base + rng.normal(0.0, 0.15, (K, G))
    n_markers = max(1, int(round(cfg.marker_fraction * G)))
    for t in range(K):
        genes = rng.choice(G, n_markers, replace=False)
        profiles[t, genes] += rng.normal(1.8, 0.5, n_markers) * rng.choice([-1.0, 1.0], n_markers)
    programs = np.where(rng.random((2, G)) < 0.05, rng.normal(0.0, 0.6, (2, G)), 0.0)
    theta = np.exp(rng.normal(math.log(4.0), 0.6, G))

    props = 0.5 * rng.dirichlet(np.full(K, 3.0), size=2) + 0.5 / K
    props[0, K - 1] = 0.0  # the last cell type exists in domain B only
    props /= props.sum(axis=1, keepdims=True)
    domain_log_factor = rng.normal(0.0, 0.5 * s, (2, G))
    library_shift = np.array([0.0, -0.4 * s])
    dropout = np.array([0.0, min(0.6, 0.1 * s)])

    sizes = (cfg.n_a, cfg.n_b)
    domain = np.repeat([0, 1], sizes)
    cell_type = np.concatenate([rng.choice(K, size, p=props[b]) for b, size in enumerate(sizes)])
    n = len(domain)

    def blocks() -> Iterator[tuple[sp.csr_matrix, dict]]:
        for start in range(0, n, SIM_BLOCK):
            stop = min(start + SIM_BLOCK, n)
            dom, typ = domain[start:stop], cell_type[start:stop]
            m = stop - start
            logits = (profiles[typ] + rng.standard_normal((m, 2)) @ programs
                      + domain_log_factor[dom])
            rho = np.exp(logits - logits.max(axis=1, keepdims=True))
            rho /= rho.sum(axis=1, keepdims=True)
            library = np.exp(rng.normal(cfg.library_log_mean + library_shift[dom], 0.35))
            counts = nb_counts(rng, rho * library[:, None], theta)
            counts[rng.random(counts.shape) < dropout[dom][:, None]] = 0.0
            yield sp.csr_matrix(counts), {}

    obs = pd.DataFrame({
        keys.BATCH: pd.Categorical(np.array(["A", "B"])[domain], categories=["A", "B"]),
        keys.CELL_TYPE: pd.Categorical(np.array(_names("type_", K))[cell_type],
                                       categories=_names("type_", K)),
    }, index=_names("cell_", n))
    var = pd.DataFrame(index=_names("gene_", G))
    sim = {**asdict(cfg), "proportions": props, "domain_log_factor_sd": 0.5 * s,
           "library_shift": library_shift, "dropout": dropout, "version": __version__}
    write_streamed_h5ad(path, obs, var, {keys.UNS: {keys.SIMULATION: sim}}, {}, blocks(), [])
    return {"n_cells": n, "n_genes": G, "domains": {"A": cfg.n_a, "B": cfg.n_b},
            "cell_types": K}


def _sd(a: np.ndarray) -> float:
    """Sample standard deviation over all entries (torch's default, as in the seed)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    return float(a.std(ddof=1)) if a.size > 1 else 0.0


def write_streamed_h5ad(path, obs: pd.DataFrame, var: pd.DataFrame, uns: dict, obsm: dict,
                        blocks, dense_layers: list[str]) -> None:
    """Write an .h5ad whose X (CSR) and dense float32 layers arrive in row blocks.

    The annotations are written by anndata; X grows by appending CSR blocks through anndata's
    backed sparse dataset, and each dense layer is an HDF5 dataset filled block by block. The file
    appears at ``path`` only when complete.
    """
    import anndata as ad
    import h5py
    from anndata.io import sparse_dataset, write_elem

    n, g = len(obs), len(var)
    with atomic_path(path, ".h5ad") as tmp:
        ad.AnnData(obs=obs, var=var, uns=uns, obsm=obsm).write_h5ad(tmp)
        with h5py.File(tmp, "r+") as f:
            layers = {}
            for name in dense_layers:
                ds = f["layers"].create_dataset(name, shape=(n, g), dtype="float32",
                                                chunks=(min(n, 256), g) if n * g else None)
                ds.attrs["encoding-type"] = "array"
                ds.attrs["encoding-version"] = "0.2.0"
                layers[name] = ds
            row, counts_ds = 0, None
            for counts, dense in blocks:
                if counts_ds is None:
                    write_elem(f, "X", counts)
                    counts_ds = sparse_dataset(f["X"])
                else:
                    counts_ds.append(counts)
                for name, values in dense.items():
                    layers[name][row:row + counts.shape[0]] = values
                row += counts.shape[0]
            if row != n:
                raise RuntimeError(f"simulator wrote {row} of {n} cells")
