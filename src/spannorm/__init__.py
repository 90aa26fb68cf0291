"""spannorm: deep Transformers with SpanNorm and its peer normalization schemes."""

from .config import ConfigError, SpannormError
from .layers import NormType
from .model import LM, ModelConfig, build_model
from .schemes import SCHEMES, InitMode, Scheme, SpanScale

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
