"""How one pass over the data updates which modules. The strategies ARE the control flow of
adversarial and alternating training, so each is straight-line code over the same modules.

Confounder mode: ``AlternatingFreeze`` (seed 002: heads learn with the generator frozen, then the
generator learns through the frozen heads) and ``JointUpdate`` (one backward on the weighted sum).
Integrate mode: ``GradientReversalStep`` and ``AlternatingAdversary`` (freeze-and-alternate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import losses
from .nn import ConfounderNet, set_trainable


# ---------------------------------------------------------------- confounder mode


@dataclass
class Baselines:
    """Heads fit once without Z ([X] -> D and [X, D] -> Y), for the DBPR reward."""

    classifier: torch.nn.Module
    nb: torch.nn.Module


def generator_objective(net: ConfounderNet, x, d, y, weights: dict[str, float], temperature: float,
                        baselines: Baselines | None = None) -> dict[str, torch.Tensor]:
    """The Z-generator's loss: bce_w * BCE + nb_w * NB - dbpr_w * (w' + v').

    BCE is per cell, NB per cell and gene; the DBPR terms are rewarded (subtracted), the sign
    seed 002's critique asks for.
    """
    z, _ = net.z(x, d, y, temperature)
    d_logit, log_mu = net.heads(x, d, z)
    out = {"bce": losses.bce(d_logit, d), "nb": losses.nb_nll(y, log_mu, net.nb.theta)}
    total = weights["bce"] * out["bce"] + weights["nb"] * out["nb"]
    if baselines is not None and weights["dbpr"] > 0:
        with torch.no_grad():
            d_logit_base = baselines.classifier(x)
            log_mu_base = baselines.nb(torch.cat([x, d[:, None]], dim=1))
        w, v = losses.dbpr_terms(d_logit, d_logit_base, d, y, log_mu, log_mu_base, net.nb.theta)
        out["dbpr_d"], out["dbpr_y"] = w, v
        total = total - weights["dbpr"] * (w + v)
    out["total"] = total
    return out


class AlternatingFreeze:
    """Seed 002's alternating scheme, with its own optimizer for each module (warm-started).

    Head phase: the generator is frozen and run under no_grad; the classifier (BCE) and the NB
    model (NB) each take a step on their own loss. Generator phase: both heads are frozen
    (requires_grad False, no detach) and only the generator learns, its gradient flowing through
    the frozen heads. No graph is reused, so no retain_graph.
    """

    def __init__(self, net: ConfounderNet, lr: float, lr_generator: float, weight_decay: float):
        self.net = net
        self.opt_classifier = torch.optim.Adam(net.classifier.parameters(), lr=lr,
                                               weight_decay=weight_decay)
        self.opt_nb = torch.optim.Adam(net.nb.parameters(), lr=lr, weight_decay=weight_decay)
        self.opt_generator = torch.optim.Adam(net.generator.parameters(), lr=lr_generator,
                                              weight_decay=weight_decay)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"classifier": self.opt_classifier, "nb": self.opt_nb,
                "generator": self.opt_generator}

    def head_epoch(self, batches, get_batch: Callable, temperature: float) -> dict[str, float]:
        net = self.net
        set_trainable(net.generator, False)
        set_trainable(net.classifier, True)
        set_trainable(net.nb, True)
        sums = {"bce": 0.0, "nb": 0.0}
        for idx in batches:
            x, d, y = get_batch(idx)
            with torch.no_grad():
                z, _ = net.z(x, d, y, temperature)
            loss_d = losses.bce(net.classifier(torch.cat([x, z], dim=1)), d)
            self.opt_classifier.zero_grad(set_to_none=True)
            loss_d.backward()
            self.opt_classifier.step()
            loss_y = losses.nb_nll(y, net.nb(torch.cat([x, d[:, None], z], dim=1)), net.nb.theta)
            self.opt_nb.zero_grad(set_to_none=True)
            loss_y.backward()
            self.opt_nb.step()
            sums["bce"] += loss_d.item() * len(idx)
            sums["nb"] += loss_y.item() * len(idx)
        n = sum(len(idx) for idx in batches)
        return {k: v / n for k, v in sums.items()}

    def generator_epoch(self, batches, get_batch: Callable, temperature: float,
                        weights: dict[str, float], baselines: Baselines | None) -> dict[str, float]:
        net = self.net
        set_trainable(net.generator, True)
        set_trainable(net.classifier, False)
        set_trainable(net.nb, False)
        sums: dict[str, float] = {}
        for idx in batches:
            x, d, y = get_batch(idx)
            out = generator_objective(net, x, d, y, weights, temperature, baselines)
            self.opt_generator.zero_grad(set_to_none=True)
            out["total"].backward()
            self.opt_generator.step()
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v.item() * len(idx)
        set_trainable(net.classifier, True)
        set_trainable(net.nb, True)
        n = sum(len(idx) for idx in batches)
        return {k: v / n for k, v in sums.items()}


class JointUpdate(AlternatingFreeze):
    """Every module learns at every step from one backward on the generator's weighted loss."""

    def joint_epoch(self, batches, get_batch: Callable, temperature: float,
                    weights: dict[str, float], baselines: Baselines | None) -> dict[str, float]:
        set_trainable(self.net, True)
        sums: dict[str, float] = {}
        opts = list(self.optimizers().values())
        for idx in batches:
            x, d, y = get_batch(idx)
            out = generator_objective(self.net, x, d, y, weights, temperature, baselines)
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            out["total"].backward()
            for opt in opts:
                opt.step()
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v.item() * len(idx)
        n = sum(len(idx) for idx in batches)
        return {k: v / n for k, v in sums.items()}
