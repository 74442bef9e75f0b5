"""Kang et al. 2018 (IFN-beta stimulation of PBMCs): do the interferon-stimulated genes stay on
top of the adjusted effects?

    OMP_WAIT_POLICY=PASSIVE python benchmarks/confounder_kang.py

Treatment = stimulation, covariates = cell type, the donor left hidden. Prints the AUROC with
which |effect| ranks 24 canonical ISGs above the other genes, naive and adjusted, what Z-hat
follows (donor, log library size), and the genes with |effect| > 5 and q < 0.05.
"""

from __future__ import annotations

import time
from pathlib import Path

import anndata as ad
import numpy as np
from sklearn.metrics import roc_auc_score

from advcli import ConfounderModel

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
ISG = ["ISG15", "IFI6", "IFI27", "IFIT1", "IFIT2", "IFIT3", "IFI44", "IFI44L", "MX1", "MX2", "OAS1",
       "OAS2", "OAS3", "OASL", "RSAD2", "CMPK2", "HERC5", "ISG20", "IFITM3", "LY6E", "XAF1",
       "EPSTI1", "STAT1", "IRF7", "BST2", "SAMD9L", "PLSCR1", "CXCL10"]


def main() -> None:
    adata = ad.read_h5ad(DATA / "kang2018_muscat_subset.h5ad")
    present = [g for g in ISG if g in adata.var_names][:24]
    cpu, wall = time.process_time(), time.perf_counter()
    model = ConfounderModel(adata, treatment_key="condition", covariate_keys=["cell_type"]).train()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    table = model.treatment_effects()
    isg = table["gene"].isin(present).to_numpy()
    print(f"{len(present)} ISGs; k = {model.config.z_dim}; fit {cpu:.1f} CPU s ({wall:.1f} wall); "
          f"warnings: {model.fit_summary()['warnings'] or 'none'}")
    for col in ("effect_naive", "effect_adjusted"):
        e = table[col].to_numpy()
        ok = np.isfinite(e)
        print(f"AUROC of {col} for the ISGs: {roc_auc_score(isg[ok], e[ok]):.3f}")
    z = model.predict(keep_means=False)["Z_hat"]
    donor = (adata.obs["donor"].astype(str) == "101").to_numpy(float)
    lib = np.log(np.asarray(adata.X.sum(1)).ravel())
    best = lambda v: max(abs(np.corrcoef(z[:, j], v)[0, 1]) for j in range(z.shape[1]))  # noqa
    print(f"max |r| of a Z-hat column with the donor {best(donor):.2f}, with log library "
          f"size {best(lib):.2f}")
    big = table[(table["effect_adjusted"].abs() > 5) & (table["qvalue"] < 0.05)]
    print(f"genes with q < 0.05: {int((table['qvalue'] < 0.05).sum())}; not tested: "
          f"{int((~table['converged']).sum())}; |effect| > 5 with q < 0.05: "
          f"{', '.join(big['gene']) or 'none'}")
    print(table.sort_values("effect_adjusted", ascending=False).head(10)[
        ["gene", "effect_naive", "effect_adjusted", "qvalue", "converged"]].to_string(index=False))


if __name__ == "__main__":
    main()
