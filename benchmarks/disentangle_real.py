"""Disentangle mode on the labelled real sets in ../shared/data: does s carry the label and is z
clean of it? One table.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/disentangle_real.py [--options "dict(adv_weight=3)"]

Each set is split 80 / 20 (seeded); the model trains on 80 % with --label-key cell_type, and
the accuracies are 5-fold cross-validated logistic regressions on the held-out 20 %'s s and z.
Targets: accuracy from s >= 0.9; from z within 0.1 of the majority-class rate; and with the
label adversary off (adv_weight 0, the same run otherwise), z's accuracy higher.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from advcli import DisentangleModel
from advcli.models.disentangle import label_accuracies

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = {"pbmc": "pbmc_3chem_symphony_small.h5ad",
        "cellbench": "cellbench_3cl_celseq2_dropseq.h5ad",
        "kang": "kang2018_muscat_subset.h5ad"}


def run(name: str, options: dict, seed: int = 0) -> dict:
    a = ad.read_h5ad(DATA / SETS[name])
    order = np.random.default_rng(seed).permutation(a.n_obs)
    cut = int(0.8 * a.n_obs)
    train, test = a[np.sort(order[:cut])].copy(), a[np.sort(order[cut:])].copy()
    label = pd.Categorical(test.obs["cell_type"]).codes.astype(np.int64)
    row = {"set": name}
    for suffix, extra in (("", {}), ("_no_adversary", {"adv_weight": 0.0})):
        start, cpu = time.perf_counter(), time.process_time()
        model = DisentangleModel(train, label_key="cell_type", seed=seed,
                                 **{**options, **extra}).train()
        row[f"fit_s{suffix}"] = round(time.perf_counter() - start, 1)
        row[f"fit_cpu_s{suffix}"] = round(time.process_time() - cpu, 1)
        out = model.predict(test)
        acc_s, acc_z, majority = label_accuracies(out["s"], out["z"], label)
        row.update({f"acc_s{suffix}": acc_s, f"acc_z{suffix}": acc_z, "majority": majority})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", default="dict()", help="DisentangleModel options")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--seed", type=int, default=0, help="split and model seed")
    args = parser.parse_args()
    options = eval(args.options, {"__builtins__": {}}, {"dict": dict})  # a dict literal
    rows = []
    for name in args.sets.split(","):
        rows.append(run(name, options, args.seed))
        print(rows[-1], flush=True)
    frame = pd.DataFrame(rows).set_index("set")
    print(f"\noptions: {options}; targets: acc_s >= 0.9, |acc_z - majority| <= 0.1, "
          "acc_z_no_adversary > acc_z")
    print(frame[["acc_s", "acc_z", "majority", "acc_z_no_adversary", "acc_s_no_adversary",
                 "fit_s", "fit_cpu_s"]].round(3).to_string())


if __name__ == "__main__":
    main()
