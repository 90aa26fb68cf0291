"""spannorm: deep Transformers with SpanNorm and its peer normalization schemes.

The configuration names are imported here; ``LM``, ``build_model`` and ``SCHEMES`` import torch, so they
are imported on first use (``__getattr__``): importing ``spannorm.model_config`` or ``spannorm.config``
does not import torch.
"""

from .config import ConfigError, SpannormError
from .model_config import InitMode, ModelConfig, NormType, Scheme, SpanScale

__all__ = [
    "LM",
    "ModelConfig",
    "build_model",
    "Scheme",
    "SpanScale",
    "InitMode",
    "NormType",
    "SCHEMES",
    "SpannormError",
    "ConfigError",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("LM", "build_model"):
        from . import model

        return getattr(model, name)
    if name == "SCHEMES":
        from .schemes import SCHEMES

        return SCHEMES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
