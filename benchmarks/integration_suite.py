"""Integrate mode's defaults on a development suite: one table, advcli against the references.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/integration_suite.py
    OMP_WAIT_POLICY=PASSIVE python benchmarks/integration_suite.py --only strength-2,zi-5dom \\
        --methods advcli --seeds 3

Datasets (`--list` prints them): `simulate integrate` across batch strengths, sizes and gene
counts; a second simulator with another batch-effect model (per-domain gene capture tied to a gene
covariate, per-domain dispersion, Splatter-style logistic dropout, lineages of close subtypes)
across 2, 3 and 5 domains and unbalanced compositions (types missing from domains, 10:1 sizes);
the log-normal-factor simulation a user first reported unmixed; and, when ../shared/data is
there, PBMC 3 chemistries, CellBench CEL-seq2 vs Drop-seq (all 15,073 genes) and Kang 2018 with
`condition` as the domain. Three rows (zi-16types, zi-20types, types-12: 12-20 cell types, more
than the composition clusters) were added after the defaults were set, as held-out checks;
`--held-out` runs thirty-one more datasets that no default was chosen on (new generator seeds
and shapes, a 10:1 pair, a query domain that holds three of ten types, rare types, twelve,
eight, four and three domains, the real counts of Kang, PBMC and CellBench with a planted
capture effect and a missing type, PBMC with planted ambient RNA,
Kang with its samples or its donors as the domains, a third simulator whose domain effects
depend on the cell type, a fourth whose domains differ in dispersion, depth or hold the types in
wildly different proportions, and a fifth without discrete types: a branching trajectory).

Methods: advcli's defaults (`--design shared`, and `--design paired`), the unintegrated PCA (30
components), and with the `bench` extra Harmony on that PCA and scVI with scvi-tools' adversarial
classifier (n_latent 10, 100 epochs). Reference results are cached in --workdir, so a rerun
trains only advcli. Each row checks the acceptance rule: overall above adversarial scVI's, ARI at
least scVI's, label ASW and cLISI not below the unintegrated PCA's, and no pair of cell types
laid on one another that the PCA keeps apart (`diagnose`'s check).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from advcli import IntegrationModel
from advcli.metrics import (integration_metrics, types_brought_together,
                            types_less_separated)
from advcli.simulate import IntegrationSimulation, nb_counts, simulate_integration
from integration_vs_scvi import pca  # the same unintegrated PCA-30 as the other benchmark

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SCVI_EPOCHS = 100


# ---------------------------------------------------------------- a second simulator

def _draw_types(rng: np.random.Generator, n: int, k: int, concentration: float,
                absent: list[int], proportions: list[float] | None = None) -> np.ndarray:
    """n cells' types from Dirichlet(concentration) proportions over k types (each domain's own
    composition) or from ``proportions``, none of ``absent``."""
    props = (rng.dirichlet(np.full(k, concentration)) if proportions is None
             else np.array(proportions, dtype=float))
    props[list(absent)] = 0.0
    return rng.choice(k, n, p=props / props.sum())


def lineage_domains(sizes: list[int], genes: int, seed: int, strength: float = 1.0,
                    lineages: int = 3, subtypes: int = 2,
                    missing: dict[int, list[int]] | None = None) -> ad.AnnData:
    """Counts of lineages x subtypes cell types over len(sizes) domains, with a batch-effect
    model unlike `simulate integrate`'s: a per-domain capture efficiency that depends on a gene
    covariate (think GC content or length) plus gene noise, per-domain dispersions, a per-domain
    log-normal library size, and logistic dropout of low means whose midpoint moves per domain.
    ``missing[d]``: cell types absent from domain d."""
    rng = np.random.default_rng(seed)
    K, G, D = lineages * subtypes, genes, len(sizes)
    base = rng.normal(0.0, 1.3, G)
    profiles = np.repeat(base[None], K, axis=0)
    for lin in range(lineages):
        genes_l = rng.choice(G, max(1, G // 10), replace=False)
        shift = rng.normal(0.0, 1.2, len(genes_l))
        for sub in range(subtypes):
            t = lin * subtypes + sub
            profiles[t, genes_l] += shift
            genes_s = rng.choice(G, max(1, G // 40), replace=False)
            profiles[t, genes_s] += rng.normal(0.0, 1.0, len(genes_s))
    profiles = np.exp(profiles)
    profiles /= profiles.sum(axis=1, keepdims=True)
    covariate = rng.normal(0.0, 1.0, G)
    capture = np.zeros((D, G))
    theta = np.exp(rng.normal(np.log(3.0), 0.5, G))
    thetas = np.repeat(theta[None], D, axis=0)
    midpoint = np.full(D, -3.0)
    for d in range(1, D):
        capture[d] = strength * (rng.normal(0.0, 0.5) * covariate + rng.normal(0.0, 0.35, G))
        thetas[d] = theta * np.exp(rng.normal(0.0, 0.4 * strength, G))
        midpoint[d] = -3.0 + strength * rng.uniform(0.5, 1.5)
    library = np.log(2500.0) + np.r_[0.0, rng.normal(0.0, 0.4 * strength, D - 1)]
    blocks, domains, types = [], [], []
    for d, n in enumerate(sizes):
        t = _draw_types(rng, n, K, 4.0, (missing or {}).get(d, []))
        lib = np.exp(rng.normal(library[d], 0.35, n))
        mu = lib[:, None] * profiles[t] * np.exp(capture[d])
        y = nb_counts(rng, mu, thetas[d])
        drop = rng.random(y.shape) < 1.0 / (1.0 + np.exp(1.5 * (np.log(mu) - midpoint[d])))
        y[drop] = 0
        blocks.append(sp.csr_matrix(y.astype(np.float32)))
        domains += [f"D{d}"] * n
        types += [f"L{ti // subtypes}.{ti % subtypes}" for ti in t]
    return _anndata(sp.vstack(blocks).tocsr(), domains, types)


def lognormal_factor_pair(seed: int) -> ad.AnnData:
    """Two domains, a per-gene log-normal factor (sd 0.7), domain B's library about 0.6x and 20 %
    extra dropout, one of six types in B only (the report that started this suite)."""
    rng = np.random.default_rng(seed)
    n_a, n_b, G, K = 3000, 3500, 1000, 6
    types_a, types_b = rng.choice(K - 1, n_a), rng.choice(K, n_b)
    profile = rng.normal(0, 1, (K, G)) * 0.8 + rng.normal(-1, 1, G)
    factor = rng.normal(0, 0.7, G)

    def draw(types, factor, lib, drop):
        mu = np.exp(profile[types] + factor) * lib * rng.lognormal(0, 0.3, len(types))[:, None]
        y = nb_counts(rng, mu, 2.0)
        y[rng.random(y.shape) < drop] = 0
        return y

    y = np.vstack([draw(types_a, 0, 1.0, 0.0), draw(types_b, factor, 0.6, 0.2)])
    return _anndata(sp.csr_matrix(y.astype(np.float32)), ["A"] * n_a + ["B"] * n_b,
                    [f"t{t}" for t in np.r_[types_a, types_b]])


def typed_domains(sizes: list[int], genes: int, seed: int, strength: float = 1.0,
                  cell_types: int = 8, missing: dict[int, list[int]] | None = None
                  ) -> ad.AnnData:
    """A third batch-effect model: the domain effect depends on the cell type. Each domain
    shifts every gene (log-normal, sd 0.4 x strength) and, within each cell type, a tenth of
    the genes again (sd 0.6 x strength), as chemistries and dissociation act differently on
    different cells; its library sizes and dispersions differ too. Within each type a
    continuous, unlabelled programme (activation-like, 5 % of the genes) varies from cell to
    cell, so there is real structure inside the labels. ``missing[d]``: types absent from d."""
    rng = np.random.default_rng(seed)
    K, G, D = cell_types, genes, len(sizes)
    base = rng.normal(0.0, 1.6, G)
    profiles = base + rng.normal(0.0, 0.2, (K, G))
    for t in range(K):
        markers = rng.choice(G, max(1, G // 15), replace=False)
        effect = rng.normal(1.5, 0.5, len(markers))
        profiles[t, markers] += effect * rng.choice([-1, 1], len(markers))
    programme = np.where(rng.random(G) < 0.05, rng.normal(0.0, 0.8, G), 0.0)
    shift = rng.normal(0.0, 0.4 * strength, (D, G))
    typed = np.where(rng.random((D, K, G)) < 0.1, rng.normal(0.0, 0.6 * strength, (D, K, G)), 0.0)
    shift[0], typed[0] = 0.0, 0.0
    theta = np.exp(rng.normal(np.log(4.0), 0.5, G))
    blocks, domains, types = [], [], []
    for d, n in enumerate(sizes):
        t = _draw_types(rng, n, K, 5.0, (missing or {}).get(d, []))
        activity = rng.normal(0.0, 1.0, n)
        logits = profiles[t] + shift[d] + typed[d, t] + activity[:, None] * programme
        rho = np.exp(logits - logits.max(axis=1, keepdims=True))
        rho /= rho.sum(axis=1, keepdims=True)
        lib = np.exp(rng.normal(np.log(1500.0) - 0.3 * strength * d, 0.4, n))
        theta_d = theta * np.exp(rng.normal(0.0, 0.3 * strength, G)) if d else theta
        blocks.append(sp.csr_matrix(nb_counts(rng, rho * lib[:, None], theta_d)))
        domains += [f"D{d}"] * n
        types += [f"t{ti}" for ti in t]
    return _anndata(sp.vstack(blocks).tocsr(), domains, types)


def marker_domains(sizes: list[int], genes: int, seed: int, cell_types: int,
                   marker_share: float, marker_sd: float, concentration: float,
                   gene_factor_sd: float, library: float, library_sd: float,
                   depths: list[float], thetas: list[float],
                   missing: dict[int, list[int]] | None = None,
                   proportions: list[float] | None = None) -> ad.AnnData:
    """A fourth simulator: each type differs from a common log-normal profile in
    ``marker_share`` of the genes (log-fold changes with sd ``marker_sd``); each domain draws its
    own type proportions from Dirichlet(``concentration``), its own per-gene log-normal factor
    (sd ``gene_factor_sd``), its depth (``library`` x ``depths[d]``, log-normal sd
    ``library_sd``) and one inverse dispersion for all its genes (``thetas[d]``: 20 against 0.7
    is a smooth protocol beside a sparse, bursty one). ``missing[d]``: types absent from d.
    ``proportions``: one composition for every domain instead of the Dirichlet draws."""
    rng = np.random.default_rng(seed)
    K, G = cell_types, genes
    base = np.log(rng.lognormal(-0.5, 1.3, G))
    profiles = np.repeat(base[None], K, axis=0)
    for t in range(K):
        markers = rng.choice(G, int(marker_share * G), replace=False)
        profiles[t, markers] += rng.normal(0.0, marker_sd, len(markers))
    blocks, domains, types = [], [], []
    for d, n in enumerate(sizes):
        t = _draw_types(rng, n, K, concentration, (missing or {}).get(d, []), proportions)
        rho = np.exp(profiles[t] + rng.normal(0.0, gene_factor_sd, G))
        rho /= rho.sum(axis=1, keepdims=True)
        lib = rng.lognormal(np.log(library * depths[d]), library_sd, n)
        blocks.append(sp.csr_matrix(nb_counts(rng, rho * lib[:, None], np.full(G, thetas[d]))))
        domains += [f"D{d}"] * n
        types += [f"t{ti}" for ti in t]
    return _anndata(sp.vstack(blocks).tocsr(), domains, types)


HALF_SEGMENTS = np.array([f"{segment}-{half}" for segment in ("stem", "b1", "b2")
                         for half in ("early", "late")])


def trajectory_domains(sizes: list[int], genes: int, seed: int, strength: float = 1.0,
                       library: float = 2000.0, missing: dict[int, list[str]] | None = None
                       ) -> ad.AnnData:
    """A fifth simulator, without discrete types: cells lie on a branching trajectory (a stem
    that splits into two branches), each gene's log mean interpolated linearly between the
    profiles of the root, the branch point and the two tips (8 % of genes move between each
    pair). The labels are the six halves of the three segments, so neighbouring labels grade
    into one another. Each domain has a per-gene log-normal factor (sd 0.5 x strength), a
    depth factor and per-gene dispersions of its own. ``missing[d]``: labels absent from d."""
    rng = np.random.default_rng(seed)
    G = genes
    base = rng.normal(-0.5, 1.3, G)

    def moved(profile: np.ndarray) -> np.ndarray:
        out = profile.copy()
        genes_moved = rng.choice(G, int(0.08 * G), replace=False)
        out[genes_moved] += rng.normal(0.0, 1.5, len(genes_moved))
        return out

    root = base
    fork = moved(root)
    tips = [moved(fork), moved(fork)]
    theta = np.exp(rng.normal(np.log(3.0), 0.5, G))
    blocks, domains, labels = [], [], []
    for d, n in enumerate(sizes):
        segment = rng.choice(3, n, p=[0.4, 0.3, 0.3])  # stem, branch 1, branch 2
        s = rng.random(n)
        start = np.where(segment[:, None] == 0, root, fork)
        end = np.select([segment[:, None] == 0, segment[:, None] == 1], [fork, tips[0]], tips[1])
        label = HALF_SEGMENTS[2 * segment + (s >= 0.5)]
        keep = ~np.isin(label, (missing or {}).get(d, []))
        start, end, s, label = start[keep], end[keep], s[keep], label[keep]
        logits = start + s[:, None] * (end - start)
        if d:
            logits = logits + rng.normal(0.0, 0.5 * strength, G)
        rho = np.exp(logits - logits.max(axis=1, keepdims=True))
        rho /= rho.sum(axis=1, keepdims=True)
        lib = rng.lognormal(np.log(library) - 0.3 * strength * d, 0.4, len(s))
        theta_d = theta * np.exp(rng.normal(0.0, 0.3 * strength, G)) if d else theta
        blocks.append(sp.csr_matrix(nb_counts(rng, rho * lib[:, None], theta_d)))
        domains += [f"D{d}"] * len(s)
        labels += list(label)
    return _anndata(sp.vstack(blocks).tocsr(), domains, labels)


def _anndata(X: sp.csr_matrix, domains: list[str], types: list[str]) -> ad.AnnData:
    obs = pd.DataFrame({"batch": pd.Categorical(domains), "cell_type": pd.Categorical(types)},
                       index=[f"c{i}" for i in range(X.shape[0])])
    a = ad.AnnData(X, obs=obs)
    a.var_names = [f"g{j}" for j in range(X.shape[1])]
    keep = np.asarray(X.sum(axis=1)).ravel() > 0
    return a[keep].copy()


def simulated(tmp: Path, **kwargs) -> ad.AnnData:
    path = tmp / "simulate_integrate.h5ad"
    simulate_integration(IntegrationSimulation(**kwargs), path)
    return ad.read_h5ad(path)


def real(name: str, domain: str = "condition") -> ad.AnnData:
    """A set from ../shared/data; for Kang, ``domain`` names the obs column used as the domain."""
    if name == "pbmc":
        return ad.read_h5ad(SHARED / "pbmc_3chem_symphony_small.h5ad")
    if name == "cellbench":
        a = ad.read_h5ad(SHARED / "cellbench_3cl_celseq2_dropseq.h5ad")
        return a[a.obs["demuxlet_cls"] != "DBL"].copy()
    a = ad.read_h5ad(SHARED / "kang2018_muscat_subset.h5ad")
    a.obs["batch"] = a.obs[domain].astype(str)
    return a


@dataclass
class Dataset:
    name: str
    what: str
    make: Callable[[Path], ad.AnnData]
    real: bool = False


def sim(name, what, **kw):
    return Dataset(name, what, lambda tmp: simulated(tmp, **kw))


DATASETS = [
    sim("strength-0.5", "simulate integrate, batch strength 0.5", n_a=3000, n_b=3500,
        batch_strength=0.5),
    sim("strength-1", "simulate integrate, batch strength 1", n_a=3000, n_b=3500),
    sim("strength-2", "simulate integrate, batch strength 2", n_a=3000, n_b=3500,
        batch_strength=2.0),
    sim("strength-3", "simulate integrate, batch strength 3", n_a=3000, n_b=3500,
        batch_strength=3.0),
    sim("cells-1k", "simulate integrate, 1,000 cells x 1,000 genes", n_a=450, n_b=550,
        genes=1000, seed=1),
    sim("cells-40k", "simulate integrate, 40,000 cells x 1,000 genes", n_a=18000, n_b=22000,
        genes=1000, seed=2),
    sim("genes-500", "simulate integrate, 500 genes", n_a=3000, n_b=3500, genes=500, seed=3),
    sim("genes-5k", "simulate integrate, 5,000 genes, 8 types", n_a=2000, n_b=2500,
        genes=5000, cell_types=8, seed=4),
    Dataset("lognormal-pair", "log-normal gene factor sd 0.7, 0.6x library, dropout, a B-only "
            "type", lambda tmp: lognormal_factor_pair(0)),
    Dataset("zi-2dom", "second simulator, 2 domains", lambda tmp: lineage_domains(
        [3000, 3000], 1500, seed=10)),
    Dataset("zi-3dom", "second simulator, 3 domains", lambda tmp: lineage_domains(
        [2000, 2500, 1500], 1500, seed=11)),
    Dataset("zi-5dom", "second simulator, 5 domains", lambda tmp: lineage_domains(
        [1500, 1200, 1000, 1800, 900], 1500, seed=12)),
    Dataset("zi-unbalanced", "second simulator, 3 domains 10:3:1, lineage 0 missing from D1, "
            "lineage 2 from D2", lambda tmp: lineage_domains(
                [6000, 1800, 600], 1500, seed=13, missing={1: [0, 1], 2: [4, 5]})),
    Dataset("zi-strong", "second simulator, 2 domains, strength 2", lambda tmp: lineage_domains(
        [2500, 3500], 1500, seed=14, strength=2.0)),
    # held out: added after the defaults were set, many more cell types than composition clusters
    Dataset("zi-16types", "second simulator, 4 domains, 8 lineages x 2 subtypes, types missing "
            "from two domains", lambda tmp: lineage_domains(
                [2500, 2000, 1500, 1000], 1500, seed=21, lineages=8,
                missing={1: [0, 1], 3: [6, 7, 8]})),
    Dataset("zi-20types", "second simulator, 2 domains 5:1, 10 lineages x 2 subtypes, strength "
            "1.5", lambda tmp: lineage_domains([4000, 800], 1000, seed=22, lineages=10,
                                               strength=1.5)),
    sim("types-12", "simulate integrate, 12 types, batch strength 2.5", n_a=2500, n_b=3000,
        genes=1500, cell_types=12, batch_strength=2.5, seed=23),
    Dataset("pbmc", "PBMC, 3 chemistries (real)", lambda tmp: real("pbmc"), True),
    Dataset("cellbench", "CellBench CEL-seq2 vs Drop-seq, all genes (real)",
            lambda tmp: real("cellbench"), True),
    Dataset("kang", "Kang 2018, ctrl vs IFN-beta as the domain (real)", lambda tmp: real("kang"),
            True),
]


def _split_real(name: str, seed: int, alter_b, dropped_rank: int) -> ad.AnnData:
    """A real set's cells split at random into two domains, A and B; B's counts become
    ``alter_b(B's counts, all counts, rng)`` and B loses the cell type of that size rank. The
    set's own batches (Kang's conditions, PBMC's chemistries) stay in both domains alike."""
    a = real(name)
    rng = np.random.default_rng(seed)
    X = sp.csr_matrix(a.X).astype(np.int64)
    in_b = rng.random(a.n_obs) < 0.5
    b = alter_b(X[in_b], X, rng)
    types = a.obs["cell_type"].astype(str).to_numpy()
    out = _anndata(sp.vstack([X[~in_b], b]).tocsr().astype(np.float32),
                   ["A"] * int((~in_b).sum()) + ["B"] * int(in_b.sum()),
                   list(np.r_[types[~in_b], types[in_b]]))
    dropped = out.obs["cell_type"].value_counts().index[dropped_rank]
    return out[~((out.obs["batch"] == "B") & (out.obs["cell_type"] == dropped))].copy()


def planted(name: str, seed: int) -> ad.AnnData:
    """Semi-synthetic batch effect with known truth: B's counts are binomially thinned with a
    per-gene capture efficiency min(1, exp(N(-0.4, 0.5))); B loses the second most common
    cell type."""
    def thin(b: sp.csr_matrix, X: sp.csr_matrix, rng: np.random.Generator) -> sp.csr_matrix:
        efficiency = np.minimum(1.0, np.exp(rng.normal(-0.4, 0.5, X.shape[1])))
        thinned = b.tocoo()
        thinned.data = rng.binomial(thinned.data, efficiency[thinned.col])
        return thinned.tocsr()

    return _split_real(name, seed, thin, dropped_rank=1)


def ambient_planted(name: str, seed: int) -> ad.AnnData:
    """Semi-synthetic ambient RNA: each of B's cells keeps 70 % of its counts (binomial) and
    gains ambient counts drawn from the pooled profile of all cells, 7.5-22.5 % of its depth;
    B loses the most common cell type."""
    def add_ambient(b: sp.csr_matrix, X: sp.csr_matrix, rng: np.random.Generator
                    ) -> sp.csr_matrix:
        soup = np.asarray(X.sum(axis=0)).ravel() / X.sum()
        kept = b.tocoo()
        kept.data = rng.binomial(kept.data, 0.7)
        depth = np.asarray(b.sum(axis=1)) * rng.uniform(0.075, 0.225, (b.shape[0], 1))
        return kept.tocsr() + sp.csr_matrix(rng.poisson(depth * soup))

    return _split_real(name, seed, add_ambient, dropped_rank=0)


# Held out: datasets no default was chosen on, run after the defaults were set (--held-out).
HELD_OUT = [
    Dataset("ho-lognormal-5", "log-normal gene factor, generator seed 5",
            lambda tmp: lognormal_factor_pair(5)),
    Dataset("ho-lognormal-7", "log-normal gene factor, generator seed 7",
            lambda tmp: lognormal_factor_pair(7)),
    sim("ho-sim-4500", "simulate integrate, 4,500 x 1,000, 7 types, batch strength 1.5",
        n_a=2000, n_b=2500, genes=1000, cell_types=7, batch_strength=1.5, seed=11),
    Dataset("ho-zi-4x3", "second simulator, 3 domains 3:2:1, 4 lineages x 3 subtypes, strength "
            "1.5, two subtypes of lineage 0 missing from D2", lambda tmp: lineage_domains(
                [3000, 2000, 1000], 1200, seed=21, strength=1.5, lineages=4, subtypes=3,
                missing={2: [0, 1]})),
    Dataset("ho-zi-6x2-mild", "second simulator, 2 domains, 6 lineages x 2 subtypes, strength "
            "0.6", lambda tmp: lineage_domains([2500, 2500], 800, seed=33, strength=0.6,
                                               lineages=6, subtypes=2)),
    Dataset("ho-zi-10to1", "second simulator, 2 domains 10:1, 5 lineages x 2 subtypes, the "
            "last lineage missing from the small domain", lambda tmp: lineage_domains(
                [3000, 300], 1500, seed=41, lineages=5, subtypes=2, missing={1: [8, 9]})),
    Dataset("ho-kang-planted", "Kang's cells split at random, per-gene capture thinning in one "
            "half, a cell type removed from it (real counts)", lambda tmp: planted("kang", 44),
            True),
    # added after free bits became a default, as new held-out checks of it
    Dataset("ho-zi-3dom-strong", "second simulator, 3 domains 5:2:1, strength 2, 5 lineages x 2 "
            "subtypes, types missing from both small domains", lambda tmp: lineage_domains(
                [4000, 1500, 800], 1500, seed=77, strength=2.0, lineages=5, subtypes=2,
                missing={1: [3], 2: [0, 1]})),
    sim("ho-sim-2.5", "simulate integrate, 5,000 x 1,500, 8 types, batch strength 2.5",
        n_a=3000, n_b=2000, genes=1500, cell_types=8, batch_strength=2.5, seed=99),
    Dataset("ho-lognormal-17", "log-normal gene factor, generator seed 17",
            lambda tmp: lognormal_factor_pair(17)),
    Dataset("ho-zi-4dom-3x3", "second simulator, 4 equal domains, 3 lineages x 3 subtypes",
            lambda tmp: lineage_domains([2000] * 4, 1000, seed=55, strength=1.0, lineages=3,
                                        subtypes=3)),
    Dataset("ho-kang-sample", "Kang 2018, the four samples (2 donors x ctrl / IFN-beta) as the "
            "domains (real)", lambda tmp: real("kang", "batch"), True),
    Dataset("ho-kang-donor", "Kang 2018, the two donors as the domains, stimulation left in "
            "(real)", lambda tmp: real("kang", "donor"), True),
    # added with the --norm option, as new held-out checks of the defaults
    Dataset("ho-pbmc-planted", "PBMC's cells split at random, per-gene capture thinning in one "
            "half, a cell type removed from it, the chemistries left in (real counts)",
            lambda tmp: planted("pbmc", 45), True),
    Dataset("ho-zi-8dom-small", "second simulator, 8 domains of 400 cells, 4 lineages x 2 "
            "subtypes", lambda tmp: lineage_domains([400] * 8, 1000, seed=88, strength=1.0,
                                                    lineages=4, subtypes=2)),
    Dataset("ho-cellbench-planted", "CellBench's cells split at random, per-gene capture "
            "thinning in one half, a cell line removed from it, the protocols left in (real "
            "counts)", lambda tmp: planted("cellbench", 46), True),
    # a third batch-effect model, added as new held-out checks of the defaults
    Dataset("ho-typed-3dom", "third simulator (domain effects that depend on the cell type, "
            "a continuous programme within types), 3 domains 3:2:1, a type missing from D2",
            lambda tmp: typed_domains([3000, 2000, 1000], 1200, seed=101, missing={2: [7]})),
    Dataset("ho-typed-strong", "third simulator, 2 domains, strength 2, 10 types",
            lambda tmp: typed_domains([2500, 2500], 1500, seed=102, strength=2.0,
                                      cell_types=10)),
    # a fourth batch-effect model, wildly skewed compositions and ambient RNA, added as new
    # held-out checks of the defaults
    Dataset("ho-dispersion-3dom", "fourth simulator (domains differ in dispersion, 20 / 3 / "
            "0.7, and depth), 3 domains 5:3:2, a type missing from D2",
            lambda tmp: marker_domains([2500, 1500, 1000], 2000, seed=2026, cell_types=8,
                                       marker_share=0.06, marker_sd=1.5, concentration=3.0,
                                       gene_factor_sd=0.5, library=3000.0, library_sd=0.35,
                                       depths=[1.0, 0.5, 1.5], thetas=[20.0, 3.0, 0.7],
                                       missing={2: [7]})),
    Dataset("ho-skewed-15types", "fourth simulator, 15 types in 4 domains of 600 cells, each "
            "domain's proportions from Dirichlet(0.5), three types missing from D3",
            lambda tmp: marker_domains([600] * 4, 1200, seed=4242, cell_types=15,
                                       marker_share=0.05, marker_sd=1.6, concentration=0.5,
                                       gene_factor_sd=0.8, library=2500.0, library_sd=0.4,
                                       depths=[1.0] * 4, thetas=[5.0] * 4,
                                       missing={3: [0, 1, 2]})),
    Dataset("ho-pbmc-ambient", "PBMC's cells split at random, ambient RNA and 70 % capture in "
            "one half, its most common type removed from it, the chemistries left in (real "
            "counts)", lambda tmp: ambient_planted("pbmc", 77), True),
    # a fifth simulator (a branching trajectory, no discrete types) and many shallow domains,
    # added as new held-out checks of the defaults
    Dataset("ho-trajectory-3dom", "fifth simulator (a branching trajectory, labels its six "
            "half-segments), 3 domains 5:4:3, one branch's tip missing from D2",
            lambda tmp: trajectory_domains([2500, 2000, 1500], 1500, seed=515,
                                           missing={2: ["b2-late"]})),
    Dataset("ho-trajectory-strong", "fifth simulator, 2 domains, strength 2, shallow (1,000 "
            "counts a cell)", lambda tmp: trajectory_domains([3000, 2500], 2000, seed=616,
                                                             strength=2.0, library=1000.0)),
    Dataset("ho-shallow-12dom", "fourth simulator, 12 domains of 300 cells, 800 counts a "
            "cell, 6 types, two missing from three domains each",
            lambda tmp: marker_domains([300] * 12, 1500, seed=1212, cell_types=6,
                                       marker_share=0.06, marker_sd=1.2, concentration=4.0,
                                       gene_factor_sd=0.5, library=800.0, library_sd=0.4,
                                       depths=list(np.linspace(0.6, 1.4, 12)),
                                       thetas=[3.0] * 12,
                                       missing={0: [5], 4: [5], 8: [5], 1: [4], 5: [4], 9: [4]})),
    # a query domain that holds few of the reference's types, and rare types, added as new
    # held-out checks of the defaults
    Dataset("ho-query-3of10", "third simulator, strength 1.5, a reference of 4,000 cells in "
            "10 types and a query of 800 cells that holds three of them",
            lambda tmp: typed_domains([4000, 800], 1500, seed=303, strength=1.5,
                                      cell_types=10, missing={1: [3, 4, 5, 6, 7, 8, 9]})),
    Dataset("ho-rare-types", "fourth simulator, 2 domains, 10 types in the same proportions "
            "(25 % down to 1 %), the rarest type in the second domain only",
            lambda tmp: marker_domains([3000, 2500], 1500, seed=909, cell_types=10,
                                       marker_share=0.05, marker_sd=1.4, concentration=1.0,
                                       gene_factor_sd=0.6, library=2000.0, library_sd=0.4,
                                       depths=[1.0, 0.7], thetas=[5.0, 2.0],
                                       proportions=[0.25, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05,
                                                    0.03, 0.01, 0.01],
                                       missing={0: [9]})),
    # five more held-out checks, drawn from the generators above with seeds and shapes no
    # default was chosen on
    sim("ho-sim-8types-2to1", "simulate integrate, 8 types, 3,000 + 1,500 cells x 1,200 genes, "
        "batch strength 1.2", n_a=3000, n_b=1500, genes=1200, cell_types=8, batch_strength=1.2,
        seed=71),
    Dataset("ho-typed-3dom-2missing", "third simulator, strength 2, 3 domains (2,500 / 2,500 / "
            "1,200 cells), 6 types, two missing from the third",
            lambda tmp: typed_domains([2500, 2500, 1200], 1200, seed=707, strength=2.0,
                                      cell_types=6, missing={2: [0, 1]})),
    Dataset("ho-lineage-6x2", "second simulator, 2 domains 2:1, 6 lineages x 2 subtypes, "
            "strength 1", lambda tmp: lineage_domains([3000, 1500], 1000, seed=77, strength=1.0,
                                                      lineages=6, subtypes=2)),
    Dataset("ho-marker-3depths", "fourth simulator, 3 domains of 2,000 cells at depths 1 / 0.6 "
            "/ 1.4 and inverse dispersions 4 / 2 / 8, each domain's own proportions of 8 types",
            lambda tmp: marker_domains([2000, 2000, 2000], 1500, seed=717, cell_types=8,
                                       marker_share=0.05, marker_sd=1.2, concentration=2.0,
                                       gene_factor_sd=0.5, library=3000.0, library_sd=0.3,
                                       depths=[1.0, 0.6, 1.4], thetas=[4.0, 2.0, 8.0])),
    Dataset("ho-typed-12types", "third simulator, strength 1, 12 types, 1,500 + 3,000 cells x "
            "2,000 genes, two types in the second domain only",
            lambda tmp: typed_domains([1500, 3000], 2000, seed=727, strength=1.0,
                                      cell_types=12, missing={0: [10, 11]})),
]


# ---------------------------------------------------------------- methods

UNINTEGRATED = "X_pca_unintegrated"


def unintegrated(a: ad.AnnData) -> np.ndarray:
    """The unintegrated PCA-30 of ``a``, computed once per dataset (kept in its obsm): the PCA
    row, Harmony's input and what ``score`` compares each embedding with."""
    if UNINTEGRATED not in a.obsm:
        a.obsm[UNINTEGRATED] = pca(a)
    return a.obsm[UNINTEGRATED]


def run_advcli(a: ad.AnnData, seed: int, **options) -> tuple[np.ndarray, dict]:
    model = IntegrationModel(a, seed=seed, **options).train(progress=False)
    s = model.fit_summary()
    return model.get_latent_representation(), {
        "train_s": s["train_seconds"], "train_cpu_s": s["train_cpu_seconds"],
        "epochs": s["epochs"], "warnings": len(s["warnings"]),
        "disc_acc": s["final_losses"].get("disc_acc", np.nan)}


def run_harmony(a: ad.AnnData, seed: int) -> tuple[np.ndarray, dict]:
    import harmonypy

    wall, cpu = time.perf_counter(), time.process_time()
    emb = np.asarray(harmonypy.run_harmony(unintegrated(a).copy(), a.obs, "batch",
                                              random_state=seed, verbose=False).Z_corr)
    emb = emb if emb.shape[0] == a.n_obs else emb.T
    return emb, {"train_s": time.perf_counter() - wall, "train_cpu_s": time.process_time() - cpu}


def run_scvi(a: ad.AnnData, seed: int) -> tuple[np.ndarray, dict]:
    import scvi
    from scvi.train import AdversarialTrainingPlan

    scvi.settings.verbosity = logging.ERROR
    scvi.settings.seed = seed

    class AdversarialSCVI(scvi.model.SCVI):
        _training_plan_cls = AdversarialTrainingPlan

    b = ad.AnnData(a.X.copy(), obs=a.obs[["batch"]].copy())
    AdversarialSCVI.setup_anndata(b, batch_key="batch")
    model = AdversarialSCVI(b, n_latent=10)
    wall, cpu = time.perf_counter(), time.process_time()
    model.train(max_epochs=SCVI_EPOCHS, plan_kwargs={"adversarial_classifier": True},
                enable_progress_bar=False)
    return model.get_latent_representation(), {"train_s": time.perf_counter() - wall,
                                               "train_cpu_s": time.process_time() - cpu}


METHODS = {
    "advcli": lambda a, seed: run_advcli(a, seed),
    "advcli paired": lambda a, seed: run_advcli(a, seed, design="paired"),
    "PCA": lambda a, seed: (unintegrated(a).copy(), {"train_s": 0.0, "train_cpu_s": 0.0}),
    "Harmony": run_harmony,
    "scVI adversarial": run_scvi,
}
CACHED = ("PCA", "Harmony", "scVI adversarial")  # not advcli: it is what changes


def score(a: ad.AnnData, emb: np.ndarray) -> dict:
    """The metrics, and how many pairs of cell types the embedding laid on one another that
    the unintegrated PCA keeps apart (`diagnose`'s check, against the same PCA as the table)."""
    labels = a.obs["cell_type"].astype(str).to_numpy()
    return {**integration_metrics(emb, a.obs["batch"].astype(str).to_numpy(), labels),
            "types_joined": len(types_brought_together(emb, unintegrated(a), labels))}


def run(dataset: Dataset, methods: list[str], seeds: int, workdir: Path,
        reference_seeds: int = 1) -> list[dict]:
    a = dataset.make(workdir)
    a.obs["batch"] = a.obs["batch"].astype(str)
    shape = f"{a.n_obs} x {a.n_vars}, {a.obs['batch'].nunique()} domains"
    rows = []
    for method in methods:
        for seed in range(seeds if method.startswith("advcli") else reference_seeds):
            cache = workdir / f"{dataset.name}__{method.replace(' ', '_')}__{seed}.json"
            if method in CACHED and cache.exists():
                row = json.loads(cache.read_text())
            else:
                try:
                    emb, info = METHODS[method](a, seed)
                except ImportError as err:
                    print(f"{method} skipped ({err}); install the bench extra", file=sys.stderr)
                    break
                row = {"dataset": dataset.name, "shape": shape, "method": method, "seed": seed,
                       **score(a, emb), **info}
                if method in CACHED:
                    cache.write_text(json.dumps(row))
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                              for k, v in row.items()}), file=sys.stderr, flush=True)
    return rows


SHOWN = ["overall_score", "ilisi", "clisi", "batch_asw", "label_asw", "ari", "nmi", "train_s",
         "train_cpu_s"]


def verdicts(frame: pd.DataFrame, method: str = "advcli") -> pd.DataFrame:
    """Per dataset: the method's mean over seeds against adversarial scVI and the PCA."""
    mean = frame.groupby(["dataset", "method"], sort=False)[SHOWN].mean()
    out = []
    for name in frame["dataset"].unique():
        m = mean.loc[name]
        if method not in m.index:
            continue
        row = {"dataset": name, "overall": m.loc[method, "overall_score"]}
        if "scVI adversarial" in m.index:
            ref = m.loc["scVI adversarial"]
            row.update(scvi=ref["overall_score"],
                       beats_scvi=m.loc[method, "overall_score"] > ref["overall_score"],
                       ari_ok=m.loc[method, "ari"] >= ref["ari"] - 1e-3)
        if "PCA" in m.index:
            rows = frame[(frame["dataset"] == name) & (frame["method"] == method)]
            joined = rows.get("types_joined", pd.Series(dtype=float)).max()
            row.update(bio_kept=not types_less_separated(m.loc[method], m.loc["PCA"])
                       and not joined > 0)  # NaN (rows scored before the check): not judged
        out.append(row)
    return pd.DataFrame(out).set_index("dataset")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated dataset names")
    parser.add_argument("--skip", default="", help="comma-separated dataset names")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", type=int, default=1, help="advcli seeds 0..N-1 per dataset")
    parser.add_argument("--reference-seeds", type=int, default=1,
                        help="seeds 0..N-1 for Harmony and scVI (cached per seed)")
    parser.add_argument("--workdir", default="/tmp/advcli_integration_suite")
    parser.add_argument("--csv", default=None, help="also write every row here")
    parser.add_argument("--options", default="",
                        help='JSON of IntegrationModel options for a variant, e.g. '
                             '\'{"d_steps": 1}\': run as method "advcli <options>"')
    parser.add_argument("--held-out", action="store_true",
                        help="run the held-out datasets (no default was chosen on them) instead")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--tables", nargs="*", default=None,
                        help="print the table and verdicts from earlier --csv files; train nothing")
    args = parser.parse_args(argv)
    datasets = HELD_OUT if args.held_out else DATASETS
    if args.list:
        for d in datasets:
            print(f"{d.name:16s} {d.what}")
        return 0
    if args.tables:
        frame = pd.concat([pd.read_csv(path) for path in args.tables], ignore_index=True)
        show(frame, list(frame["method"].unique()))
        return 0
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    only = [s for s in args.only.split(",") if s]
    skip = [s for s in args.skip.split(",") if s]
    unknown = set(only + skip) - {d.name for d in datasets}
    if unknown:
        parser.error(f"not in this list of datasets: {', '.join(sorted(unknown))} (see --list"
                     f"{'' if args.held_out else '; held-out ones need --held-out'})")
    methods = [m for m in args.methods.split(",") if m]
    if args.options:
        options = json.loads(args.options)
        variant = f"advcli {args.options}"
        METHODS[variant] = lambda a, seed: run_advcli(a, seed, **options)
        methods = [variant if m == "advcli" else m for m in methods]
    rows = []
    for dataset in datasets:
        if (only and dataset.name not in only) or dataset.name in skip:
            continue
        if dataset.real and not SHARED.is_dir():
            print(f"{SHARED} not found: {dataset.name} skipped", file=sys.stderr)
            continue
        rows += run(dataset, methods, args.seeds, workdir, args.reference_seeds)
    frame = pd.DataFrame(rows)
    if args.csv:
        frame.to_csv(args.csv, index=False)
    show(frame, methods)
    return 0


def show(frame: pd.DataFrame, methods: list[str]) -> None:
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 30)
    pd.set_option("display.max_rows", 500)
    table = frame.reindex(columns=["dataset", "method", *SHOWN]).groupby(
        ["dataset", "method"], sort=False)[SHOWN].mean()  # rows cached before a column existed
    print(table.round(3).to_string())
    for method in ("advcli", "advcli paired"):
        if method in methods:
            print(f"\n{method}: overall above adversarial scVI, ARI at least scVI's, label ASW "
                  "and cLISI not below the unintegrated PCA's, no two types laid on one another")
            print(verdicts(frame, method).round(3).to_string())


if __name__ == "__main__":
    sys.exit(main())
