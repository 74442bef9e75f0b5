"""`diagnose` for integrate mode: scIB-style metrics, a 2-D map of the embedding, loss curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .. import keys
from ..backed import read_rows
from ..data import (check_finite_obsm, count_source, counts_anndata, encode_domains,
                    seeded_subset)
from ..errors import InputError
from ..metrics import (active_dimensions, collapsed_note, integration_metrics, mixing_note,
                       types_brought_together, types_joined_note, types_less_separated,
                       types_mixed_note)
from ..io import plain
from .plots import loss_curves, pyplot

LOSS_PANELS = [
    {"title": "Reconstruction + KL", "ylabel": "negative ELBO per cell",
     "series": [("elbo", "train -ELBO"), ("val_elbo", "validation -ELBO")]},
    {"title": "Adversary (mixing: CE up, accuracy toward chance)", "ylabel": "",
     "series": [("disc_ce", "discriminator CE"), ("disc_acc", "discriminator accuracy")]},
]
MAP_CELLS = 5000  # the map is drawn on a seeded subsample above this many cells
METRIC_CELLS = 20000  # above this many cells, a seeded subsample is scored
MAP_METHODS = ("tsne", "umap")
MAP_NAMES = {"tsne": "t-SNE", "umap": "UMAP"}


def check_map_method(method: str) -> None:
    """Refuse an unknown map method, or UMAP without umap-learn, before any work is done."""
    if method not in MAP_METHODS:
        raise InputError(f"--map '{method}' is not one of {', '.join(MAP_METHODS)}.")
    if method == "umap":
        import importlib

        try:
            importlib.import_module("umap")
        except ImportError:
            raise InputError("--map umap needs umap-learn: pip install 'advcli[umap]' (or "
                             "umap-learn), or use --map tsne.") from None


def two_d(embedding: np.ndarray, method: str) -> np.ndarray:
    """A seeded 2-D map of the embedding's rows (the same file gives the same picture)."""
    n = len(embedding)
    if method == "umap":
        import warnings

        import umap

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "n_jobs overridden by random_state": wanted
            return umap.UMAP(n_neighbors=int(min(15, n - 1)), random_state=0,
                             init="spectral" if n > 50 else "random").fit_transform(embedding)
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, perplexity=float(min(30, max(2, (n - 1) / 3))), init="pca",
                random_state=0).fit_transform(embedding)


def integration_report(adata, folder: Path, payload: dict | None, label_key: str,
                       batch_key: str | None, map_method: str = "tsne") -> dict[str, Any]:
    if keys.X_LATENT not in adata.obsm:
        raise InputError(f"obsm['{keys.X_LATENT}'] is missing: the file was not written by "
                         "`advcli predict` with an integrate model.")
    inputs = adata.uns.get(keys.UNS, {}).get(keys.INTEGRATE_INPUTS, {})
    batch_key = batch_key or str(inputs.get("batch_key", keys.BATCH))
    codes, names = encode_domains(adata, batch_key)
    batch = np.asarray(names, dtype=object)[codes].astype(str)
    notes: list[str] = []
    labels = None
    if label_key is not None and label_key not in adata.obs.columns:
        raise InputError(f"--label-key '{label_key}' is not an obs column. The file has: "
                         f"{', '.join(map(repr, adata.obs.columns)) or 'none'}.")
    label_key = label_key or keys.CELL_TYPE
    if label_key in adata.obs.columns:
        column = adata.obs[label_key]
        if column.isna().any():
            raise InputError(f"obs['{label_key}'] has {int(column.isna().sum())} missing "
                             "labels; fill or drop those cells.")
        labels = column.astype(str).to_numpy()
    else:
        notes.append(f"No obs['{label_key}']: label metrics (cLISI, label ASW, ARI, NMI, bio and "
                     "overall scores) are skipped.")
    embedding = check_finite_obsm(adata, keys.X_LATENT, "the embedding")
    cells = np.arange(adata.n_obs)
    if adata.n_obs > METRIC_CELLS:  # silhouettes are quadratic, and a backed file stays on disk
        cells = seeded_subset(adata.n_obs, METRIC_CELLS, 0)
        embedding, batch = embedding[cells], batch[cells]
        labels = None if labels is None else labels[cells]
        notes.append(f"Metrics, the baseline and the map use a random {METRIC_CELLS:,} of the "
                     f"{adata.n_obs:,} cells.")
    metrics = integration_metrics(embedding, batch, labels)
    before = unintegrated_pca(adata, embedding.shape[1], str(inputs.get("layer", "")) or None,
                              cells)
    baseline = integration_metrics(before, batch, labels) if before is not None else None
    if before is None:
        notes.append("The file does not hold the counts the model read, so there is no "
                     "unintegrated baseline to compare with.")
    elif "overall_score" in metrics and metrics["overall_score"] < baseline["overall_score"]:
        notes.append(f"The integrated embedding scores below the unintegrated PCA (overall "
                     f"{metrics['overall_score']:.3f} against {baseline['overall_score']:.3f}): "
                     "the fit made things worse. Check the loss curves; try --adversary "
                     "alternate or another --seed.")
    if baseline is not None and types_less_separated(metrics, baseline):
        notes.append(types_mixed_note(metrics, baseline))
    joined = (types_brought_together(embedding, before, labels)
              if before is not None and labels is not None else [])
    if joined:
        notes.append(types_joined_note(joined))
    (folder / "integration_metrics.json").write_text(json.dumps(
        plain({**metrics, "unintegrated_pca": baseline, "types_brought_together": joined},
              json_safe=True), indent=2))
    plt = pyplot()
    collapsed = active_dimensions(embedding) == 0
    if collapsed:  # and the mixing figures of a collapsed space mislead: no mixing note below
        notes.append(collapsed_note(embedding.shape[1]))
    if _distinct_rows(embedding) < 10:
        notes.append("No map is drawn: every cell sits at a handful of points." if collapsed else
                     "The embedding is (nearly) constant: every cell sits at a handful of "
                     "points, so the fit collapsed and no map is drawn. Refit with another "
                     "--seed or a lower --lr.")
    else:
        maps = [("X_advcli", embedding, metrics)]
        if before is not None:
            maps.insert(0, ("unintegrated PCA", before, baseline))
        notes += _embedding_plot(plt, maps, batch, labels, batch_key, label_key,
                                 folder / "embedding.png", map_method)
    if payload is not None:
        k = max(len(payload.get("encoding", {}).get("domains", [])), 2)
        panels = [LOSS_PANELS[0], {**LOSS_PANELS[1], "reference": [
            (float(np.log(k)), f"chance CE ln {k}"), (1.0 / k, f"chance accuracy 1/{k}")]}]
        loss_curves(payload["history"], panels, folder / "loss_curves.png", notes,
                    training_markers(payload["history"]))
    else:
        notes.append("No --model given: loss_curves.png needs the model file's history.")
    if not collapsed:
        mixing = mixing_note(metrics.get("ilisi", 1.0), metrics.get("ilisi_random_mixing", 1.0),
                             metrics.get("mixing_fraction", 1.0), metrics.get("ilisi_by_domain"))
        if mixing:
            notes.append(mixing)
    headline = {k: metrics[k] for k in ("ilisi", "batch_asw", "label_asw", "ari",
                                        "overall_score") if k in metrics}
    if baseline is not None:
        headline.update({f"{k}_unintegrated": baseline[k] for k in ("ilisi", "overall_score")
                         if k in baseline})
    return {"metrics": metrics, "unintegrated_metrics": baseline, "headline": headline,
            "notes": notes}


def unintegrated_pca(adata, n_components: int, layer: str | None = None,
                     cells: np.ndarray | None = None) -> np.ndarray | None:
    """What integration is judged against: PCA of log1p-normalised counts, from the counts
    the model read (None when they are missing, not finite or negative); ``cells``: of those
    rows only (sorted), read alone from a backed file."""
    import scipy.sparse as sp
    from sklearn.decomposition import PCA

    try:
        source = counts_anndata(adata, layer)
        matrix = count_source(source, layer)
        if cells is not None and len(cells) < matrix.shape[0]:
            matrix = read_rows(matrix, cells)
        x = sp.csr_matrix(matrix[:] if not sp.issparse(matrix) else matrix, dtype=np.float64)
    except InputError:
        return None
    if x.shape[1] < 2 or not np.isfinite(x.data).all() or (x.data < 0).any():
        return None
    library = np.asarray(x.sum(axis=1)).ravel()
    x = sp.diags(1e4 / np.maximum(library, 1.0)) @ x
    x.data = np.log1p(x.data)
    k = int(min(max(n_components, 2), x.shape[1] - 1, x.shape[0] - 1))
    if k < 2:
        return None
    return PCA(n_components=k, svd_solver="arpack", random_state=0).fit_transform(x)


def training_markers(history: dict) -> list[tuple[float, str]]:
    """Epochs worth a line on the loss curves: where the KL and adversary warm-ups end and the
    best validation epoch (where early stopping kept the model)."""
    if not isinstance(history, dict) or "epoch" not in history:
        return []
    epochs = np.asarray(history["epoch"], dtype=float)
    out = []
    for column, label in (("kl_weight", "KL warm-up ends"),
                          ("adv_weight", "adversary at full weight")):
        values = np.asarray(history.get(column, []), dtype=float)
        if len(values) == len(epochs) and np.isfinite(values).any():
            top = np.nanmax(values)
            if top > 0 and values[0] < top:
                out.append((float(epochs[np.argmax(values >= top)]), label))
    val = np.asarray(history.get("val_elbo", []), dtype=float)
    if len(val) == len(epochs) and np.isfinite(val).any():
        out.append((float(epochs[np.nanargmin(val)]), "best validation -ELBO"))
    return out


def _distinct_rows(embedding: np.ndarray) -> int:
    """Distinct cells in the embedding, at a resolution of 1e-6 of its spread: t-SNE crashes
    on an embedding with (almost) no distinct points."""
    spread = float(np.nanstd(embedding)) if embedding.size else 0.0
    if spread == 0.0:
        return min(len(embedding), 1)
    return len(np.unique(np.round(embedding / (spread * 1e-6)), axis=0))


def _embedding_plot(plt, maps, batch, labels, batch_key, label_key, path,
                    method: str) -> list[str]:
    """One row per embedding (unintegrated PCA above X_advcli), coloured by domain and by
    label, each with its metrics in the title; returns notes (subsampling)."""
    rng = np.random.default_rng(0)
    n = len(batch)
    keep = np.arange(n)
    notes = []
    if n > MAP_CELLS:
        keep = np.sort(rng.choice(n, MAP_CELLS, replace=False))
        notes.append(f"embedding.png shows a random {MAP_CELLS:,} of the {n:,} cells the "
                     "metrics use.")
    colourings = [(batch[keep], batch_key)]
    if labels is not None:
        colourings.append((labels[keep], label_key))
    fig, axes = plt.subplots(len(maps), len(colourings),
                             figsize=(6.5 * len(colourings), 5.5 * len(maps)), squeeze=False)
    order = rng.permutation(len(keep))  # draw in random order so no group hides another
    size = float(np.clip(20000 / len(keep), 3, 30))
    for row, (name, embedding, scores) in enumerate(maps):
        xy = two_d(embedding[keep], method)
        score = ", ".join(f"{k} {scores[k]:.2f}" for k in ("ilisi", "ari", "overall_score")
                          if k in scores)
        for ax, (values, key) in zip(axes[row], colourings):
            cats, counts = np.unique(values, return_counts=True)
            cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
            colour = {c: cmap(i % cmap.N) for i, c in enumerate(cats)}
            rare = {c for c, k in zip(cats, counts) if k < 0.02 * len(values)}
            sizes = np.array([size * (3 if v in rare else 1) for v in values[order]])
            ax.scatter(xy[order, 0], xy[order, 1], s=sizes,
                       c=[colour[v] for v in values[order]], alpha=0.7, linewidths=0)
            handles = [plt.Line2D([], [], marker="o", ls="", color=colour[c],
                                  label=f"{c} ({k:,})") for c, k in zip(cats[:20], counts[:20])]
            ax.legend(handles=handles, fontsize=7, markerscale=1.2, loc="best", frameon=False)
            ax.set_title(f"{MAP_NAMES[method]} of {name}, by {key}\n{score}", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return notes
