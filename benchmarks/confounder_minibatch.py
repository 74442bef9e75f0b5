"""Confounder fits on larger data at 128 cells a minibatch against the default minibatch.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/confounder_minibatch.py [--n 10000]
        [--data general-0,general-1,held-0,held-1] [--batch-sizes 128,0]

`general` is `simulate confounder --setting general --genes 1000`, `held` the generator of
confounder_heldout.py (300 genes); the number after the dash is the seed. Batch size 0 is the
default (about 24 steps an epoch above 3,072 cells). Per fit: the batch size used, Z's columns,
|r(Z-hat, Z)|, the effect RMSE against the truth and the false-positive rate at q < 0.05 among
genes without an effect (NaN where every gene has one), training seconds and CPU seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np

from advcli import ConfounderModel
from advcli.simulate import ConfounderSimulation, simulate_confounder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from confounder_heldout import score, simulate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--data", default="general-0,general-1,held-0,held-1")
    parser.add_argument("--batch-sizes", default="128,0")
    args = parser.parse_args()
    sizes = [int(b) or None for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.data.split(","):
            kind, seed = name.split("-")
            seed = int(seed)
            if kind == "general":
                path = Path(tmp) / f"general_{seed}.h5ad"
                simulate_confounder(ConfounderSimulation(n=args.n, genes=1000, setting="general",
                                                         seed=seed), path)
                adata = ad.read_h5ad(path)
                sim = adata.uns["advcli"]["simulation"]
                truth = np.asarray(sim["beta_2"])[-1]
                z = np.asarray(adata.obsm["Z_true"])[:, 0]
                options = {}
            else:
                adata, z, truth = simulate(seed, n=args.n)
                options = dict(treatment_key="D", covariate_keys=["num0", "num1", "cat"])
            for batch_size in sizes:
                cpu = time.process_time()
                model = ConfounderModel(adata, batch_size=batch_size, seed=seed,
                                        **options).train(progress=False)
                cpu = time.process_time() - cpu
                z_hat = model.predict(keep_means=False)["Z_hat"]
                s = score(model.treatment_effects(), truth, z_hat, z)
                summary = model.fit_summary()
                print(f"{name:<10} n={args.n} batch={model.config.batch_size:<5} "
                      f"k={model.config.z_dim} |r|={s['abs_r_z']:.3f} "
                      f"rmse={s['effect_rmse']:.4f} fpr={s['fpr']:.3f} "
                      f"train_s={summary['train_seconds']:.1f} cpu_s={cpu:.1f} "
                      f"warnings={len(summary.get('warnings', []))}", flush=True)


if __name__ == "__main__":
    main()
