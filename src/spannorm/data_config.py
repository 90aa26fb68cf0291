"""The data section of a run's config (:class:`DataConfig`): the corpus, the tokenizer and the split. It imports
neither torch nor the datasets' code (:mod:`spannorm.data`), so a config is built and checked without them."""

from __future__ import annotations

import enum
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Bound, ConfigError, check_bounds, coerce_enum, invalid, option

DEFAULT_CORPUS = "shakespeare"
EOT = "<|endoftext|>"


class Tokenizer(str, enum.Enum):
    """How text becomes token ids."""

    BYTE = "byte"  # UTF-8 bytes, vocabulary 256
    BPE = "bpe"  # byte-level BPE trained on the training documents with Hugging Face tokenizers


TOKENIZERS = "byte, bpe, or a path to a tokenizer.json or to a folder holding one"
EOS_NAMES = (EOT, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")  # an eos a tokenizer.json may name, in order


@dataclass
class DataConfig:
    """The corpus, the tokenizer and the split: each field with its doc and its bound."""

    corpus: str = option(
        DEFAULT_CORPUS,
        '"shakespeare" (the default corpus) or a path to a text file or directory',
        Bound(lambda v: isinstance(v, str) and v != "", f"{DEFAULT_CORPUS!r} or a path to a text file or directory"),
    )
    tokenizer: Any = option(
        Tokenizer.BYTE,
        "byte, bpe, or a tokenizer.json (or a folder holding one): kept as its path",
    )
    vocab_size: int = option(
        4096,
        "BPE vocabulary size (ignored for byte, 256, and for a tokenizer file: its own)",
        Bound(lambda v: isinstance(v, int) and 257 <= v <= 2**31 - 1, "an integer >= 257"),
    )
    val_fraction: float = option(
        0.1,
        "fraction of documents held out for validation",
        Bound(lambda v: isinstance(v, float) and 0.0 < v <= 0.5, "a number in (0, 0.5]"),
    )
    cache_dir: str | None = option(None, "where corpora and datasets live; None: $SPANNORM_CACHE or ~/.cache/spannorm")
    text_field: str = option(
        "text",
        ".jsonl, .jsonl.gz, .parquet and datasets folders: the field that holds a document",
        Bound(lambda v: isinstance(v, str) and v != "", "a field name"),
    )
    name_field: str | None = option(
        None,
        "... and the one that names it (the split hashes names); None: file:row number",
        Bound(lambda v: v is None or (isinstance(v, str) and v != ""), "a field name or null"),
    )

    def __post_init__(self):
        if isinstance(self.tokenizer, str) and self.tokenizer not in {t.value for t in Tokenizer}:
            self.tokenizer = str(tokenizer_path(self.tokenizer))
            file_tokenizer(self.tokenizer)  # (a file tokenizers cannot read: refused here, in one line)
        else:
            self.tokenizer = coerce_enum(Tokenizer, "data.tokenizer", self.tokenizer)
        check_bounds(self, "data")

    @property
    def tokenizer_kind(self) -> str:
        """byte, bpe or file (data.tokenizer is a tokenizer.json)."""
        return self.tokenizer.value if isinstance(self.tokenizer, Tokenizer) else "file"

    @property
    def model_vocab_size(self) -> int:
        """The vocabulary the model needs for this tokenizer."""
        if self.tokenizer_kind == "file":
            return file_tokenizer(self.tokenizer).get_vocab_size(with_added_tokens=True)
        return 256 if self.tokenizer is Tokenizer.BYTE else self.vocab_size

    def cache(self) -> Path:
        path = Path(self.cache_dir or os.environ.get("SPANNORM_CACHE") or Path.home() / ".cache" / "spannorm")
        if path.exists() and not path.is_dir():
            raise ConfigError(f"the cache {str(path)!r} (data.cache_dir, else $SPANNORM_CACHE) is not a directory")
        return path


def tokenizer_path(value: str) -> Path:
    """The absolute tokenizer.json a data.tokenizer path names: the file, or a folder's tokenizer.json (the fast
    tokenizer AutoTokenizer saves; a folder of a slow tokenizer alone is refused: convert it first)."""
    path = Path(value).expanduser().absolute()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise invalid("data.tokenizer", value, f"{TOKENIZERS} (no {str(path)!r})")
    return path


@functools.lru_cache(maxsize=8)
def _read_tokenizer(path: str, stamp: tuple[int, int]):
    from tokenizers import Tokenizer as HFTokenizer  # (here: only for a tokenizer file)

    try:
        return HFTokenizer.from_file(path)
    except Exception as e:  # (tokenizers raises its own Exception for a file it cannot read)
        raise ConfigError(f"data.tokenizer={path!r} is not a tokenizer.json tokenizers reads ({str(e)[:99]})") from None


def file_tokenizer(path: str):
    """The ``tokenizers.Tokenizer`` of a tokenizer.json (read again when the file changes)."""
    stat = Path(path).stat()
    return _read_tokenizer(path, (stat.st_mtime_ns, stat.st_size))


def file_special_tokens(path: str) -> dict[str, str]:
    """eos_token (, bos_token, pad_token) of a tokenizer.json: those its folder's tokenizer_config.json names, where
    the tokenizer has them; else as eos the first of ``EOS_NAMES`` it has ({}: none, documents then run on)."""
    tok, special = file_tokenizer(path), {}
    config = Path(path).parent / "tokenizer_config.json"
    try:
        named = json.loads(config.read_text()) if config.is_file() else {}
    except (OSError, ValueError):
        named = {}
    for key in ("eos_token", "bos_token", "pad_token"):
        value = named.get(key) if isinstance(named, dict) else None
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and tok.token_to_id(value) is not None:
            special[key] = value
    if "eos_token" not in special and (eos := next((t for t in EOS_NAMES if tok.token_to_id(t) is not None), None)):
        special["eos_token"] = eos
    return special


def absolute_corpus(corpus: str) -> str:
    """``data.corpus`` as a run records it: the default corpus by name, a path made absolute (a run resumed,
    exported or evaluated from another working directory reads the same text)."""
    return corpus if corpus == DEFAULT_CORPUS else str(Path(corpus).expanduser().absolute())
