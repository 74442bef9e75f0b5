"""Training loops: epochs, history, early stopping and the per-epoch progress callback.

Read top to bottom: get a batch, run the strategy's epoch, log, check the budget.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from . import losses
from .config import ConfounderConfig
from .data import minibatches
from .nn import ConfounderNet, NBRegression, TreatmentClassifier
from .strategies import AlternatingFreeze, Baselines, JointUpdate

EpochCallback = Callable[[int, dict[str, float]], None]
BASELINE_EPOCHS = 10
WARM_START_EPOCHS = 5  # the generator learns the residual-factor start
FIRST_HEAD_EPOCHS = 10  # the heads fit [X, D, start Z] before the generator first moves
WARM_START_SCALE = 3.0  # start logits at +-3 per sd of the factor: a clear split, not saturated


def planned_confounder_epochs(cfg: ConfounderConfig) -> int:
    """Passes over the data the configuration asks for (an upper bound with early stopping)."""
    t = cfg.outer_iterations
    if cfg.strategy == "joint":
        planned = t * cfg.generator_epochs
    else:
        planned = math.ceil(t / 2) * cfg.predictor_epochs + (t // 2) * cfg.generator_epochs
        if t % 2 == 0:
            planned += cfg.predictor_epochs  # the heads are refit to the final Z
    if cfg.dbpr_weight > 0:
        planned += BASELINE_EPOCHS
    if cfg.warm_start:
        planned += WARM_START_EPOCHS
        if cfg.strategy == "alternating":
            planned += max(FIRST_HEAD_EPOCHS - cfg.predictor_epochs, 0)
    return min(planned, cfg.max_epochs) if cfg.max_epochs else planned


def temperature_at(cfg: ConfounderConfig, outer: int) -> float:
    """Gumbel temperature, annealed geometrically from start to end over the outer iterations."""
    if cfg.outer_iterations <= 1:
        return cfg.temperature_end
    frac = (outer - 1) / (cfg.outer_iterations - 1)
    return cfg.temperature_start * (cfg.temperature_end / cfg.temperature_start) ** frac


def fit_baselines(x_dim: int, get_batch, n: int, cfg: ConfounderConfig, generator,
                  theta: torch.Tensor) -> tuple[Baselines, int]:
    """Fit [X] -> D and [X, D] -> Y once, for the DBPR reward; return them and the epochs used."""
    classifier = TreatmentClassifier(x_dim, cfg.intercept).to(theta.device)
    nb = NBRegression(x_dim + 1, theta.numel(), cfg.intercept,
                      fixed_alpha=(1.0 / theta).detach()).to(theta.device)
    opt = torch.optim.Adam(list(classifier.parameters()) + list(nb.parameters()), lr=cfg.lr)
    for _ in range(BASELINE_EPOCHS):
        for idx in minibatches(n, cfg.batch_size, generator):
            xb, db, yb, off = get_batch(idx)
            loss = (losses.bce(classifier(xb), db)
                    + losses.nb_nll(yb, nb(torch.cat([xb, db[:, None]], dim=1), off), nb.theta))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for module in (classifier, nb):
        module.requires_grad_(False)
        module.eval()
    return Baselines(classifier, nb), BASELINE_EPOCHS


def warm_start(net: ConfounderNet, n: int, get_batch: Callable, start: torch.Tensor,
               cfg: ConfounderConfig, generator: torch.Generator) -> list[float]:
    """Teach the generator to output the residual factors ``start`` (n x k, standardised): Z
    begins at the main axes of Y that [X, D] leave unexplained, one different axis per column,
    instead of at a random direction that can saturate. Returns the MSE per epoch."""
    scale = 1.0 if cfg.z_type == "continuous" else WARM_START_SCALE
    opt = torch.optim.Adam(net.generator.parameters(), lr=cfg.lr)
    record = []
    for _ in range(WARM_START_EPOCHS):
        total = 0.0
        for idx in minibatches(n, cfg.batch_size, generator):
            x, d, y, off = get_batch(idx)
            target = start[idx.to(start.device)] * scale
            loss = torch.nn.functional.mse_loss(net.generator(x, d, y, off), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        record.append(total / n)
    return record


def train_confounder(net: ConfounderNet, n: int, get_batch: Callable, cfg: ConfounderConfig,
                     weights: dict[str, float], on_epoch: EpochCallback | None = None,
                     start: torch.Tensor | None = None) -> tuple[dict, int, dict]:
    """Train ``net`` in place; return (history, epochs used, optimizer states).

    With ``start`` (residual factors) the generator is first taught to output them, and the
    first head phase runs up to FIRST_HEAD_EPOCHS so the heads fit before Z moves.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    strategy_cls = JointUpdate if cfg.strategy == "joint" else AlternatingFreeze
    strategy = strategy_cls(net, cfg.lr, cfg.lr_generator or cfg.lr, cfg.weight_decay)
    budget = cfg.max_epochs or planned_confounder_epochs(cfg)
    history: dict[str, dict[str, list]] = {"predictor": {"epoch": [], "outer": []},
                                           "generator": {"epoch": [], "outer": []}}
    epochs = 0

    def log(phase: str, outer: int, record: dict[str, float]) -> None:
        nonlocal epochs
        epochs += 1
        table = history[phase]
        table["epoch"].append(epochs)
        table["outer"].append(outer)
        for k, v in record.items():
            table.setdefault(k, []).append(float(v))
        if on_epoch is not None:
            on_epoch(epochs, {k: v for k, v in record.items() if k in ("bce", "nb", "total")})

    baselines = None
    if weights["dbpr"] > 0:
        baselines, used = fit_baselines(net.x_dim, get_batch, n, cfg, generator,
                                        net.nb.theta.detach())
        epochs += used

    net.train()
    if start is not None:
        history["warm_start"] = {"mse": warm_start(net, n, get_batch, start, cfg, generator)}
        epochs += WARM_START_EPOCHS
    head_budget = cfg.predictor_epochs if cfg.strategy == "alternating" else 0
    last_phase = None
    base_lr = {id(opt): [g["lr"] for g in opt.param_groups] for opt in strategy.optimizers().values()}
    for outer in range(1, cfg.outer_iterations + 1):
        temperature = temperature_at(cfg, outer)
        frac = (outer - 1) / max(cfg.outer_iterations - 1, 1)
        scale = 1.0 - (1.0 - cfg.lr_final_fraction) * frac  # linear decay to the final fraction
        for opt in strategy.optimizers().values():
            for group, lr in zip(opt.param_groups, base_lr[id(opt)]):
                group["lr"] = lr * scale
        if cfg.strategy == "joint":
            for _ in range(cfg.generator_epochs):
                if epochs >= budget:
                    break
                log("generator", outer, strategy.joint_epoch(
                    minibatches(n, cfg.batch_size, generator), get_batch, temperature, weights,
                    baselines))
        elif outer % 2 == 1:
            _head_phase(strategy, n, get_batch, cfg, generator, temperature, outer, log,
                        lambda: epochs < budget,
                        max(cfg.predictor_epochs, FIRST_HEAD_EPOCHS)
                        if outer == 1 and cfg.warm_start else cfg.predictor_epochs)
            last_phase = "heads"
        else:
            if epochs >= budget - head_budget:
                break
            for _ in range(cfg.generator_epochs):
                if epochs >= budget - head_budget:
                    break
                log("generator", outer, strategy.generator_epoch(
                    minibatches(n, cfg.batch_size, generator), get_batch, temperature, weights,
                    baselines))
            last_phase = "generator"
        if epochs >= budget:
            break
    if last_phase == "generator":  # refit the heads to the generator's final Z
        _head_phase(strategy, n, get_batch, cfg, generator, temperature_at(cfg, cfg.outer_iterations),
                    cfg.outer_iterations + 1, log, lambda: epochs < max(budget, 1),
                    cfg.predictor_epochs)
    net.eval()
    optim_state = {k: opt.state_dict() for k, opt in strategy.optimizers().items()}
    return history, epochs, optim_state


def _head_phase(strategy, n, get_batch, cfg, generator, temperature, outer, log, may_continue,
                max_epochs: int):
    """Train the heads for up to ``max_epochs``, stopping when neither loss improves by 0.1%
    for ``patience`` epochs (patience 0: always run them all)."""
    best = {"bce": math.inf, "nb": math.inf}
    stale = 0
    for _ in range(max_epochs):
        if not may_continue():
            break
        record = strategy.head_epoch(minibatches(n, cfg.batch_size, generator), get_batch,
                                     temperature)
        log("predictor", outer, record)
        improved = any(record[k] < best[k] - 1e-3 * abs(best[k]) for k in best
                       if math.isfinite(best[k])) or not math.isfinite(best["bce"])
        best = {k: min(best[k], record[k]) for k in best}
        stale = 0 if improved else stale + 1
        if cfg.patience and stale >= cfg.patience:
            break
