"""advcli: adversarial and alternating training of latent-variable models on single-cell counts.

The models are imported lazily so that `advcli --help` does not wait for torch.
"""

__version__ = "0.1.0"
__all__ = ["AAEModel", "ConfounderModel", "DisentangleModel", "IntegrationModel",
           "read_backed", "__version__"]


def __getattr__(name: str):
    if name == "read_backed":
        from .data import read_backed

        return read_backed
    if name in __all__[:-2]:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'advcli' has no attribute {name!r}")
