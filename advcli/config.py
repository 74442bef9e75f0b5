"""Training configurations: one dataclass per mode flows from the command line into the model file.

Kept free of torch so the CLI starts fast and can check options before any heavy import.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import InputError


@dataclass
class ConfounderConfig:
    """Confounder mode. Defaults are chosen by the benchmarks in docs/confounder.md;
    ``preset='seed'`` restores the original design's settings."""

    treatment_key: str = "D"
    treated_level: str | None = None
    covariate_keys: list[str] | None = None  # None: uns['advcli']['covariate_keys'], else none
    layer: str | None = None
    dispersion_key: str | None = None  # var column with a fixed NB dispersion alpha per gene
    size_factors: str = "library"  # none | library | an obs column: log offset of every NB model
    sample_key: str | None = None  # obs column: test effects on pseudobulk samples
    control_genes: list[str] | None = None  # negative controls: genes D does not affect
    z_dim: int | None = None  # None: counted from the residuals (parallel analysis), 1-10
    z_type: str = "gumbel"  # binary (straight-through) | soft | gumbel (annealed) | continuous
    warm_start: bool = True  # start Z at the top residual factors of Y on [X, D]
    strategy: str = "alternating"  # alternating | joint
    generator_inputs: list[str] = field(default_factory=lambda: ["x", "d", "y"])
    hidden: int = 128
    intercept: bool = True
    bce_weight: float = 1.0
    nb_weight: float | None = None  # None: the number of genes (NB summed over genes per cell)
    dbpr_weight: float = 0.0
    outer_iterations: int = 60
    predictor_epochs: int = 1
    generator_epochs: int = 1
    patience: int = 2
    batch_size: int = 128
    lr: float = 1e-2
    lr_generator: float | None = 1e-3  # None: lr. Slower than the heads: Z must not outrun them
    lr_final_fraction: float = 0.1  # learning rates decay linearly to this fraction (1: constant)
    weight_decay: float = 0.0
    temperature_start: float = 2.0
    temperature_end: float = 0.5
    max_epochs: int | None = None
    seed: int = 0
    device: str = "auto"
    preset: str = "default"

    def check(self) -> None:
        _choice("--z-type", self.z_type, ("binary", "soft", "gumbel", "continuous"))
        _choice("--strategy", self.strategy, ("alternating", "joint"))
        _choice("--device", self.device, ("auto", "cpu", "cuda"))
        bad = [g for g in self.generator_inputs if g not in ("x", "d", "y")]
        if bad or not self.generator_inputs:
            raise InputError(f"--generator-inputs takes a comma list of x, d, y (got "
                             f"{','.join(self.generator_inputs) or 'nothing'}).")
        if self.z_dim is not None:
            _positive(z_dim=self.z_dim)
        _positive(hidden=self.hidden, outer_iterations=self.outer_iterations,
                  predictor_epochs=self.predictor_epochs, generator_epochs=self.generator_epochs,
                  batch_size=self.batch_size, lr=self.lr, temperature_end=self.temperature_end,
                  temperature_start=self.temperature_start)
        _positive(lr_final_fraction=self.lr_final_fraction)
        _non_negative(bce_weight=self.bce_weight, dbpr_weight=self.dbpr_weight,
                      weight_decay=self.weight_decay, patience=self.patience)
        if self.nb_weight is not None:
            _non_negative(nb_weight=self.nb_weight)
        if self.max_epochs is not None:
            _positive(max_epochs=self.max_epochs)


@dataclass
class IntegrationConfig:
    """Integrate mode: one VAE per domain, a domain discriminator on the posterior means."""

    batch_key: str = "batch"
    layer: str | None = None
    latent_dim: int = 10  # 32 mixed worse (docs/integrate.md)
    hidden: int = 128
    likelihood: str = "nb"  # nb | mse
    design: str = "shared"  # shared: one encoder, one domain-conditioned decoder | paired (seed)
    adversary: str = "grl"  # grl | alternate
    adv_loss: str = "negce"  # negce | uniform | flip
    adv_weight: float = 1.0
    adv_start_epoch: int = 0  # the adversary acts from the first epoch: the domains never part
    adv_warmup_epochs: int | None = None  # None: a twentieth of the epochs
    grl_lambda: float = 1.0
    d_steps: int = 1
    e_steps: int = 1
    beta_kl: float = 1.0
    dropout: float = 0.1  # in the encoder's hidden layers (scVI's default); see docs/integrate.md
    kl_warmup_epochs: int | None = None  # None: a quarter of the epochs
    batch_size: int | None = None  # None: 64-256 cells, at least ~8 steps per epoch
    lr: float = 1e-3
    lr_discriminator: float | None = None  # None: the same as lr
    max_epochs: int | None = None
    val_fraction: float = 0.1
    patience: int = 20
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        _choice("--likelihood", self.likelihood, ("nb", "mse"))
        _choice("--design", self.design, ("shared", "paired"))
        _choice("--adversary", self.adversary, ("grl", "alternate"))
        _choice("--adv-loss", self.adv_loss, ("negce", "uniform", "flip"))
        _choice("--device", self.device, ("auto", "cpu", "cuda"))
        _positive(latent_dim=self.latent_dim, hidden=self.hidden, lr=self.lr,
                  d_steps=self.d_steps, e_steps=self.e_steps)
        if self.batch_size is not None:
            _positive(batch_size=self.batch_size)
        _non_negative(adv_weight=self.adv_weight, grl_lambda=self.grl_lambda, beta_kl=self.beta_kl,
                      patience=self.patience, adv_start_epoch=self.adv_start_epoch)
        for name in ("adv_warmup_epochs", "kl_warmup_epochs"):
            if getattr(self, name) is not None:
                _non_negative(**{name: getattr(self, name)})
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"--dropout must be in [0, 1) (got {self.dropout}).")
        if not 0.0 <= self.val_fraction < 0.5:
            raise InputError(f"--val-fraction must be in [0, 0.5) (got {self.val_fraction}).")
        if self.max_epochs is not None:
            _positive(max_epochs=self.max_epochs)


def config_to_dict(cfg) -> dict[str, Any]:
    return asdict(cfg)


def config_from_dict(cls, d: dict[str, Any]):
    """Rebuild a config from a model file, ignoring keys this version does not know."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choice(option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InputError(f"{option} must be one of {', '.join(allowed)} (got '{value}').")


def _positive(**values) -> None:
    for name, value in values.items():
        if not value > 0:
            raise InputError(f"{_option(name)} must be positive (got {value}).")


def _non_negative(**values) -> None:
    for name, value in values.items():
        if not value >= 0:
            raise InputError(f"{_option(name)} must be zero or more (got {value}).")
