"""Issue 25 (reliability, round 2), defect 1: a run pins its data. It records the dataset it trained on (data.json)
and keeps its BPE tokenizer; a relative corpus is recorded as an absolute path. A resume or an eval of its
validation split on a corpus that changed is refused in one line; export and generate use the run's own tokenizer.
Each test fails on the code before the fix."""

import json
import os
import shutil

import pytest
from conftest import one_line_error, write_corpus

from spannorm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

BPE = ["--set", "data.tokenizer=bpe", "--set", "data.vocab_size=300"]


def tokenizer_of(folder):
    return json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]


def test_a_bpe_run_keeps_its_tokenizer_and_refuses_a_changed_corpus(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    train = ["train", "--config", "tiny", "--corpus", str(corpus), "--out", str(run), "--quiet", *BPE]
    assert main([*train, "--set", "train.max_steps=20"]) == 0
    assert json.loads((run / "data.json").read_text())["dataset"].startswith("bpe300-")
    kept = tokenizer_of(run)

    (corpus / "extra.txt").write_text("zyzzyva quixotic " * 4000)  # (a document added: another BPE, other data)
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    assert tokenizer_of(tmp_path / "hf") == kept, "the export must carry the tokenizer the weights were trained with"
    assert main(["generate", str(run), "--prompt", "the", "--max-new-tokens", "4", "--seed", "1"]) == 0
    capsys.readouterr()
    os.remove(run / "summary.json")  # (as if killed after its last checkpoint)
    one_line_error(capsys, ["train", "--resume", "--out", str(run), "--quiet"], "the corpus changed since")
    one_line_error(capsys, ["eval", str(run)], "the corpus changed since")

    (corpus / "extra.txt").unlink()  # (restored: the same data again)
    assert main(["train", "--resume", "--out", str(run), "--quiet"]) == 0


def test_a_relative_corpus_is_the_same_text_from_another_directory(tmp_path, monkeypatch, capsys):
    write_corpus(tmp_path / "a" / "text")
    write_corpus(tmp_path / "b" / "text", seed=1)  # (the same relative path elsewhere holds other text)
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path / "a")
    argv = ["train", "--config", "tiny", "--corpus", "text", "--out", str(run), "--quiet"]
    assert main([*argv, "--set", "train.max_steps=20", "--set", "train.ckpt_interval=20"]) == 0
    recorded = json.loads((run / "data.json").read_text())
    assert recorded["corpus"] == str(tmp_path / "a" / "text")
    os.remove(run / "summary.json")  # (as if killed after its last checkpoint)
    monkeypatch.chdir(tmp_path / "b")
    assert main(["train", "--resume", "--out", str(run), "--quiet"]) == 0
    assert "text" in os.listdir(tmp_path / "a")  # (read from where it was trained, not from b)
    shutil.rmtree(tmp_path / "a")
    os.remove(run / "summary.json")
    one_line_error(capsys, ["train", "--resume", "--out", str(run), "--quiet"], "does not exist")


def test_a_damaged_data_record_is_one_line(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--corpus", str(corpus), "--out", str(run), "--quiet"]) == 0
    os.remove(run / "summary.json")
    (run / "data.json").write_text('{"dataset": 3}')
    one_line_error(capsys, ["train", "--resume", "--out", str(run), "--quiet"], "data.json")
