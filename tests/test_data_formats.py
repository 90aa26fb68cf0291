"""Corpora beyond text files (issue 26): .jsonl, .jsonl.gz, .parquet and Hugging Face datasets folders, one document a
record (data.text_field; data.name_field names it, else file:row). The same documents give the same token files as
a text directory; a record without the field, a JSON file and a binary file are one-line errors, never trained on."""

import gzip
import json

import numpy as np
import pytest

from spannorm.cli import main
from spannorm.data import prepare
from spannorm.data_config import DataConfig

DOCS = {f"doc{i}.txt": f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (40 + i) for i in range(8)}


def records():
    return [{"name": name, "text": text, "other": 1} for name, text in DOCS.items()]


def write_text_dir(root):
    root.mkdir()
    for name, text in DOCS.items():
        (root / name).write_text(text)
    return root


def write_jsonl(path):
    path.write_text("".join(json.dumps(r) + "\n" for r in records()))
    return path


def write_jsonl_gz(path):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records())
    return path


def write_parquet(path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq  # (pyarrow: an optional dependency, the data extra)

    pq.write_table(pa.Table.from_pylist(records()), path)
    return path


def write_datasets_folder(path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(records()).save_to_disk(str(path))
    return path


def tokens(corpus, cache, **fields):
    out = prepare(DataConfig(corpus=str(corpus), cache_dir=str(cache), **fields))
    return out.name, np.load(out / "train.npy"), np.load(out / "val.npy")


@pytest.mark.parametrize(
    "write, filename",
    [
        (write_jsonl, "c.jsonl"),
        (write_jsonl_gz, "c.jsonl.gz"),
        (write_parquet, "c.parquet"),
        (write_datasets_folder, "ds"),
    ],
    ids=["jsonl", "jsonl.gz", "parquet", "datasets"],
)
def test_records_give_the_token_files_of_the_text_directory(tmp_path, write, filename):
    name, train, val = tokens(write_text_dir(tmp_path / "texts"), tmp_path / "cache-text")
    other = write(tmp_path / filename)
    got_name, got_train, got_val = tokens(other, tmp_path / "cache-other", name_field="name")
    assert got_name == name  # (the same documents, names and settings: the same dataset)
    assert np.array_equal(got_train, train) and np.array_equal(got_val, val)


def test_records_without_a_name_field_are_named_by_file_and_row(tmp_path):
    from spannorm.data import Fields, documents_at

    docs = documents_at(write_jsonl(tmp_path / "c.jsonl"), "x", "corpus file", Fields())
    assert [n for n, _ in docs] == [f"c.jsonl:{i}" for i in range(1, 9)]
    assert [t for _, t in docs] == list(DOCS.values())


@pytest.mark.parametrize(
    "content, said",
    [
        ('{"text": "a document"}\n{"body": "no text field"}\n', "record 2 has no text field 'text'"),
        ('{"text": "a document"}\nnot json\n', "line 2 is not JSON"),
        ('{"text": 7}\n', "record 1 has no text field 'text'"),
    ],
)
def test_a_bad_jsonl_is_one_line(corpus, tmp_path, capsys, content, said):
    (tmp_path / "bad.jsonl").write_text(content)
    argv = ["train", "--config", "tiny", "--corpus", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and said in err and "bad.jsonl" in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "name, content, said",
    [
        ("data.bin", b"\x00\x01\x02binary\x00", "NUL bytes"),
        ("data.json", b'[{"text": "a"}]', "not a format spannorm reads"),
        ("img.dat", bytes(range(256)), "not UTF-8 text"),
    ],
)
def test_a_file_that_is_not_text_is_never_trained_on(tmp_path, capsys, name, content, said):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "ok.txt").write_text("some text " * 100)
    (tmp_path / "c" / name).write_bytes(content)
    argv = ["data", "prepare", "--corpus", str(tmp_path / "c")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and said in err and name in err, err


def test_a_bad_text_field_setting_is_one_line(corpus, tmp_path, capsys):
    argv = ["train", "--config", "tiny", "--corpus", str(corpus), "--out", str(tmp_path / "r"), "--set"]
    assert main([*argv, "data.text_field="]) == 2
    assert "data.text_field" in capsys.readouterr().err
