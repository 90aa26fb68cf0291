"""Issue 29: a study on a cluster (`spannorm study --launcher slurm`), each cell a job through submitit. Here the same
code path runs on submitit's local executor (spannorm.study.launch.CLUSTER set to "local"): the same results.csv as
a local study, a cell killed mid-run resumes from its checkpoint, finished cells are reused (never submitted)."""

import csv

import pytest
import yaml
from conftest import one_line_error

from spannorm.cli import main
from spannorm.run_config import read_run_config
from spannorm.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("submitit", reason="the cluster extra (submitit) is not installed")

COMPARED = ("name", "status", "steps", "tokens", "final_loss", "final_val_loss", "diverged")


def study_file(tmp_path, corpus):
    data = {
        "base": "tiny",
        "set": [f"data.corpus={corpus}", "train.probe_interval=0", "train.ckpt_interval=4"],
        "tokens_per_cell": 2560,  # 10 steps of 8 × 32
        "probe": False,
        "grids": [{"name": "g", "axes": {"model.scheme": ["pre", "span"], "model.n_layers": [2], "train.seed": [1]}}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def rows(out):
    with open(out / "results.csv") as f:
        return [{k: r[k] for k in COMPARED} for r in csv.DictReader(f)]


def test_a_study_on_slurm_through_submitit_is_the_local_study(corpus, tmp_path, monkeypatch, capsys):
    from spannorm.study import launch

    monkeypatch.setattr(launch, "CLUSTER", "local")
    monkeypatch.setattr(launch, "POLL_S", 0.5)
    config = study_file(tmp_path, corpus)
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    assert main(["study", "--config", str(config), "--out", str(local), "--quiet"]) == 0
    # a cell the scheduler killed after its checkpoint at step 4: the next run of the study resumes it
    span = next(r["name"] for r in rows(local) if r["name"].startswith("span"))
    killed = read_run_config(local / "cells" / span / "config.yaml")
    train(killed, cluster / "cells" / span, progress=False, stop_after=4)
    argv = ["study", "--config", str(config), "--out", str(cluster), "--launcher", "slurm"]
    assert main([*argv, "--slurm", "timeout_min=10"]) == 0
    said = capsys.readouterr().out
    assert rows(cluster) == rows(local)  # (exact resume: the killed cell's losses are the local run's)
    assert said.count(": trained") == 2 and f"{span}: trained" in said
    submitted = sorted(p.name for p in (cluster / "slurm").glob("*_submitted.pkl"))
    assert len(submitted) == 2
    # run again: every cell is reused, none submitted
    assert main(argv) == 0
    assert capsys.readouterr().out.count(": reused") == 2
    assert sorted(p.name for p in (cluster / "slurm").glob("*_submitted.pkl")) == submitted


def test_launcher_settings_are_checked_in_one_line(corpus, tmp_path, capsys, monkeypatch):
    from spannorm.study import launch

    config = study_file(tmp_path, corpus)
    base = ["study", "--config", str(config), "--out", str(tmp_path / "s")]
    one_line_error(capsys, [*base, "--slurm", "timeout_min=10"], "--slurm 'timeout_min=10' is only read with")
    one_line_error(capsys, [*base, "--launcher", "slurm", "--jobs", "2"], "--jobs 2 is not used with --launcher slurm")
    one_line_error(capsys, [*base, "--launcher", "slurm", "--slurm", "nokey"], "--slurm 'nokey' is invalid")
    # no Slurm on this machine: submitit finds no srun
    one_line_error(capsys, [*base, "--launcher", "slurm"], "--launcher slurm:", "--launcher local")
    monkeypatch.setattr(launch, "CLUSTER", "local")
    one_line_error(capsys, [*base, "--launcher", "slurm", "--slurm", "no_such_parameter=1"], "--slurm: ")
    assert not (tmp_path / "s" / "cells").exists()
