"""How the cell types lie in an integration's latent space, beyond the suite's scores: whether a
low ARI means lost resolution or k-means geometry, and the shape of each type's cloud.

    python benchmarks/latent_geometry.py ho-zi-4x3 --method advcli --seed 0
    python benchmarks/latent_geometry.py ho-zi-4x3 --method advcli --options '{"beta_kl": 0.1}'
    python benchmarks/latent_geometry.py pbmc --method "scVI adversarial"   # the bench extra

Prints, for one dataset of `integration_suite.py` (development or held-out) and one method:
- ARI of k-means with one cluster per label (the suite's metric) beside the 15-nearest-neighbour
  type accuracy (5-fold cross-validation): local resolution, which k-means does not see;
- the k-means confusion (labels x clusters);
- per label: the share of its within-type variance on its first principal direction, the share
  on the radial direction (from the centre of all cells to the label's centre; an isotropic cloud
  in d dimensions gives 1/d), and the Spearman correlation of that radial coordinate with the
  cell's library size (a KL term that shrinks low-count cells toward the prior makes it positive).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

import integration_suite as suite


def type_shapes(emb: np.ndarray, labels: np.ndarray, library: np.ndarray) -> pd.DataFrame:
    """Per label: first-principal-direction share, radial share, Spearman(radial, library)."""
    centre = emb.mean(axis=0)
    rows = {}
    for label in sorted(set(labels)):
        cells = labels == label
        if cells.sum() < 3:
            continue
        mean = emb[cells].mean(axis=0)
        spread = emb[cells] - mean
        singular = np.linalg.svd(spread, compute_uv=False) ** 2
        radial_dir = (mean - centre) / np.linalg.norm(mean - centre)
        radial = spread @ radial_dir
        rows[label] = {"cells": int(cells.sum()),
                       "pc1_share": singular[0] / singular.sum(),
                       "radial_share": radial.var() / spread.var(axis=0).sum(),
                       "radial_vs_library": spearmanr(radial, library[cells])[0]}
    return pd.DataFrame(rows).T


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset")
    parser.add_argument("--method", default="advcli", choices=list(suite.METHODS))
    parser.add_argument("--options", default="", help="JSON of IntegrationModel options (advcli)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/advcli_latent_geometry")
    args = parser.parse_args(argv)
    datasets = {d.name: d for d in suite.DATASETS + suite.HELD_OUT}
    if args.options and args.method != "advcli":
        parser.error("--options are advcli's; leave out --method or give --method advcli")
    if args.dataset not in datasets:
        parser.error(f"unknown dataset {args.dataset!r}; one of: {', '.join(datasets)}")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    a = datasets[args.dataset].make(workdir)
    a.obs["batch"] = a.obs["batch"].astype(str)
    if args.options:
        emb, _ = suite.run_advcli(a, args.seed, **json.loads(args.options))
    else:
        emb, _ = suite.METHODS[args.method](a, args.seed)
    labels = a.obs["cell_type"].astype(str).to_numpy()
    library = np.asarray(a.X.sum(axis=1)).ravel()
    clusters = KMeans(n_clusters=len(set(labels)), n_init=10, random_state=0).fit_predict(emb)
    knn = cross_val_score(KNeighborsClassifier(15), emb, labels, cv=5).mean()
    pd.set_option("display.width", 250)
    print(f"{args.dataset} {args.options or args.method} seed {args.seed}: "
          f"k-means ARI {adjusted_rand_score(labels, clusters):.3f}, "
          f"15-NN type accuracy {knn:.3f}")
    print(pd.crosstab(labels, clusters, rownames=["label"], colnames=["k-means cluster"]))
    shapes = type_shapes(emb, labels, library)
    print(shapes.round(2).to_string())
    print(f"mean over labels: pc1_share {shapes['pc1_share'].mean():.2f}, radial_share "
          f"{shapes['radial_share'].mean():.2f} (isotropic: {1 / emb.shape[1]:.2f}), "
          f"radial_vs_library {shapes['radial_vs_library'].mean():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
