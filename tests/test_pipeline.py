"""The documented Snakemake pipeline runs end to end: simulate -> fit -> predict -> diagnose for
both modes, threads passed through, a log per job."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

SNAKEFILE = Path(__file__).resolve().parents[1] / "docs" / "pipeline" / "Snakefile"


def test_snakemake_pipeline(tmp_path):
    snakemake = shutil.which("snakemake") or str(Path(sys.executable).parent / "snakemake")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = subprocess.run([snakemake, "-s", str(SNAKEFILE), "--cores", "2", "--directory",
                          str(tmp_path), "--config", "seeds=[0]", "cells=300", "genes=40",
                          "fit_options=--max-epochs 10"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    for mode in ("confounder", "integrate"):
        summary = json.loads((tmp_path / "reports" / f"{mode}_seed0" / "summary.json").read_text())
        assert summary["mode"] == mode
        fit = json.loads((tmp_path / "models" / f"{mode}_seed0.json").read_text())
        assert fit["command"] == "fit" and fit["epochs"] <= 10
        for step in ("fit", "predict", "diagnose"):
            assert (tmp_path / "logs" / f"{step}_{mode}_seed0.log").exists()
