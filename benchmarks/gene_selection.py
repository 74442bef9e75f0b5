"""All genes against `--n-top-genes 2000` in integrate mode: fit time, CPU time, model size and
integration quality, side by side in one run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/gene_selection.py [--seeds 2]

Datasets: CellBench CEL-seq2 vs Drop-seq (without its doublets, x 15,073 genes) and PBMC 3 chemistries (1,200 x 1,767)
from ../shared/data, and a 3,000-cell x 8,000-gene `simulate integrate` file. Each fit runs as its
own `advcli fit` process (so the CPU seconds are the process's own), then `predict`; the metrics
are diagnose's, on the predicted embedding.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import pandas as pd

from advcli.simulate import IntegrationSimulation, simulate_integration
from integration_suite import SHARED, real, score  # the same real sets and metrics


def datasets(tmp: Path) -> dict[str, Path]:
    out = {}
    if SHARED.is_dir():
        for name in ("cellbench", "pbmc"):
            real(name).write_h5ad(tmp / f"{name}.h5ad")
            out[name] = tmp / f"{name}.h5ad"
    sim = tmp / "sim.h5ad"
    simulate_integration(IntegrationSimulation(n_a=1400, n_b=1600, genes=8000, cell_types=6,
                                               batch_strength=1.0, seed=5), sim)
    out["simulated 3,000 x 8,000"] = sim
    return out


def advcli(*args: str) -> tuple[float, float, str]:
    """Run one advcli command; its wall and CPU seconds (user + system of the child), stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "advcli", *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"advcli {' '.join(args)} failed:\n{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--n-top-genes", type=int, default=2000)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, path in datasets(tmp).items():
            a = ad.read_h5ad(path)
            for genes in ("all", str(args.n_top_genes)):
                for seed in range(args.seeds):
                    model, pred = tmp / "m.pt", tmp / "p.h5ad"
                    extra = [] if genes == "all" else ["--n-top-genes", genes]
                    wall, cpu, out = advcli("fit", str(path), "--mode", "integrate", "-o",
                                            str(model), "--seed", str(seed), "--json", *extra)
                    summary = json.loads(out)
                    size_mb = model.stat().st_size / 1e6
                    advcli("predict", str(model), str(path), "-o", str(pred))
                    m = score(a, ad.read_h5ad(pred).obsm["X_advcli"])
                    rows.append({"dataset": f"{name} ({a.n_obs} x {a.n_vars})", "genes": genes,
                                 "seed": seed, "fit_wall_s": wall, "fit_cpu_s": cpu,
                                 "model_MB": size_mb, "epochs": summary.get("epochs"),
                                 **{k: m[k] for k in ("overall_score", "ilisi", "ari",
                                                      "label_asw")}})
                    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                      for k, v in rows[-1].items()}), file=sys.stderr, flush=True)
    table = pd.DataFrame(rows).groupby(["dataset", "genes"], sort=False).mean(numeric_only=True)
    table = table.drop(columns=["seed"])
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.round(3).to_string())
    base = table.xs("all", level="genes")
    top = table.xs(str(args.n_top_genes), level="genes")
    ratio = pd.DataFrame({"fit wall all / top": base["fit_wall_s"] / top["fit_wall_s"],
                          "fit CPU all / top": base["fit_cpu_s"] / top["fit_cpu_s"],
                          "model MB all / top": base["model_MB"] / top["model_MB"],
                          "overall top - all": top["overall_score"] - base["overall_score"]})
    print()
    print(ratio.round(3).to_string())


if __name__ == "__main__":
    main()
