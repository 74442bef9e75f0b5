"""Confounder mode on real counts with a planted hidden factor and planted treatment effects.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/confounder_semisynthetic.py [--seeds 3]
        [--scenarios NAME,...] [--jobs N] [--out table.csv]

Each scenario takes real cells (the real sets in ../shared/data), a real hidden factor H of
them (cell type, chemistry, donor, protocol, or a continuous expression programme), draws a
treatment D ~ Bernoulli(sigmoid(b * H)) (b = 2 strong, 0.7 weak, 0 none; "overlap0" sets D = H),
and plants effects of +-0.7 (natural log) on 10 % of the genes in the treated cells: binomial
thinning for decreases, Poisson addition for increases. H is then hidden. The truth of each
gene's conditional effect is the planted one (0 for the others).

Rows: naive GLM on [X, D]; oracle with H; SVA-like (top residual PC of log-normalised Y on
[1, X, D]); PC1 of residuals on [1, X] only; advcli's defaults. Every method's effects come
from the same NB GLM with library-size offsets (advcli.effects.treatment_effects). Columns:
effect RMSE over the genes every method could test, AUROC of |effect| for the affected genes,
false-positive rate at q < 0.05 among null genes, |r(Z-hat, H)|, fit CPU seconds.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
EFFECT = 0.7
STRENGTHS = {"strong": 2.0, "weak": 0.7, "none": 0.0, "overlap0": None}


def _log_norm(counts) -> np.ndarray:
    lib = np.asarray(counts.sum(1)).ravel()
    x = sp.diags(1e4 / lib) @ counts
    return np.log1p(x.toarray())


def base_sets() -> dict[str, dict]:
    """name -> counts (CSR), hidden factor H (standardised), covariate frame."""
    out = {}
    pbmc = ad.read_h5ad(DATA / "pbmc_3chem_symphony_small.h5ad")
    pbmc = pbmc[pbmc.obs["cell_type_broad"].isin(["T", "Mono", "B", "NK"])].copy()
    myeloid = (pbmc.obs["cell_type_broad"] == "Mono").to_numpy(float)
    out["pbmc_celltype"] = (pbmc, myeloid, ["batch"])
    out["pbmc_chemistry"] = (pbmc, (pbmc.obs["batch"] == "5p").to_numpy(float), ["cell_type"])
    lymph = pbmc[pbmc.obs["cell_type_broad"].isin(["T", "NK"])].copy()
    ln = _log_norm(sp.csr_matrix(lymph.X, dtype=np.float64))
    ln = ln - ln.mean(0)
    u, s, _ = np.linalg.svd(ln, full_matrices=False)
    out["pbmc_lymph_continuous"] = (lymph, u[:, 0], ["batch"])
    kang = ad.read_h5ad(DATA / "kang2018_muscat_subset.h5ad")
    kang = kang[kang.obs["condition"] == "ctrl"].copy()
    out["kang_donor"] = (kang, (kang.obs["donor"].astype(str) == "101").to_numpy(float),
                         ["cell_type"])
    mono = kang.obs["cell_type"].astype(str).str.contains("Monocytes").to_numpy(float)
    out["kang_monocyte"] = (kang, mono, [])
    cb = ad.read_h5ad(DATA / "cellbench_3cl_celseq2_dropseq.h5ad")
    cb = cb[cb.obs["demuxlet_cls"] != "DBL"].copy()
    out["cellbench_protocol"] = (cb, (cb.obs["batch"] == "CEL-seq2").to_numpy(float),
                                 ["cell_type"])
    return out


def make_scenario(adata, h, cov_keys, strength: str, seed: int):
    rng = np.random.default_rng(seed)
    counts = sp.csr_matrix(adata.X, dtype=np.float64)
    keep = np.asarray((counts > 0).mean(0)).ravel() >= 0.05  # usual QC: expressed genes
    counts = counts[:, keep]
    names = np.asarray(adata.var_names)[keep]
    if counts.shape[1] > 2000:  # the most expressed 2,000 (CellBench has 15,000)
        top = np.sort(np.argsort(-np.asarray(counts.mean(0)).ravel())[:2000])
        counts, names = counts[:, top], names[top]
    h = np.asarray(h, float)
    hs = (h - h.mean()) / h.std()
    b = STRENGTHS[strength]
    d = (h > np.median(h)).astype(float) if b is None else \
        (rng.random(len(h)) < 1 / (1 + np.exp(-b * hs))).astype(float)
    if np.unique(h).size == 2 and b is None:
        d = (h == h.max()).astype(float)
    g = counts.shape[1]
    affected = rng.random(g) < 0.10
    sign = np.where(rng.random(g) < 0.5, -1.0, 1.0)
    truth = np.where(affected, sign * EFFECT, 0.0)
    y = counts.toarray()
    t = d == 1
    down = affected & (sign < 0)
    up = affected & (sign > 0)
    y[np.ix_(t, down)] = rng.binomial(y[np.ix_(t, down)].astype(np.int64), np.exp(-EFFECT))
    y[np.ix_(t, up)] += rng.poisson(y[np.ix_(t, up)] * (np.exp(EFFECT) - 1.0))
    obs = adata.obs[cov_keys].copy() if cov_keys else pd.DataFrame(index=adata.obs_names)
    for k in cov_keys:
        obs[k] = obs[k].astype(str).astype("category")
    obs["D"] = d.astype(int)
    out = ad.AnnData(sp.csr_matrix(y.astype(np.float32)), obs=obs)
    out.var_names = [str(v) for v in names]
    out.var_names_make_unique()
    return out, hs, truth


def residual_pc(y_csr, design, lib) -> np.ndarray:
    ln = np.log1p((sp.diags(1e4 / lib) @ y_csr).toarray())
    ln = (ln - ln.mean(0)) / np.maximum(ln.std(0), 1e-3)
    coef, *_ = np.linalg.lstsq(design, ln, rcond=None)
    r = ln - design @ coef
    u, s, _ = np.linalg.svd(r, full_matrices=False)
    return u[:, :1] * s[0]


def score(frame, truth, z, hs) -> dict:
    ok = frame["converged"].to_numpy()
    eff = frame["effect_adjusted"].to_numpy()
    if np.isnan(eff).all():
        eff = frame["effect_naive"].to_numpy()
    null = truth == 0
    q = frame["qvalue"].to_numpy()
    out = {"effects": eff, "ok": ok,
           "auroc": roc_auc_score(~null[ok], np.abs(eff[ok])),
           "fpr": float(np.mean(q[null & ok] < 0.05)),
           "big_sig": int(np.sum((np.abs(eff) > 5) & (q < 0.05) & null)),
           "abs_r_z": float(abs(np.corrcoef(z[:, 0], hs)[0, 1])) if z is not None
           and np.std(z[:, 0]) > 0 else np.nan}
    return out


def run_one(args) -> list[dict]:
    name, strength, seed, options = args
    import torch

    torch.set_num_threads(1)
    from advcli import ConfounderModel
    from advcli.data import CovariateEncoding
    from advcli.effects import treatment_effects

    adata, h, cov_keys = base_sets()[name]
    data, hs, truth = make_scenario(adata, h, cov_keys, strength, seed)
    y = data.X.tocsr().astype(np.float64)
    lib = np.asarray(y.sum(1)).ravel()
    d = data.obs["D"].to_numpy(float)
    x = CovariateEncoding.fit(data, cov_keys).transform(data).astype(float)
    n = len(d)
    genes = list(data.var_names)
    rows = {}

    def eff(z):
        return treatment_effects(y, d, x, z, genes, lib)

    rows["naive"] = score(eff(None), truth, None, hs)
    rows["oracle"] = score(eff(hs[:, None]), truth, hs[:, None], hs)
    ones = np.ones((n, 1))
    z = residual_pc(y, np.column_stack([ones, x, d]), lib)
    rows["SVA-like"] = score(eff(z), truth, z, hs)
    z = residual_pc(y, np.column_stack([ones, x]), lib)
    rows["PC1 resid on X"] = score(eff(z), truth, z, hs)
    t0 = time.process_time()
    model = ConfounderModel(data, treatment_key="D", covariate_keys=cov_keys, seed=seed,
                            **options).train()
    cpu = time.process_time() - t0
    z = model.predict(keep_means=False)["Z_hat"]
    rows["advcli"] = score(model.treatment_effects(), truth, z, hs)
    rows["advcli"]["fit_cpu_s"] = cpu
    rows["advcli"]["warnings"] = len(model.fit_summary()["warnings"])
    rows["advcli"]["k"] = model.config.z_dim
    rows["advcli"]["extreme_propensity"] = model.fit_summary()["extreme_propensity_fraction"]
    common = np.logical_and.reduce([r["ok"] for r in rows.values()])
    out = []
    for method, r in rows.items():
        err = r.pop("effects")[common] - truth[common]
        r.pop("ok")
        out.append({"scenario": name, "strength": strength, "seed": seed, "method": method,
                    "rmse": float(np.sqrt(np.mean(err ** 2))), **r})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scenarios", default=None)
    parser.add_argument("--strengths", default=",".join(STRENGTHS))
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 1))
    parser.add_argument("--out", default=None)
    parser.add_argument("--options", default="{}",
                        help="advcli options as a Python dict literal, e.g. \"{'z_dim': 2}\"")
    args = parser.parse_args()
    names = args.scenarios.split(",") if args.scenarios else list(base_sets())
    import ast

    options = ast.literal_eval(args.options)
    tasks = [(n, s, seed, options) for n in names for s in args.strengths.split(",")
             for seed in range(args.seeds)]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        results = [row for rows in pool.map(run_one, tasks) for row in rows]
    table = pd.DataFrame(results)
    if args.out:
        table.to_csv(args.out, index=False)
    summary = table.groupby(["scenario", "strength", "method"], sort=False)[
        ["rmse", "auroc", "fpr", "abs_r_z", "big_sig"]].mean()
    pd.set_option("display.width", 200)
    print(summary.round(3).to_string())
    adv = table[table.method == "advcli"]
    print(f"\nadvcli fit CPU seconds: median {adv.fit_cpu_s.median():.1f}; "
          f"runs with a warning: {int((adv.warnings > 0).sum())} of {len(adv)}")
    print("advcli runs with a warning (of the seeds), k and the extreme-propensity fraction:")
    print(adv.groupby(["scenario", "strength"], sort=False)[
        ["warnings", "k", "extreme_propensity"]].agg(
        {"warnings": lambda w: int((w > 0).sum()), "k": "mean", "extreme_propensity": "mean"})
        .round(2).to_string())
    print(f"wall {time.perf_counter() - start:.0f} s for {len(tasks)} runs, {args.jobs} jobs")


if __name__ == "__main__":
    main()
