"""Network pieces shared by the models. Each module does one job; the model files wire them
into players, and strategies decide which players learn in a step."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 1) -> nn.Sequential:
    parts: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers):
        parts += [nn.Linear(dim, hidden), nn.ReLU()]
        dim = hidden
    parts.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*parts)


# ---------------------------------------------------------------- confounder mode


def straight_through(probs: torch.Tensor) -> torch.Tensor:
    """Forward: 0/1 by thresholding at 0.5; backward: the gradient of ``probs`` (straight-through estimator)."""
    hard = (probs > 0.5).to(probs.dtype)
    return hard + (probs - probs.detach())  # exactly 0/1 forward


class ZGenerator(nn.Module):
    """Infers the hidden confounder from any of [X, D, Y~], Y~ = standardised log1p counts.

    Feeding raw counts (the original design) lets a few high-count genes dominate the first
    layer; the per-gene centring and scaling are buffers, so predict replays them exactly.
    Z-scores are clipped at +-10 and the per-gene sd floored at 0.1 (see api.ConfounderModel).
    """

    def __init__(self, x_dim: int, n_genes: int, z_dim: int, hidden: int, inputs: list[str],
                 y_mean: torch.Tensor, y_scale: torch.Tensor):
        super().__init__()
        self.inputs = list(inputs)
        in_dim = (x_dim if "x" in inputs else 0) + ("d" in inputs) + (n_genes if "y" in inputs else 0)
        # LayerNorm after the wide first layer: its pre-activations would otherwise move in
        # proportion to the number of genes at every Adam step and saturate Z within an epoch
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.ReLU(),
                                 nn.Linear(hidden, z_dim))
        self.register_buffer("y_mean", y_mean.float())
        self.register_buffer("y_scale", y_scale.float())

    def forward(self, x: torch.Tensor, d: torch.Tensor, y: torch.Tensor,
                offset: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of Z (n x k)."""
        return self.net(self.features(x, d, y, offset))

    def features(self, x: torch.Tensor, d: torch.Tensor, y: torch.Tensor,
                 offset: torch.Tensor | None = None) -> torch.Tensor:
        """The network's input, free of trainable parameters: a minibatch computes it once for
        all the turns of a step. ``offset`` (log size factor per cell) normalises the counts
        first, so sequencing depth is not the first thing Z learns."""
        parts = []
        if "x" in self.inputs:
            parts.append(x)
        if "d" in self.inputs:
            parts.append(d[:, None])
        if "y" in self.inputs:
            # clipped like scanpy's scale(max_value=10): a rare gene's lone count would
            # otherwise reach z-scores near 40 and saturate the generator at once
            if offset is not None:
                y = y * torch.exp(-offset)[:, None]
            parts.append(((torch.log1p(y) - self.y_mean) / self.y_scale).clamp(-10.0, 10.0))
        return torch.cat(parts, dim=1)


def represent_z(logits: torch.Tensor, z_type: str, temperature: float, training: bool) -> torch.Tensor:
    """Turn generator logits into the Z the heads consume.

    binary: straight-through 0/1; soft: sigmoid; gumbel: a logistic-noise relaxation at the given
    temperature while training, its noise-free value at prediction; continuous: the logits
    themselves (a linear factor, for hidden factors that are gradients rather than groups).
    """
    if z_type == "continuous":
        return logits
    if z_type == "soft":
        return torch.sigmoid(logits)
    if z_type == "binary":
        return straight_through(torch.sigmoid(logits))
    if z_type == "gumbel":
        if training:
            u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
            logits = logits + torch.log(u) - torch.log1p(-u)
        return torch.sigmoid(logits / temperature)
    raise ValueError(f"unknown z type {z_type!r}")


class TreatmentClassifier(nn.Module):
    """Linear logit of D on [X, Z] (or on [X] alone for the baseline)."""

    def __init__(self, in_dim: int, intercept: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_dim, 1, bias=intercept)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features).squeeze(-1)


class NBRegression(nn.Module):
    """Linear log-mean of every gene on [X, D, Z] with a per-gene dispersion.

    The inverse dispersion theta is learnt (log-parameterised) unless ``fixed_alpha`` gives the
    dispersion alpha = 1 / theta per gene.
    """

    def __init__(self, in_dim: int, n_genes: int, intercept: bool = True,
                 fixed_alpha: torch.Tensor | None = None):
        super().__init__()
        self.linear = nn.Linear(in_dim, n_genes, bias=intercept)
        if fixed_alpha is None:
            self.log_theta = nn.Parameter(torch.zeros(n_genes))
        else:
            self.register_buffer("log_theta", -torch.log(fixed_alpha.float()))

    @property
    def theta(self) -> torch.Tensor:
        return torch.exp(self.log_theta.clamp(-10.0, 10.0))

    @torch.no_grad()
    def start_from_data(self, log_mean: torch.Tensor, alpha: torch.Tensor | None) -> None:
        """Gene intercepts at the log mean normalised count, slopes at zero and (unless fixed)
        dispersions at their moment estimates: real log means span -6 to +4, and heads that
        start near 0 let the generator spend Z on a shared intercept and saturate."""
        if self.linear.bias is not None:
            self.linear.bias.copy_(log_mean)
        self.linear.weight.zero_()
        if alpha is not None and isinstance(self.log_theta, nn.Parameter):
            self.log_theta.copy_(-torch.log(alpha))

    def forward(self, features: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """Log mean of every gene; ``offset`` is the cell's log size factor."""
        out = self.linear(features)
        return out if offset is None else out + offset[:, None]


# ---------------------------------------------------------------- integrate mode


class MinibatchNorm(nn.BatchNorm1d):
    """BatchNorm that normalises a group of fewer than ``MIN_CELLS`` cells (a minibatch's tail,
    a small domain's share of it under the paired design, one rank's shard) with the running
    statistics instead: two cells give no usable mean and spread, and one gives none."""

    MIN_CELLS = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < self.MIN_CELLS:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, eps=self.eps)
        return super().forward(x)


def hidden_norm(kind: str, width: int) -> nn.Module:
    """The normalisation after a hidden layer of the encoders and decoders.

    ``layer`` normalises each cell's hidden units on their own, so a cell's code does not
    depend on the other cells of its minibatch; ``batch`` normalises each unit over the cells of
    the minibatch (running statistics at inference), as scVI's networks do; ``none`` leaves the
    layer as it is.
    """
    if kind == "layer":
        return nn.LayerNorm(width)
    if kind == "batch":
        return MinibatchNorm(width)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalisation {kind!r}; choose layer, batch or none")


class Encoder(nn.Module):
    """log1p of library-normalised counts -> posterior mean and log-variance.

    Dropout after each hidden layer (scVI's 0.1 by default) regularises the encoder: on a few
    thousand cells the validation ELBO stops improving within tens of epochs.
    """

    def __init__(self, n_genes: int, latent_dim: int, hidden: int, dropout: float = 0.0,
                 variational: bool = True, norm: str = "layer"):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_genes, hidden), hidden_norm(norm, hidden),
                                 nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), hidden_norm(norm, hidden),
                                 nn.ReLU(), nn.Dropout(dropout))
        self.mean = nn.Linear(hidden, latent_dim)
        self.logvar = nn.Linear(hidden, latent_dim) if variational else None

    def forward(self, x_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(posterior mean, log-variance); a deterministic encoder returns (code, None)."""
        h = self.net(x_norm)
        if self.logvar is None:
            return self.mean(h), None
        return self.mean(h), self.logvar(h).clamp(-10.0, 10.0)


class Decoder(nn.Module):
    """Latent -> per-gene output: log proportions (NB, and the NB part of the zero-inflated NB,
    whose per-gene zero logits come from a second head on the same hidden layers) or
    log1p-normalised values (MSE).

    With ``n_conditions`` > 0 the decoder is shared by the domains and the domain's one-hot code
    enters its input and output layers (scVI's covariate injection), so a latent position means
    the same cell state in every domain while each domain keeps its own gene-level offsets.
    ``norm`` is ``hidden_norm``'s kind after every hidden layer, or ``layer-first``: LayerNorm
    after the first hidden layer only.
    """

    def __init__(self, latent_dim: int, n_genes: int, hidden: int, likelihood: str,
                 n_conditions: int = 0, layers: int = 2, norm: str = "layer"):
        super().__init__()
        self.likelihood = likelihood
        self.n_conditions = n_conditions
        widths = [latent_dim + n_conditions] + [hidden] * layers
        kinds = (["layer"] + ["none"] * (layers - 1) if norm == "layer-first"
                 else [norm] * layers)
        self.hidden = nn.Sequential(*(part for a, b, kind in zip(widths, widths[1:], kinds)
                                      for part in (nn.Linear(a, b), hidden_norm(kind, b),
                                                   nn.ReLU())))
        self.out = nn.Linear(hidden + n_conditions, n_genes)
        self.zero_logits = (nn.Linear(hidden + n_conditions, n_genes) if likelihood == "zinb"
                            else None)

    def forward(self, z: torch.Tensor, condition: torch.Tensor | None = None,
                with_zero_logits: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The per-gene output; with ``with_zero_logits`` (zinb), also the zero logits."""
        if with_zero_logits and self.zero_logits is None:
            raise ValueError(f"a {self.likelihood} decoder has no zero logits (zinb only)")
        if self.n_conditions:
            code = F.one_hot(condition, self.n_conditions).to(z.dtype)
            h = torch.cat([self.hidden(torch.cat([z, code], dim=1)), code], dim=1)
        else:
            h = self.hidden(z)
        out = self.out(h)
        out = out if self.likelihood == "mse" else F.log_softmax(out, dim=-1)
        return (out, self.zero_logits(h)) if with_zero_logits else out


class DomainDiscriminator(nn.Module):
    """Predicts the domain of a cell from its posterior mean.

    Its input is standardised per latent dimension (batch statistics, no learnt scale), so the
    encoders cannot fool it by shrinking the whole latent space towards zero, a collapse that
    otherwise satisfies the adversary while leaving the domains apart.
    """

    def __init__(self, latent_dim: int, n_domains: int, hidden: int = 128):
        super().__init__()
        self.register_buffer("center", torch.zeros(latent_dim))
        self.register_buffer("spread", torch.ones(()))
        self.net = mlp(latent_dim, hidden, n_domains, layers=2)

    def forward(self, z_mean: torch.Tensor) -> torch.Tensor:
        if self.training and z_mean.shape[0] > 1:
            # batch statistics, detached: no gradient path through them for encoders to exploit
            with torch.no_grad():
                center = z_mean.float().mean(dim=0)
                spread = z_mean.float().std(dim=0).mean().clamp_min(1e-6)
                self.center.lerp_(center, 0.1)
                self.spread.lerp_(spread, 0.1)
        else:
            center, spread = self.center, self.spread
        return self.net((z_mean - center) / spread)


class PriorDiscriminator(nn.Module):
    """Tells a minibatch of latent codes from a minibatch of prior draws (logits: code,
    prior). Each input also sees its own minibatch's quantiles per dimension (a generalisation
    of the minibatch statistics of progressive GANs): without them an encoder can send every
    cell to one point the discriminator currently believes, and chase it from point to point;
    with the mean and spread alone a minibatch with the right moments but the wrong shape (one
    lump per cell type) passes; with the quantiles the shape of each marginal is judged."""

    QUANTILES = (0.05, 0.15, 0.3, 0.5, 0.7, 0.85, 0.95)

    def __init__(self, latent_dim: int, hidden: int = 128):
        super().__init__()
        self.register_buffer("levels", torch.tensor(self.QUANTILES), persistent=False)
        self.net = mlp((1 + len(self.QUANTILES)) * latent_dim, hidden, 2, layers=2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[0] > 1:
            q = torch.quantile(z, self.levels.to(z.dtype), dim=0)  # (levels, dims)
        else:
            q = z.expand(len(self.QUANTILES), -1)
        return self.net(torch.cat([z, q.T.reshape(1, -1).expand(z.shape[0], -1)], dim=1))
