"""Bad input: one line on stderr, exit code 2, no traceback, no file written or changed."""

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spannorm.cli import main


def snapshot(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run_bad(capsys, argv, fragment):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert fragment in err, err
    return err


@pytest.mark.parametrize(
    "sets, fragment",
    [
        (["model.scheme=bogus"], "model.scheme='bogus' is invalid: expected one of pre, post, span, deepnorm"),
        (["model.n_heads=3"], "model.d_model=32 is invalid: expected a multiple of model.n_heads=3"),
        (["train.lr=-3e-3"], "train.lr=-0.003 is invalid: expected a positive number"),
        (["model.dropout=0.1"], "unknown key model.dropout; valid keys:"),
        (["data.corpus=/no/such/dir"], "data.corpus='/no/such/dir' does not exist"),
    ],
)
def test_bad_train_inputs(capsys, tmp_path, corpus, sets, fragment):
    argv = ["train", "--config", "tiny", "--out", str(tmp_path / "run"), "--set", f"data.corpus={corpus}"]
    for s in sets:
        argv += ["--set", s]
    run_bad(capsys, argv, fragment)
    assert not (tmp_path / "run").exists()


def test_empty_corpus(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    run_bad(
        capsys,
        ["train", "--config", "tiny", "--corpus", str(tmp_path / "empty"), "--out", str(tmp_path / "r")],
        "is empty: it holds no non-empty text file",
    )
    assert not (tmp_path / "r").exists()


@pytest.fixture
def finished_run(tmp_path, corpus):
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--corpus", str(corpus), "--out", str(run), "--quiet"]) == 0
    return run


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_bad_checkpoint(capsys, finished_run, damage):
    for ckpt in (finished_run / "checkpoints").glob("step-*"):  # every kept one (a resume falls back to an older one)
        target = ckpt / ("model.safetensors" if damage == "corrupt" else "state.pt")
        data = bytearray(target.read_bytes())
        if damage == "corrupt":
            data[len(data) // 2] ^= 0xFF
        else:
            data = data[: len(data) // 3]
        target.write_bytes(bytes(data))
    (finished_run / "summary.json").unlink()  # as if killed before the end
    before = snapshot(finished_run)
    run_bad(capsys, ["train", "--out", str(finished_run), "--resume"], "is corrupt or truncated")
    assert snapshot(finished_run) == before


def test_checkpoint_that_does_not_fit_the_config(capsys, finished_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(finished_run, other)
    cfg = (other / "config.yaml").read_text().replace("d_model: 32", "d_model: 64")
    (other / "config.yaml").write_text(cfg)
    (other / "summary.json").unlink()  # as if killed before the end
    run_bad(capsys, ["train", "--out", str(other), "--resume"], "does not match the run's config")


def test_existing_run_and_missing_run(capsys, finished_run, tmp_path, corpus):
    run_bad(
        capsys,
        ["train", "--config", "tiny", "--corpus", str(corpus), "--out", str(finished_run)],
        "already holds a run: pass --resume",
    )
    run_bad(capsys, ["train", "--out", str(tmp_path / "nothing"), "--resume"], "holds no run to resume")
    run_bad(
        capsys,
        ["train", "--out", str(finished_run), "--resume", "--set", "train.lr=1"],
        "--resume uses the run's saved config.yaml",
    )


def test_other_bad_inputs(capsys, tmp_path):
    run_bad(capsys, ["train"], "--config is required")
    run_bad(
        capsys,
        ["compare", "--schemes", "pre,nope", "--out", str(tmp_path / "c")],
        "--schemes='nope' is invalid: expected one of pre, post, span, deepnorm",
    )
    run_bad(capsys, ["train", "--config", "huge"], "presets:")
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "invalid choice" in err


def test_console_script_error_has_no_traceback(tmp_path):
    exe = Path(sys.executable).parent / "spannorm"
    assert exe.is_file(), "the spannorm console script is not installed beside python"
    res = subprocess.run(
        [exe, "train", "--config", "tiny", "--set", "model.scheme=bogus"], capture_output=True, text=True, cwd=tmp_path
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_data_prepare(capsys, corpus):
    assert (
        main(
            ["data", "prepare", "--corpus", str(corpus), "--set", "data.tokenizer=bpe", "--set", "data.vocab_size=300"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "5 train / 1 val documents (split by document)" in out and "bpe vocab 300" in out
