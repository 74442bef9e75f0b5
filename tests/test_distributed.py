"""Multi-process training on torch.distributed (gloo, 2 CPU processes): the ranks' averaged
step equals the single-process step, and `fit --nproc 2` gives the single-process model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from advcli import distributed
from advcli.cli import _argv_without_nproc
from advcli.strategies import AlternatingFreeze, Simultaneous


class TwoPlayers(torch.nn.Module):
    """A regression player and an adversary on its output, each with a mean loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.f = torch.nn.Linear(4, 2)
        self.g = torch.nn.Linear(2, 1)

    def players(self):
        return {"f": self.f.parameters(), "g": self.g.parameters()}

    def turns(self):
        return [(("g",), 1), (("f",), 1)]

    def objective(self, batch, players, ctx):
        h = self.f(batch["x"])
        fit = ((h - batch["y"]) ** 2).mean()
        adv = (self.g(h.detach()) ** 2).mean()
        return {"f": fit, "g": adv}, {"fit": fit, "adv": adv}


def _data():
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(16, 4, generator=g), "y": torch.randn(16, 2, generator=g)}


def _train(strategy_cls, rank: int = 0, world: int = 1) -> tuple[list[torch.Tensor], dict]:
    module = TwoPlayers()
    strategy = strategy_cls(module, {"f": 0.1, "g": 0.1})
    data = _data()
    idx = torch.arange(16)
    for _ in range(3):
        part = idx[rank::world]
        record = strategy.step({k: v[part] for k, v in data.items()}, ("f", "g"), {})
    return [p.detach().clone() for p in module.parameters()], record


def _rank_main(rank: int, init_file: str, out: str, name: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cls = {"simultaneous": Simultaneous, "alternating": AlternatingFreeze}[name]
        params, record = _train(cls, rank, 2)
        if rank == 0:
            torch.save({"params": params, "record": record}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name,cls", [("simultaneous", Simultaneous),
                                      ("alternating", AlternatingFreeze)])
def test_two_ranks_take_the_single_process_steps(tmp_path, name, cls):
    """Each rank sees half of every minibatch; the averaged gradients and logged losses are
    those of the whole minibatch in one process."""
    out = str(tmp_path / "result.pt")
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), out, name), nprocs=2, join=True)
    got = torch.load(out)
    want_params, want_record = _train(cls)
    for a, b in zip(got["params"], want_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert got["record"] == pytest.approx(want_record, rel=1e-5)


def test_without_a_process_group_everything_is_local():
    assert not distributed.is_distributed()
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    idx = torch.arange(5)
    assert torch.equal(distributed.shard(idx), idx)
    assert distributed.average_values({"a": 1.5}) == {"a": 1.5}
    assert distributed.any_rank(None) is None


def test_argv_without_nproc():
    assert _argv_without_nproc(["fit", "d.h5ad", "--nproc", "2", "-o", "m.pt"]) == \
        ["fit", "d.h5ad", "-o", "m.pt"]
    assert _argv_without_nproc(["fit", "--nproc=3", "d.h5ad"]) == ["fit", "d.h5ad"]


def _advcli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "advcli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_fit_nproc_2_matches_one_process(tmp_path):
    """The real path: `advcli fit --nproc 2` starts two gloo ranks; rank 0 alone writes."""
    run = _advcli("simulate", "confounder", "-o", "c.h5ad", "--n", "600", "--genes", "40",
                  "--setting", "general", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    epochs = []
    for name, extra in (("one", []), ("two", ["--nproc", "2"])):
        run = _advcli("fit", "c.h5ad", "--mode", "confounder", "-o", f"{name}.pt", "--json",
                      "--max-epochs", "30", *extra, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        assert len([line for line in run.stdout.splitlines() if line.startswith("{")]) == 1
        epochs.append(json.loads(run.stdout)["epochs"])
        run = _advcli("predict", f"{name}.pt", "c.h5ad", "-o", f"{name}.h5ad", cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
    assert epochs[0] == epochs[1] and not list(tmp_path.glob("*.ckpt.pt"))
    one = ad.read_h5ad(tmp_path / "one.h5ad").obsm["Z_hat"][:, 0]
    two = ad.read_h5ad(tmp_path / "two.h5ad").obsm["Z_hat"][:, 0]
    assert abs(np.corrcoef(one, two)[0, 1]) > 0.99


def test_fit_nproc_bad_input_exits_2_with_nothing_written(tmp_path):
    run = _advcli("simulate", "integrate", "-o", "i.h5ad", "--n-a", "100", "--n-b", "100",
                  "--genes", "30",
                  cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    run = _advcli("fit", "i.h5ad", "--mode", "integrate", "--batch-key", "nope", "-o", "m.pt",
                  "--nproc", "2", cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "nope" in run.stderr
    assert not list(tmp_path.glob("m*"))
    run = _advcli("fit", "i.h5ad", "--mode", "integrate", "-o", "m.pt", "--nproc", "0",
                  cwd=tmp_path)
    assert run.returncode == 2 and "--nproc" in run.stderr


def test_fit_nproc_2_with_batch_norm_integrates_and_predicts(tmp_path):
    """BatchNorm's running statistics come from each rank's share of a minibatch; the ranks
    share rank 0's after each epoch, and the saved model predicts from them."""
    run = _advcli("simulate", "integrate", "-o", "i.h5ad", "--n-a", "200", "--n-b", "200",
                  "--genes", "40", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    run = _advcli("fit", "i.h5ad", "--mode", "integrate", "--norm", "batch", "-o", "m.pt",
                  "--max-epochs", "3", "--nproc", "2", "--json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout)["epochs"] == 3
    state = torch.load(tmp_path / "m.pt", weights_only=False)["state"]
    running = [v for k, v in state.items() if k.endswith("running_var")]
    assert len(running) == 4 and all(torch.isfinite(v).all() and (v > 0).all() for v in running)
    run = _advcli("predict", "m.pt", "i.h5ad", "-o", "p.h5ad", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert np.isfinite(ad.read_h5ad(tmp_path / "p.h5ad").obsm["X_advcli"]).all()
