"""`diagnose`'s integration metrics beside scib-metrics' on the same embeddings and neighbours.

    pip install -e ".[bench]"
    OMP_WAIT_POLICY=PASSIVE python benchmarks/metrics_vs_scib.py

Embeddings: the unintegrated PCA and advcli's (defaults, seed 0) on the bundled sample, a
strength-2 `simulate integrate` file and, when ../shared/data is there, PBMC. For each metric the
table shows advcli's value, scib-metrics' value on the same 90 neighbours, and the difference.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from advcli import IntegrationModel
from advcli.metrics import integration_metrics, knn
from advcli.report.integrate import unintegrated_pca
from advcli.simulate import IntegrationSimulation, simulate_integration

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data"


def scib(embedding: np.ndarray, batch: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    import scib_metrics
    from scib_metrics.nearest_neighbors import NeighborsResults

    dist, idx = knn(embedding.astype(np.float64), 90)
    neighbours = NeighborsResults(indices=idx, distances=dist)
    # advcli's LISI uses perplexity 30 (Harmony's); scib-metrics defaults to k // 3 = 30 too
    out = {"ilisi": scib_metrics.ilisi_knn(neighbours, batch, perplexity=30),
           "clisi": scib_metrics.clisi_knn(neighbours, labels, perplexity=30),
           "batch_asw": scib_metrics.silhouette_batch(embedding, labels, batch),
           "label_asw": scib_metrics.silhouette_label(embedding, labels)}
    out.update(scib_metrics.nmi_ari_cluster_labels_kmeans(embedding, labels))
    return {k: float(v) for k, v in out.items()}


def embeddings(a: ad.AnnData) -> dict[str, np.ndarray]:
    latent = IntegrationModel(a, seed=0).train(progress=False).get_latent_representation()
    return {"unintegrated PCA": unintegrated_pca(a, latent.shape[1]), "advcli": latent}


def main() -> int:
    sets = {"sample": lambda tmp: ad.read_h5ad(ROOT / "sample_data" / "integrate.h5ad")}

    def strong(tmp):
        simulate_integration(IntegrationSimulation(n_a=1500, n_b=1800, genes=1000,
                                                   batch_strength=2.0), tmp / "s.h5ad")
        return ad.read_h5ad(tmp / "s.h5ad")

    sets["strength-2"] = strong
    if SHARED.is_dir():
        sets["pbmc"] = lambda tmp: ad.read_h5ad(SHARED / "pbmc_3chem_symphony_small.h5ad")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in sets.items():
            a = make(Path(tmp))
            batch = a.obs["batch"].astype(str).to_numpy()
            labels = a.obs["cell_type"].astype(str).to_numpy()
            for method, emb in embeddings(a).items():
                ours = integration_metrics(emb, batch, labels)
                theirs = scib(emb, batch, labels)
                for metric, value in theirs.items():
                    rows.append({"dataset": name, "embedding": method, "metric": metric,
                                 "advcli": ours[metric], "scib_metrics": value,
                                 "difference": ours[metric] - value})
                print(f"{name} {method} done", file=sys.stderr, flush=True)
    frame = pd.DataFrame(rows).set_index(["dataset", "embedding", "metric"])
    pd.set_option("display.width", 200)
    pd.set_option("display.max_rows", 200)
    print(frame.round(3).to_string())
    print(f"\nlargest |difference| per metric:\n"
          f"{frame['difference'].abs().groupby(level='metric').max().round(3).to_string()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
