"""What every model shares: configuration, training through the one loop, checkpoints and
resume, the fit summary and model files.

A model (scvi-tools' "model") turns AnnData into tensors and back; its ``module`` (an
nn.Module, scvi-tools' "module") holds the math: ``players()``, ``turns()`` and
``objective()``. A subclass supplies:

* ``_setup(adata)``: read and check the data, build ``self.module``;
* ``schedule()``, ``batches(sampler)``, ``batch(idx)`` and optionally ``validate()`` for the loop;
* ``strategy_name`` and ``learning_rates()``;
* ``predict(adata)``, ``predict_into(adata)``, ``_summarise()``, ``_encoding()`` and
  ``_rebuild(payload)`` (the module from a model file, without data).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .. import __version__, distributed, keys
from ..config import CONFIGS, TrainConfig, config_from_dict, config_to_dict, make_config
from ..errors import InputError
from ..data import counts_anndata
from ..io import load_model, plain, save_model
from ..strategies import STRATEGIES, Strategy
from ..train import EpochCallback, TrainState, history_table, run


DEFAULT_EPOCHS = 100  # passes over the data, as scVI's benchmarks train
MIN_STEPS = 1500  # but at least this many optimizer steps: on a few hundred cells an adversary
                  # needs steps, not epochs, to act


def default_batch_size(n_cells: int, largest: int = 256) -> int:
    """A power of two between 64 and ``largest`` giving at least ~8 steps per epoch: on a few
    hundred cells, batches of 256 leave two steps an epoch and an adversary too few steps to
    act."""
    return int(min(largest, max(64, 2 ** math.floor(math.log2(max(n_cells / 8, 1))))))


CELL_PASSES = 8_000_000  # on large data, epochs stop at about this many cells seen (scVI's
                         # rule, 400 epochs at 20,000 cells): an atlas needs steps, not passes


def default_epochs(max_epochs: int | None, steps_per_epoch: int, min_steps: int = MIN_STEPS,
                   most: int = 400, n_cells: int = 0) -> int:
    """--max-epochs, else DEFAULT_EPOCHS (fewer above 80,000 ``n_cells``: CELL_PASSES cells
    seen) or as many as ``min_steps`` needs (at most ``most``)."""
    if max_epochs is not None:
        return max_epochs
    epochs = DEFAULT_EPOCHS if n_cells <= 0 else min(DEFAULT_EPOCHS,
                                                     math.ceil(CELL_PASSES / n_cells))
    return int(min(most, max(epochs, math.ceil(min_steps / steps_per_epoch))))


def epoch_cap(planned: int, n_cells: int, factor: int = 2) -> int:
    """Room past the ``planned`` epochs for a stopping rule to end training: ``factor`` times
    the plan, but no more than CELL_PASSES cells seen (nor less than the plan), so that an
    atlas, whose few planned epochs no patience can cut short, is not trained twice as long."""
    return int(min(factor * planned, max(planned, math.ceil(CELL_PASSES / max(n_cells, 1)))))


def resolve_device(device: str) -> torch.device:
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {device} was asked for, but torch sees no CUDA device.")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA "
                             "device(s), numbered from 0.")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class BaseModel:
    """Construct on an AnnData (which validates it), ``train()``, ``save()``, ``load()``,
    ``predict()``. Fitted state ends in ``_``."""

    mode = ""
    strategy_name = "simultaneous"
    progress_keys: tuple[str, ...] = ()
    monitored_losses: tuple[str, ...] = ()  # a blow-up of these stops training (train.BLOWUP)

    def __init__(self, adata, config: TrainConfig | None = None, **options):
        cfg = make_config(self.mode, **options) if config is None else replace(config, **options)
        cfg.check()
        self.config = cfg
        self.device = resolve_device(cfg.device)
        self.history_: dict | None = None
        self.summary_: dict | None = None
        self.optimizer_state_: dict | None = None
        self.train_state_: TrainState | None = None
        self.is_trained_ = False
        self.has_data_ = True
        self._setup(self._gene_selection(counts_anndata(adata, cfg.layer)))
        self.fingerprint_ = self._fingerprint()

    def _gene_selection(self, adata):
        """The cells with only the --n-top-genes most variable genes (all genes without it)."""
        n_top = getattr(self.config, "n_top_genes", None)
        if n_top is None or n_top >= adata.n_vars:
            return adata
        from ..data import count_source, highly_variable_genes, obs_column, validate_counts

        validate_counts(adata, self.config.layer)
        key = self.hvg_batch_key
        batches = None if key is None else obs_column(adata, key, "Batch").astype(str).to_numpy()
        chosen = highly_variable_genes(count_source(adata, self.config.layer), n_top, batches)
        if getattr(adata, "isbacked", False):
            return adata.select_genes(chosen)
        return adata[:, chosen].copy()

    @property
    def hvg_batch_key(self) -> str | None:
        """The obs column within which --n-top-genes ranks genes (None: all cells at once)."""
        return None

    def __repr__(self) -> str:
        state = ("trained" if self.is_trained_ else
                 f"{self.epochs_} epochs, unfinished" if self.epochs_ else "not trained")
        data = "" if not self.has_data_ else ", with its training data"
        return (f"{type(self).__name__}(mode={self.mode!r}, {len(self.genes_):,} genes, "
                f"{state}{data}; config: {type(self.config).__name__})")

    # ------------------------------------------------------------------ the loop's pieces

    def _setup(self, adata) -> None:
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        return {}

    @property
    def training_seed(self) -> int:
        return self.config.seed

    def learning_rates(self) -> dict[str, float]:
        raise NotImplementedError

    @property
    def planned_epochs(self) -> int:
        raise NotImplementedError

    def _data_summary(self) -> bytes:
        """Bytes that change when the training data change (counts per gene, cells)."""
        raise NotImplementedError

    def _fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(self.genes_).encode())
        h.update(self._data_summary())
        return h.hexdigest()

    # ------------------------------------------------------------------ training

    def train(self, max_epochs: int | None = None, on_epoch: EpochCallback | None = None,
              checkpoint_path: str | Path | None = None, checkpoint_every: int = 0,
              progress: bool = False):
        """Train, or continue a run that was interrupted or loaded with its data.

        ``max_epochs`` raises (or lowers) the epoch budget first. ``on_epoch(epoch, record)``
        reports progress; ``progress=True`` draws a progress bar instead. With
        ``checkpoint_path`` a resumable model file is written there every
        ``checkpoint_every`` epochs and on SIGINT / SIGTERM (which then raise
        ``TrainingInterrupted``).
        """
        if not self.has_data_:
            raise InputError("This model was loaded without data; load it with "
                             "`load(path, adata)` to continue training.")
        if max_epochs is not None:
            self.config = replace(self.config, max_epochs=int(max_epochs))
            self.config.check()
            if self.train_state_ is not None:
                self.train_state_.finished = False
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        if progress and on_epoch is None:
            from rich.console import Console

            from ..progress import EpochProgress

            with EpochProgress(self.planned_epochs, f"train {self.mode}", self.progress_keys,
                               self.epochs_, Console(stderr=True), force=True) as on_epoch:
                self._fit(on_epoch, checkpoint_path, checkpoint_every)
        else:
            self._fit(on_epoch, checkpoint_path, checkpoint_every)
        self.is_trained_ = True
        self.summary_ = self._summarise(time.perf_counter() - start_wall,
                                        time.process_time() - start_cpu)
        return self

    def _fit(self, on_epoch, checkpoint_path, checkpoint_every) -> None:
        """One run of the loop; a model may wrap it (restarts)."""
        self._run_loop(on_epoch, checkpoint_path, checkpoint_every)

    def _strategy(self) -> Strategy:
        cfg = self.config
        return STRATEGIES[self.strategy_name](self.module, self.learning_rates(),
                                              getattr(cfg, "weight_decay", 0.0),
                                              cfg.max_grad_norm)

    def _run_loop(self, on_epoch, checkpoint_path, checkpoint_every) -> None:
        strategy = self._strategy()
        if self.optimizer_state_ is not None and self.train_state_ is not None:
            strategy.load_state_dict(self.optimizer_state_)
        state = self.train_state_ or TrainState()

        def checkpoint(current: TrainState) -> None:
            self.optimizer_state_ = strategy.state_dict()
            self.train_state_ = current
            if distributed.is_main():
                self._save(checkpoint_path)

        self.train_state_ = run(self, strategy, state, on_epoch,
                                checkpoint if checkpoint_path is not None else None,
                                checkpoint_every)
        self.optimizer_state_ = strategy.state_dict()

    @property
    def epochs_(self) -> int:
        return 0 if self.train_state_ is None else len(self.train_state_.records)

    # ------------------------------------------------------------------ summary

    def _require_trained(self) -> None:
        if not self.is_trained_:
            raise InputError("The model has not finished training; call train() first (a "
                             "checkpoint resumes with `advcli fit ... --resume FILE`).")

    def _require_data(self, what: str) -> None:
        if not self.has_data_:
            raise InputError(f"A model loaded without data needs the AnnData for {what}; "
                             "pass it.")

    def _predict_inplace(self, adata, device: str | None = None, **options) -> list[str]:
        """``predict(adata, inplace=True)``: the command line's outputs written into ``adata``."""
        if adata is None:
            raise InputError("predict(inplace=True) writes into an AnnData; pass it.")
        return self.predict_into(adata, device=device or "auto", **options)

    def fit_summary(self) -> dict[str, Any]:
        self._require_trained()
        return dict(self.summary_)

    def _summarise(self, wall: float, cpu: float) -> dict[str, Any]:
        raise NotImplementedError

    # ------------------------------------------------------------------ files

    def _encoding(self) -> dict:
        raise NotImplementedError

    def begin_epoch(self) -> None:
        """Called by the loop before each epoch's first step (not when a run resumes in the
        middle of an epoch: what this sets must then come back through ``_restore_extras``)."""

    def _train_extras(self) -> dict:
        """Model-specific training state a resumed run needs (beyond the loop's)."""
        return {}

    def _restore_extras(self, extras: dict) -> None:
        pass

    def _save(self, path: str | Path) -> None:
        state = self.train_state_
        save_model({
            "format": keys.MODEL_FORMAT, "format_version": keys.FORMAT_VERSION,
            "version": __version__, "mode": self.mode, "config": config_to_dict(self.config),
            "genes": list(self.genes_), "encoding": self._encoding(),
            "state": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
            "optimizers": self.optimizer_state_,
            "history": plain(history_table(state.records if state else [])),
            "summary": plain(self.summary_) if self.is_trained_ else None,
            "train_state": None if state is None else {
                **state.to_payload(), "records": plain(state.records),
                "fingerprint": self.fingerprint_, "extras": plain(self._train_extras())},
        }, path)

    def save(self, path: str | Path) -> None:
        """Write the model file (trained state, optimizer states and what resuming needs)."""
        self._require_trained()
        self._save(path)

    @classmethod
    def load(cls, path: str | Path, adata=None):
        """A model from its file. With ``adata`` (the training data) it can also continue
        training; without, it predicts on data you pass."""
        return cls.from_payload(load_model(path, mode=cls.mode), path, adata)

    @classmethod
    def from_payload(cls, payload: dict, path: str | Path = "model", adata=None):
        try:
            config = config_from_dict(CONFIGS[cls.mode], cls._upgrade_config(payload["config"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"Model file '{path}' is damaged or inconsistent ({exc}).") from None
        if adata is not None:
            self = cls(adata, config)
            self.resume_from(payload, path)
            return self
        self = cls.__new__(cls)
        self.config, self.has_data_ = config, False
        self.fingerprint_ = (payload.get("train_state") or {}).get("fingerprint")
        self.device = torch.device("cpu")
        try:
            self.genes_ = [str(g) for g in payload["genes"]]
            self._rebuild(payload)
            self.module.load_state_dict(payload["state"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
            raise InputError(f"Model file '{path}' is damaged or inconsistent ({exc}).") from None
        self._restore_training(payload, path)
        return self

    @staticmethod
    def _upgrade_config(config: dict) -> dict:
        return dict(config)

    def _rebuild(self, payload: dict) -> None:
        raise NotImplementedError

    def resume_from(self, payload: dict, path: str | Path = "model") -> None:
        """Continue from a checkpoint or model file of the same configuration and data; exit 2
        (InputError) naming what differs otherwise."""
        saved = self._upgrade_config(payload["config"])
        mine = config_to_dict(self.config)
        differ = [k for k in mine if k != "device" and k in saved and saved[k] != mine[k]]
        if differ:
            shown = "; ".join(f"--{k.replace('_', '-')} {saved[k]!r} there, {mine[k]!r} now"
                              for k in differ[:6])
            raise InputError(f"'{path}' was trained with other options ({shown}); resume with "
                             "the options it was started with.")
        state = payload.get("train_state")
        if not isinstance(state, dict):
            raise InputError(f"'{path}' holds no training state to resume from.")
        if state.get("fingerprint") != self.fingerprint_:
            raise InputError(f"'{path}' was trained on other data (other cells, genes or "
                             "counts); resume it on the file it was started on.")
        try:
            self.module.load_state_dict(payload["state"])
        except (KeyError, RuntimeError) as exc:
            raise InputError(f"Model file '{path}' is damaged or inconsistent ({exc}).") from None
        self._restore_training(payload, path)

    def _restore_training(self, payload: dict, path) -> None:
        _check_finite(payload["state"], path)
        state = payload.get("train_state")
        self.optimizer_state_ = payload.get("optimizers")
        self.summary_ = payload.get("summary")
        self.train_state_ = None
        if isinstance(state, dict):
            try:
                self.train_state_ = TrainState.from_payload(state)
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(f"Model file '{path}' has a damaged training state "
                                 f"({exc}).") from None
            self._restore_extras(state.get("extras") or {})
        self.is_trained_ = self.summary_ is not None and (
            self.train_state_ is None or self.train_state_.finished)
        self.module.eval()


def _check_finite(state: dict, path) -> None:
    for name, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            raise InputError(f"Model file '{path}' holds non-finite values ({name}): the fit "
                             "that wrote it diverged. Refit with a lower --lr or with "
                             "--max-grad-norm.")
