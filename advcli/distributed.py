"""Data-parallel training on torch.distributed: every rank trains the same players on its own
share of each minibatch, and the ranks agree on every gradient, log value and stop decision.

How the ranks stay in step (see docs/scaling.md):

* All ranks draw the same global minibatches from the same seeded sampler; rank r trains on
  cells ``r, r + world, r + 2 world, ...`` of each, so together they see exactly the batches of a
  single-process run.
* After each backward, the gradients of the players that stepped are averaged across ranks in
  one flat all-reduce per player, before any optimizer moves. That is what
  DistributedDataParallel does, done per player because players take turns (frozen players
  have no gradient) and read each other through constants: a DDP wrapper around the whole
  module would need ``find_unused_parameters`` and would synchronise frozen players too.
* The logged losses of each step are averaged across ranks before anything reads them, so the
  divergence guard, early stopping and alternating phases decide the same on every rank.
* A SIGINT / SIGTERM seen by any rank stops all of them at the same step; rank 0 alone writes
  checkpoints and the model file.

Outside ``torchrun`` (or ``advcli fit --nproc N``, which starts the ranks itself) every
function here but ``launch`` is a no-op.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, or a single process: the one that writes files and prints."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes in the environment; return the device this
    rank trains on (gloo on CPU, nccl with one GPU per local rank)."""
    if not launched_by_torchrun() or is_distributed():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return device


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def shard(idx: torch.Tensor) -> torch.Tensor:
    """This rank's cells of a global minibatch."""
    return idx[rank()::world_size()] if is_distributed() else idx


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (before training starts)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def broadcast_tensors(tensors: Sequence[torch.Tensor]) -> None:
    """Rank 0's values of ``tensors`` on every rank (in place): state that each rank computes
    alike, made identical to the bit."""
    if not is_distributed():
        return
    for t in tensors:
        dist.broadcast(t, src=0)


def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Average the gradients of ``params`` across ranks in one all-reduce (a parameter
    without a gradient on this step counts as zero, as it does on every rank)."""
    if not is_distributed() or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def average_values(values: dict[str, float]) -> dict[str, float]:
    """Logged values averaged across ranks (NaN anywhere makes the average NaN everywhere)."""
    if not is_distributed() or not values:
        return values
    names = sorted(values)
    t = torch.tensor([float(values[k]) for k in names], dtype=torch.float64)
    dist.all_reduce(t)
    t /= world_size()
    return dict(zip(names, t.tolist()))


def any_rank(flag: int | None) -> int | None:
    """The largest non-zero flag raised on any rank (a signal number), else None."""
    if not is_distributed():
        return flag
    t = torch.tensor([flag or 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) or None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(nproc: int, argv: Sequence[str], grace: float = 10.0) -> int:
    """Run ``python -m advcli ARGV`` as ``nproc`` ranks on this machine (the environment
    torchrun would give them) and return the first non-zero exit code, else 0. A rank that
    fails stops the others: they are terminated, then killed after ``grace`` seconds. SIGINT /
    SIGTERM reach every rank, which stop together and leave rank 0's checkpoint."""
    port = _free_port()
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    procs = []
    for r in range(nproc):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        env.setdefault("OMP_NUM_THREADS", threads)
        procs.append(subprocess.Popen([sys.executable, "-m", "advcli", *argv], env=env))
    forward = lambda signum, frame: [p.send_signal(signum) for p in procs if p.poll() is None]
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    first = 0
    try:
        failed_at = None
        while any(p.poll() is None for p in procs):
            failed = [c for c in (p.poll() for p in procs) if c not in (None, 0)]
            if failed_at is None and failed:
                failed_at, first = time.monotonic(), failed[0]
                forward(signal.SIGTERM, None)
            if failed_at is not None and time.monotonic() - failed_at > grace:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if not first:
        first = next((p.returncode for p in procs if p.returncode != 0), 0)
    return 128 - first if first < 0 else first
