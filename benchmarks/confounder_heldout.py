"""Confounder mode on simulations outside the design documents' family, in one table.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/confounder_heldout.py [--seeds 3]

The generator here is not `advcli simulate`: gene intercepts drawn from real-like log means
(N(-1, 1.5^2)), log-normal library sizes (sd 0.5), an unbalanced binary Z (P(Z = 1) = 0.3),
a categorical covariate (4 levels) beside two numeric ones, Z acting on Y with weaker,
gene-specific effects (N(0, 0.5^2)), Z and X shifting the odds of treatment, and sparse
treatment effects (10 % of genes, +-0.5). Rows: naive, oracle (true Z), SVA-like, advcli.
Columns: |r(Z-hat, Z)| (best column), effect RMSE, FPR at q < 0.05 on null genes.
"""

from __future__ import annotations

import argparse
import time

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from advcli import ConfounderModel
from advcli.data import CovariateEncoding
from advcli.effects import treatment_effects


def simulate(seed: int, n: int = 3000, genes: int = 300):
    rng = np.random.default_rng(seed)
    z = (rng.random(n) < 0.3).astype(float)
    cat = rng.choice(["a", "b", "c", "d"], n)
    num = rng.normal(size=(n, 2))
    x = np.column_stack([num, pd.get_dummies(cat, drop_first=True).to_numpy(float)])
    logit = 1.2 * (z - 0.3) + x @ rng.normal(0, 0.4, x.shape[1]) - 0.2
    d = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(float)
    intercept = rng.normal(-1.0, 1.5, genes)
    effect = np.where(rng.random(genes) < 0.1, rng.choice([-0.5, 0.5], genes), 0.0)
    log_mu = (intercept + x @ rng.normal(0, 0.2, (x.shape[1], genes)) + np.outer(d, effect)
              + np.outer(z, rng.normal(0, 0.5, genes)) + rng.normal(0, 0.5, n)[:, None])
    theta = np.exp(rng.normal(1.0, 0.5, genes))
    y = rng.poisson(rng.gamma(theta, np.exp(log_mu) / theta))
    obs = pd.DataFrame({"D": d.astype(int), "num0": num[:, 0], "num1": num[:, 1],
                        "cat": pd.Categorical(cat)}, index=[f"c{i}" for i in range(n)])
    adata = ad.AnnData(sp.csr_matrix(y.astype(np.float32)), obs=obs)
    adata.var_names = [f"g{j}" for j in range(genes)]
    keep = np.asarray(adata.X.sum(1)).ravel() > 0
    return adata[keep].copy(), z[keep], effect


def score(frame, truth, z_hat, z):
    eff = frame["effect_adjusted"].to_numpy()
    if np.isnan(eff).all():
        eff = frame["effect_naive"].to_numpy()
    ok = frame["converged"].to_numpy()
    r = np.nan if z_hat is None else max(abs(np.corrcoef(z_hat[:, j], z)[0, 1])
                                         for j in range(z_hat.shape[1]))
    return {"abs_r_z": r, "effect_rmse": float(np.sqrt(np.mean((eff[ok] - truth[ok]) ** 2))),
            "fpr": float(np.mean(frame["qvalue"].to_numpy()[(truth == 0) & ok] < 0.05))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    keys = ["num0", "num1", "cat"]
    for seed in range(args.seeds):
        adata, z, truth = simulate(seed)
        y = adata.X.astype(np.float64)
        lib = np.asarray(y.sum(1)).ravel()
        d = adata.obs["D"].to_numpy(float)
        x = CovariateEncoding.fit(adata, keys).transform(adata).astype(float)
        genes = list(adata.var_names)
        rows.append({"seed": seed, "method": "naive",
                     **score(treatment_effects(y, d, x, None, genes, lib), truth, None, z)})
        rows.append({"seed": seed, "method": "oracle", **score(
            treatment_effects(y, d, x, z[:, None], genes, lib), truth, z[:, None], z)})
        ln = np.log1p((sp.diags(1e4 / lib) @ y).toarray())
        ln = (ln - ln.mean(0)) / np.maximum(ln.std(0), 1e-3)
        design = np.column_stack([np.ones(len(d)), x, d])
        resid = ln - design @ np.linalg.lstsq(design, ln, rcond=None)[0]
        pc = np.linalg.svd(resid, full_matrices=False)[0][:, :1]
        rows.append({"seed": seed, "method": "SVA-like", **score(
            treatment_effects(y, d, x, pc, genes, lib), truth, pc, z)})
        cpu = time.process_time()
        model = ConfounderModel(adata, treatment_key="D", covariate_keys=keys, seed=seed).train()
        cpu = time.process_time() - cpu
        z_hat = model.predict(keep_means=False)["Z_hat"]
        rows.append({"seed": seed, "method": "advcli", "k": model.config.z_dim,
                     "fit_cpu_s": cpu, **score(model.treatment_effects(), truth, z_hat, z)})
    table = pd.DataFrame(rows)
    print(table.groupby("method", sort=False)[["abs_r_z", "effect_rmse", "fpr"]].mean()
          .round(3).to_string())
    adv = table[table.method == "advcli"]
    print(f"\nadvcli per seed |r|: {adv.abs_r_z.round(3).tolist()}, k: {adv.k.tolist()}, "
          f"fit CPU s: {adv.fit_cpu_s.round(1).tolist()}")


if __name__ == "__main__":
    main()
