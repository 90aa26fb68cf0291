"""Issue 25 (reliability, round 2): nothing under a run or study directory is followed out of it, a Ctrl-C is never
lost, a resume never starts again by mistake, and the smaller defects of run directories (3, 6, 7, 10, 11, 26, 28,
29, 30 and the Python API's wording). One test per defect; each fails on the code before the fix."""

import errno
import fcntl
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml
from conftest import one_line_error

from spannorm.cli import main
from spannorm.config import ConfigError, SpannormError
from spannorm.files import atomic_dir, locked
from spannorm.run import RunDir, read_metrics
from spannorm.run_config import load_config
from spannorm.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(corpus, *more):
    return load_config("tiny", [f"data.corpus={corpus}", *more])


def usage_error(capsys, argv, fragment):
    """An argument error: argparse's one line, exit code 2."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err


def rows(run):
    """metrics.jsonl's lines, read as a file (read_metrics refuses a run that holds a link)."""
    return (Path(run) / "metrics.jsonl").read_text().splitlines()


def resume(run):
    return ["train", "--out", str(run), "--resume", "--quiet"]


def listing(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


@pytest.fixture
def two_runs(corpus, tmp_path):
    """``other``: a finished run (checkpoints 30 and 40); ``cut``: a run stopped at step 25 (checkpoints 10, 20)."""
    cfg = tiny(corpus, "train.ckpt_interval=10")
    train(cfg, tmp_path / "other", progress=False)
    train(cfg, tmp_path / "cut", progress=False, stop_after=25)
    return tmp_path / "other", tmp_path / "cut"


def study_yaml(corpus, tmp_path, schemes=("span",)):
    study = {
        "base": "tiny",
        "set": [f"data.corpus={corpus}"],
        "tokens_per_cell": 2560,
        "probe": False,
        "grids": [{"name": "g", "axes": {"model.scheme": list(schemes)}}],
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    return str(tmp_path / "study.yaml")


# --- 3. a symlinked checkpoints/, a checkpoint of another run; the principle: no link is followed ----------------


def test_a_symlinked_checkpoints_folder_is_refused_and_the_other_run_untouched(two_runs, capsys):
    other, cut = two_runs
    before, theirs = rows(cut), listing(other / "checkpoints")
    shutil.rmtree(cut / "checkpoints")
    (cut / "checkpoints").symlink_to(other / "checkpoints")
    one_line_error(capsys, resume(cut), "'checkpoints', a symbolic link")
    assert listing(other / "checkpoints") == theirs  # nothing rotated away
    assert rows(cut) == before  # nothing truncated
    for argv in (["track", str(cut), "--to", "tensorboard"], ["probe", "--checkpoint", str(cut)]):
        one_line_error(capsys, argv, "a symbolic link")


def test_a_checkpoint_copied_from_another_run_is_refused(two_runs, capsys):
    other, cut = two_runs
    before = read_metrics(cut)
    shutil.copytree(other / "checkpoints" / "step-0000040", cut / "checkpoints" / "step-0000040")
    (cut / "checkpoints" / "latest").write_text("step-0000040")
    one_line_error(capsys, resume(cut), "was written by another run")
    assert read_metrics(cut) == before
    shutil.rmtree(cut / "checkpoints" / "step-0000040")
    (cut / "checkpoints" / "latest").write_text("step-0000020")
    assert main(resume(cut)) == 0  # its own checkpoints: it resumes


@pytest.mark.parametrize("name", ["metrics.jsonl", "summary.json", "config.yaml", "tensorboard"])
def test_no_file_of_a_run_is_followed_out_of_it(two_runs, tmp_path, capsys, name):
    other, cut = two_runs
    outside = tmp_path / "outside"
    if name == "tensorboard":
        outside.mkdir()
    else:
        outside.write_bytes((other / name).read_bytes() if (other / name).exists() else b"")
    written = outside.stat().st_mtime_ns
    if (cut / name).exists():
        (cut / name).unlink()
    (cut / name).symlink_to(outside)
    one_line_error(capsys, resume(cut), f"{name!r}, a symbolic link")
    one_line_error(capsys, ["track", str(cut), "--to", "tensorboard"], "a symbolic link")
    assert outside.stat().st_mtime_ns == written and (not outside.is_dir() or not list(outside.iterdir()))


def test_no_folder_of_a_study_is_followed_out_of_it(corpus, tmp_path, capsys):
    config, out, elsewhere = study_yaml(corpus, tmp_path), tmp_path / "st", tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "cells").symlink_to(elsewhere)
    argv = ["study", "--config", config, "--out", str(out), "--quiet"]
    one_line_error(capsys, argv, "'cells', a symbolic link")
    one_line_error(capsys, [*argv, "--report-only"], "'cells', a symbolic link")
    assert list(elsewhere.iterdir()) == []


# --- 6. a Ctrl-C while the final checkpoint is written ------------------------------------------------------------


def ctrl_c_in_final_checkpoint(monkeypatch, max_steps):
    """A Ctrl-C arrives while the checkpoint of step ``max_steps`` is written."""
    save = RunDir.save_checkpoint

    def save_and_ctrl_c(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if step == max_steps:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # (the handler runs here)

    monkeypatch.setattr(RunDir, "save_checkpoint", save_and_ctrl_c)


def test_ctrl_c_during_the_final_checkpoint_is_not_lost(corpus, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    ctrl_c_in_final_checkpoint(monkeypatch, 40)
    assert main(["train", "--config", "tiny", "--corpus", str(corpus), "--out", str(run), "--quiet"]) == 130
    assert "interrupted at step 40" in capsys.readouterr().err
    assert not (run / "summary.json").exists()
    monkeypatch.undo()
    assert main(resume(run)) == 0 and json.loads((run / "summary.json").read_text())["steps"] == 40


def test_ctrl_c_during_a_cells_final_checkpoint_stops_the_study(corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "st"
    ctrl_c_in_final_checkpoint(monkeypatch, 10)  # (2560 tokens a cell: 10 steps of 8×32)
    argv = ["study", "--config", study_yaml(corpus, tmp_path, ("span", "pre")), "--out", str(out), "--quiet"]
    assert main(argv) == 130
    assert len(list((out / "cells").iterdir())) == 1  # the second cell was not trained


# --- 7. latest naming a checkpoint that is missing, a link or not a directory; the free-space hint ----------------


@pytest.mark.parametrize(
    "what, said",
    [("missing", "which is missing or not a directory"), ("file", "which is missing"), ("link", "a symbolic link")],
)
def test_a_latest_that_names_no_checkpoint_directory_is_refused(two_runs, capsys, what, said):
    _, cut = two_runs
    before = rows(cut)
    ckpts = cut / "checkpoints"
    (ckpts / "latest").write_text("step-0000030")
    if what == "file":
        (ckpts / "step-0000030").write_text("not a directory")
    elif what == "link":
        (ckpts / "step-0000030").symlink_to(ckpts / "step-0000020")
    one_line_error(capsys, resume(cut), said)
    assert rows(cut) == before  # not truncated: no restart at step 0


def test_the_free_space_hint_is_for_a_full_disk_only(corpus, tmp_path, capsys, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "r" / "checkpoints"))

    monkeypatch.setattr(RunDir, "save_checkpoint", denied)
    argv = ["train", "--config", "tiny", "--corpus", str(corpus), "--out", str(tmp_path / "r"), "--quiet"]
    err = one_line_error(capsys, argv, "Permission denied")
    assert "free space" not in err and "disk is full" not in err


# --- 10. track --to wandb on a run W&B cannot write ----------------------------------------------------------------


def test_wandb_that_cannot_write_the_run_is_an_error(corpus, tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    run = tmp_path / "run"
    train(tiny(corpus, "train.max_steps=5", "train.ckpt_interval=5"), run, progress=False)
    access = os.access
    # a read-only run as W&B sees it (as root, the permission bits would not stop a write)
    monkeypatch.setattr(
        os, "access", lambda path, mode, **kw: not str(path).startswith(str(run)) and access(path, mode)
    )
    one_line_error(capsys, ["track", str(run), "--to", "wandb"], "W&B cannot write")


# --- 11. a .lock that is a symbolic link -----------------------------------------------------------------------------


def test_a_lock_that_is_a_symbolic_link_creates_nothing_outside(corpus, tmp_path, capsys):
    run, target = tmp_path / "run", tmp_path / "outside" / "made-by-spannorm"
    (tmp_path / "outside").mkdir()
    run.mkdir()
    (run / ".lock").symlink_to(target)
    with pytest.raises(SpannormError, match="its .lock is a symbolic link"):  # (opened with O_NOFOLLOW)
        with locked(run, "--out"):
            pass
    one_line_error(
        capsys,
        ["train", "--config", "tiny", "--corpus", str(corpus), "--out", str(run), "--quiet"],
        "'.lock', a symbolic link",
    )
    out = tmp_path / "st"
    out.mkdir()
    (out / ".lock").symlink_to(target)
    one_line_error(
        capsys, ["study", "--config", study_yaml(corpus, tmp_path), "--out", str(out), "--quiet"], "symbolic link"
    )
    assert not target.exists() and not (run / "config.yaml").exists()


# --- 26. a missing tracker package ------------------------------------------------------------------------------------


def test_a_missing_tracker_package_is_found_before_the_run_directory_exists(corpus, tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name)
    )
    run = tmp_path / "run"
    argv = ["train", "--config", "tiny", "--corpus", str(corpus), "--out", str(run), "--quiet"]
    argv += ["--set", "train.trackers=[tensorboard]", "--set", "train.max_steps=5"]
    one_line_error(capsys, argv, "tracker tensorboard needs tensorboard")
    assert not run.exists()
    monkeypatch.undo()
    assert main(argv) == 0  # the retry trains (it does not say that the directory already holds a run)


# --- 28. temporary directories that kills left outside runs ---------------------------------------------------------


def test_temporary_directories_left_by_kills_are_removed(corpus, tmp_path):
    old = time.time() - 3600
    dead, held = tmp_path / ".export.tmp-dead", tmp_path / ".export.tmp-held"
    for d in (dead, held):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 10)
        os.utime(d, (old, old))
    fd = os.open(held, os.O_RDONLY)  # held: a live process writes it
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with atomic_dir(tmp_path / "export") as tmp:  # (an export, a dataset in the cache)
            (tmp / "x").write_text("x")
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export.tmp-held", "export"]
    from spannorm.files import temp_dir  # (new with the fix: imported here, so that the others run without it)

    with temp_dir(tmp_path, "export") as tmp:  # (torchrun's config, lm-eval's export)
        assert tmp.is_dir()
    assert not tmp.exists()

    out = tmp_path / "st"
    (out / "cells" / ".torchrun.tmp-dead").mkdir(parents=True)  # a study killed while a cell ran under torchrun
    assert main(["study", "--config", study_yaml(corpus, tmp_path), "--out", str(out), "--quiet"]) == 0
    assert not (out / "cells" / ".torchrun.tmp-dead").exists()


# --- 29. --out '' ---------------------------------------------------------------------------------------------------


def test_an_empty_out_is_refused(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    usage_error(capsys, ["train", "--config", "tiny", "--corpus", str(corpus), "--out", ""], "--out: '' is invalid")
    for argv in (["track", "", "--to", "tensorboard"], ["study", "--config", "tiny", "--out", ""]):
        usage_error(capsys, argv, "'' is invalid: expected a path")
    with pytest.raises(ConfigError, match="run_dir '' is invalid"):
        train(tiny(corpus), "", progress=False)
    assert list(tmp_path.iterdir()) == []


# --- 30. "diverged at step None" ------------------------------------------------------------------------------------


def test_a_run_that_diverged_by_its_end_names_no_step(tmp_path, capsys, monkeypatch):
    import spannorm.train

    summary = {
        "scheme": "span",
        "steps": 40,
        "final_val_loss": 5.0,
        "diverged": True,
        "diverged_step": None,  # (the last loss not below the first: no step stopped the run)
        "diverged_reason": "last training loss not below the first",
        "tokens_per_s": 1.0,
    }
    monkeypatch.setattr(spannorm.train, "train", lambda *a, **k: summary)
    assert main(["train", "--config", "tiny", "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert "None" not in err and "the run diverged by its end: last training loss not below the first" in err, err


# --- the Python API's second train() into a directory ---------------------------------------------------------------


def test_the_api_error_names_the_api_arguments(corpus, tmp_path, capsys):
    cfg = tiny(corpus, "train.max_steps=5")
    train(cfg, tmp_path / "r", progress=False)
    with pytest.raises(ConfigError) as e:
        train(cfg, tmp_path / "r", progress=False)
    assert "pass resume=True to continue it or choose another run_dir" in str(e.value) and "--" not in str(e.value)
    argv = ["train", "--config", "tiny", "--corpus", str(corpus), "--out", str(tmp_path / "r"), "--quiet"]
    one_line_error(capsys, [*argv, "--set", "train.max_steps=5"], "pass --resume to continue it")
