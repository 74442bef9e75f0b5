"""Plotting shared by the reports: a headless pyplot and per-epoch loss curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib's pyplot on the Agg backend: reports are written on machines without a
    display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(history: dict, panels: list[dict], path: Path, notes: list[str],
                markers: list[tuple[float, str]] = ()) -> None:
    """One panel per entry of ``panels`` ({title, ylabel, series: [(column, label)], optional
    phases, symlog, reference: [(y, label)]}), each series against the epoch; with ``phases``
    only epochs of those training phases are drawn, ``reference`` adds dashed horizontal lines
    (a chance level), ``markers`` dotted vertical lines on every panel (the end of a warm-up,
    the best epoch). A history without per-epoch records is a note, not a plot."""
    if not isinstance(history, dict) or "epoch" not in history:
        notes.append("The model file's history has no per-epoch records (written by an older "
                     "advcli): loss_curves.png is skipped.")
        return
    plt = pyplot()
    epochs = np.asarray(history["epoch"], dtype=float)
    phase = np.asarray(history.get("phase", [""] * len(epochs)), dtype=object)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        rows = np.ones(len(epochs), bool) if "phases" not in panel else np.isin(phase,
                                                                                panel["phases"])
        drawn = False
        for column, label in panel["series"]:
            values = np.asarray(history.get(column, [np.nan] * len(epochs)), dtype=float)
            keep = rows & np.isfinite(values)
            if keep.any():
                ax.plot(epochs[keep], values[keep], marker="." if keep.sum() < 30 else None,
                        label=label)
                drawn = True
        for y, label in panel.get("reference", []) if drawn else []:
            ax.axhline(y, color="grey", ls="--", lw=0.8)
            ax.annotate(label, (0.01, y), xycoords=("axes fraction", "data"), fontsize=7,
                        color="grey", va="bottom")
        for i, (x, label) in enumerate(markers if drawn else []):
            ax.axvline(x, color=f"C{i + 3}", ls=":", lw=1.2, label=label)
        if panel.get("symlog") and drawn:
            ax.set_yscale("symlog")
        ax.set_xlabel("epoch (all phases counted)")
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.set_title(panel["title"])
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no epochs of this phase", ha="center", va="center",
                    transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
