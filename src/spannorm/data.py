"""Corpora, tokenizers and memmap token datasets.

The default corpus is the modern-spelling Shakespeare plays and poems, fetched on first use
(:mod:`spannorm.corpus_fetch`). Any local text file or directory works too, and records (JSON lines,
Parquet, a saved datasets dataset).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import tqdm

from .config import ConfigError, SpannormError
from .corpus_fetch import fetch_shakespeare
from .data_config import (
    DEFAULT_CORPUS,
    EOT,
    DataConfig,
    Tokenizer,
    file_special_tokens,
    file_tokenizer,
)
from .files import atomic_dir, atomic_write_text, dumps, os_error, remove_dir, sha256_file

# --- corpora ---------------------------------------------------------------------------


def dataset_identity(dataset: Path, corpus: str) -> dict:
    """What a run records of the dataset it trains on: the prepared directory's name (tokenizer, vocabulary and
    a hash of every document's name and text and of the split's settings), its files' sha256 and ``corpus``
    (where it was read, :func:`absolute_corpus`)."""
    meta = json.loads((dataset / "meta.json").read_text())
    files = meta.get("files", {})
    identity = {"dataset": dataset.name, "corpus": corpus, "files": {f: v["sha256"] for f, v in files.items()}}
    return identity | ({"special_tokens": meta["special_tokens"]} if "special_tokens" in meta else {})


def load_documents(corpus: str, cache: Path, fields=None) -> list[tuple[str, str]]:
    """(name, text) pairs (:func:`documents_at`; ``fields``: :class:`Fields`, default text and file:row names)."""
    return list(iter_documents(corpus, cache, fields))


def iter_documents(corpus: str, cache: Path, fields=None):
    """:func:`load_documents` one document at a time (each pass reads the corpus again: bounded memory)."""
    if corpus == DEFAULT_CORPUS:
        root = fetch_shakespeare(cache)
    else:
        root = Path(corpus).expanduser()
        if not root.exists():
            raise ConfigError(
                f"data.corpus={corpus!r} does not exist: expected {DEFAULT_CORPUS!r} "
                "or a path to a text file or directory"
            )
    return iter_documents_at(root, f"data.corpus={corpus!r}", "corpus file", fields)


class Fields(NamedTuple):
    """Where a document is in a record (a JSON line, a Parquet or datasets row): data.text_field, data.name_field."""

    text: str = "text"
    name: str | None = None


def documents_at(root: Path, what: str, file_word: str, fields: Fields | None = None) -> list[tuple[str, str]]:
    """(name, text) pairs of a file or of a directory's files (``what``, ``file_word``: how errors call them): a text
    file is one document; a .jsonl, .jsonl.gz or .parquet file and a Hugging Face datasets folder (save_to_disk)
    hold one per record, named by ``fields.name`` or by file and row number. A path is always a path:
    ``./shakespeare`` is the user's directory, never the default corpus."""
    return list(iter_documents_at(root, what, file_word, fields))


def iter_documents_at(root: Path, what: str, file_word: str, fields: Fields | None = None):
    """:func:`documents_at` one document at a time; an empty corpus is refused when the pass ends."""
    fields = fields or Fields()
    found = False
    if root.is_dir() and (root / "dataset_info.json").is_file() and (root / "state.json").is_file():
        for doc in _records(_datasets_rows(root, fields), root.name, f"the datasets folder {str(root)!r}", fields):
            found = True
            yield doc
        paths = []
    elif root.is_file():
        paths = [root]
    else:
        hidden = lambda p: any(part.startswith(".") for part in p.relative_to(root).parts)  # noqa: E731
        paths = sorted(p for p in root.rglob("*") if p.is_file() and not hidden(p))
    for p in paths:
        name = str(p.relative_to(root)) if root.is_dir() else p.name
        where = f"{file_word} {str(p)!r}"
        if p.name.endswith((".jsonl", ".jsonl.gz")):
            records = _records(_jsonl_rows(p, where), name, where, fields)
        elif p.suffix == ".parquet":
            records = _records(_parquet_rows(p, where, fields), name, where, fields)
        elif p.suffix in (".json", ".arrow", ".gz", ".zst", ".bz2", ".xz", ".zip", ".tar"):
            raise ConfigError(
                f"{where} is not text, and not a format spannorm reads: expected text files, .jsonl, .jsonl.gz, "
                ".parquet or a datasets folder (save_to_disk)"
            )
        else:
            try:
                text = p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise ConfigError(f"{where} is not UTF-8 text") from None
            if "\0" in text:
                raise ConfigError(f"{where} holds NUL bytes: a binary file, not text")
            records = [(name, text)] if text.strip() else []
        for doc in records:
            found = True
            yield doc
    if not found:
        raise ConfigError(f"{what} is empty: it holds no non-empty text file or record")


def _records(rows, name: str, where: str, fields: Fields):
    """(name, text) of each record of ``rows`` (dicts) with a non-empty text: one line names a missing field."""
    for i, row in enumerate(rows, 1):
        text = row.get(fields.text) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise ConfigError(
                f"{where} record {i} has no text field {fields.text!r} (data.text_field) holding a string"
            )
        label = f"{name}:{i}"
        if fields.name is not None:
            if not isinstance(row.get(fields.name), (str, int)):
                raise ConfigError(f"{where} record {i} has no name field {fields.name!r} (data.name_field)")
            label = str(row[fields.name])
        if text.strip():
            yield label, text


def _jsonl_rows(path: Path, where: str):
    """The JSON value of each non-blank line of a .jsonl (or gzip-compressed .jsonl.gz) file."""
    try:
        with (
            gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")
        ) as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError:
                        raise ConfigError(f"{where} line {i} is not JSON: expected one JSON object a line") from None
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise ConfigError(f"{where} cannot be read as JSON lines ({type(e).__name__})") from None


def _parquet_rows(path: Path, where: str, fields: Fields):
    try:
        import pyarrow.parquet as pq  # (here: pyarrow, an optional dependency, only for Parquet corpora)
    except ImportError:
        raise ConfigError(f"{where}: reading Parquet needs pyarrow: pip install 'spannorm[data]'") from None
    try:
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
        keep = [c for c in (fields.text, fields.name) if c is not None and c in names]
        for batch in table.iter_batches(batch_size=1024, columns=keep):  # (one batch in memory at a time)
            yield from batch.to_pylist()
    except Exception as e:  # (pyarrow's ArrowInvalid and kin)
        raise ConfigError(f"{where} cannot be read as Parquet ({type(e).__name__})") from None


def _datasets_rows(root: Path, fields: Fields):
    try:
        import datasets  # (here: an optional dependency, only for datasets folders; it never reaches a hub here)
    except ImportError:
        raise ConfigError(
            f"{str(root)!r}: reading a datasets folder needs datasets: pip install 'spannorm[data]'"
        ) from None
    try:
        dataset = datasets.load_from_disk(str(root))
    except Exception as e:  # (datasets raises many kinds)
        raise ConfigError(f"{str(root)!r} cannot be read as a datasets folder ({type(e).__name__})") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise ConfigError(f"{str(root)!r} holds the splits {sorted(dataset)}: give one split's folder")
    keep = [c for c in (fields.text, fields.name) if c is not None and c in dataset.column_names]
    if not keep:  # (no such column: every row lacks the field, which _records names)
        yield from ({} for _ in range(len(dataset)))
        return
    for batch in dataset.select_columns(keep).iter(batch_size=1024):  # (memory-mapped; a batch at a time)
        yield from (dict(zip(keep, values)) for values in zip(*(batch[c] for c in keep)))


def split_documents(docs: list[tuple[str, str]], val_fraction: float):
    """Deterministic train/validation split by document (by sha256 of the name).

    A one-document corpus is split by position instead: its last ``val_fraction`` goes to
    validation (reported in the dataset's meta.json as ``split: position``).
    """
    if len(docs) == 1:
        return (*split_position(docs[0], val_fraction), "position")
    val_names = validation_names([name for name, _ in docs], val_fraction)
    return ([d for d in docs if d[0] not in val_names], [d for d in docs if d[0] in val_names], "document")


def split_position(doc: tuple[str, str], val_fraction: float):
    """([train part], [validation part]) of a one-document corpus: its last ``val_fraction`` is validation."""
    name, text = doc
    cut = int(len(text) * (1 - val_fraction))
    return [(name, text[:cut])], [(name, text[cut:])]


def validation_names(names: list[str], val_fraction: float) -> set[str]:
    """The names of the validation documents: the round(val_fraction · n) (at least 1, at most n − 1) whose
    names' sha256 rank first (independent of the listing order)."""
    n_val = min(len(names) - 1, max(1, round(val_fraction * len(names))))
    return set(sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())[:n_val])


# --- tokenization and datasets ------------------------------------------------------------


def _train_bpe(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


class _TokenFile:
    """An .npy file of token ids written in pieces, with plain writes (a sparse memmap would die of SIGBUS on a full
    disk): the header is written for the largest length first and rewritten, the same size, for the real one."""

    def __init__(self, path: Path, dtype):
        self.f, self.dtype, self.size, self.first = open(path, "wb"), np.dtype(dtype), 0, True
        self.f.write(self._header(10**18))

    def _header(self, n: int) -> bytes:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": self.dtype.str, "fortran_order": False, "shape": (n,)})
        return header.getvalue()

    def write(self, ids) -> None:
        ids = np.asarray(ids, dtype=self.dtype)
        self.f.write(ids.tobytes())
        self.size += ids.size

    def __enter__(self):
        return self

    def __exit__(self, kind, *_) -> None:
        with self.f:
            if kind is None:  # (the real length's header, once every id is written)
                header = self._header(self.size)
                assert len(header) == self.f.seek(0, io.SEEK_END) - self.size * self.dtype.itemsize  # (same size)
                self.f.seek(0)
                self.f.write(header)


def _encode(docs, cfg: DataConfig, tok, eos: str | None, out: _TokenFile) -> None:
    """The documents' token ids into ``out``: bytes joined by a blank line, or each document's ids (special tokens
    of the tokenizer's template not added) followed by ``eos`` (BPE's: <|endoftext|>); batch by batch."""
    if cfg.tokenizer is Tokenizer.BYTE:
        for _, text in docs:
            if not out.first:
                out.write(np.frombuffer(b"\n\n", dtype=np.uint8))
            out.write(np.frombuffer(text.encode("utf-8"), dtype=np.uint8))
            out.first = False
        return
    after = [] if eos is None else [tok.token_to_id(eos)]
    for enc in tok.encode_batch([t for _, t in docs], add_special_tokens=False):
        out.write(enc.ids + after)


def prepare(cfg: DataConfig, verify: bool = False) -> Path:
    """Tokenize the corpus into ``train.npy``/``val.npy``; cached by content and settings.

    A cached dataset is checked before use: its files' sizes against ``meta.json`` (and with ``verify`` their
    sha256); a damaged one is rebuilt. Disk errors (a full disk) are one-line errors naming the dataset.
    """
    cache = cfg.cache()
    docs = functools.partial(iter_documents, cfg.corpus, cache, Fields(cfg.text_field, cfg.name_field))
    key, names = hashlib.sha256(), []
    for name, text in docs():  # (pass 1: the names, and the key of every name and text)
        key.update(name.encode() + b"\0" + hashlib.sha256(text.encode()).digest())
        names.append(name)
    settings = [cfg.tokenizer_kind, cfg.model_vocab_size, cfg.val_fraction]
    if cfg.tokenizer_kind == "file":  # (the tokenizer's bytes and its special tokens, not its path)
        settings += [sha256_file(Path(cfg.tokenizer)), file_special_tokens(cfg.tokenizer)]
    key.update(json.dumps(settings).encode())
    out = cache / "datasets" / f"{cfg.tokenizer_kind}{cfg.model_vocab_size}-{key.hexdigest()[:16]}"
    if out.exists() or out.is_symlink():
        if (problem := dataset_damage(out, hashes=verify)) is None:
            return out
        print(f"spannorm: the cached dataset {out} is damaged ({problem}): rebuilding it", file=sys.stderr)
        try:
            remove_dir(out)
        except FileNotFoundError:  # another process removed it first
            pass
        except OSError as e:
            raise SpannormError(
                f"the cached dataset {str(out)!r} is damaged ({problem}) and cannot be removed "
                f"({e.strerror}): delete it and retry"
            ) from None
    try:
        _build(cfg, docs, names, out)
    except OSError as e:
        raise os_error(e, f"the dataset {str(out)!r}", "free space or choose another data.cache_dir") from None
    return out


def _build(cfg: DataConfig, docs, names: list[str], out: Path) -> None:
    """The dataset of ``docs()`` (each call a new pass over the corpus, whose document names are ``names``) in
    ``out``, streamed: memory holds the names and a batch of documents, never the corpus (but for a one-document
    corpus, which is split by position)."""
    if len(names) == 1:
        train_part, val_part = split_position(next(iter(docs())), cfg.val_fraction)
        labelled = lambda: [("train", d) for d in train_part] + [("val", d) for d in val_part]  # noqa: E731
        split = "position"
    else:
        val_names, split = validation_names(names, cfg.val_fraction), "document"
        labelled = lambda: ((("val" if d[0] in val_names else "train"), d) for d in docs())  # noqa: E731
    tok, special = None, {}
    if cfg.tokenizer is Tokenizer.BPE:  # (pass 2: BPE learns its merges from the training documents)
        train_texts = (d[1] for part, d in labelled() if part == "train")
        tok, special = _train_bpe(train_texts, cfg.vocab_size), {"eos_token": EOT}
    elif cfg.tokenizer_kind == "file":
        tok, special = file_tokenizer(cfg.tokenizer), file_special_tokens(cfg.tokenizer)
        if "eos_token" not in special:
            print(
                f"spannorm: data.tokenizer={cfg.tokenizer!r} names no eos token: documents follow each other "
                "with no separator",
                file=sys.stderr,
            )
    dtype = np.uint8 if tok is None else np.uint16 if cfg.model_vocab_size <= 65536 else np.uint32
    with atomic_dir(out) as tmp:
        in_part = {"train": [], "val": []}
        progress = tqdm.tqdm(labelled(), total=len(names), unit="doc", desc="tokenizing", disable=None, leave=False)
        with _TokenFile(tmp / "train.npy", dtype) as train, _TokenFile(tmp / "val.npy", dtype) as val:
            files = {"train": train, "val": val}
            for part, batch in _parts(progress, in_part):  # (the last pass: every document into its split's file)
                _encode(batch, cfg, tok, special.get("eos_token"), files[part])
        counts = {part: f.size for part, f in files.items()}
        if tok is not None:
            tok.save(str(tmp / "tokenizer.json"))
        files = {
            f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)}
            for f in ("train.npy", "val.npy") + (("tokenizer.json",) if tok is not None else ())
        }
        meta = {
            "corpus": cfg.corpus,
            "tokenizer": cfg.tokenizer_kind,
            **({"tokenizer_file": cfg.tokenizer, "special_tokens": special} if cfg.tokenizer_kind == "file" else {}),
            "vocab_size": cfg.model_vocab_size,
            "split": split,
            "train_documents": in_part["train"],
            "val_documents": in_part["val"],
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "files": files,
        }
        atomic_write_text(tmp / "meta.json", dumps(meta, indent=1))


def _parts(labelled, names: dict[str, list[str]], chars: int = 1 << 22):
    """(split, documents): consecutive documents of one split, about ``chars`` characters at most (a tokenizer
    encodes a list in parallel), each document's name added to ``names``."""
    batch, size, at = [], 0, None
    for part, doc in labelled:
        if batch and (part != at or size >= chars):
            yield at, batch
            batch, size = [], 0
        batch.append(doc)
        names[part].append(doc[0])
        size, at = size + len(doc[1]), part
    if batch:
        yield at, batch


def _npy_size(path: Path) -> tuple[tuple[int, ...], int]:
    """The shape in an .npy file's header, and the file size that header implies."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        return shape, f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def dataset_damage(out: Path, hashes: bool = False) -> str | None:
    """What is wrong with a prepared dataset directory (None: nothing found). Cheap: the files' sizes against
    their .npy headers, the token counts and the sizes in ``meta.json`` (datasets prepared before sizes were
    recorded are checked on what they have); with ``hashes`` also the recorded sha256."""
    try:
        meta = json.loads((out / "meta.json").read_text())
        files = meta.get("files", {})
        needed = ["train.npy", "val.npy"] + (["tokenizer.json"] if meta["tokenizer"] != Tokenizer.BYTE.value else [])
        for name in needed:
            path = out / name
            if not path.is_file():
                return f"{name} is missing"
            size = path.stat().st_size
            if name in files and size != files[name]["bytes"]:
                return f"{name} has {size} bytes, meta.json says {files[name]['bytes']}"
            if name.endswith(".npy"):
                shape, want = _npy_size(path)
                if size != want or shape != (meta[name.replace(".npy", "_tokens")],):
                    return f"{name} has {size} bytes for shape {shape}, expected {want} bytes"
            if hashes and name in files and sha256_file(path) != files[name]["sha256"]:
                return f"{name} does not match its sha256 in meta.json"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"cannot read it: {type(e).__name__}"
    return None


class TokenData:
    """Random training windows and fixed validation windows over memmapped token ids."""

    def __init__(self, path: Path, seq_len: int | None):
        """``seq_len``: the training window, which both splits must hold; None (eval, whose windows may be shorter):
        not checked."""
        self.path = Path(path)
        if (problem := dataset_damage(self.path)) is not None:
            raise SpannormError(f"the dataset {str(self.path)!r} is damaged ({problem}): delete it and run again")
        try:
            self.meta = json.loads((self.path / "meta.json").read_text())
            self.train = np.load(self.path / "train.npy", mmap_mode="r")
            self.val = np.load(self.path / "val.npy", mmap_mode="r")
        except (OSError, ValueError) as e:
            raise SpannormError(
                f"the dataset {str(self.path)!r} cannot be read ({type(e).__name__}): delete it and run again"
            ) from None
        self.seq_len = seq_len
        for part, arr in (("train", self.train), ("val", self.val)):
            if seq_len is not None and arr.size < seq_len + 2:
                raise ConfigError(
                    f"train.seq_len={seq_len} is invalid: the {part} split has only {arr.size} "
                    f"tokens; use a shorter seq_len or a larger corpus"
                )

    def check_val(self, batch_size: int, n_batches: int) -> None:
        """Refuse more validation windows than the validation split has distinct ones (train.eval_batches of
        train.batch_size windows): more would only score the same windows again, and slowly."""
        distinct = self.val.size - self.seq_len
        if batch_size * n_batches > distinct:
            raise ConfigError(
                f"train.eval_batches={n_batches:,} is invalid: {n_batches:,} batches of {batch_size:,} windows, but "
                f"the validation split has {distinct:,} distinct windows of {self.seq_len} tokens: expected at "
                f"most {max(1, distinct // batch_size):,}"
            )

    def unigram_entropy(self) -> float:
        """Entropy (nats/token) of the training tokens' frequencies: the loss of a model that learned
        only how often each token occurs."""
        counts = np.zeros(1, dtype=np.int64)
        for i in range(0, self.train.size, 1 << 24):  # (in chunks: the split may not fit in memory)
            chunk = np.bincount(np.asarray(self.train[i : i + (1 << 24)], dtype=np.int64))
            counts = np.pad(counts, (0, max(0, chunk.size - counts.size)))
            counts[: chunk.size] += chunk
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    def _windows(self, arr: np.ndarray, starts) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        buf = np.stack([np.asarray(arr[s : s + T + 1], dtype=np.int64) for s in starts])
        t = torch.from_numpy(buf)
        return t[:, :-1], t[:, 1:]

    def sample(self, gen: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, self.train.size - self.seq_len - 1, (batch_size,), generator=gen).tolist()
        return self._windows(self.train, starts)

    def val_batches(self, batch_size: int, n_batches: int):
        """The same evenly spaced validation windows every time: the starts of np.linspace(0, last, n), computed
        batch by batch (bit for bit the same values), so that many batches allocate nothing in advance."""
        last = self.val.size - self.seq_len - 1
        n = batch_size * n_batches
        step = last / (n - 1) if n > 1 else 0.0  # (np.linspace's step, as it computes it)
        for i in range(0, n, batch_size):
            starts = np.arange(i, min(i + batch_size, n), dtype=np.float64) * step
            if i + len(starts) == n and n > 1:
                starts[-1] = last  # (np.linspace ends at its stop exactly)
            yield self._windows(self.val, starts.astype(np.int64).tolist())
