"""`diagnose`: turn a prediction file into metrics, tables and plots a biologist can read.

Everything is written to a staging folder first and moved into REPORT_DIR file by file, each by
an atomic rename, so REPORT_DIR never holds a half-written file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .. import keys
from ..data import read_h5ad, seeded_subset
from ..errors import InputError
from ..io import load_model, plain
from .aae import aae_report
from .confounder import confounder_report
from .disentangle import disentangle_report
from .integrate import check_map_method, integration_report

BACKED_REPORTS = ("integrate", "confounder")
BACKED_ENTRIES = 30_000_000  # a backed confounder report reads about this many counts:
                             # cells (seeded, 5,000-50,000) x genes, so its GLMs fit in ~2 GB
REPORTS = {"aae": aae_report, "disentangle": disentangle_report}  # modes whose report needs only the file and the model


def diagnose(predicted: str | Path, out_dir: str | Path, model_path: str | Path | None = None,
             label_key: str | None = None, batch_key: str | None = None,
             map_method: str = "tsne", backed: bool = False) -> dict[str, Any]:
    """Write the report for ``predicted`` into ``out_dir``; return the summary (also summary.json).
    ``map_method``: tsne or umap for the integrate map; ``backed``: leave the counts and layers
    on disk (integrate reports, which read a subsample of cells)."""
    check_map_method(map_method)
    adata = read_h5ad(predicted, backed)
    meta = adata.uns.get(keys.UNS, {})
    info = meta.get(keys.PREDICT) if isinstance(meta, dict) else None
    if not isinstance(info, dict) or "mode" not in info:
        raise InputError(f"'{predicted}' has no uns['{keys.UNS}']['{keys.PREDICT}'] record: run "
                         "`advcli predict` first and diagnose its output.")
    mode = str(info["mode"])
    if mode not in keys.MODES:
        raise InputError(f"'{predicted}' records an unknown mode '{mode}' in uns['{keys.UNS}']"
                         f"['{keys.PREDICT}'].")
    if backed and mode not in BACKED_REPORTS:
        raise InputError(f"--backed applies to predictions of mode "
                         f"{' and '.join(BACKED_REPORTS)}; '{predicted}' is of mode {mode}. "
                         "Drop --backed.")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(f"'{predicted}' has {adata.n_obs} cells and {adata.n_vars} genes: "
                         "nothing to diagnose.")
    notes: list[str] = []
    if backed and mode == "confounder":  # its report reads per-gene matrices whole
        cells = np.arange(adata.n_obs)
        most = int(np.clip(BACKED_ENTRIES // max(adata.n_vars, 1), 5_000, 50_000))
        if adata.n_obs > most:
            cells = seeded_subset(adata.n_obs, most, 0)
            notes.append(f"--backed: the report (correlations, effects, plots) uses a random "
                         f"{most:,} of the {adata.n_obs:,} cells.")
        adata = adata.to_memory(cells)
    payload = load_model(model_path, mode=mode) if model_path is not None else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".advcli-report-", dir=out_dir))
    try:
        if mode == "confounder":
            summary = confounder_report(adata, staging, payload)
        elif mode == "integrate":
            summary = integration_report(adata, staging, payload, label_key, batch_key,
                                         map_method)
        else:
            summary = REPORTS[mode](adata, staging, payload)
        summary = {"mode": mode, "input": str(predicted), **summary}
        summary["notes"] = notes + list(summary.get("notes", []))
        summary["files"] = sorted(p.name for p in staging.iterdir()) + ["summary.json"]
        (staging / "summary.json").write_text(json.dumps(plain(summary, json_safe=True), indent=2))
        stale = _previous_files(out_dir) - set(summary["files"])
        umask = os.umask(0)
        os.umask(umask)
        for path in staging.iterdir():
            os.chmod(path, 0o666 & ~umask)
            os.replace(path, out_dir / path.name)
        for name in stale:  # files of an earlier report that this one did not write
            (out_dir / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _previous_files(out_dir: Path) -> set[str]:
    """The files an earlier report in ``out_dir`` listed in its summary.json (plain names)."""
    try:
        files = json.loads((out_dir / "summary.json").read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {f for f in files if isinstance(f, str) and f == Path(f).name}
