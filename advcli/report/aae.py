"""`diagnose` for aae mode: do the codes fill the prior, does the attribute dimension follow the
attribute, and do decoded prior draws look like cells?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .. import keys
from ..data import check_finite_obsm, counts_anndata, gene_order, load_counts, validate_counts
from ..io import plain
from .plots import loss_curves, pyplot

LOSS_PANELS = [
    {"title": "Autoencoder", "ylabel": "loss",
     "series": [("recon", "reconstruction (per count entry)"), ("ar", "attribute regularisation"),
                ("fool", "adversarial (encoder)")]},
    {"title": "Prior discriminator (matched: CE ln 2, accuracy 0.5)", "ylabel": "",
     "series": [("disc_ce", "discriminator CE"), ("disc_acc", "discriminator accuracy")]},
]
REALISM_CELLS = 2000  # real and sampled cells each, for the real-vs-sampled classifier


def aae_report(adata, folder: Path, payload: dict | None) -> dict[str, Any]:
    from scipy.stats import kstest, spearmanr

    codes = check_finite_obsm(adata, keys.X_LATENT, "the latent codes")
    inputs = adata.uns.get(keys.UNS, {}).get(keys.AAE_INPUTS, {})
    notes: list[str] = []
    ks = np.array([kstest(codes[:, j], "norm").statistic for j in range(codes.shape[1])])
    metrics: dict[str, Any] = {"latent_ks": ks.tolist(), "latent_ks_mean": float(ks.mean())}
    headline: dict[str, Any] = {"mean KS distance to N(0, 1)": float(ks.mean())}
    if ks.mean() > 0.2:
        notes.append(f"The codes do not match the prior (mean KS distance {ks.mean():.2f}): "
                     "decoded prior draws will not resemble these cells.")
    plt = pyplot()
    _latent_map(plt, codes, ks, folder / "latent_vs_prior.png")

    attribute_key = str(inputs.get("attribute_key", "")) or None
    if attribute_key is not None and attribute_key in adata.obs.columns:
        import pandas as pd

        values = pd.to_numeric(adata.obs[attribute_key], errors="coerce").to_numpy(float)
        dim = int(inputs.get("attribute_dim", 0))
        keep = np.isfinite(values)
        rho = float(spearmanr(codes[keep, dim], values[keep])[0])
        metrics["attribute_spearman"] = rho
        headline[f"Spearman(dim {dim}, {attribute_key})"] = rho
        _attribute_plot(plt, values[keep], codes[keep, dim], attribute_key, dim, rho,
                        folder / "attribute_dimension.png")
    elif attribute_key is not None:
        notes.append(f"obs['{attribute_key}'] is not in the file: the attribute dimension is "
                     "not checked.")

    if payload is not None:
        from ..models import load

        loss_curves(payload["history"], LOSS_PANELS, folder / "loss_curves.png", notes)
        accuracy = _realism(adata, load(payload), inputs)
        metrics["sample_realism_accuracy"] = accuracy
        headline["real-vs-sampled classifier accuracy (0.5 = indistinguishable)"] = accuracy
        if accuracy > 0.75:
            notes.append(f"A classifier tells decoded prior draws from real cells with accuracy "
                         f"{accuracy:.2f}: sampled cells are not yet realistic.")
    else:
        notes.append("No --model given: loss curves and the realism of sampled cells need the "
                     "model file.")
    (folder / "aae_metrics.json").write_text(json.dumps(plain(metrics, json_safe=True),
                                                        indent=2))
    return {"metrics": metrics, "headline": headline, "notes": notes}


def _realism(adata, model, inputs: dict) -> float:
    """Cross-validated accuracy of a logistic regression telling real cells from decoded prior
    draws, on the top principal components of log1p-normalised counts (0.5: indistinguishable)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    layer = model.config.layer
    adata = counts_anndata(adata, layer)
    validate_counts(adata, layer)
    rng = np.random.default_rng(0)
    real_rows = rng.choice(adata.n_obs, min(adata.n_obs, REALISM_CELLS), replace=False)
    real = load_counts(adata, layer)[np.sort(real_rows)]
    real = real[:, gene_order(adata, model.genes_)].toarray()
    fake = model.sample(len(real_rows), seed=1).X.toarray()

    def normalise(x):
        return np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1.0) * 1e4)

    features = np.vstack([normalise(real), normalise(fake)])
    labels = np.r_[np.zeros(len(real)), np.ones(len(fake))]
    features = PCA(n_components=min(20, features.shape[1] - 1, len(features) - 1),
                   random_state=0).fit_transform(features)
    scores = cross_val_score(LogisticRegression(max_iter=1000), features, labels, cv=5)
    return float(scores.mean())


def _latent_map(plt, codes, ks, path):
    from sklearn.decomposition import PCA

    prior = np.random.default_rng(0).standard_normal(codes.shape)
    pca = PCA(n_components=2, random_state=0).fit(np.vstack([codes, prior]))
    a, b = pca.transform(codes), pca.transform(prior)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    lim = np.quantile(np.abs(np.vstack([a, b])), 0.995) * 1.05
    for ax, xy, title, colour in ((axes[0], a, "latent codes of the cells", "tab:blue"),
                                  (axes[1], b, "draws of the prior N(0, I)", "tab:grey")):
        ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.5, color=colour, linewidths=0)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_title(f"{title} (shared PCA axes)")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    axes[2].bar(np.arange(len(ks)), ks, color="tab:blue")
    axes[2].axhline(0.1, ls="--", color="k", lw=1, label="0.1")
    axes[2].set_xlabel("latent dimension")
    axes[2].set_ylabel("KS distance to N(0, 1)")
    axes[2].set_title(f"Per-dimension match to the prior (mean {np.mean(ks):.3f})")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _attribute_plot(plt, values, dimension, key, dim, rho, path):
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(values, dimension, s=5, alpha=0.5, linewidths=0)
    ax.set_xlabel(key)
    ax.set_ylabel(f"latent dimension {dim}")
    ax.set_title(f"Attribute dimension vs {key}: Spearman {rho:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
