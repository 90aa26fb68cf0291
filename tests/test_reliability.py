"""Issue 16: never a wrong result, never a lost run. One test per defect (each fails on the code before the
fix), and a fault test that kills training runs with SIGKILL at random moments."""

import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import one_line_error
from safetensors.torch import load_file, save_file

from spannorm.cli import main
from spannorm.run import RunDir, load_run, read_metrics
from spannorm.run_config import load_config
from spannorm.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


TIMING = ("tokens_per_s",)  # the fields of summary.json and metrics.jsonl that measure time


def tiny(corpus, *more):
    return load_config("tiny", [f"data.corpus={corpus}", *more])


def untimed(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def strict_load(text):
    """json.loads that refuses NaN and Infinity, as strict parsers do."""

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@contextlib.contextmanager
def locked(directory):
    """Hold the lock of a run or study directory, as another spannorm process training into it does."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def temp_files(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if ".tmp-" in p.name)


# --- 1. killed after the final checkpoint, before summary.json -------------------------------


def test_resume_after_the_final_checkpoint_writes_the_right_summary(corpus, tmp_path):
    cfg = tiny(corpus)
    full = train(cfg, tmp_path / "run", progress=False)
    assert full["final_val_loss"] is not None
    (tmp_path / "run" / "summary.json").unlink()  # killed between the final checkpoint and the summary
    resumed = train(cfg, tmp_path / "run", resume=True, progress=False)
    assert untimed([resumed]) == untimed([full])
    assert untimed([json.loads((tmp_path / "run" / "summary.json").read_text())]) == untimed([full])


# --- 3. one process per run directory and per study directory -------------------------------


def test_a_second_train_into_a_locked_run_is_refused(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    with locked(run):  # another spannorm process is training into run (a new directory)
        one_line_error(
            capsys,
            ["train", "--config", "tiny", "--corpus", str(corpus), "--out", str(run), "--quiet"],
            "is in use by another spannorm process",
        )
    assert not (run / "config.yaml").exists()
    assert main(["train", "--config", "tiny", "--corpus", str(corpus), "--out", str(run), "--quiet"]) == 0
    (run / "summary.json").unlink()
    with locked(run):
        one_line_error(capsys, ["train", "--out", str(run), "--resume", "--quiet"], "is in use")


def test_a_second_study_into_a_locked_study_is_refused(corpus, tmp_path, capsys):
    study = {
        "base": "tiny",
        "set": [f"data.corpus={corpus}"],
        "tokens_per_cell": 2560,
        "probe": False,
        "grids": [{"name": "g", "axes": {"model.scheme": ["span"]}}],
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    out = tmp_path / "st"
    with locked(out):
        one_line_error(
            capsys,
            ["study", "--config", str(tmp_path / "study.yaml"), "--out", str(out), "--quiet"],
            "is in use by another spannorm process",
        )
    assert not (out / "cells").exists()


# --- 4. resume during a divergence streak -------------------------------------------------


def test_resume_is_exact_during_a_divergence_streak(corpus, tmp_path):
    # lr 10 without clipping: the loss stays above the first step's from step 6 on, and the run stops at
    # step 10 (5 in a row); cut at step 8, three steps into the streak
    cfg = tiny(corpus, "train.lr=10", "train.grad_clip=0", "train.log_interval=1", "train.ckpt_interval=1")
    full = train(cfg, tmp_path / "full", progress=False)
    assert full["diverged_step"] == 10
    assert train(cfg, tmp_path / "cut", progress=False, stop_after=8) == {"step": 8, "finished": False}
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert untimed([resumed]) == untimed([full])
    assert untimed(read_metrics(tmp_path / "cut")) == untimed(read_metrics(tmp_path / "full"))


def test_every_part_of_the_trainer_is_in_the_checkpoint(corpus, tmp_path):
    """A resume recomputes nothing: the divergence monitor, the training guard, the throughput meter and the last
    validation loss are saved in each checkpoint, beside the optimizer and the RNGs."""
    import torch

    cfg = tiny(corpus, "train.ckpt_interval=10", "train.eval_interval=10", "train.log_interval=1")
    train(cfg, tmp_path / "run", progress=False, stop_after=20)
    state = torch.load(RunDir(tmp_path / "run").find_checkpoint() / "state.pt", weights_only=True)
    rows = read_metrics(tmp_path / "run")
    assert state["step"] == 20 and state["last_val"] == rows[-1]["val_loss"]
    assert state["divergence"]["first_loss"] == rows[0]["loss"]
    assert state["throughput"]["tokens"] == 20 * cfg.train.batch_size * cfg.train.seq_len
    assert state["guard"]["skipped"] == 0 and state["guard"]["lr_scale"] == 1.0


# --- 5, 13. probe --checkpoint: the manifest, non-finite results, its own flag in errors ------


@pytest.fixture
def finished_run(tmp_path, corpus):
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--corpus", str(corpus), "--out", str(run), "--quiet"]) == 0
    return run


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_probe_checkpoint_verifies_the_manifest(finished_run, tmp_path, capsys):
    out = str(tmp_path / "p.json")
    flip_a_byte(finished_run / "checkpoints" / "step-0000040" / "model.safetensors")
    assert main(["probe", "--checkpoint", str(finished_run), "--json", out]) == 0  # the previous checkpoint
    err = capsys.readouterr().err
    assert "step-0000040' is corrupt or truncated" in err and "using step-0000020" in err, err
    flip_a_byte(finished_run / "checkpoints" / "step-0000020" / "model.safetensors")
    one_line_error(capsys, ["probe", "--checkpoint", str(finished_run), "--json", out], "is corrupt or truncated")


def test_probe_refuses_non_finite_weights(finished_run, tmp_path, capsys):
    """Weights that verify (the manifest rewritten to match) but hold a NaN: an error, not NaN results."""
    ckpt = finished_run / "checkpoints" / "step-0000040"
    weights = load_file(ckpt / "model.safetensors")
    name = next(iter(weights))
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, ckpt / "model.safetensors")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    import hashlib

    manifest["model.safetensors"] = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(
        capsys,
        ["probe", "--checkpoint", str(finished_run), "--json", str(tmp_path / "p.json")],
        "holds non-finite weights",
    )


def test_probe_checkpoint_errors_name_the_checkpoint_flag(tmp_path, capsys):
    err = one_line_error(capsys, ["probe", "--checkpoint", str(tmp_path)], f"--checkpoint '{tmp_path}' holds no run")
    assert "--out" not in err


# --- 6. k checkpoints, fallback, a missing checkpoints/latest --------------------------------


def test_the_newest_k_checkpoints_are_kept(corpus, tmp_path, capsys):
    train(tiny(corpus, "train.ckpt_interval=10"), tmp_path / "a", progress=False)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == [
        "latest",
        "step-0000030",
        "step-0000040",
    ]
    train(tiny(corpus, "train.ckpt_interval=10", "train.keep_checkpoints=3"), tmp_path / "b", progress=False)
    assert len(list((tmp_path / "b" / "checkpoints").glob("step-*"))) == 3
    one_line_error(
        capsys,
        ["train", "--config", "tiny", "--set", "train.keep_checkpoints=1"],
        "train.keep_checkpoints=1 is invalid: expected an integer >= 2",
    )


def test_missing_latest_resumes_from_the_newest_checkpoint(corpus, tmp_path):
    cfg = tiny(corpus, "train.ckpt_interval=10")
    train(cfg, tmp_path / "full", progress=False)
    train(cfg, tmp_path / "cut", progress=False, stop_after=25)
    (tmp_path / "cut" / "checkpoints" / "latest").unlink()
    before = read_metrics(tmp_path / "cut")
    train(cfg, tmp_path / "cut", resume=True, progress=False)
    after = read_metrics(tmp_path / "cut")
    assert after[:4] == before[:4]  # steps 5-20 are not trained again (their timing would differ)
    assert untimed(after) == untimed(read_metrics(tmp_path / "full"))


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(corpus, tmp_path, capsys):
    cfg = tiny(corpus, "train.ckpt_interval=10")
    train(cfg, tmp_path / "full", progress=False)
    train(cfg, tmp_path / "cut", progress=False, stop_after=25)
    flip_a_byte(tmp_path / "cut" / "checkpoints" / "step-0000020" / "state.pt")
    train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert "step-0000020' is corrupt or truncated" in capsys.readouterr().err
    assert untimed(read_metrics(tmp_path / "cut")) == untimed(read_metrics(tmp_path / "full"))


# --- 9. checkpoints/latest pointing outside the run ------------------------------------------


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_latest_pointing_outside_the_run_is_refused(corpus, tmp_path, capsys, where):
    cfg = tiny(corpus, "train.ckpt_interval=10")
    train(cfg, tmp_path / "other", progress=False)
    train(cfg, tmp_path / "cut", progress=False, stop_after=25)
    shutil.rmtree(tmp_path / "cut" / "checkpoints")  # only a latest that names another run's checkpoint
    target = tmp_path / "other" / "checkpoints" / "step-0000040"
    (tmp_path / "cut" / "checkpoints").mkdir()
    (tmp_path / "cut" / "checkpoints" / "latest").write_text(
        "../../other/checkpoints/step-0000040" if where == "relative" else str(target)
    )
    one_line_error(
        capsys,
        ["train", "--out", str(tmp_path / "cut"), "--resume", "--quiet"],
        "not a checkpoint directory of this run: refused",
    )


# --- 10. temporary files from kills -----------------------------------------------------------


def test_temp_files_from_kills_are_swept(corpus, tmp_path):
    cfg = tiny(corpus, "train.ckpt_interval=10")
    run = tmp_path / "run"
    train(cfg, run, progress=False, stop_after=25)
    (run / ".metrics.jsonl.tmp-k1").write_text("half")
    (run / "checkpoints" / ".latest.tmp-k2").write_text("step-")
    (run / "checkpoints" / ".step-0000030.tmp-k3").mkdir()
    (run / "checkpoints" / ".step-0000030.tmp-k3" / "model.safetensors").write_bytes(b"\0" * 10)
    train(cfg, run, resume=True, progress=False)
    assert temp_files(run) == []

    study = {
        "base": "tiny",
        "set": [f"data.corpus={corpus}"],
        "tokens_per_cell": 2560,
        "probe": False,
        "grids": [{"name": "g", "axes": {"model.scheme": ["span"]}}],
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    out = tmp_path / "st"
    argv = ["study", "--config", str(tmp_path / "study.yaml"), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    cell = next((out / "cells").iterdir())
    for path in (out / ".results.csv.tmp-a", out / "plots" / ".val_vs_lr.png.tmp-b", cell / ".cell.json.tmp-c"):
        path.write_text("half")
    assert main(argv) == 0
    assert temp_files(out) == []


# --- 12. strict JSON ----------------------------------------------------------------------------


def test_every_json_file_is_strict_json(corpus, tmp_path):
    cfg = tiny(
        corpus,
        "model.scheme=pre",
        "train.lr=1e6",
        "train.grad_clip=0",
        "train.warmup_steps=0",
        "model.init_std=10",
        "train.probe_interval=1",
        "train.log_interval=1",
    )
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["diverged_reason"] == "non-finite loss"
    files = list((tmp_path / "run").rglob("*.json")) + list((tmp_path / "run").rglob("*.jsonl"))
    assert len(files) >= 3
    for path in files:
        for line in path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
            strict_load(line)
    assert read_metrics(tmp_path / "run")[-1]["loss"] is None  # the NaN, as null
    from spannorm.files import dumps

    assert strict_load(dumps({"a": [float("nan"), float("inf"), -float("inf"), 1.5]})) == {"a": [None] * 3 + [1.5]}


# --- also: a closed pipe, a diverged run's reason on stderr -------------------------------------


def test_a_closed_pipe_ends_quietly():
    exe = Path(sys.executable).parent / "spannorm"
    proc = subprocess.Popen([exe, "schemes", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # as `| head` does once it has what it wants
    err = proc.stderr.read().decode()
    proc.wait()
    assert err == "" and proc.returncode == 141, (proc.returncode, err)


def test_a_diverged_run_exits_0_with_its_reason_on_stderr(corpus, tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--config",
                "tiny",
                "--corpus",
                str(corpus),
                "--out",
                str(tmp_path / "r"),
                "--quiet",
                "--set",
                "train.lr=1e6",
                "--set",
                "train.grad_clip=0",
                "--set",
                "train.warmup_steps=0",
                "--set",
                "model.init_std=10",
                "--set",
                "model.scheme=pre",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "the run diverged at step" in err and "non-finite loss" in err, err


# --- the fault test: SIGKILL at random moments --------------------------------------------------


def kill_and_resume(corpus, tmp_path, kills: int, steps: int, seed: int):
    """Train a tiny run (a checkpoint every step) with SIGKILL at random moments, half of them while a
    checkpoint is being written, resuming each time; then finish it. Returns the kills that landed."""
    sets = [
        f"data.corpus={corpus}",
        f"train.max_steps={steps}",
        "train.ckpt_interval=1",
        "train.log_interval=1",
        "train.eval_interval=20",
        "train.probe_interval=7",
    ]
    cli = [sys.executable, "-m", "spannorm.cli", "train", "--quiet"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # one thread, as this module's
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(load_config("tiny", sets), full, progress=False)
    rng = random.Random(seed)
    landed, in_writes = 0, 0
    first = True
    while landed < kills and not (cut / "summary.json").exists():
        argv = [*cli, "--config", "tiny", *(a for s in sets for a in ("--set", s))] if first else [*cli, "--resume"]
        proc = subprocess.Popen([*argv, "--out", str(cut)], env=env, stderr=subprocess.PIPE)
        first = False
        latest = cut / "checkpoints" / "latest"
        before = latest.read_text() if latest.is_file() else ""
        deadline = time.time() + 120
        while (
            time.time() < deadline and proc.poll() is None and not (latest.is_file() and latest.read_text() != before)
        ):
            time.sleep(0.002)  # training (kills left no temporary file yet: they are swept first)
        if landed % 2:  # while a checkpoint is written: its temporary directory exists
            while time.time() < deadline and proc.poll() is None and not any(latest.parent.glob(".step-*.tmp-*")):
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        if proc.returncode == -signal.SIGKILL:
            landed += 1
            in_writes += bool(temp_files(cut))
        else:
            assert proc.returncode == 0, err.decode()
    train(load_run(cut), cut, resume=True, progress=False)
    # the final weights, the metrics and the summary are the uninterrupted run's; no temporary file is left
    final = f"checkpoints/step-{steps:07d}/model.safetensors"
    a, b = load_file(full / final), load_file(cut / final)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert untimed(read_metrics(cut)) == untimed(read_metrics(full))
    assert (cut / "diagnostics.jsonl").read_text() == (full / "diagnostics.jsonl").read_text()
    summaries = [strict_load((d / "summary.json").read_text()) for d in (full, cut)]
    assert untimed(summaries[:1]) == untimed(summaries[1:])
    assert temp_files(cut) == []
    (cut / "summary.json").unlink()  # and a kill between the final checkpoint and the summary
    assert untimed([train(load_run(cut), cut, resume=True, progress=False)]) == untimed(summaries[:1])
    return landed, in_writes


def test_sigkill_at_random_moments_3_kills(corpus, tmp_path):
    landed, in_writes = kill_and_resume(corpus, tmp_path, kills=3, steps=60, seed=1)
    assert landed == 3


@pytest.mark.slow
def test_sigkill_at_random_moments_12_kills(corpus, tmp_path):
    landed, in_writes = kill_and_resume(corpus, tmp_path, kills=12, steps=200, seed=2)
    assert landed == 12 and in_writes >= 1


# --- 7. a full disk: one line, exit code 2, nothing half written -----------------------------------


def disk_full(path="?"):
    import errno

    return OSError(errno.ENOSPC, "No space left on device", str(path))


def test_a_full_disk_in_data_prepare_is_one_line(corpus, tmp_path, capsys, monkeypatch):
    from spannorm import data

    write = data._TokenFile.write

    def fill_up(self, ids):  # some bytes land, then the disk is full
        self.f.write(bytes(100))
        raise disk_full(self.f.name)

    cache = tmp_path / "cache"
    argv = ["data", "prepare", "--corpus", str(corpus), "--set", f"data.cache_dir={cache}"]
    monkeypatch.setattr(data._TokenFile, "write", fill_up)
    err = one_line_error(capsys, argv, "the disk is full (No space left on device)")
    assert f"{cache / 'datasets'}/byte256-" in err
    assert temp_files(cache) == [] and list((cache / "datasets").iterdir()) == []
    monkeypatch.setattr(data._TokenFile, "write", write)  # space freed: it works
    assert main(argv) == 0


@pytest.mark.parametrize("where", ["weights", "state"])
def test_a_full_disk_at_a_checkpoint_is_one_line_and_resumable(corpus, tmp_path, capsys, monkeypatch, where):
    """As the libraries report it: safetensors with a SafetensorError "(os error 28)", torch.save with a RuntimeError
    of its own raised while the OSError is handled."""
    import torch
    from safetensors import SafetensorError

    import spannorm.checkpoint as checkpoint_mod

    run = tmp_path / "run"
    argv = ["train", "--config", "tiny", "--corpus", str(corpus), "--out", str(run), "--quiet"]

    def full_weights(model, filename):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def full_state(obj, f, *args, **kwargs):
        f.write(b"PK")
        try:
            raise disk_full()
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3968 vs 3860") from None

    with monkeypatch.context() as m:
        if where == "weights":
            m.setattr(checkpoint_mod, "save_model", full_weights)
        else:
            m.setattr(torch, "save", full_state)
        err = one_line_error(capsys, argv, "the disk is full (No space left on device)")
    assert f"the run {str(run)!r}" in err and "--resume" in err
    assert temp_files(run) == [] and list((run / "checkpoints").iterdir()) == []
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0  # space freed
    assert json.loads((run / "summary.json").read_text())["steps"] == 40


def test_a_full_disk_writing_metrics_is_one_line(corpus, tmp_path, capsys, monkeypatch):
    import builtins

    import spannorm.train as train_mod

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            raise disk_full()  # (a buffered write's error names no file)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def full_open(path, *args, **kwargs):
        f = builtins.open(path, *args, **kwargs)
        return Full(f) if Path(path).name == "metrics.jsonl" else f

    run = tmp_path / "run"
    monkeypatch.setattr(train_mod, "open", full_open, raising=False)
    err = one_line_error(
        capsys, ["train", "--config", "tiny", "--corpus", str(corpus), "--out", str(run), "--quiet"], "the disk is full"
    )
    assert f"the run {str(run)!r}" in err and temp_files(run) == []


def test_any_other_os_error_is_one_line(capsys, monkeypatch):
    import errno

    import spannorm.cli as cli

    def fails(args):
        raise PermissionError(errno.EACCES, "Permission denied", "/somewhere/file")

    monkeypatch.setattr(cli, "cmd_schemes", fails)
    one_line_error(capsys, ["schemes"], "cannot use '/somewhere/file': Permission denied")
    monkeypatch.setattr(cli, "cmd_schemes", lambda args: (_ for _ in ()).throw(disk_full("/x/y")))
    one_line_error(capsys, ["schemes"], "cannot write '/x/y': the disk is full (No space left on device)")


# --- 11. one-line errors at file edges ----------------------------------------------------------

EDGES = {  # case: (argv after "spannorm", the fragment of the error); {f}: a file, {d}: a directory, {c}: the corpus
    "binary --config": (["train", "--config", "{f}"], "is not a UTF-8 text file"),
    "--out a file": (["train", "--config", "tiny", "--corpus", "{c}", "--out", "{f}"], "cannot be used as a directory"),
    "--out under a file": (
        ["train", "--config", "tiny", "--corpus", "{c}", "--out", "{f}/run"],
        "cannot be used as a directory",
    ),
    "data.cache_dir a file": (
        ["train", "--config", "tiny", "--corpus", "{c}", "--out", "{d}/r", "--set", "data.cache_dir={f}"],
        "is not a directory",
    ),
    "probe --json a directory": (
        ["probe", "--config", "tiny", "--corpus", "{c}", "--depths", "2", "--json", "{d}"],
        "is a directory",
    ),
    "probe --json under a file": (
        ["probe", "--config", "tiny", "--corpus", "{c}", "--depths", "2", "--json", "{f}/p.json"],
        "cannot be created",
    ),
}


@pytest.mark.parametrize("case", sorted(EDGES))
def test_file_edges_give_one_line_errors(corpus, tmp_path, capsys, case):
    a_file = tmp_path / "a_file"
    a_file.write_bytes(bytes(range(256)))
    argv, fragment = EDGES[case]
    one_line_error(capsys, [a.format(f=a_file, d=tmp_path, c=corpus) for a in argv], fragment)


def test_a_corrupt_summary_is_a_one_line_error(finished_run, capsys):
    (finished_run / "summary.json").write_text('{"scheme": "sp')
    one_line_error(
        capsys,
        ["train", "--out", str(finished_run), "--resume"],
        "summary.json' cannot be read as JSON (JSONDecodeError): delete it and resume the run",
    )


@pytest.mark.parametrize(
    "size,said",
    [
        ("model.d_model=1099511627776", "at most 1,048,576"),  # (the model's bound)
        ("model.d_model=262144", "GiB of memory"),
        ("train.batch_size=1000000000000", "GiB of memory"),
        ("train.eval_batches=1000000000000", "distinct windows"),  # (drawn batch by batch: no memory is asked)
        ("model.n_layers=100000000", "at most 1,048,576"),
        ("model.n_layers=1000000", "GiB of memory"),
    ],
)
def test_absurd_sizes_are_refused_before_anything_is_allocated(corpus, tmp_path, capsys, size, said):
    one_line_error(
        capsys,
        [
            "train",
            "--config",
            "tiny",
            "--corpus",
            str(corpus),
            "--out",
            str(tmp_path / "r"),
            "--set",
            size,
            "--set",
            "model.n_heads=1",
        ],
        said,
    )
    assert not (tmp_path / "r").exists()


# --- Ctrl-C: a checkpoint, then exit 130; progress lines when stderr is not a terminal -------------


def test_ctrl_c_writes_a_checkpoint_and_the_run_resumes_exactly(corpus, tmp_path):
    more = ["train.max_steps=300", "train.ckpt_interval=1000", "train.eval_interval=10"]
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "spannorm.cli",
        "train",
        "--config",
        "tiny",
        "--corpus",
        str(corpus),
        "--out",
        str(run),
        *[a for m in more for a in ("--set", m)],
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not any(r["step"] >= 20 for r in strict_rows(run / "metrics.jsonl")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "--resume" in err and "Traceback" not in err
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and 20 <= int(ckpts[0].name[5:]) < 300  # written at the interrupt, not a schedule
    lines = [ln for ln in err.splitlines() if ln.startswith("span: step ")]
    assert lines and all("val loss" in ln for ln in lines)  # stderr is a pipe: progress lines, no bar
    train(load_run(run), run, resume=True, progress=False)
    train(tiny(corpus, *more), tmp_path / "full", progress=False)
    assert untimed(read_metrics(run)) == untimed(read_metrics(tmp_path / "full"))


def strict_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")] if path.is_file() else []
