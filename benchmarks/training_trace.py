"""How an integrate fit gets where it ends: the stopping rule's signals beside the cell types'
resolution, epoch by epoch, for one dataset of `integration_suite.py`.

    python benchmarks/training_trace.py ho-shallow-12dom --seed 0
    python benchmarks/training_trace.py ho-shallow-12dom --options '{"adv_weight": 0}'

Prints one row every --every epochs (and the first three): the training and validation ELBO, the
discriminator's validation cross-entropy and accuracy, the validation cells' neighbourhood
mixing, and, on the posterior means of every cell, the suite's k-means ARI and the
15-nearest-neighbour label purity.
A validation ELBO that worsens while the training ELBO improves, with ARI falling, is the VAE
overfitting; both ELBOs worsening while the mixing rises is the adversary's cost.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

import integration_suite as suite
from advcli import IntegrationModel
from advcli.metrics import knn

COLUMNS = ("elbo", "val_elbo", "val_disc_ce", "val_disc_acc", "val_mixing")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--options", default="{}", help="IntegrationModel options as JSON.")
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--workdir", default="/tmp/advcli_training_trace")
    args = parser.parse_args()
    datasets = {d.name: d for d in suite.DATASETS + suite.HELD_OUT}
    if args.dataset not in datasets:
        parser.error(f"unknown dataset {args.dataset!r}; one of: {', '.join(datasets)}")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    adata = datasets[args.dataset].make(workdir)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    n_labels = len(set(labels))
    model = IntegrationModel(adata, seed=args.seed, **json.loads(args.options))
    every_cell = torch.arange(adata.n_obs)
    print("epoch " + " ".join(f"{c:>12}" for c in COLUMNS) + "      ARI  kNN purity", flush=True)

    def trace(epoch: int, record: dict) -> None:
        if epoch > 3 and epoch % args.every:
            return
        training = model.module.training
        with torch.inference_mode():
            means = model._posterior_means(every_cell)
        model.module.train(training)
        clusters = KMeans(n_labels, n_init=10, random_state=0).fit_predict(means)
        _, idx = knn(means.astype(np.float64), 15)
        purity = (labels[idx] == labels[:, None]).mean()
        values = " ".join(f"{record.get(c, np.nan):12.3f}" for c in COLUMNS)
        print(f"{epoch:5d} {values} {adjusted_rand_score(labels, clusters):8.3f} "
              f"{purity:11.3f}", flush=True)

    model.train(progress=False, on_epoch=trace)
    summary = model.fit_summary()
    print(f"stopped at epoch {summary['epochs']}; best validation ELBO at epoch "
          f"{summary['best_val_epoch']}; stopped_overfitting {summary['stopped_overfitting']}")


if __name__ == "__main__":
    main()
