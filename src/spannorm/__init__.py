"""spannorm: deep Transformers with SpanNorm and its peer normalization schemes.

The public names below are imported on first use (PEP 562), so that ``import spannorm.config`` and the
command line's start (``spannorm --help``, argument errors) do not load torch."""

import importlib

from .config import ConfigError, SpannormError

__version__ = "0.1.0"

_LAZY = {  # public name: the module that defines it
    "LM": "model",
    "ModelConfig": "model",
    "build_model": "model",
    "Scheme": "schemes",
    "SpanScale": "schemes",
    "InitMode": "schemes",
    "SCHEMES": "schemes",
    "NormType": "layers",
}
__all__ = [*_LAZY, "SpannormError", "ConfigError"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'spannorm' has no attribute {name!r}")
