"""`diagnose` for disentangle mode: does s carry the label and is z clean of it?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .. import keys
from ..data import check_finite_obsm, encode_domains
from ..errors import InputError
from ..io import plain
from .plots import loss_curves, pyplot

LOSS_PANELS = [
    {"title": "VAE", "ylabel": "per cell", "series": [("elbo", "-ELBO"),
                                                      ("swap", "swap reconstruction")]},
    {"title": "Adversaries (clean z: label accuracy toward the majority rate)", "ylabel": "",
     "series": [("z_label_acc", "label adversary's accuracy on z"),
                ("x_disc_ce", "decoded-cell discriminator CE")]},
]


def disentangle_report(adata, folder: Path, payload: dict | None) -> dict[str, Any]:
    from ..models.disentangle import label_accuracies

    s = check_finite_obsm(adata, keys.X_LATENT_S, "s")
    z = check_finite_obsm(adata, keys.X_LATENT_Z, "z")
    inputs = adata.uns.get(keys.UNS, {}).get(keys.DISENTANGLE_INPUTS, {})
    label_key = str(inputs.get("label_key", "")) or None
    notes: list[str] = []
    if label_key is None or label_key not in adata.obs.columns:
        raise InputError(f"The label column obs['{label_key}'] the model was trained on is not "
                         "in the file; diagnose needs it to measure what s and z carry.")
    label, names = encode_domains(adata, label_key, what="Label")
    acc_s, acc_z, majority = label_accuracies(s, z, label)
    metrics = {"label_accuracy_s": acc_s, "label_accuracy_z": acc_z, "majority_rate": majority}
    headline = {"label accuracy from s": acc_s, "label accuracy from z": acc_z,
                "majority-class rate": majority}
    if acc_z > majority + 0.1:
        notes.append(f"z still predicts the label (accuracy {acc_z:.2f} against a majority "
                     f"rate of {majority:.2f}): it is not clean of it.")
    if acc_s < 0.8:
        notes.append(f"s predicts the label poorly (accuracy {acc_s:.2f}).")
    _maps(pyplot(), s, z, np.asarray(names)[label], label_key, acc_s, acc_z, majority,
          folder / "s_and_z.png")
    if payload is not None:
        loss_curves(payload["history"], LOSS_PANELS, folder / "loss_curves.png", notes)
    else:
        notes.append("No --model given: loss_curves.png needs the model file's history.")
    (folder / "disentangle_metrics.json").write_text(json.dumps(plain(metrics, json_safe=True),
                                                                indent=2))
    return {"metrics": metrics, "headline": headline, "notes": notes}


def _maps(plt, s, z, labels, label_key, acc_s, acc_z, majority, path):
    from sklearn.decomposition import PCA

    cats = np.unique(labels)
    cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
    colour = {c: cmap(i % cmap.N) for i, c in enumerate(cats)}
    order = np.random.default_rng(0).permutation(len(labels))
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for ax, values, title in ((axes[0], s, f"s (label accuracy {acc_s:.2f})"),
                              (axes[1], z, f"z (label accuracy {acc_z:.2f})")):
        xy = PCA(n_components=2, random_state=0).fit_transform(values)
        ax.scatter(xy[order, 0], xy[order, 1], s=4, linewidths=0, alpha=0.7,
                   c=[colour[v] for v in labels[order]])
        ax.set_title(f"PCA of {title}, coloured by {label_key}")
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Line2D([], [], marker="o", ls="", color=colour[c], label=str(c))
               for c in cats[:20]]
    axes[0].legend(handles=handles, fontsize=7, frameon=False, loc="best")
    axes[2].bar(["from s", "from z"], [acc_s, acc_z], color=["tab:green", "tab:orange"])
    axes[2].axhline(majority, ls="--", color="k", lw=1, label=f"majority class ({majority:.2f})")
    axes[2].set_ylim(0, 1)
    axes[2].set_ylabel("cross-validated label accuracy")
    axes[2].set_title("What s and z carry")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
