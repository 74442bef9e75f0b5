"""How one minibatch updates which players. Strategies know nothing of the model they train.

A model's module names its players (``players()``: name -> parameters) and returns, for a
minibatch, each active player's loss (``objective(batch, players, ctx)``). The contract that
makes strategies interchangeable: a player's loss carries gradient to that player's parameters
only (the module reads other players through detached tensors or constant parameters). Then

* ``Simultaneous`` sums the losses and steps every active player from one backward. With an
  adversary whose loss is the discriminator's loss negated this is gradient reversal (Ganin &
  Lempitsky), the reversal written into the loss instead of a layer; with cooperating players
  it is a joint update.
* ``AlternatingFreeze`` lets the players take turns, in the order and counts of the module's
  ``turns()``; everyone outside the turn is frozen (requires_grad False), so the gradient of the
  turn's loss flows through frozen players into the one that learns.

A new strategy is one class with ``step`` and one entry in ``STRATEGIES``.
"""

from __future__ import annotations

import math
from typing import Collection

import torch

from .distributed import average_gradients, average_values


class TrainingDiverged(RuntimeError):
    """A loss or parameter became NaN or infinite; ``term`` names it."""

    def __init__(self, term: str, value: float):
        super().__init__(f"{term} became {value}")
        self.term, self.value = term, value


def adam(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam, fused into one kernel where the torch build supports it (CPU since torch 2.4): on
    thousands of genes its per-tensor loops otherwise cost a sixth of each step."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


class Strategy:
    """One optimizer per player; ``step`` decides who learns from what."""

    def __init__(self, module: torch.nn.Module, lrs: dict[str, float], weight_decay: float = 0.0,
                 max_grad_norm: float | None = None):
        self.module, self.lrs = module, dict(lrs)
        self.players = {name: list(params) for name, params in module.players().items()}
        self.optimizers = {name: adam(params, lrs[name], weight_decay)
                           for name, params in self.players.items()}
        self.max_grad_norm = max_grad_norm

    def step(self, batch: dict, players: Collection[str], ctx: dict) -> dict[str, float]:
        raise NotImplementedError

    def _update(self, batch: dict, players: list[str], ctx: dict) -> dict[str, float]:
        """One forward, one backward of the summed losses, one step per active player."""
        losses, logs = self.module.objective(batch, players, ctx)
        record = average_values({k: float(torch.as_tensor(v).detach()) for k, v in logs.items()})
        for name, value in record.items():
            if not math.isfinite(value):
                raise TrainingDiverged(name, value)
        for name in players:
            self.optimizers[name].zero_grad(set_to_none=True)
        sum(losses[name] for name in players).backward()
        for name in players:
            average_gradients(self.players[name])
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.players[name], self.max_grad_norm)
            self.optimizers[name].step()
        if hasattr(self.module, "after_step"):
            self.module.after_step(players)
        return record

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])

    def reset(self, players: Collection[str]) -> None:
        """Forget the optimizer state of ``players`` (a fresh start after a pre-training phase)."""
        for name in players:
            self.optimizers[name].state.clear()

    def scale_lr(self, scale: float) -> None:
        """Every player at ``scale`` times its base learning rate (a schedule's decay)."""
        for name, opt in self.optimizers.items():
            for group in opt.param_groups:
                group["lr"] = self.lrs[name] * scale


class Simultaneous(Strategy):
    """Every active player steps at once on its own loss (gradient reversal; joint update)."""

    def step(self, batch: dict, players: Collection[str], ctx: dict) -> dict[str, float]:
        active = [p for p in self.players if p in players]
        # players that first take solo steps on the minibatch (a discriminator catching up)
        for name, extra in getattr(self.module, "solo_steps", {}).items():
            if name in active and len(active) > 1:
                for _ in range(extra):
                    self._update(batch, [name], ctx)
        return self._update(batch, active, ctx)


class AlternatingFreeze(Strategy):
    """Players take turns (``module.turns()``: [(players, repeats), ...]); the rest are frozen."""

    def step(self, batch: dict, players: Collection[str], ctx: dict) -> dict[str, float]:
        record: dict[str, float] = {}
        for group, repeats in self.module.turns():
            active = [p for p in group if p in players]
            if not active:
                continue
            self._freeze_all_but(active)
            try:
                for _ in range(repeats):
                    record.update(self._update(batch, active, ctx))
            finally:
                self._freeze_all_but(list(self.players))
        return record

    def _freeze_all_but(self, active: list[str]) -> None:
        for name, params in self.players.items():
            for p in params:
                p.requires_grad_(name in active)


STRATEGIES: dict[str, type[Strategy]] = {"simultaneous": Simultaneous,
                                         "alternating": AlternatingFreeze}


def constant_call(module: torch.nn.Module, *args):
    """``module(*args)`` with its parameters as constants and its buffers untouched: the
    gradient reaches the inputs only. How one player reads another without training it."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    buffers = {k: v.clone() for k, v in module.named_buffers()}
    return torch.func.functional_call(module, {**params, **buffers}, args)
