"""spannorm: deep Transformers with SpanNorm and its peer normalization schemes.

The configuration names are imported here; ``LM``, ``build_model`` and ``SCHEMES`` import torch, so they are
imported on first use (PEP 562): ``import spannorm.config`` or ``spannorm.model_config`` and the command
line's start (``spannorm --help``, argument errors) do not load torch."""

import importlib

from .config import ConfigError, SpannormError
from .model_config import InitMode, ModelConfig, NormType, Scheme, SpanScale

__version__ = "0.1.0"

_LAZY = {"LM": "model", "build_model": "model", "SCHEMES": "schemes"}  # public name: the module that defines it
__all__ = [*_LAZY, "ModelConfig", "Scheme", "SpanScale", "InitMode", "NormType", "SpannormError", "ConfigError"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
