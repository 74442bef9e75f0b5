"""How many Z columns the default factor count gives, and what the effects cost when it is wrong.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/confounder_factor_count.py [--seeds 2] [--real]

Simulations with a known number of hidden factors: `simulate confounder --setting general` at
100-2,000 genes, 1,000-10,000 cells and 1-3 binary hidden factors, and the held-out generator of
confounder_heldout.py (one factor, log-normal depth). For each: the number of columns advcli's
defaults chose (k), and the effect RMSE against the truth of advcli's adjusted effects, the
oracle (the same GLM with the true Z) and the naive GLM on [X, D]; whether the fit warned; its
CPU seconds. `--real` adds the factor count alone on the real sets in ../shared/data (their
hidden axes are unknown: real cells vary along many).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from advcli import ConfounderModel
from advcli.data import CovariateEncoding, default_covariate_keys, encode_treatment
from advcli.effects import treatment_effects
from advcli.simulate import ConfounderSimulation, simulate_confounder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from confounder_heldout import simulate as heldout_simulation  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
GENERAL = [(1000, 100, 1), (1000, 1000, 1), (3000, 1000, 1), (10000, 1000, 1), (3000, 2000, 1),
           (3000, 1000, 2), (3000, 1000, 3)]  # cells, genes, hidden factors


def rmse(frame: pd.DataFrame, column: str, truth: np.ndarray) -> float:
    ok = frame["converged"].to_numpy()
    est = frame[column].to_numpy()
    return float(np.sqrt(np.mean((est[ok] - truth[ok]) ** 2)))


def run(name: str, adata, cov_keys: list[str], z_true: np.ndarray, truth: np.ndarray) -> dict:
    start = time.process_time()
    model = ConfounderModel(adata, treatment_key="D", covariate_keys=cov_keys, seed=0).train()
    cpu = time.process_time() - start
    adjusted = model.treatment_effects()
    counts = sp.csr_matrix(adata.X, dtype=np.float64)
    lib = np.asarray(counts.sum(axis=1)).ravel()
    d = adata.obs["D"].to_numpy(float)
    x = CovariateEncoding.fit(adata, cov_keys).transform(adata).astype(float)
    oracle = treatment_effects(counts, d, x, z_true, list(adata.var_names), lib)
    return {"data": name, "true k": z_true.shape[1], "k": model.config.z_dim,
            "advcli": rmse(adjusted, "effect_adjusted", truth),
            "oracle": rmse(oracle, "effect_adjusted", truth),
            "naive": rmse(oracle, "effect_naive", truth),
            "warned": bool(model.fit_summary()["warnings"]), "fit_cpu_s": round(cpu, 1)}


def real_counts() -> list[dict]:
    from advcli.data import factor_count

    sets = [("PBMC 3 chemistries", "pbmc_3chem_symphony_small.h5ad", "batch", ["cell_type"]),
            ("Kang", "kang2018_muscat_subset.h5ad", "condition", ["cell_type"]),
            ("CellBench", "cellbench_3cl_celseq2_dropseq.h5ad", "batch", ["cell_type"])]
    rows = []
    for name, file, treatment, cov in sets:
        a = ad.read_h5ad(DATA / file)
        if a.obs[treatment].nunique() > 2:  # two levels: the first against the rest
            first = sorted(a.obs[treatment].astype(str).unique())[0]
            a.obs[treatment] = (a.obs[treatment].astype(str) == first).astype(int)
        counts = sp.csr_matrix(a.X, dtype=np.float64)
        keep = np.asarray((counts > 0).mean(axis=0)).ravel() >= 0.05
        a = a[:, keep].copy()
        counts = counts[:, keep]
        log_lib = np.log(np.asarray(counts.sum(axis=1)).ravel())
        x = CovariateEncoding.fit(a, cov).transform(a)
        d, _ = encode_treatment(a, treatment)
        k = factor_count(counts, log_lib - log_lib.mean(), np.column_stack([x, d]), 0)
        rows.append({"data": f"{name} ({a.n_obs} x {a.n_vars}, D = {treatment})", "k": k})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--real", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, genes, k in GENERAL:
            for seed in range(args.seeds):
                path = Path(tmp) / f"sim_{n}_{genes}_{k}_{seed}.h5ad"
                simulate_confounder(ConfounderSimulation(n=n, genes=genes, setting="general",
                                                         z_dim=k, seed=seed), path)
                a = ad.read_h5ad(path)
                truth = np.asarray(a.uns["advcli"]["simulation"]["beta_2"])[-1]
                rows.append(run(f"general {n} x {genes}, seed {seed}", a,
                                default_covariate_keys(a), a.obsm["Z_true"], truth))
                print(rows[-1], flush=True)
    for seed in range(args.seeds):
        a, z, truth = heldout_simulation(seed)
        rows.append(run(f"held-out 3000 x 300, seed {seed}", a, ["num0", "num1", "cat"],
                        z[:, None], truth))
        print(rows[-1], flush=True)
    pd.set_option("display.width", 200)
    table = pd.DataFrame(rows).set_index("data")
    print(table.round(3).to_string())
    if args.real:
        print(pd.DataFrame(real_counts()).to_string(index=False))


if __name__ == "__main__":
    main()
