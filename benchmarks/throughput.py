"""Training throughput, scaling in n, peak memory and the matmul limit, in one run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/throughput.py                  # all parts
    OMP_WAIT_POLICY=PASSIVE python benchmarks/throughput.py --parts seed,limit
    OMP_WAIT_POLICY=PASSIVE python benchmarks/throughput.py --parts scale --sizes 1000,10000,100000
    OMP_WAIT_POLICY=PASSIVE python benchmarks/throughput.py --parts backed --backed-sizes 10000,100000,1000000

Parts:

* ``seed``: the design documents' alternating loop (per-sample Dataset, DataLoader at batch 32,
  odd outer iterations train the classifier then the NB model for one pass each, even ones the
  generator), copied faithfully except for the one change it needs to run at all (the
  predictor losses were computed under no_grad), against ``advcli.ConfounderModel`` on the same
  simulated 10,000 x 1,000 data. Throughput is cells x player-epochs per second: one
  player-epoch is every player trained on every cell once: three DataLoader passes of the loop,
  two advcli epochs (a heads epoch trains the classifier and the NB model together, a generator
  epoch the generator; the warm start's generator epochs count as half a player-epoch each).
  Quality is |r(Z-hat, Z)| on all cells.
* ``scale``: ``advcli fit`` / ``predict`` / ``diagnose`` in fresh processes for both modes at each
  size (fixed epochs), with wall and CPU seconds, peak RSS and the exponent of fit time in n.
* ``limit``: every matrix product one default confounder training runs (forward and backward,
  recorded with their shapes by a dispatch mode in a counting run), each timed alone at the best
  of seven rounds: the seconds those products need at torch.matmul's own speed, as a fraction
  of the seconds the training takes (a second, uncounted run). Then where a step's time goes:
  one minibatch of the default size stepped 60 times as a heads step and as a generator step,
  with the wall time of the model's pieces (generator forward, NB head, the NB loss and its
  count term, backward, Adam) taken by timing wrappers around them.
* ``backed``: both modes in memory and with ``--backed`` (counts left on disk) at each size:
  fit / predict / diagnose time, peak RSS and diagnose's scores side by side, and the exponent
  of backed fit time in n (``--backed-sizes 10000,100000,1000000`` for the atlas case).
* ``scvi``: integrate against scVI (``pip install -e '.[bench]'``) on ``simulate integrate`` data,
  the same epochs, CPU seconds per epoch.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import anndata as ad
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Dataset

import advcli

CHILD = """
import resource, runpy, sys
sys.argv = ["advcli"] + sys.argv[1:]
try:
    runpy.run_module("advcli.cli", run_name="__main__")
except SystemExit as exc:
    if exc.code:
        raise
usage = resource.getrusage(resource.RUSAGE_SELF)
print(usage.ru_maxrss, usage.ru_utime + usage.ru_stime)
"""


# ----------------------------------------------------------------------------- the seed loop


class XDYDataset(Dataset):
    def __init__(self, X, D, Y):
        self.X, self.D, self.Y = X.float(), D.float().view(-1, 1), Y.float()

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i], self.D[i], self.Y[i]


class SeedNB(nn.Module):
    def __init__(self, in_dim, n_genes):
        super().__init__()
        self.fc = nn.Linear(in_dim, n_genes)
        self.theta_log = nn.Parameter(torch.full((n_genes,), 1.0).log())

    def forward(self, feats):
        return self.fc(feats), F.softplus(self.theta_log) + 1e-8


def seed_nb_nll(y, log_mu, theta, eps=1e-8):
    mu = torch.exp(log_mu) + eps
    theta = theta.view(1, -1)
    t1 = torch.lgamma(y + theta) - torch.lgamma(theta) - torch.lgamma(y + 1.0)
    t2 = theta * (torch.log(theta + eps) - torch.log(theta + mu))
    t3 = y * (torch.log(mu) - torch.log(theta + mu))
    return -(t1 + t2 + t3).mean()


class SeedGenerator(nn.Module):
    def __init__(self, in_dim, z_dim=1, hidden=128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, z_dim), nn.Sigmoid())

    def forward(self, X, D, Y):
        probs = self.net(torch.cat([X, D, Y], dim=1))
        return (probs > 0.5).float() + (probs - probs.detach()), probs


def seed_loop(X, D, Y, outer_iters=10, batch_size=32, lr=1e-3):
    """The design documents' alternating_train (odd: classifier pass, NB pass; even: generator
    pass). Returns the generator's probabilities on all cells and the number of passes."""
    torch.manual_seed(0)
    n, x_dim = X.shape
    p = Y.shape[1]
    loader = DataLoader(XDYDataset(X, D, Y), batch_size=batch_size, shuffle=True, drop_last=True)
    gen = SeedGenerator(x_dim + 1 + p)
    cls = nn.Linear(x_dim + 1, 1)
    nb = SeedNB(x_dim + 2, p)
    bce = nn.BCEWithLogitsLoss()
    opt_cls = torch.optim.Adam(cls.parameters(), lr=lr)
    opt_nb = torch.optim.Adam(nb.parameters(), lr=lr)
    opt_gen = torch.optim.Adam(gen.parameters(), lr=lr)
    passes = 0
    for outer in range(1, outer_iters + 1):
        if outer % 2 == 1:
            for q in gen.parameters():
                q.requires_grad = False
            for Xb, Db, Yb in loader:
                with torch.no_grad():
                    Z_hat, _ = gen(Xb, Db, Yb)
                loss = bce(cls(torch.cat([Xb, Z_hat], dim=1)), Db)
                opt_cls.zero_grad(set_to_none=True)
                loss.backward()
                opt_cls.step()
            for Xb, Db, Yb in loader:
                with torch.no_grad():
                    Z_hat, _ = gen(Xb, Db, Yb)
                log_mu, theta = nb(torch.cat([Xb, Db, Z_hat], dim=1))
                loss = seed_nb_nll(Yb, log_mu, theta)
                opt_nb.zero_grad(set_to_none=True)
                loss.backward()
                opt_nb.step()
            passes += 2
        else:
            for q in gen.parameters():
                q.requires_grad = True
            for q in list(cls.parameters()) + list(nb.parameters()):
                q.requires_grad = False
            for Xb, Db, Yb in loader:
                Z_hat, _ = gen(Xb, Db, Yb)
                log_mu, theta = nb(torch.cat([Xb, Db, Z_hat], dim=1))
                loss = bce(cls(torch.cat([Xb, Z_hat], dim=1)), Db) + seed_nb_nll(Yb, log_mu, theta)
                opt_gen.zero_grad(set_to_none=True)
                loss.backward()
                opt_gen.step()
            for q in list(cls.parameters()) + list(nb.parameters()):
                q.requires_grad = True
            passes += 1
    with torch.no_grad():
        _, probs = gen(X.float(), D.float().view(-1, 1), Y.float())
    return probs[:, 0].numpy(), passes


def _abs_r(a, b) -> float:
    return abs(float(np.corrcoef(np.asarray(a).ravel(), np.asarray(b).ravel())[0, 1]))


def part_seed(tmp: Path, n: int, genes: int) -> None:
    path = tmp / "confounder.h5ad"
    subprocess.run([sys.executable, "-m", "advcli", "simulate", "confounder", "-o", str(path),
                    "--n", str(n), "--genes", str(genes), "--setting", "general"], check=True,
                   capture_output=True)
    a = ad.read_h5ad(path)
    cov = [c for c in a.obs.columns if c.startswith("cov_")]
    X = torch.tensor(a.obs[cov].to_numpy(np.float32))
    D = torch.tensor(a.obs["D"].to_numpy(np.float32))
    Y = torch.tensor(np.asarray(a.X.todense() if hasattr(a.X, "todense") else a.X, np.float32))
    z_true = a.obsm["Z_true"][:, 0]
    print(f"\n== confounder training throughput, {n:,} cells x {genes:,} genes "
          f"(simulate confounder --setting general), {torch.get_num_threads()} threads")
    print(f"{'method':<34}{'player-epochs':>14}{'wall s':>9}{'cpu s':>9}"
          f"{'cells x epochs / s':>20}{'|r(Z-hat, Z)|':>15}")
    w, c = time.perf_counter(), time.process_time()
    probs, passes = seed_loop(X, D, Y)
    w, c = time.perf_counter() - w, time.process_time() - c
    seed_rate = n * passes / 3 / w
    print(f"{'design documents loop (batch 32)':<34}{passes / 3:>14.1f}{w:>9.1f}{c:>9.1f}"
          f"{seed_rate:>20,.0f}{_abs_r(probs, z_true):>15.3f}")
    for label, opts in (("advcli defaults", {}),
                        ("advcli --batch-size 128", {"batch_size": 128})):
        m = advcli.ConfounderModel(a, **opts).train()
        s = m.fit_summary()
        if not opts:
            label += f" (batch {m.config.batch_size})"
        player_epochs = s["epochs"] / 2  # a heads epoch and a generator epoch
        rate = n * player_epochs / s["train_seconds"]
        print(f"{label:<34}{player_epochs:>14.1f}{s['train_seconds']:>9.1f}"
              f"{s['train_cpu_seconds']:>9.1f}{rate:>20,.0f}"
              f"{_abs_r(m.predict_training_z()[:, 0], z_true):>15.3f}   {rate / seed_rate:.1f}x")


# ----------------------------------------------------------------------------- scaling


def _run(args: list[str], report: list | None = None) -> tuple[float, float, float]:
    """Wall s, CPU s and peak MB of one advcli command in a fresh process; with ``report``,
    its --json object is appended to it."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"advcli {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    lines = done.stdout.strip().splitlines()
    peak_kb, cpu = lines[-1].split()
    if report is not None:
        report.append(json.loads("\n".join(lines[:-1])))
    return time.perf_counter() - start, float(cpu), float(peak_kb) / 1024.0


def part_scale(tmp: Path, sizes: list[int], genes: int, epochs: int) -> None:
    print(f"\n== scaling in n: {genes:,} genes, fit with --max-epochs {epochs}, fresh processes")
    print(f"{'mode':<12}{'command':<10}{'cells':>10}{'wall s':>9}{'cpu s':>9}{'peak MB':>9}"
          f"{'cells / wall s':>16}")
    for mode in ("confounder", "integrate"):
        times = []
        for n in sizes:
            data = tmp / f"{mode}_{n}.h5ad"
            sim = (["--n", str(n)] if mode == "confounder" else
                   ["--n-a", str(n // 2), "--n-b", str(n - n // 2)])
            _run(["simulate", mode, "-o", str(data), "--genes", str(genes), *sim])
            model, pred, report = tmp / f"{mode}_{n}.pt", tmp / f"{mode}_{n}_p.h5ad", tmp / f"r_{mode}_{n}"
            for name, args in (("fit", ["fit", str(data), "--mode", mode, "-o", str(model),
                                        "--max-epochs", str(epochs), "--patience", "0"]),
                               ("predict", ["predict", str(model), str(data), "-o", str(pred)]),
                               ("diagnose", ["diagnose", str(pred), "-o", str(report)])):
                wall, cpu, peak = _run(args)
                if name == "fit":
                    times.append(wall)
                print(f"{mode:<12}{name:<10}{n:>10,}{wall:>9.1f}{cpu:>9.1f}{peak:>9.0f}"
                      f"{n / wall:>16,.0f}")
            for f in (data, pred):
                f.unlink(missing_ok=True)
        if len(sizes) > 1:
            slope = np.polyfit(np.log(sizes), np.log(times), 1)[0]
            print(f"{mode:<12}fit time ~ n^{slope:.2f} over {sizes[0]:,}-{sizes[-1]:,} cells "
                  "(start-up included)")


def part_backed(tmp: Path, mode: str, sizes: list[int], genes: int, cells_seen: float,
                data_dir: Path | None) -> None:
    """One mode in memory and with --backed at each size: time, peak memory, and the diagnose
    scores of both (the same epochs: enough to see ``cells_seen`` cells, at most 100), plus the
    exponent in n of the backed fit's time per epoch."""
    score_names = {"integrate": ("ilisi", "ari", "overall_score"),
                   "confounder": ("|r(Z-hat, Z)|", "mean per-gene r(log mu)", None)}[mode]
    print(f"\n== in memory vs --backed ({mode}, {genes:,} genes, epochs to see "
          f"{cells_seen:,.0f} cells (at most 100), fresh processes; diagnose reads a seeded "
          f"{'20,000' if mode == 'integrate' else '3e7 / genes'} cells)")
    print(f"{'cells':>10}  {'how':<8}{'command':<10}{'passes':>7}{'wall s':>9}{'cpu s':>9}"
          f"{'peak MB':>9}{'cells x epochs / s':>20}  "
          + ("iLISI    ARI  overall" if mode == "integrate" else "|r(Z-hat,Z)|  r(log mu)"))
    times = []
    for n in sizes:
        epochs = int(min(100, math.ceil(cells_seen / n)))
        folder = data_dir or tmp
        data = folder / f"{mode}_{n}_{genes}.h5ad"
        if not data.exists():
            size = (["--n-a", str(n // 2), "--n-b", str(n - n // 2)] if mode == "integrate"
                    else ["--n", str(n), "--setting", "general"])
            _run(["simulate", mode, "-o", str(data), "--genes", str(genes), *size])
        for how in ("memory", "backed"):
            flag = ["--backed"] if how == "backed" else []
            if how == "memory" and n * genes > 4e8:
                print(f"{n:>10,}  {how:<8}skipped: {n:,} x {genes:,} counts do not fit here")
                continue
            model, pred, report = tmp / f"m_{how}_{n}.pt", tmp / f"p_{how}_{n}.h5ad", tmp / f"r_{how}_{n}"
            out: list = []  # the --json objects
            for name, args in (("fit", ["fit", str(data), "--mode", mode, "-o", str(model),
                                        "--max-epochs", str(epochs), "--patience", "0"]),
                               ("predict", ["predict", str(model), str(data), "-o", str(pred)]),
                               ("diagnose", ["diagnose", str(pred), "-o", str(report)])):
                wall, cpu, peak = _run(args + flag + ["--json"], out)
                passes = out[-1]["epochs"] if name == "fit" else 1  # a schedule may plan fewer
                if name == "fit" and how == "backed":
                    times.append(out[-1]["train_seconds"] / passes)
                scores = ""
                if name == "diagnose":
                    found = {**out[-1].get("metrics", {}), **out[-1].get("headline", {})}
                    scores = "  " + "".join(f"{found.get(k, float('nan')):>9.3f}"
                                            for k in score_names if k)
                print(f"{n:>10,}  {how:<8}{name:<10}{passes:>7}{wall:>9.1f}{cpu:>9.1f}"
                      f"{peak:>9.0f}{n * passes / wall:>20,.0f}{scores}", flush=True)
            pred.unlink(missing_ok=True)
    if len(times) > 1:
        slope = np.polyfit(np.log(sizes), np.log(times), 1)[0]
        print(f"--backed training seconds per epoch ~ n^{slope:.2f} over "
              f"{sizes[0]:,}-{sizes[-1]:,} cells")


# ----------------------------------------------------------------------------- matmul limit


class MatmulShapes(TorchDispatchMode):
    """Counts every matrix product torch runs, by (m, k, n), backward passes included."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            a, b = args[-2:]
            self.counts[(a.shape[0], a.shape[1], b.shape[1])] += 1
        return func(*args, **(kwargs or {}))


def _matmul_seconds(m: int, k: int, n: int, repeats: int = 50, rounds: int = 7) -> float:
    """Seconds of one (m x k) @ (k x n) product: the best of several rounds, since a limit is
    what the machine reaches when nothing else runs on it."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(5):
        a @ b
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    return best / repeats


def part_limit(tmp: Path, n: int, genes: int) -> None:
    """The products a default training runs, at torch.matmul's best speed, against the time
    the training takes."""
    path = tmp / "confounder_limit.h5ad"
    subprocess.run([sys.executable, "-m", "advcli", "simulate", "confounder", "-o", str(path),
                    "--n", str(n), "--genes", str(genes), "--setting", "general"], check=True,
                   capture_output=True)
    a = ad.read_h5ad(path)
    timed_model = advcli.ConfounderModel(a).train()
    timed = timed_model.fit_summary()
    shapes = MatmulShapes()
    with shapes:
        counted = advcli.ConfounderModel(a).train().fit_summary()
    flops = seconds = 0.0
    for (m, k, n_out), count in shapes.counts.items():
        flops += 2.0 * m * k * n_out * count
        seconds += _matmul_seconds(m, k, n_out) * count
    per_epoch_flops, per_epoch_limit = flops / counted["epochs"], seconds / counted["epochs"]
    per_epoch = timed["train_seconds"] / timed["epochs"]
    print(f"\n== matmul limit, confounder model, {n:,} x {genes:,}, "
          f"{torch.get_num_threads()} threads")
    print(f"matrix products per epoch: {sum(shapes.counts.values()) / counted['epochs']:,.0f} "
          f"of {len(shapes.counts)} shapes, {per_epoch_flops / n / 1e6:.2f} MFLOP per cell "
          f"(epochs: {counted['epochs']} counted, {timed['epochs']} timed)")
    print(f"torch.matmul at those shapes: {per_epoch_flops / per_epoch_limit / 1e9:.2f} GFLOP/s "
          f"-> {per_epoch_limit * 1e3:.0f} ms per epoch")
    print(f"advcli: {per_epoch * 1e3:.0f} ms per epoch = {per_epoch_flops / per_epoch / 1e9:.2f} "
          f"GFLOP/s, {per_epoch_limit / per_epoch:.0%} of the matmul limit")
    step_breakdown(a, per_epoch_limit / math.ceil(n / timed_model.config.batch_size))


def step_breakdown(a: ad.AnnData, limit_per_step: float, repeats: int = 60) -> None:
    """Wall milliseconds of a heads step and a generator step on one minibatch, by piece."""
    from advcli import losses

    model = advcli.ConfounderModel(a).train(max_epochs=3)
    strategy = model._strategy()
    batch = model.batch(torch.randperm(a.n_obs, generator=torch.Generator().manual_seed(0))
                        [:model.config.batch_size])
    spent: Counter = Counter()
    originals, labels = [], []

    def timed(owner, name: str, label: str) -> None:
        inner = getattr(owner, name)
        originals.append((owner, name, inner))
        if label not in labels:
            labels.append(label)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            spent[label] += time.perf_counter() - start
            return out
        setattr(owner, name, wrapper)

    timed(model.module, "z", "generator forward")
    timed(model.module.nb, "forward", "NB head forward")
    timed(losses, "nb_nll", "NB loss forward")
    timed(losses, "nb_count_term", "  of which the count term")
    timed(losses.CountHistogram, "of_pairs", "the minibatch's count histogram")
    timed(torch.Tensor, "backward", "backward")
    for optimizer in strategy.optimizers.values():
        timed(optimizer, "step", "Adam")
    ctx = {"phase": "heads", "temperature": model.config.temperature_end,
           "weights": model.weights}
    print(f"\n== one step of {model.config.batch_size} cells, wall ms; the matmul limit is "
          f"{limit_per_step * 1e3:.2f} ms per step")
    try:
        for title, players in (("heads step", ("classifier", "nb")),
                               ("generator step", ("generator",))):
            for _ in range(5):
                strategy.step(batch, players, ctx)
            spent.clear()
            start = time.perf_counter()
            for _ in range(repeats):
                strategy.step(batch, players, ctx)
            total = (time.perf_counter() - start) / repeats * 1e3
            print(f"{title}: {total:.2f}")
            for label in (name for name in labels if name in spent):
                print(f"  {label:38s} {spent[label] / repeats * 1e3:6.2f}")
            print(f"  {'the rest (Python, cat, classifier)':38s} "
                  f"{total - sum(v for k, v in spent.items() if not k.startswith(' ')) / repeats * 1e3:6.2f}")
    finally:
        for owner, name, inner in reversed(originals):
            setattr(owner, name, inner)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="seed,limit,scale,scvi")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--genes", type=int, default=1_000)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--backed-sizes", default="10000,100000",
                        help="sizes of the 'backed' part (add 1000000 for the atlas case)")
    parser.add_argument("--backed-genes", type=int, default=2_000)
    parser.add_argument("--backed-modes", default="integrate,confounder")
    parser.add_argument("--cells-seen", type=float, default=2e6,
                        help="the backed part trains each size for this many cells x epochs")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="keep the backed part's simulated files here (reused if present)")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "seed" in parts:
            part_seed(tmp, args.n, args.genes)
        if "limit" in parts:
            part_limit(tmp, args.n, args.genes)
        if "scale" in parts:
            part_scale(tmp, [int(s) for s in args.sizes.split(",")], args.genes, args.epochs)
        if "scvi" in parts:
            part_scvi(tmp, args.epochs)
        if "backed" in parts:
            for mode in args.backed_modes.split(","):
                genes = args.backed_genes if mode == "integrate" else args.genes
                part_backed(tmp, mode, [int(s) for s in args.backed_sizes.split(",")], genes,
                            args.cells_seen, args.data_dir)
    return 0


def part_scvi(tmp: Path, epochs: int) -> None:
    try:
        import scvi
    except ImportError:
        print("\n== scVI: not installed (pip install -e '.[bench]'); skipped")
        return
    path = tmp / "integrate.h5ad"
    subprocess.run([sys.executable, "-m", "advcli", "simulate", "integrate", "-o", str(path)],
                   check=True, capture_output=True)
    a = ad.read_h5ad(path)
    print(f"\n== integrate vs scVI, {a.n_obs:,} x {a.n_vars:,}, {epochs} epochs each")
    c = time.process_time()
    w = time.perf_counter()
    advcli.IntegrationModel(a, max_epochs=epochs, patience=0).train()
    ours = (time.perf_counter() - w, time.process_time() - c)
    b = a.copy()
    scvi.model.SCVI.setup_anndata(b, batch_key="batch")
    model = scvi.model.SCVI(b, n_latent=10)
    c, w = time.process_time(), time.perf_counter()
    model.train(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False)
    theirs = (time.perf_counter() - w, time.process_time() - c)
    print(f"advcli: {ours[0]:.1f} s wall, {ours[1]:.1f} s CPU; scVI: {theirs[0]:.1f} s wall, "
          f"{theirs[1]:.1f} s CPU; cells x epochs / s {a.n_obs * epochs / ours[0]:,.0f} vs "
          f"{a.n_obs * epochs / theirs[0]:,.0f} ({theirs[0] / ours[0]:.2f}x)")


if __name__ == "__main__":
    raise SystemExit(main())
