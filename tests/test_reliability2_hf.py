"""Issue 25 (reliability, round 2): eval, export and Hugging Face folders (defects 2, 4, 8, 14, 16, 18). ``--text`` is
always a path; a shared folder chooses no local path and runs none of its own Python; a damaged folder, a full disk
and a text of only special tokens are one line. Each test fails on the code before the fix."""

import json
import shutil

import pytest
import yaml
from conftest import one_line_error, write_corpus

from spannorm.cli import main
from spannorm.run_config import load_config
from spannorm.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(corpus, tmp_path_factory):
    """{"byte", "bpe"} -> (run directory, its exported folder): tiny runs of 10 steps."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, more in {"byte": [], "bpe": ["data.tokenizer=bpe", "data.vocab_size=300"]}.items():
        cfg = load_config(
            "tiny",
            [
                f"data.corpus={corpus}",
                f"data.cache_dir={root / 'cache'}",
                "train.max_steps=10",
                "train.probe_interval=0",
            ]
            + more,
        )
        train(cfg, root / name, progress=False)
        assert main(["export", str(root / name), str(root / f"{name}-hf")]) == 0
        out[name] = (root / name, root / f"{name}-hf")
    return out


def scores(capsys, argv) -> dict:
    """{name: result} of ``spannorm eval ... --json``."""
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    json_file = argv[argv.index("--json") + 1]
    return {r["name"]: r for r in json.loads(open(json_file).read())["results"]}


def test_a_text_named_like_a_corpus_is_the_users_path(exported, tmp_path, capsys, monkeypatch):
    """Defect 2: ``--text ./shakespeare`` is the user's directory, never the built-in corpus (nor fetched)."""
    run, _ = exported["byte"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shakespeare").mkdir()
    (tmp_path / "shakespeare" / "mine.txt").write_text("all my own words, " * 20)
    got = scores(capsys, ["eval", str(run), "--text", "shakespeare", "--json", str(tmp_path / "s.json")])
    assert got["shakespeare"]["bytes"] == len("all my own words, " * 20) - 1  # (every byte but the first is scored)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "shakespeare"]  # nothing fetched here


def test_a_shared_folder_chooses_no_local_path(exported, tmp_path, capsys):
    """Defect 4: an exported folder whose spannorm_run.yaml names a private corpus and a cache elsewhere: eval
    --text scores only the text and neither reads the corpus nor writes the cache; --validation (asked for) reads
    the corpus but caches in the user's own cache, never in the folder's."""
    _, folder = exported["byte"]
    shared = tmp_path / "shared"
    shutil.copytree(folder, shared)
    private = write_corpus(tmp_path / "private", n_docs=4, words_per_doc=500)
    elsewhere = tmp_path / "elsewhere"
    run_yaml = yaml.safe_load((shared / "spannorm_run.yaml").read_text())
    run_yaml["data"] |= {"corpus": str(private), "cache_dir": str(elsewhere)}
    (shared / "spannorm_run.yaml").write_text(yaml.safe_dump(run_yaml))
    (tmp_path / "mine.txt").write_text("some text of mine. " * 30)

    got = scores(capsys, ["eval", str(shared), "--text", str(tmp_path / "mine.txt"), "--json", str(tmp_path / "a")])
    assert list(got) == [str(tmp_path / "mine.txt")]
    assert not elsewhere.exists()
    got = scores(capsys, ["eval", str(shared), "--validation", "--json", str(tmp_path / "b")])
    assert list(got) == ["validation"] and not elsewhere.exists()


def test_a_folders_own_python_is_never_run(exported, tmp_path, capsys):
    """Defect 8: a config.json whose auto_map names the folder's own module is never imported: our model type
    loads with our own class; a model type transformers does not know is refused in one line."""
    _, folder = exported["byte"]
    evil = tmp_path / "evil"
    shutil.copytree(folder, evil)
    marker = tmp_path / "ran"
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}
    (evil / "config.json").write_text(json.dumps(config))
    assert main(["generate", str(evil), "--prompt", "a", "--max-new-tokens", "2"]) == 0
    (evil / "config.json").write_text(json.dumps(config | {"model_type": "evil"}))
    one_line_error(capsys, ["eval", str(evil), "--text", str(evil / "config.json")], str(evil))
    one_line_error(capsys, ["generate", str(evil), "--prompt", "a"], str(evil))
    assert not marker.exists()


def damage_tokenizer(folder):
    (folder / "tokenizer.json").write_text('{"model": ')


def truncate_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def remove_tokenizer(folder):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)


def pickle_only(folder):
    """The weights as pytorch_model.bin (a pickle, which can run code when read) instead of safetensors."""
    import torch  # (imported here: only this damage needs it)
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def odd_tokenizer_config(folder):
    """A value of the wrong type that transformers reads only when the tokenizer is used (found by the fuzz test)."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"model_max_length": []}))


@pytest.mark.parametrize(
    "damage", [damage_tokenizer, truncate_weights, remove_tokenizer, pickle_only, odd_tokenizer_config]
)
def test_a_damaged_folder_is_one_line(exported, tmp_path, capsys, damage):
    """Defect 14: a bad tokenizer.json, truncated weights, no tokenizer, a pickle instead of safetensors."""
    _, folder = exported["bpe"]
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    damage(broken)
    one_line_error(
        capsys, ["eval", str(broken), "--text", str(broken / "config.json")], "cannot be loaded", str(broken)
    )


def test_export_onto_a_full_disk_is_one_line_and_leaves_nothing(exported, tmp_path, capsys, monkeypatch):
    """Defect 16: safetensors reports a full disk as its own SafetensorError; export says the disk is full."""
    from safetensors import SafetensorError  # (imported here: the error the patched writer raises)
    from transformers import modeling_utils

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(modeling_utils, "safe_save_file", full)
    run, _ = exported["byte"]
    one_line_error(capsys, ["export", str(run), str(tmp_path / "hf")], "the disk is full", str(tmp_path / "hf"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("which", ["run", "folder"])
def test_a_text_of_only_special_tokens_is_one_line(exported, tmp_path, capsys, which):
    """Defect 18: bits per byte of 0 bytes: nothing to score, said in one line (no division by zero)."""
    run, folder = exported["bpe"]
    (tmp_path / "eot.txt").write_text("<|endoftext|>" * 40)
    model = run if which == "run" else folder
    one_line_error(capsys, ["eval", str(model), "--text", str(tmp_path / "eot.txt")], "only special tokens")


def test_eval_of_a_text_needs_no_validation_split_and_names_only_its_options(exported, tmp_path, capsys):
    """Defect 27: with --text, a run's validation split is scored only with --validation, so a split that cannot be
    scored (its corpus gone) never blocks the text; a --seq-len longer than the training split is a window like
    any other, not an error about train.seq_len (an option not passed)."""
    run, _ = exported["byte"]
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    config = yaml.safe_load((moved / "config.yaml").read_text())
    config["data"]["corpus"] = str(tmp_path / "gone")
    (moved / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (tmp_path / "mine.txt").write_text("text of mine. " * 40)
    text = ["--text", str(tmp_path / "mine.txt")]
    got = scores(capsys, ["eval", str(moved), *text, "--seq-len", "100000000", "--json", str(tmp_path / "a.json")])
    assert list(got) == [str(tmp_path / "mine.txt")] and got[str(tmp_path / "mine.txt")]["tokens"] == 14 * 40 - 1
    err = one_line_error(capsys, ["eval", str(moved), *text, "--validation"], "gone")
    assert "train.seq_len" not in err
