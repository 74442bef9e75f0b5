"""Integrate mode against the baselines, one table of scIB-style metrics and speed.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/integration_vs_scvi.py
    OMP_WAIT_POLICY=PASSIVE python benchmarks/integration_vs_scvi.py --datasets sim

Datasets: `simulate integrate` defaults (11,000 cells x 2,000 genes), and, when ../shared/data is
there, Symphony's PBMC 3 chemistries and CellBench CEL-seq2 vs Drop-seq (singlets, all genes).
Methods: advcli (--adversary grl and alternate, defaults otherwise), the unintegrated PCA (30
components of log1p-normalised, scaled data) and, when installed (`pip install -e .[bench]`),
scvi-tools' scVI (plain, and with its AdversarialTrainingPlan's adversarial classifier) and
harmonypy on that PCA. Training seconds are wall seconds, CPU seconds beside.
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

from advcli import IntegrationModel
from advcli.metrics import integration_metrics
from advcli.simulate import IntegrationSimulation, simulate_integration

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def load(name: str, tmp: Path) -> ad.AnnData:
    if name == "sim":
        path = tmp / "sim.h5ad"
        simulate_integration(IntegrationSimulation(), path)
        return ad.read_h5ad(path)
    if name == "pbmc":
        return ad.read_h5ad(SHARED / "pbmc_3chem_symphony_small.h5ad")
    a = ad.read_h5ad(SHARED / "cellbench_3cl_celseq2_dropseq.h5ad")
    return a[a.obs["demuxlet_cls"] != "DBL"].copy()


def pca(a: ad.AnnData, n: int = 30) -> np.ndarray:
    from sklearn.decomposition import PCA

    x = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
    x = np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-8)
    return PCA(min(n, x.shape[1] - 1), random_state=0).fit_transform(np.clip(x, -10, 10))


def run_methods(a: ad.AnnData) -> list[dict]:
    rows = []
    batch, labels = a.obs["batch"].astype(str).to_numpy(), a.obs["cell_type"].astype(str).to_numpy()

    def score(method, emb, wall, cpu, rate):
        rows.append({"method": method, **integration_metrics(emb, batch, labels),
                     "train_s": wall, "train_cpu_s": cpu, "cells_x_epochs_per_s": rate})

    wall, cpu = time.perf_counter(), time.process_time()
    base = pca(a)
    score("unintegrated PCA", base, time.perf_counter() - wall, time.process_time() - cpu, np.nan)
    for adversary in ("grl", "alternate"):
        model = IntegrationModel(a, adversary=adversary, seed=0).train()
        s = model.fit_summary()
        score(f"advcli --adversary {adversary}", model.get_latent_representation(),
              s["train_seconds"], s["train_cpu_seconds"], s["cells_x_epochs_per_second"])
    try:
        import harmonypy

        wall, cpu = time.perf_counter(), time.process_time()
        emb = np.asarray(harmonypy.run_harmony(base, a.obs, "batch", random_state=0).Z_corr)
        emb = emb if emb.shape[0] == a.n_obs else emb.T  # harmonypy < 2 returns PCs x cells
        score("Harmony (PCA-30)", emb, time.perf_counter() - wall, time.process_time() - cpu,
              np.nan)
    except ImportError:
        print("harmonypy not installed: Harmony skipped", file=sys.stderr)
    try:
        import logging

        import scvi
        from scvi.train import AdversarialTrainingPlan

        scvi.settings.verbosity = logging.ERROR
        scvi.settings.seed = 0

        class AdversarialSCVI(scvi.model.SCVI):
            _training_plan_cls = AdversarialTrainingPlan

        for name, cls, plan in (("scVI (n_latent 10, 100 epochs)", scvi.model.SCVI, {}),
                                ("scVI + adversarial classifier", AdversarialSCVI,
                                 {"adversarial_classifier": True})):
            b = a.copy()
            cls.setup_anndata(b, batch_key="batch")
            model = cls(b, n_latent=10)
            wall, cpu = time.perf_counter(), time.process_time()
            model.train(max_epochs=100, plan_kwargs=plan, enable_progress_bar=False)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            score(name, model.get_latent_representation(), wall, cpu, b.n_obs * 100 / wall)
    except ImportError:
        print("scvi-tools not installed: scVI skipped", file=sys.stderr)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="pbmc,cellbench,sim")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            if name != "sim" and not SHARED.is_dir():
                print(f"{SHARED} not found: {name} skipped", file=sys.stderr)
                continue
            a = load(name, Path(tmp))
            for row in run_methods(a):
                rows.append({"dataset": f"{name} ({a.n_obs} x {a.n_vars})", **row})
            show(rows, final=False)  # each dataset as it finishes
    show(rows, final=True)
    return 0


def show(rows: list[dict], final: bool) -> None:
    frame = pd.DataFrame(rows).set_index(["dataset", "method"])
    cols = ["overall_score", "bio_score", "batch_score", "ilisi", "clisi", "batch_asw",
            "label_asw", "ari", "nmi", "knn_batch_entropy", "train_s", "train_cpu_s",
            "cells_x_epochs_per_s"]
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 20)
    stream = sys.stdout if final else sys.stderr
    print(frame[cols].round(3).to_string(), file=stream, flush=True)


if __name__ == "__main__":
    sys.exit(main())
