"""`diagnose` for integrate mode: scIB-style metrics, a 2-D map of the embedding, loss curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .. import keys
from ..data import check_finite_obsm, encode_domains
from ..errors import InputError
from ..metrics import UNMIXED_ILISI, integration_metrics
from ..io import plain
from .plots import loss_curves, pyplot

LOSS_PANELS = [
    {"title": "Reconstruction + KL", "ylabel": "negative ELBO per cell",
     "series": [("elbo", "train -ELBO"), ("val_elbo", "validation -ELBO")]},
    {"title": "Adversary (mixing: CE up, accuracy toward chance)", "ylabel": "",
     "series": [("disc_ce", "discriminator CE"), ("disc_acc", "discriminator accuracy")]},
]
MAP_CELLS = 5000  # t-SNE is drawn on a seeded subsample above this many cells


def integration_report(adata, folder: Path, payload: dict | None, label_key: str,
                       batch_key: str | None) -> dict[str, Any]:
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
    metrics = integration_metrics(embedding, batch, labels)
    (folder / "integration_metrics.json").write_text(json.dumps(plain(metrics, json_safe=True), indent=2))
    plt = pyplot()
    if _distinct_rows(embedding) < 10:
        notes.append("The embedding is (nearly) constant: every cell sits at a handful of "
                     "points, so the fit collapsed and no map is drawn. Refit with another "
                     "--seed or a lower --lr.")
    else:
        _embedding_plot(plt, embedding, batch, labels, batch_key, label_key,
                        folder / "embedding.png")
    if payload is not None:
        loss_curves(payload["history"], LOSS_PANELS, folder / "loss_curves.png", notes)
    else:
        notes.append("No --model given: loss_curves.png needs the model file's history.")
    if metrics.get("ilisi", 1.0) < UNMIXED_ILISI:
        notes.append(f"The domains are not mixed (iLISI {metrics['ilisi']:.2f}): each cell's "
                     "neighbours come from its own domain. Refit with --patience 0, a higher "
                     "--adv-weight or --adversary alternate.")
    headline = {k: metrics[k] for k in ("ilisi", "batch_asw", "label_asw", "ari",
                                        "overall_score") if k in metrics}
    return {"metrics": metrics, "headline": headline, "notes": notes}


def _distinct_rows(embedding: np.ndarray) -> int:
    """Distinct cells in the embedding, at a resolution of 1e-6 of its spread: t-SNE crashes
    on an embedding with (almost) no distinct points."""
    spread = float(np.nanstd(embedding)) if embedding.size else 0.0
    if spread == 0.0:
        return min(len(embedding), 1)
    return len(np.unique(np.round(embedding / (spread * 1e-6)), axis=0))


def _embedding_plot(plt, embedding, batch, labels, batch_key, label_key, path):
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(0)
    keep = np.arange(len(batch))
    if len(keep) > MAP_CELLS:
        keep = np.sort(rng.choice(len(keep), MAP_CELLS, replace=False))
    perplexity = float(min(30, max(2, (len(keep) - 1) / 3)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0).fit_transform(
        embedding[keep])
    panels = [(batch[keep], f"coloured by {batch_key}")]
    if labels is not None:
        panels.append((labels[keep], f"coloured by {label_key}"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.5), squeeze=False)
    order = rng.permutation(len(keep))  # draw in random order so no group hides another
    for ax, (values, title) in zip(axes[0], panels):
        cats = np.unique(values)
        cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
        colour = {c: cmap(i % cmap.N) for i, c in enumerate(cats)}
        ax.scatter(xy[order, 0], xy[order, 1], s=3, c=[colour[v] for v in values[order]],
                   alpha=0.7, linewidths=0)
        handles = [plt.Line2D([], [], marker="o", ls="", color=colour[c], label=str(c))
                   for c in cats[:20]]
        ax.legend(handles=handles, fontsize=7, markerscale=1.2, loc="best", frameon=False)
        ax.set_title(f"t-SNE of X_advcli, {title}")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
