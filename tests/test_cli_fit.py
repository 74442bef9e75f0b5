"""`advcli fit` as a process: signals, resume, divergence, options generated from the configs."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, SAMPLE

DATA = SAMPLE / "confounder.h5ad"


def _fit(*args):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "advcli", "fit", str(DATA), "--mode", "confounder",
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def test_sigterm_saves_a_checkpoint_that_resumes_to_the_uninterrupted_model(tmp_path):
    full = _fit("-o", tmp_path / "full.pt")
    assert full.returncode == 0, full.stderr
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "advcli", "fit", str(DATA), "--mode", "confounder",
           "-o", str(tmp_path / "m.pt"), "--checkpoint-every", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    ckpt = tmp_path / "m.ckpt.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "--resume" in err and str(ckpt) in err
    assert not (tmp_path / "m.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.pt", "m.ckpt.pt"]  # no temporaries

    resumed = _fit("-o", tmp_path / "m.pt", "--resume", ckpt)
    assert resumed.returncode == 0, resumed.stderr
    assert not ckpt.exists()  # the finished model replaces the checkpoint
    a = torch.load(tmp_path / "full.pt", weights_only=True)
    b = torch.load(tmp_path / "m.pt", weights_only=True)
    assert a["state"].keys() == b["state"].keys()
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    assert a["train_state"]["records"] == b["train_state"]["records"]


def test_resume_with_other_options_is_bad_input(tmp_path, invoke):
    r = invoke("fit", DATA, "--mode", "confounder", "--outer-iterations", "2", "-o",
               tmp_path / "m.pt")
    assert r.exit_code == 0
    r = invoke("fit", DATA, "--mode", "confounder", "--outer-iterations", "3", "-o",
               tmp_path / "n.pt", "--resume", tmp_path / "m.pt")
    assert r.exit_code == 2 and "other options" in r.stderr and "--outer-iterations" in r.stderr


def test_diverging_fit_exits_1_naming_the_epoch_and_term_and_writes_nothing(tmp_path, invoke):
    r = invoke("fit", DATA, "--mode", "confounder", "--lr", "1e6", "-o", tmp_path / "m.pt")
    assert r.exit_code == 1
    assert "Training diverged in epoch 1" in r.stderr and "--max-grad-norm" in r.stderr
    assert "Traceback" not in r.stderr and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_option_values_are_bad_input(tmp_path, invoke, value):
    for option in ("--lr", "--adv-weight"):
        r = invoke("fit", SAMPLE / "integrate.h5ad", "--mode", "integrate", option, value,
                   "-o", tmp_path / "m.pt")
        assert r.exit_code == 2 and "must be a finite number" in r.stderr


def test_an_option_of_the_other_mode_is_bad_input(tmp_path, invoke):
    r = invoke("fit", DATA, "--mode", "confounder", "--latent-dim", "4", "-o", tmp_path / "m.pt")
    assert r.exit_code == 2
    assert "--latent-dim applies to --mode integrate, aae or disentangle only" in r.stderr


def test_output_that_cannot_be_written_is_refused_before_training(tmp_path, invoke):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "folder", "is a folder"),
                         (tmp_path / "file" / "m.pt", "is a file, not a folder")):
        r = invoke("fit", DATA, "--mode", "confounder", "-o", out)
        assert r.exit_code == 2 and message in r.stderr


def test_every_config_field_is_a_fit_option_with_its_default_in_help(invoke):
    from dataclasses import fields

    from advcli.config import CONFIGS

    r = invoke("fit", "--help")
    text = " ".join(r.stdout.replace("│", " ").split())
    for cls in CONFIGS.values():
        for f in fields(cls):
            assert "--" + f.name.replace("_", "-") in text, f.name
    assert "Confounder mode" in text and "Integrate mode" in text and "[default: 0.01" not in text
    assert "confounder: 0.01; integrate, disentangle: 0.001; aae: 0.0003" in text  # --lr's default in each mode


def test_docs_cli_md_is_generated_from_the_commands():
    from advcli.clidoc import render

    current = (ROOT / "docs" / "cli.md").read_text()
    assert render(current) == current, "run `python -m advcli.clidoc docs/cli.md`"


def test_the_chance_capped_adversarial_loss_is_a_fit_option(tmp_path, invoke):
    """`--adv-loss chance` trains and is kept in the model file; an unknown loss is bad input
    that names the choices."""
    out = tmp_path / "m.pt"
    r = invoke("fit", SAMPLE / "integrate.h5ad", "--mode", "integrate", "--adv-loss", "chance",
               "--max-epochs", "1", "--latent-dim", "4", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert torch.load(out, weights_only=True)["config"]["adv_loss"] == "chance"
    r = invoke("fit", SAMPLE / "integrate.h5ad", "--mode", "integrate", "--adv-loss", "capped",
               "-o", tmp_path / "n.pt")
    assert r.exit_code == 2 and "chance" in r.stderr and not (tmp_path / "n.pt").exists()
