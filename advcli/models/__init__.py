"""The models, by mode name. A new model is one file here with its BaseModel subclass and one
entry in MODELS (and its config in ``advcli.config.CONFIGS``)."""

from __future__ import annotations

from .aae import AAEModel
from .base import BaseModel
from .confounder import ConfounderModel
from .disentangle import DisentangleModel
from .integrate import IntegrationModel

MODELS: dict[str, type[BaseModel]] = {"confounder": ConfounderModel,
                                      "integrate": IntegrationModel, "aae": AAEModel,
                                      "disentangle": DisentangleModel}


def load(payload: dict, path="model") -> BaseModel:
    """The model object for a loaded model file, whatever its mode."""
    return MODELS[payload["mode"]].from_payload(payload, path)


__all__ = ["MODELS", "AAEModel", "BaseModel", "ConfounderModel", "DisentangleModel",
           "IntegrationModel", "load"]
