"""Training configurations: one dataclass per mode, the single source of the options.

Every field carries its help text and option group as metadata: `advcli fit`'s options, its
``--help`` and docs/cli.md are generated from these classes, so a default is written once, here.
Kept free of torch so the CLI starts fast and checks options before any heavy import.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from .errors import InputError

TRAINING = "Training (both modes)"
CONFOUNDER = "Confounder mode"
INTEGRATE = "Integrate mode"
LATENT = "Latent models (integrate, aae, disentangle)"
AAE = "AAE mode"
DISENTANGLE = "Disentangle mode"


def option(default: Any, help: str, group: str, *, shown: str | None = None,
           choices: tuple[str, ...] | None = None, factory=None):
    """A config field with its command-line help. ``shown`` replaces the default in the help
    (for a None that means "chosen from the data"); ``choices`` are checked and listed."""
    meta = {"help": help, "group": group, "shown": shown, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Options every mode shares; each mode's class may give them other defaults."""

    layer: str | None = option(None, "Counts layer to use instead of X; 'raw' reads adata.raw "
                               "(and its genes) when there is no layer of that name.",
                               TRAINING, shown="X")
    n_top_genes: int | None = option(None, "Train on the N most variable genes (the Seurat v3 "
                                     "rule on counts, ranked within each batch or condition); "
                                     "predict then reads those genes from any file.", TRAINING,
                                     shown="all genes")
    seed: int = option(0, "Random seed: the same seed gives the same model.", TRAINING)
    device: str = option("auto", "Where to train: auto (a GPU if torch sees one), cpu, cuda or "
                         "cuda:N.", TRAINING)
    precision: str = option("fp32", "Arithmetic of training: fp32, or bf16 (mixed precision: "
                            "the layers' matrix products in bfloat16, every loss in float32; "
                            "for GPUs with bfloat16 units).", TRAINING, choices=("fp32", "bf16"))
    max_epochs: int | None = option(None, "Upper bound on passes over the data, all phases "
                                    "counted.", TRAINING, shown="no bound")
    batch_size: int | None = option(None, "Cells per minibatch.", TRAINING)
    lr: float = option(1e-3, "Learning rate.", TRAINING)
    patience: int = option(20, "Epochs without improvement before a phase (or training) "
                           "stops; 0 turns early stopping off.", TRAINING)
    hidden: int = option(128, "Hidden units per layer of the networks.", TRAINING)
    max_grad_norm: float | None = option(None, "Clip each player's gradient to this norm "
                                         "before its step (a guard against exploding "
                                         "updates).", TRAINING, shown="no clipping")

    def check(self) -> None:
        """Exit-2 checks of the option values (InputError), before any data is read."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(f"{_option(f.name)} must be a finite number (got {value}).")
            choices = f.metadata.get("choices")
            if choices and value is not None:
                _choice(_option(f.name), value, choices)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise InputError(f"--device must be auto, cpu, cuda or cuda:N (got '{self.device}').")
        _positive(lr=self.lr, hidden=self.hidden)
        _non_negative(patience=self.patience)
        for name in ("max_epochs", "batch_size", "max_grad_norm", "n_top_genes"):
            if getattr(self, name) is not None:
                _positive(**{name: getattr(self, name)})


@dataclass
class ConfounderConfig(TrainConfig):
    """Confounder mode. Defaults are chosen by the benchmarks in docs/confounder.md;
    ``preset='seed'`` restores the original design's settings."""

    treatment_key: str = option("D", "obs column with the binary treatment.", CONFOUNDER)
    treated_level: str | None = option(None, "Level of a two-level treatment column that means "
                                       "treated.", CONFOUNDER, shown="1, true or the 2nd level")
    covariate_keys: list[str] | None = option(
        None, "Comma list of obs columns used as covariates X (categorical ones one-hot "
        "encoded).", CONFOUNDER, shown="those the simulator recorded, else none")
    dispersion_key: str | None = option(None, "var column with a fixed NB dispersion per gene.",
                                        CONFOUNDER, shown="learned")
    size_factors: str = option("library", "Per-cell offset of every NB model: library (total "
                               "counts), none, or a numeric obs column of size factors.",
                               CONFOUNDER)
    sample_key: str | None = option(None, "obs column naming each cell's sample (donor): "
                                    "effects are tested on pseudobulk samples, not cells.",
                                    CONFOUNDER)
    control_genes: list[str] | None = option(
        None, "Negative-control genes the treatment does not affect (comma list or a file, one "
        "per line): they fix Z-hat's treatment share.", CONFOUNDER, shown="none")
    z_dim: int | None = option(None, "Columns of Z. By default, the hidden factors beyond "
                               "[X, D] that parallel analysis finds in the counts' Pearson "
                               "residuals.", CONFOUNDER,
                               shown="counted from the data, 1-10")
    z_type: str = option("gumbel", "gumbel (annealed, near-binary groups), binary (straight-"
                         "through), soft (sigmoid) or continuous (a gradient).", CONFOUNDER,
                         choices=("binary", "soft", "gumbel", "continuous"))
    warm_start: bool = option(True, "Start Z at the top residual factors of Y on [X, D] and "
                              "fit the heads before the generator moves.", CONFOUNDER)
    strategy: str = option("alternating", "alternating (freeze the heads, then the generator) "
                           "or joint (every module steps on its own loss together).",
                           CONFOUNDER, choices=("alternating", "joint"))
    generator_inputs: list[str] = option(None, "What the Z-generator sees: a comma list of x, "
                                         "d, y.", CONFOUNDER, shown="x,d,y",
                                         factory=lambda: ["x", "d", "y"])
    intercept: bool = option(True, "Intercepts in the D-classifier and the NB model.",
                             CONFOUNDER)
    bce_weight: float = option(1.0, "Weight of the D-classifier's BCE in the generator's "
                               "objective.", CONFOUNDER)
    nb_weight: float | None = option(None, "Weight of the per-gene mean NB loss in the "
                                     "generator's objective.", CONFOUNDER,
                                     shown="the number of genes")
    dbpr_weight: float = option(0.0, "Weight of the deviance-based partial R^2 reward "
                                "(subtracted).", CONFOUNDER)
    outer_iterations: int = option(60, "Alternating iterations (odd: heads, even: generator).",
                                   CONFOUNDER)
    predictor_epochs: int = option(1, "Head epochs per odd iteration.", CONFOUNDER)
    generator_epochs: int = option(1, "Generator epochs per even iteration.", CONFOUNDER)
    lr_generator: float | None = option(1e-3, "The Z-generator's learning rate (slower than "
                                        "the heads': Z must not outrun them).", CONFOUNDER)
    lr_final_fraction: float = option(0.1, "Learning rates decay linearly to this fraction "
                                      "(1: constant).", CONFOUNDER)
    weight_decay: float = option(0.0, "Adam weight decay.", CONFOUNDER)
    temperature_start: float = option(2.0, "Gumbel temperature at the first iteration.",
                                      CONFOUNDER)
    temperature_end: float = option(0.5, "Gumbel temperature at the last iteration.",
                                    CONFOUNDER)
    preset: str = option("default", "seed: the original design's settings (batch 32, lr 1e-3, "
                         "10 iterations, binary Z, k = 1, no intercepts, no size factors).",
                         CONFOUNDER, choices=("default", "seed"))
    # shared options with this mode's defaults
    max_epochs: int | None = option(None, "Upper bound on passes over the data, all phases "
                                    "counted.", TRAINING, shown="the schedule's length")
    batch_size: int | None = option(None, "Cells per minibatch.", TRAINING,
                                    shown="128, or about 24 steps an epoch on over 3,072 "
                                    "cells (at most 1,024 cells and 10^6 counts)")
    lr: float = option(1e-2, "Learning rate.", TRAINING)
    patience: int = option(2, "Epochs without improvement before a phase (or training) stops; "
                           "0 turns early stopping off.", TRAINING)

    def check(self) -> None:
        super().check()
        bad = [g for g in self.generator_inputs if g not in ("x", "d", "y")]
        if bad or not self.generator_inputs:
            raise InputError(f"--generator-inputs takes a comma list of x, d, y (got "
                             f"{','.join(self.generator_inputs) or 'nothing'}).")
        if self.z_dim is not None:
            _positive(z_dim=self.z_dim)
        _positive(outer_iterations=self.outer_iterations,
                  predictor_epochs=self.predictor_epochs, generator_epochs=self.generator_epochs,
                  temperature_end=self.temperature_end, temperature_start=self.temperature_start,
                  lr_final_fraction=self.lr_final_fraction)
        if self.lr_generator is not None:
            _positive(lr_generator=self.lr_generator)
        _non_negative(bce_weight=self.bce_weight, dbpr_weight=self.dbpr_weight,
                      weight_decay=self.weight_decay)
        if self.nb_weight is not None:
            _non_negative(nb_weight=self.nb_weight)


LIKELIHOOD_HELP = ("nb (learned dispersion per gene), zinb (integrate mode: NB with a "
                   "probability per cell and gene that a count is an extra zero) or mse (on "
                   "log1p-normalised values).")
ADV_LOSS_HELP = ("What the encoder minimises: negce (minus the discriminator's "
                 "cross-entropy), chance (negce capped at chance, -ln of the class's share: "
                 "integrate mode caps the cells whose domain is scarce in their composition "
                 "cluster, so domains are not drawn into types they lack; aae and disentangle "
                 "cap every cell at 1/K), uniform (towards 1/K) or flip (towards a wrong "
                 "class).")
ADV_LOSS_CHOICES = ("negce", "chance", "uniform", "flip")


@dataclass
class LatentModelConfig(TrainConfig):
    """What the count autoencoders (integrate, aae, disentangle) share: a latent space, a
    likelihood, an adversary and its loss."""

    latent_dim: int = option(10, "Latent dimensions.", LATENT)
    likelihood: str = option("nb", LIKELIHOOD_HELP, LATENT, choices=("nb", "mse"))
    adversary: str = option("grl", "grl (gradient reversal: one backward, every player steps) "
                            "or alternate (the discriminator steps with the encoder frozen, then "
                            "the encoder with the discriminator frozen).", LATENT,
                            choices=("grl", "alternate"))
    adv_loss: str = option("negce", ADV_LOSS_HELP, LATENT, choices=ADV_LOSS_CHOICES)
    adv_weight: float = option(1.0, "Weight of the adversarial term.", LATENT)
    lr_discriminator: float | None = option(None, "The discriminator's learning rate.", LATENT,
                                            shown="--lr")
    dropout: float = option(0.1, "Dropout after the encoder's hidden layers.", LATENT)
    max_epochs: int | None = option(None, "Upper bound on passes over the data, all phases "
                                    "counted.", TRAINING, shown="100, or enough for 1,500 steps "
                                    "(at most 400)")
    batch_size: int | None = option(None, "Cells per minibatch.", TRAINING,
                                    shown="64-256, at least ~8 steps per epoch")

    def check(self) -> None:
        super().check()
        _positive(latent_dim=self.latent_dim)
        _non_negative(adv_weight=self.adv_weight)
        if self.lr_discriminator is not None:
            _positive(lr_discriminator=self.lr_discriminator)
        _fraction(dropout=self.dropout)


@dataclass
class IntegrationConfig(LatentModelConfig):
    """Integrate mode: VAEs over the domains, a domain discriminator on the posterior means."""

    batch_key: str = option("batch", "obs column with the domains (two or more).", INTEGRATE)
    design: str = option("shared", "shared (one encoder, a domain-conditioned decoder) or "
                         "paired (one VAE per domain).", INTEGRATE, choices=("shared", "paired"))
    tie: float = option(0.1, "paired design: after each step, each domain's encoder and "
                        "decoder weights move this fraction of the way to the domains' average "
                        "(0: untied VAEs, 1: identical).", INTEGRATE)
    adv_start_epoch: int = option(0, "Epoch at which the adversary starts acting.", INTEGRATE)
    adv_warmup_epochs: int | None = option(None, "Epochs over which the adversarial weight "
                                           "ramps in.", INTEGRATE, shown="a twentieth of the "
                                           "planned epochs")
    grl_lambda: float = option(1.0, "Gradient-reversal factor (multiplies --adv-weight under "
                               "--adversary grl).", INTEGRATE)
    d_steps: int = option(3, "Discriminator steps per minibatch (under grl, the extra steps "
                          "come before the joint one).",
                          INTEGRATE)
    e_steps: int = option(1, "Encoder steps per minibatch (--adversary alternate).", INTEGRATE)
    batch_size: int | None = option(None, "Cells per minibatch.", TRAINING,
                                    shown="64-128, at least ~8 steps per epoch")
    max_epochs: int | None = option(None, "Upper bound on passes over the data; the warm-ups "
                                    "are laid out over it when given.", TRAINING,
                                    shown="twice the planned epochs (100, or enough for 1,500 "
                                    "steps, at most 400), within ~8 x 10^6 cells seen; the "
                                    "stopping rule ends most fits before")
    composition_clusters: int = option(10, "Clusters of the latent space within which the "
                                       "adversary counts every domain at its share of all "
                                       "cells, so that domains holding cell types in different "
                                       "proportions are not pushed to merge them (0: off).",
                                       INTEGRATE)
    dropout: float = option(0.2, "Dropout after the encoder's hidden layers.", LATENT)
    likelihood: str = option("nb", LIKELIHOOD_HELP, LATENT, choices=("nb", "zinb", "mse"))
    decoder_layers: int = option(2, "Hidden layers of the decoder. One keeps cell types "
                                 "further apart but leaves strong batch effects less mixed "
                                 "(docs/integrate.md).", INTEGRATE)
    norm: str = option("layer", "Normalisation after the encoder's hidden layers (and the "
                       "decoder's: see --decoder-norm): layer (each cell on its own) or batch "
                       "(each unit over the minibatch's cells, running statistics at "
                       "inference).", INTEGRATE,
                       choices=("layer", "batch"))
    decoder_norm: str | None = option(None, "Normalisation in the decoder: layer-first "
                                      "(LayerNorm after its first hidden layer only), layer, "
                                      "batch (after each hidden layer) or none.", INTEGRATE,
                                      shown="layer-first with --norm layer, batch with --norm "
                                      "batch", choices=("layer-first", "layer", "batch", "none"))
    beta_kl: float = option(0.25, "Weight of the KL term (reached after the warm-up).",
                            INTEGRATE)
    kl_warmup_epochs: int | None = option(None, "Epochs over which the KL weight ramps in.",
                                          INTEGRATE, shown="a quarter of the planned "
                                          "epochs")
    kl_free_bits: float = option(1.0, "Nats of KL per latent dimension (averaged over a "
                                 "minibatch) that are not penalised, so the KL term switches "
                                 "off no dimension (0: the plain KL).", INTEGRATE)
    input_thinning: float = option(0.0, "In training, the encoder reads each cell's counts "
                                   "binomially thinned to a depth fraction drawn between 1 - "
                                   "this and 1 (0: off). Tightens the cell types' clusters but "
                                   "mixes strong batch effects less (docs/integrate.md).",
                                   INTEGRATE)
    val_fraction: float = option(0.1, "Held-out cells for early stopping on the validation "
                                 "ELBO (at most 10,000).", INTEGRATE)

    def check(self) -> None:
        super().check()
        _positive(d_steps=self.d_steps, e_steps=self.e_steps, decoder_layers=self.decoder_layers)
        _fraction(input_thinning=self.input_thinning)
        _non_negative(grl_lambda=self.grl_lambda, beta_kl=self.beta_kl,
                      kl_free_bits=self.kl_free_bits, adv_start_epoch=self.adv_start_epoch,
                      composition_clusters=self.composition_clusters)
        for name in ("adv_warmup_epochs", "kl_warmup_epochs"):
            if getattr(self, name) is not None:
                _non_negative(**{name: getattr(self, name)})
        if not 0.0 <= self.tie <= 1.0:
            raise InputError(f"--tie must be between 0 and 1 (got {self.tie}).")
        if not 0.0 <= self.val_fraction < 0.5:
            raise InputError(f"--val-fraction must be in [0, 0.5) (got {self.val_fraction}).")


@dataclass
class AAEConfig(LatentModelConfig):
    """Adversarial autoencoder: a deterministic code pushed to the prior N(0, I) by a
    discriminator, a class-conditioned decoder and an attribute-regularised dimension."""

    condition_key: str | None = option(None, "obs column with a class the decoder is "
                                       "conditioned on (batch, cell type, donor).", AAE,
                                       shown="no condition")
    attribute_key: str | None = option(None, "Numeric obs column tied to one latent dimension "
                                       "by attribute regularisation.", AAE, shown="none")
    attribute_dim: int = option(0, "The latent dimension that orders cells by the attribute.",
                                AAE)
    ar_weight: float = option(3.0, "Weight of the attribute-regularisation loss.", AAE)
    sw_weight: float = option(30.0, "Weight of the sliced Wasserstein distance of each "
                              "minibatch's codes to N(0, I), beside the prior discriminator "
                              "(0: the discriminator alone).", AAE)
    encoder_genes: int = option(2000, "The encoder reads this many most variable genes (0: "
                                "all); the decoder reconstructs every gene.", AAE)
    encoder_pcs: int = option(50, "The encoder reads this many principal components of those "
                              "genes' log1p-normalised expression, fitted on the training "
                              "cells (0: the genes themselves).", AAE)
    adversary: str = option("alternate", "grl (gradient reversal: one backward, every player "
                            "steps) or alternate (the discriminator steps with the encoder "
                            "frozen, then the encoder with the discriminator frozen).", LATENT,
                            choices=("grl", "alternate"))
    adv_loss: str = option("flip", ADV_LOSS_HELP, LATENT, choices=ADV_LOSS_CHOICES)

    lr: float = option(3e-4, "Learning rate.", TRAINING)
    max_epochs: int | None = option(None, "Upper bound on passes over the data, all phases "
                                    "counted.", TRAINING, shown="100, or enough for 6,000 steps "
                                    "(at most 1,000)")

    def check(self) -> None:
        super().check()
        _non_negative(ar_weight=self.ar_weight, sw_weight=self.sw_weight,
                      encoder_genes=self.encoder_genes, encoder_pcs=self.encoder_pcs)
        if not 0 <= self.attribute_dim < self.latent_dim:
            raise InputError(f"--attribute-dim must be a latent dimension, 0 to "
                             f"{self.latent_dim - 1} (got {self.attribute_dim}).")


@dataclass
class DisentangleConfig(LatentModelConfig):
    """A VAE whose latent splits into s (carries the label) and z (cleaned of it by an
    adversary), with swap reconstructions and a real-vs-generated discriminator."""

    label_key: str = option("cell_type", "obs column with the label s must carry.",
                            DISENTANGLE)
    s_dim: int = option(8, "Dimensions of s, the label-carrying part.", DISENTANGLE)
    swap_weight: float = option(1.0, "Weight of reconstructing a cell from its z and the s of "
                                "another cell of its class.", DISENTANGLE)
    gan_weight: float = option(0.1, "Weight of the real-vs-generated adversary on decoded "
                               "cells.", DISENTANGLE)
    label_weight: float = option(30.0, "Weight of the cross-entropy of a linear read-out of the "
                                 "label from s.", DISENTANGLE)
    adv_loss: str = option("uniform", ADV_LOSS_HELP, LATENT, choices=ADV_LOSS_CHOICES)
    beta_kl: float = option(1.0, "Weight of the KL term of z.", DISENTANGLE)
    adv_weight: float = option(30.0, "Weight of the adversarial term.", LATENT)
    lr_discriminator: float | None = option(None, "The adversaries' learning rate.", LATENT,
                                            shown="3 x --lr")

    def check(self) -> None:
        super().check()
        _positive(s_dim=self.s_dim)
        _non_negative(swap_weight=self.swap_weight, gan_weight=self.gan_weight,
                      beta_kl=self.beta_kl, label_weight=self.label_weight)


CONFIGS: dict[str, type[TrainConfig]] = {"confounder": ConfounderConfig,
                                         "integrate": IntegrationConfig, "aae": AAEConfig,
                                         "disentangle": DisentangleConfig}

SEED_PRESET = dict(batch_size=32, lr=1e-3, lr_generator=None, outer_iterations=10,
                   predictor_epochs=1, generator_epochs=1, intercept=False, z_type="binary",
                   nb_weight=1.0, patience=0, lr_final_fraction=1.0, size_factors="none",
                   warm_start=False, z_dim=1, preset="seed")


def make_config(mode: str, **options) -> TrainConfig:
    """A mode's config from its defaults, a preset (confounder ``preset='seed'``), then the
    explicit options, which win. Unknown options are a TypeError, as for any dataclass."""
    cls = CONFIGS[mode]
    base = cls(**SEED_PRESET) if mode == "confounder" and options.get("preset") == "seed" else cls()
    return replace(base, **options)


def config_to_dict(cfg) -> dict[str, Any]:
    return asdict(cfg)


def config_from_dict(cls, d: dict[str, Any]):
    """Rebuild a config from a model file, ignoring keys this version does not know."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def default_of(f) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


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


def _fraction(**values) -> None:
    for name, value in values.items():
        if not 0.0 <= value < 1.0:
            raise InputError(f"{_option(name)} must be in [0, 1) (got {value}).")
