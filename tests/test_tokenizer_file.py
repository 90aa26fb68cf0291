"""Issue 26: data.tokenizer takes a tokenizer.json or a folder holding one (what AutoTokenizer saves). A run with one
trains, exports, generates and evaluates; eos (and bos, pad) come from the folder's tokenizer_config.json; bits per
byte divides by the bytes of the text, as a byte run's does. The tokenizer here is SentencePiece-style (a ▁ word
piece, byte fallback, Llama's decoder), trained on the test corpus: not byte-level, so every byte count is new."""

import json

import numpy as np
import pytest
from conftest import one_line_error, write_corpus

pytest.importorskip("transformers")

from spannorm.cli import main  # noqa: E402
from spannorm.data import prepare  # noqa: E402
from spannorm.data_config import DataConfig
from spannorm.run_config import load_config  # noqa: E402
from spannorm.train import train  # noqa: E402

TEXT = "The king — and 'honour'! 日本\nA fool.\n"  # 日本: not in the training text, so byte fallback


def sentencepiece_folder(path, corpus):
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(
        (p.read_text() for p in sorted(corpus.glob("*.txt"))),
        trainers.BpeTrainer(vocab_size=600, special_tokens=special, show_progress=False),
    )
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    config = {"eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>", "model_max_length": 128}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokfile")
    corpus = write_corpus(root / "corpus", n_docs=4, words_per_doc=2000)
    folder = sentencepiece_folder(root / "sp", corpus)
    cfg = load_config(
        "tiny",
        [f"data.corpus={corpus}", f"data.cache_dir={root / 'cache'}", f"data.tokenizer={folder}", "train.max_steps=4"]
        + ["train.eval_interval=4", "train.ckpt_interval=4", "train.probe_interval=0", "train.seq_len=32"],
    )
    train(cfg, root / "run", progress=False)
    return root, corpus, folder, cfg


def test_the_dataset_takes_the_vocabulary_and_eos_from_the_tokenizer(setup):
    root, corpus, folder, cfg = setup
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert cfg.data.tokenizer == str(folder / "tokenizer.json") and cfg.data.tokenizer_kind == "file"
    assert cfg.model.vocab_size == tok.get_vocab_size(with_added_tokens=True)
    dataset = prepare(cfg.data)
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["special_tokens"] == {"eos_token": "</s>", "bos_token": "<s>"}  # (no pad in the folder)
    ids = np.load(dataset / "train.npy")
    docs = [p.read_text() for p in sorted(corpus.glob("*.txt")) if p.name in meta["train_documents"]]
    want = sum((tok.encode(d, add_special_tokens=False).ids + [tok.token_to_id("</s>")] for d in docs), [])
    assert ids.tolist() == want
    # the file given as the file: the same dataset; the tokenizer's bytes, not its path, name it
    assert prepare(DataConfig(**{**vars(cfg.data), "tokenizer": str(folder / "tokenizer.json")})) == dataset


def test_a_run_with_a_tokenizer_file_exports_generates_and_evaluates(setup, tmp_path, capsys):
    from transformers import AutoTokenizer

    root, corpus, folder, cfg = setup
    assert main(["export", str(root / "run"), str(tmp_path / "hf")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (tokenizer.eos_token, tokenizer.bos_token) == ("</s>", "<s>")
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids("</s>")  # generation stops at eos
    reference = AutoTokenizer.from_pretrained(folder)
    assert tokenizer(TEXT, add_special_tokens=False).input_ids == reference(TEXT, add_special_tokens=False).input_ids
    capsys.readouterr()
    args = ["--prompt", "The king", "--max-new-tokens", "5", "--temperature", "0", "--device", "cpu"]
    assert main(["generate", str(tmp_path / "hf"), *args]) == 0
    assert capsys.readouterr().out.startswith("The king")

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "eval.json"
    assert main(["eval", str(root / "run"), "--text", str(text), "--json", str(out), "--device", "cpu"]) == 0
    [result] = json.loads(out.read_text())["results"]
    enc = reference(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    assert any(reference.convert_ids_to_tokens(i).startswith("<0x") for i in enc.input_ids)  # byte fallback used
    first = len(reference.decode(enc.input_ids[:1]).encode())  # the first token's text, which nothing predicts
    # a byte run's definition: the UTF-8 bytes of the text the predicted tokens stand for
    assert (result["tokens"], result["bytes"]) == (len(enc.input_ids) - 1, len(TEXT.encode()) - first)


@pytest.mark.parametrize("what", ["missing", "folder", "garbage"])
def test_a_bad_tokenizer_is_one_line(what, tmp_path, capsys):
    bad = {"missing": tmp_path / "none.json", "folder": tmp_path, "garbage": tmp_path / "tokenizer.json"}[what]
    (tmp_path / "x.txt").write_text("not a tokenizer")
    if what == "garbage":
        bad.write_text("{not json")
    want = "is not a tokenizer.json tokenizers reads" if what == "garbage" else "a path to a tokenizer.json"
    one_line_error(capsys, ["data", "prepare", "--set", f"data.tokenizer={bad}"], "data.tokenizer=", want)
