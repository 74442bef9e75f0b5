"""The one training loop of every model: sample -> step -> log -> validate / stop -> checkpoint.

The model supplies the pieces (``schedule()``, ``batches()``, ``batch()``, ``validate()``); a
strategy performs the steps. The schedule is a Python generator: it yields an ``EpochPlan`` (who
learns, the weights the objective reads, a learning-rate scale) and receives the epoch's record
back, which is how early stopping and alternating phases decide what comes next. Because the
schedule depends only on the configuration and the records, a resumed run replays the saved
records into a fresh schedule and continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from . import distributed
from .io import SignalFlag
from .strategies import Strategy, TrainingDiverged

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class EpochPlan:
    """One epoch: the players that learn, what the objective reads (``ctx``), and a factor on
    every optimizer's base learning rate. ``log`` values are stored in the history;
    ``fresh_optimizers`` forget their state before the epoch."""

    players: tuple[str, ...]
    ctx: dict = field(default_factory=dict)
    lr_scale: float = 1.0
    log: dict = field(default_factory=dict)
    fresh_optimizers: tuple[str, ...] = ()


@dataclass
class TrainState:
    """Where a run is: the finished epochs' records, the epoch in progress (steps done, partial
    sums, the batch sampler's state when the epoch began) and every random state."""

    records: list[dict] = field(default_factory=list)
    step: int = 0
    sums: dict = field(default_factory=dict)
    sampler_rng: torch.Tensor | None = None
    rng: dict | None = None
    finished: bool = False
    reference: dict = field(default_factory=dict)  # "phase:term" -> the loss at its first step

    def to_payload(self) -> dict:
        return {"records": self.records, "step": self.step, "sums": self.sums,
                "sampler_rng": self.sampler_rng, "rng": self.rng, "finished": self.finished,
                "reference": self.reference}

    @classmethod
    def from_payload(cls, d: dict) -> "TrainState":
        return cls(records=list(d["records"]), step=int(d["step"]), sums=dict(d["sums"]),
                   sampler_rng=d["sampler_rng"], rng=d["rng"], finished=bool(d["finished"]),
                   reference=dict(d.get("reference", {})))


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM during training; the resumable state was handed to the checkpoint."""

    def __init__(self, signum: int, epoch: int, saved: bool):
        super().__init__(f"interrupted by signal {signum} in epoch {epoch}")
        self.signum, self.epoch, self.saved = signum, epoch, saved


BLOWUP = 100.0  # a monitored loss this many times above its first step's value (or 1) diverged


class DivergedAt(RuntimeError):
    """Training diverged: the epoch, the loss term and what happened to it."""

    def __init__(self, epoch: int, term: str, value: float, best: float | None = None):
        what = (f"{term} became {value:.4g}, over {BLOWUP:g} times its value at the start "
                f"({best:.4g})" if best is not None else f"{term} became {value}")
        super().__init__(f"Training diverged in epoch {epoch}: {what}.")
        self.epoch, self.term, self.value = epoch, term, value


def rng_state() -> dict:
    """Every random state a training step may draw from."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                      int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def run(model, strategy: Strategy, state: TrainState, on_epoch: EpochCallback | None = None,
        checkpoint: Callable[[TrainState], None] | None = None, checkpoint_every: int = 0
        ) -> TrainState:
    """Run (or continue) ``model``'s schedule with ``strategy``; return the final state.

    ``checkpoint(state)`` is called every ``checkpoint_every`` epochs and on SIGINT / SIGTERM,
    which then raise TrainingInterrupted. A non-finite loss or parameter raises DivergedAt
    before any optimizer step takes it in.
    """
    module = model.module
    distributed.broadcast_parameters(module)
    schedule: Iterator[EpochPlan] = model.schedule()
    plan = next(schedule, None)
    for record in state.records:  # replay: the schedule reaches the epoch in progress
        plan = _send(schedule, record)
    if state.rng is None:
        torch.manual_seed(model.training_seed)
        state.rng = rng_state()
    set_rng_state(state.rng)
    precision = mixed_precision(model)
    sampler = torch.Generator()
    if state.sampler_rng is None:
        sampler.manual_seed(model.training_seed)
    else:
        sampler.set_state(state.sampler_rng)

    with SignalFlag() as flag:
        while plan is not None:
            epoch = len(state.records) + 1
            if state.step == 0:
                state.sampler_rng = sampler.get_state()
                strategy.reset(plan.fresh_optimizers)
                model.begin_epoch()
            else:  # resuming mid-epoch: draw the same batches again
                sampler.set_state(state.sampler_rng)
            strategy.scale_lr(plan.lr_scale)
            batches = model.batches(sampler)
            module.train()
            for idx in batches[state.step:]:
                try:
                    with precision:
                        step_record = strategy.step(model.batch(distributed.shard(idx)),
                                                    plan.players, plan.ctx)
                except TrainingDiverged as exc:
                    raise DivergedAt(epoch, exc.term, exc.value) from None
                for k, v in step_record.items():
                    state.sums[k] = state.sums.get(k, 0.0) + v
                    if k in model.monitored_losses:
                        state.reference.setdefault(f"{plan.log.get('phase', '')}:{k}", v)
                state.step += 1
                signum = distributed.any_rank(flag.signum)
                if signum is not None:
                    state.rng = rng_state()
                    if checkpoint is not None:
                        checkpoint(state)
                    raise TrainingInterrupted(signum, epoch, checkpoint is not None)
            _check_parameters(module, epoch)
            # running statistics (BatchNorm, the discriminator's input scaling) follow each
            # rank's own shard: every rank takes rank 0's, as DistributedDataParallel does
            distributed.broadcast_tensors(list(module.buffers()))
            record = {k: v / max(state.step, 1) for k, v in state.sums.items()}
            record.update(distributed.average_values(model.validate()))
            record.update(plan.log)
            record["epoch"] = epoch
            _check_blowup(record, state.reference, epoch)
            state.records.append(record)
            state.step, state.sums = 0, {}
            state.sampler_rng = sampler.get_state()
            if on_epoch is not None:
                on_epoch(epoch, record)
            plan = _send(schedule, record)
            state.rng = rng_state()
            if plan is None:
                state.finished = True
            if checkpoint is not None and checkpoint_every and epoch % checkpoint_every == 0:
                checkpoint(state)
            signum = distributed.any_rank(flag.signum)
            if signum is not None and plan is not None:
                if checkpoint is not None:
                    checkpoint(state)
                raise TrainingInterrupted(signum, epoch, checkpoint is not None)
    module.eval()
    state.finished = True
    return state


def mixed_precision(model):
    """The autocast context of ``--precision bf16`` (a no-op for fp32): linear layers run in
    bfloat16, and the losses cast their inputs back to float32 (see losses.as_float)."""
    if model.config.precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=model.device.type, dtype=torch.bfloat16)


def _send(schedule: Iterator[EpochPlan], record: dict) -> EpochPlan | None:
    try:
        return schedule.send(record)
    except StopIteration:
        return None


def _check_parameters(module: torch.nn.Module, epoch: int) -> None:
    for name, p in module.named_parameters():
        if not torch.isfinite(p).all():
            raise DivergedAt(epoch, f"parameter {name}", float("nan"))


def _check_blowup(record: dict, reference: dict, epoch: int) -> None:
    """A loss that is finite but exploding (a learning rate far too high) also diverged: stop
    before it is saved as a model. The reference is the loss before the first step of its
    phase, which no learning rate can have spoiled yet."""
    for key, start in reference.items():
        phase, term = key.split(":", 1)
        value = record.get(term)
        if value is None or record.get("phase", "") != phase:
            continue
        if not math.isfinite(value) or value > BLOWUP * max(abs(start), 1.0):
            raise DivergedAt(epoch, term, value, start)


def history_table(records: list[dict]) -> dict[str, list]:
    """Per-epoch records as columns (NaN where an epoch did not log a value): what model files
    store and the loss-curve plots read."""
    names: list[str] = []
    for r in records:
        names += [k for k in r if k not in names]
    return {k: [r.get(k, math.nan) for r in records] for k in names}


def history_records(table: dict[str, list]) -> list[dict]:
    """The inverse of ``history_table`` (NaN entries dropped)."""
    n = len(next(iter(table.values()), []))
    return [{k: v[i] for k, v in table.items()
             if not (isinstance(v[i], float) and math.isnan(v[i]))} for i in range(n)]
