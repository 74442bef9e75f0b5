"""AAE mode on the real sets in ../shared/data: does the latent match the prior, does the
attribute dimension order held-out cells, do sampled cells look real? One table.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/aae_real.py [--options "dict(ar_weight=3)"]

Each set is split 80 / 20 (seeded); the model trains on 80 % with --condition-key batch and an
attribute, and every figure is measured on the held-out 20 %:
- ks: mean over latent dimensions of the KS distance of the codes to N(0, 1) (target <= 0.1),
  beside it the same model with no prior matching (discriminator and sliced Wasserstein term
  off), with the term alone (discriminator off) and, optionally, with the encoder reading
  the genes instead of their principal components (--baselines genes), and
  ks_floor, what exact N(0, 1) draws score on as many cells; ks_train and spearman_train are
  the same figures on the training cells (the distribution the prior match is trained on),
  so that the gap between the two is the encoder's generalisation;
- spearman: |Spearman| of the attribute dimension with the attribute (target >= 0.9);
- realism: 5-fold accuracy of a logistic regression telling held-out cells from as many decoded
  prior draws, on 20 PCs of log1p-normalised counts (0.5 = indistinguishable; target <= 0.75).
Attributes: log library size, and a gene-set score (mean log1p-normalised expression of the
ribosomal protein genes RPS* / RPL*, or of the 50 most variable genes where there are none).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy.stats import kstest, spearmanr

from advcli import AAEModel
from advcli.report.aae import _realism

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = {"pbmc": "pbmc_3chem_symphony_small.h5ad",
        "cellbench": "cellbench_3cl_celseq2_dropseq.h5ad",
        "kang": "kang2018_muscat_subset.h5ad"}


def attributes(a: ad.AnnData) -> dict[str, np.ndarray]:
    counts = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
    library = counts.sum(1)
    norm = np.log1p(counts / np.maximum(library[:, None], 1) * 1e4)
    names = pd.Index(a.var_names).str.upper()
    ribo = names.str.startswith("RPS") | names.str.startswith("RPL")
    genes = ribo if ribo.sum() >= 10 else np.isin(np.arange(a.n_vars),
                                                  np.argsort(norm.var(0))[-50:])
    return {"log_library": np.log(np.maximum(library, 1)), "gene_set_score": norm[:, genes].mean(1)}


def ks_floor(n: int, draws: int = 500) -> float:
    """The mean KS distance of n exact N(0, 1) draws to N(0, 1): what a perfect match scores
    on n held-out cells (about 0.87 / sqrt(n))."""
    rng = np.random.default_rng(0)
    return float(np.mean([kstest(rng.standard_normal(n), "norm").statistic
                          for _ in range(draws)]))


def run(name: str, attribute: str, options: dict, seed: int = 0,
        baselines: tuple[str, ...] = ("no_prior_match", "no_discriminator")) -> dict:
    a = ad.read_h5ad(DATA / SETS[name])
    for key, values in attributes(a).items():
        a.obs[key] = values
    order = np.random.default_rng(seed).permutation(a.n_obs)
    cut = int(0.8 * a.n_obs)
    train, test = a[np.sort(order[:cut])].copy(), a[np.sort(order[cut:])].copy()
    row = {"set": name, "attribute": attribute}
    variants = {"": {}, "_no_prior_match": {"adv_weight": 0.0, "sw_weight": 0.0},
                "_no_discriminator": {"adv_weight": 0.0}, "_genes": {"encoder_pcs": 0}}
    for label in [""] + [f"_{b}" for b in baselines]:
        extra = variants[label]
        start, cpu = time.perf_counter(), time.process_time()
        model = AAEModel(train, condition_key="batch", attribute_key=attribute, seed=seed,
                         **{**options, **extra}).train()
        row[f"fit_s{label}"] = round(time.perf_counter() - start, 1)
        row[f"fit_cpu_s{label}"] = round(time.process_time() - cpu, 1)
        codes = model.predict(test)["latent"]
        row[f"ks{label}"] = float(np.mean([kstest(codes[:, j], "norm").statistic
                                           for j in range(codes.shape[1])]))
        row[f"realism{label}"] = _realism(test, model, {})
        if not label:
            row["ks_floor"] = ks_floor(len(codes))
            dim = model.config.attribute_dim
            row["spearman"] = abs(float(spearmanr(codes[:, dim], test.obs[attribute])[0]))
            seen = model.predict(train)["latent"]
            row["ks_train"] = float(np.mean([kstest(seen[:, j], "norm").statistic
                                             for j in range(seen.shape[1])]))
            row["spearman_train"] = abs(float(spearmanr(seen[:, dim], train.obs[attribute])[0]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", default="dict()", help="AAEModel options, a dict literal")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--attributes", default="log_library,gene_set_score")
    parser.add_argument("--seed", type=int, default=0, help="split and model seed")
    parser.add_argument("--baselines", default="no_prior_match,no_discriminator",
                        help="models beside the default: no_prior_match (discriminator and "
                        "sliced Wasserstein term off), no_discriminator (the term alone), "
                        "genes (the encoder reads the genes, not their principal components)")
    args = parser.parse_args()
    options = eval(args.options, {"__builtins__": {}}, {"dict": dict})  # a dict literal
    rows = []
    for name in args.sets.split(","):
        for attribute in args.attributes.split(","):
            rows.append(run(name, attribute, options, args.seed,
                            tuple(b for b in args.baselines.split(",") if b)))
            print(rows[-1], flush=True)
    frame = pd.DataFrame(rows).set_index(["set", "attribute"])
    cols = [c for c in ("ks", "ks_floor", "ks_no_prior_match", "ks_no_discriminator",
                        "ks_genes", "ks_train", "spearman", "spearman_train", "realism",
                        "realism_no_prior_match", "realism_no_discriminator",
                        "realism_genes", "fit_s",
                        "fit_cpu_s") if c in frame.columns]
    print(f"\noptions: {options}; targets: ks <= 0.1 (and below ks_no_prior_match), "
          "spearman >= 0.9, realism <= 0.75")
    print(frame[cols].round(3).to_string())


if __name__ == "__main__":
    main()
