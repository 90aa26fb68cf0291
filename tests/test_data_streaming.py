"""Issue 26: preparing a corpus streams it. Memory holds the document names and a batch of documents, never the
corpus: a .jsonl corpus three times larger than what preparing it may add to the process's memory prepares, and its
token files are those of the same documents read whole (the list functions)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from spannorm.data import load_documents, prepare, split_documents
from spannorm.data_config import DataConfig

MEASURE = """
import json, sys, time
from pathlib import Path
from spannorm.data import prepare
from spannorm.data_config import DataConfig

def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) * 1024

cfg = DataConfig(corpus=sys.argv[1], cache_dir=sys.argv[2])
Path("/proc/self/clear_refs").write_text("5")  # (the peak RSS starts again from here)
before = status("VmRSS:")
start = time.perf_counter()
out = prepare(cfg)
print(json.dumps({"added": status("VmHWM:") - before, "rss": before, "seconds": time.perf_counter() - start,
                  "dataset": str(out)}))
"""


def write_jsonl(path, n_docs, chars):
    line = "Now is the winter of our discontent made glorious summer by this sun of York. " * (chars // 80)
    with open(path, "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": f"{i} {line}", "id": f"doc{i}"}) + "\n")
    return path.stat().st_size


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux) for the peak memory")
def test_a_corpus_three_times_the_memory_it_may_add_prepares(tmp_path):
    size = write_jsonl(tmp_path / "big.jsonl", n_docs=16_000, chars=4_000)  # about 64 MB
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path / "big.jsonl"), str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert 3 * got["added"] <= size, f"preparing {size:,} bytes added {got['added']:,} bytes of memory"
    meta = json.loads((tmp_path / "cache" / "datasets").joinpath(got["dataset"], "meta.json").read_text())
    assert meta["train_tokens"] + meta["val_tokens"] > size * 0.9  # (every document is in it: bytes, less JSON)


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
@pytest.mark.parametrize("n_docs", [1, 7])
def test_the_streamed_token_files_are_those_of_the_whole_documents(tmp_path, tokenizer, n_docs):
    """The token files of the streaming pass equal the split and encoding of the documents read whole."""
    write_jsonl(tmp_path / "c.jsonl", n_docs=n_docs, chars=3_000)
    cfg = DataConfig(corpus=str(tmp_path / "c.jsonl"), tokenizer=tokenizer, vocab_size=300, cache_dir=str(tmp_path))
    out = prepare(cfg)
    train, val, how = split_documents(load_documents(cfg.corpus, tmp_path), cfg.val_fraction)
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["split"], meta["train_documents"], meta["val_documents"]) == (
        how,
        [n for n, _ in train],
        [n for n, _ in val],
    )
    if tokenizer == "byte":
        for part, docs in (("train", train), ("val", val)):
            want = "\n\n".join(t for _, t in docs).encode()
            assert np.load(out / f"{part}.npy").tobytes() == want
    else:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        eot = tok.token_to_id("<|endoftext|>")
        want = sum((tok.encode(t).ids + [eot] for _, t in val), [])
        assert np.load(out / "val.npy").tolist() == want
