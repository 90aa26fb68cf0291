"""spannorm: deep Transformers with SpanNorm and its peer normalization schemes.

The configuration names are imported here; ``LM``, ``build_model`` and ``SCHEMES`` import torch, so they are
imported on first use (PEP 562): ``import spannorm.config`` or ``spannorm.model_config`` and the command
line's start (``spannorm --help``, argument errors) do not load torch.

After ``import spannorm``, ``transformers.AutoModelForCausalLM.from_pretrained(folder)`` loads a folder of
``spannorm export``: ``spannorm.hf`` registers its classes with the Auto classes, and is imported as soon as
transformers is (at once if it already is, else right after the program imports it), never before."""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from .config import ConfigError, SpannormError
from .model_config import InitMode, ModelConfig, NormType, QKNorm, Scheme, SpanScale

__version__ = "0.1.0"

_LAZY = {"LM": "model", "build_model": "model", "SCHEMES": "schemes"}  # public name: the module that defines it
__all__ = [
    *_LAZY,
    "ModelConfig",
    "Scheme",
    "SpanScale",
    "InitMode",
    "NormType",
    "QKNorm",
    "SpannormError",
    "ConfigError",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_hf() -> None:
    if "spannorm.hf" in sys.modules:  # (being imported: it imports transformers itself, and registers)
        return
    try:
        importlib.import_module(".hf", __name__)
    except Exception as e:  # (a transformers spannorm.hf cannot use: the program's import of it goes on)
        warnings.warn(f"spannorm: the Auto classes do not know spannorm models: {e}", stacklevel=2)


class _AfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when transformers is first imported, has it register spannorm.hf once it has run."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)  # (the finders that really find it)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def exec_module(module, run=run):
                run(module)
                _register_hf()

            spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    _register_hf()
elif importlib.util.find_spec("transformers") is not None:
    sys.meta_path.insert(0, _AfterTransformers())
