"""Confounder mode against the baselines on seed 002's simulation, in one table.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/confounder_quality.py            # issue 3's table
    OMP_WAIT_POLICY=PASSIVE python benchmarks/confounder_quality.py --robustness

Methods: advcli's defaults, advcli --preset seed (the proof of concept), the naive GLM on [X, D],
the oracle GLM with the true Z, and an SVA-like factor (top PC of the residuals of log1p(Y) on
[X, D]). Every method's treatment effect comes from the same NB GLM of Y on [1, X, D, Z-hat]
(advcli.effects); the effect's truth is the D row of beta_2. Fit seconds are CPU seconds of the
fit alone (wall seconds beside them).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from advcli import ConfounderModel
from advcli.data import CovariateEncoding, default_covariate_keys
from advcli.effects import nb_glm
from advcli.metrics import columnwise_pearson, match_latents
from advcli.simulate import ConfounderSimulation, simulate_confounder


def effect_scores(y, x, d, z, truth_effect, log_mu_true):
    """GLM of Y on [1, X, D, Z]: effect RMSE, bias and 95% coverage, and per-gene r of log means."""
    n = len(d)
    design = np.column_stack([np.ones(n), x, d] + ([z] if z is not None else []))
    j = 1 + x.shape[1]
    fit = nb_glm(y, design)
    est, se = fit["coef"][:, j], fit["se"][:, j]
    err = est - truth_effect
    r_genes = columnwise_pearson(design @ fit["coef"].T, log_mu_true)
    return {"effect_rmse": float(np.sqrt(np.mean(err ** 2))), "effect_bias": float(np.mean(err)),
            "ci95_coverage": float(np.mean(np.abs(err) <= 1.959964 * se)),
            "r_log_mu_glm": float(np.nanmean(r_genes))}


def z_scores(z_hat, z_prob, z_true, d):
    order, signed = match_latents(z_hat, z_true)
    aurocs = []
    for i, j in enumerate(order):
        score = z_prob[:, j] if signed[i] >= 0 else -z_prob[:, j]
        aurocs.append(roc_auc_score(z_true[:, i], score))
    corr_d = [abs(np.corrcoef(z_hat[:, j], d)[0, 1]) for j in range(z_hat.shape[1])]
    return {"abs_r_z": float(np.mean(np.abs(signed))), "auroc_z": float(np.mean(aurocs)),
            "corr_z_d": float(np.max(corr_d))}


def run_one(path: Path, variant: str) -> list[dict]:
    a = ad.read_h5ad(path)
    sim = a.uns["advcli"]["simulation"]
    cov_keys = default_covariate_keys(a)
    if variant == "categorical covariate":  # cov_0, cov_1 become one 4-level categorical
        a.obs["cov_cat"] = pd.Categorical((a.obs["cov_0"] * 2 + a.obs["cov_1"]).map(
            {0: "w", 1: "x", 2: "y", 3: "z"}))
        cov_keys = ["cov_cat"] + cov_keys[2:]
    x = CovariateEncoding.fit(a, cov_keys).transform(a)
    d = a.obs["D"].to_numpy(float)
    y = a.X.toarray()
    z_true = np.asarray(a.obsm["Z_true"], float)
    log_mu_true = np.asarray(a.layers["log_mu_true"], float)
    truth = np.asarray(sim["beta_2"])[int(sim["covariates"])]
    rows = []

    def record(method, z_hat, z_prob, seconds, cpu, r_model=None):
        row = {"method": method, "fit_cpu_s": cpu, "fit_wall_s": seconds}
        if z_hat is not None:
            row.update(z_scores(z_hat, z_prob, z_true, d))
        row.update(effect_scores(y, x, d, z_hat, truth, log_mu_true))
        row["r_log_mu"] = r_model if r_model is not None else row["r_log_mu_glm"]
        rows.append(row)

    for method, options in (("advcli default", {}), ("advcli --preset seed", {"preset": "seed"})):
        wall, cpu = time.perf_counter(), time.process_time()
        model = ConfounderModel(a, covariate_keys=cov_keys, z_dim=z_true.shape[1],
                                **options).train()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        out = model.predict()
        r_model = float(np.nanmean(columnwise_pearson(np.log(out["nb_mean"]), log_mu_true)))
        record(method, out["Z_hat"], out["Z_prob"], wall, cpu, r_model)
    record("naive [X, D]", None, None, 0.0, 0.0)
    record("oracle (true Z)", z_true, z_true, 0.0, 0.0)
    wall, cpu = time.perf_counter(), time.process_time()
    logy = np.log1p(y)
    design = np.column_stack([np.ones(len(d)), x, d])
    resid = logy - design @ np.linalg.lstsq(design, logy, rcond=None)[0]
    resid -= resid.mean(axis=0)
    k = z_true.shape[1]
    pcs = np.linalg.svd(resid, full_matrices=False)[0][:, :k]
    record("SVA-like (top PC of residuals)", pcs, pcs, time.perf_counter() - wall,
           time.process_time() - cpu)
    return rows


VARIANTS = {
    "k = 2": dict(z_dim=2),
    "unbalanced Z (p_z = 0.2)": dict(p_z=0.2),
    "500 genes": dict(genes=500),
    "n = 3000": dict(n=3000),
    "categorical covariate": dict(),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--robustness", action="store_true",
                        help="advcli's defaults on other sizes and parameters (general setting)")
    parser.add_argument("--csv", type=Path, default=None, help="also write every row here")
    args = parser.parse_args(argv)
    cases = ([(v, "general", VARIANTS[v]) for v in VARIANTS] if args.robustness
             else [("", s, {}) for s in ("extreme", "general")])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant, setting, params in cases:
            for seed in range(args.seeds):
                cfg = replace(ConfounderSimulation(setting=setting, seed=seed), **params)
                path = Path(tmp) / f"sim_{setting}_{seed}.h5ad"
                simulate_confounder(cfg, path)
                for row in run_one(path, variant):
                    if args.robustness and not row["method"].startswith(("advcli default",
                                                                         "oracle")):
                        continue
                    rows.append({"case": variant or setting, "seed": seed, **row})
                print(f"done {variant or setting} seed {seed}", file=sys.stderr, flush=True)
    frame = pd.DataFrame(rows)
    if args.csv:
        frame.to_csv(args.csv, index=False)
    cols = ["abs_r_z", "auroc_z", "corr_z_d", "r_log_mu", "effect_rmse", "effect_bias",
            "ci95_coverage", "fit_cpu_s", "fit_wall_s"]
    table = frame.groupby(["case", "method"], sort=False)[cols].mean()
    oracle = table.xs("oracle (true Z)", level="method")["effect_rmse"]
    table["rmse_vs_oracle"] = [v / oracle[case] for (case, _), v in table["effect_rmse"].items()]
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 20)
    print(f"means over seeds 0-{args.seeds - 1}; n=1000, genes=100, k=1 unless the case says")
    print(table.round(3).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
