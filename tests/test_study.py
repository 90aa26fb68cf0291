"""`spannorm study`: grid expansion, results/report/plots, reuse, resume, divergence, --jobs, bad YAML."""

import csv
import hashlib
import importlib
import io
import json
import lzma
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import check_page

from spannorm.cli import main
from spannorm.config import ConfigError
from spannorm.run import read_metrics
from spannorm.run_config import load_config, preset_names
from spannorm.study import expand, load_study, plan_study, run_study, study_from_dict, study_names
from spannorm.study.search import search_follow, searches
from spannorm.train import PATIENCE, train

PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def small_study(corpus, **changes):
    """A few-second study on the tiny preset: pre and span at depths 2 and 3, two seeds, a span ablation."""
    data = {
        "base": "tiny",
        "set": [f"data.corpus={corpus}", "train.probe_interval=5"],
        "tokens_per_cell": 2560,  # 10 steps of 8 × 32
        "grids": [
            {
                "name": "main",
                "axes": {
                    "model.scheme": ["pre", "span"],
                    "model.n_layers": [2, 3],
                    "train.lr": [1e-2],
                    "train.seed": [1, 2],
                },
            },
            {
                "name": "abl",
                "axes": {
                    "model.scheme": ["span"],
                    "model.n_layers": [3],
                    "train.lr": [1e-2],
                    "train.seed": [1],
                    "model.span.scale": ["norm", "none"],
                },
            },
        ],
    }
    data.update(changes)
    return data


def write_study(tmp_path, data):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_expand_grid_dedup_names_and_steps(corpus):
    study = study_from_dict(small_study(corpus))
    cells = expand(plan_study(study))
    names = [c.name for c in cells]
    # 2 schemes × 2 depths × 2 seeds, then the ablation:
    # its span_scale=norm cell (the default) is the main grid's span_L3_s1
    assert names == [
        "pre_L2_lr0.01_s1",
        "pre_L2_lr0.01_s2",
        "pre_L3_lr0.01_s1",
        "pre_L3_lr0.01_s2",
        "span_L2_lr0.01_s1",
        "span_L2_lr0.01_s2",
        "span_L3_lr0.01_s1",
        "span_L3_lr0.01_s2",
        "span_L3_lr0.01_s1_span_scale-none",
    ]
    shared = cells[names.index("span_L3_lr0.01_s1")]
    assert shared.grids == ["main", "abl"] and shared.extras == {} and shared.axes["model.span.scale"] == "norm"
    assert cells[-1].extras == {"model.span.scale": "none"} and cells[-1].series == "span span_scale=none"
    assert all(c.cfg.train.max_steps == 10 for c in cells)
    # a batch-size axis changes the step count, not the token budget
    data = small_study(corpus, grids=[{"name": "g", "axes": {"train.batch_size": [4, 8]}}])
    assert [c.cfg.train.max_steps for c in expand(plan_study(study_from_dict(data)))] == [20, 10]


def test_shipped_studies_expand_and_are_not_presets(tmp_path):
    assert {"tiny", "reference"} <= set(study_names())
    assert "studies" not in preset_names() and "reference" not in preset_names()
    ref = expand(plan_study(load_study("reference")))
    assert len(ref) == 8 * 3 * 2 * 2 + 2 * 9 - 2 + 2 * 2 * 2 * 2
    assert {c.cfg.model.d_model for c in ref} == {64} and {c.cfg.train.max_steps for c in ref} == {256}
    assert {c.cfg.model.n_layers for c in ref if c.extras and not c.cfg.model.moe.enabled} == {48}
    assert {(c.cfg.model.n_layers, c.cfg.model.moe.n_experts) for c in ref if c.cfg.model.moe.enabled} == {
        (6, 8),
        (24, 8),
    }
    assert len(expand(plan_study(load_study("tiny")))) == 3 * 2 * 2 * 2 + 4 * 3 * 2 - 2
    for name in study_names():  # every shipped study's first cells are valid (a typo shows here, not hours in)
        plan = plan_study(load_study(name))
        assert expand(plan, search_follow(searches(plan, tmp_path / name))), name

    lr = expand(plan_study(load_study("lr")))
    assert len(lr) == 9 * 2 * 6  # span (norm, the default), span init, span multiplier and 6 peers; 6 lrs
    assert {c.cfg.train.max_steps for c in lr} == {256} and {c.cfg.model.d_model for c in lr} == {64}
    assert {c.cfg.model.n_layers for c in lr} == {12, 48} and {c.cfg.train.seed for c in lr} == {1}
    assert "span_L12_lr0.001_s1" in [c.name for c in lr]  # the default span: no span_scale in its name
    assert [g.best_lr_seeds for g in load_study("lr").grids] == [[2, 3]] * 3


def test_study_runs_writes_outputs_and_reuses(corpus, tmp_path, capsys):
    out = tmp_path / "st"
    argv = ["study", "--config", str(write_study(tmp_path, small_study(corpus))), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count(": trained, val loss") == 9
    rows = read_csv(out / "results.csv")
    assert [r["name"] for r in rows][-1] == "span_L3_lr0.01_s1_span_scale-none"
    assert len(rows) == 9 and {r["steps"] for r in rows} == {"10"} and {r["tokens"] for r in rows} == {"2560"}
    assert rows[6]["grid"] == "main+abl" and rows[-1]["model.span.scale"] == "none"
    for r in rows:
        assert r["diverged"] == "False" and 2.0 < float(r["final_val_loss"]) < 5.0
        assert float(r["wall_s"]) > 0 and int(r["n_params"]) > 0 and r["status"] in ("ok", "stalled")
        cell = out / "cells" / r["name"]
        assert (cell / "probe.json").is_file() and not (cell / "checkpoints").exists()
        summary = json.loads((cell / "summary.json").read_text())
        assert float(r["final_val_loss"]) == summary["final_val_loss"]
    assert load_study(str(out / "study.yaml")).to_dict() == load_study(str(tmp_path / "study.yaml")).to_dict()
    for name in ("val_vs_depth", "val_vs_lr", "ablation", "loss_curves", "grad_heatmaps", "similarity"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == PNG
    report = (out / "report.md").read_text()
    assert f"Command: `spannorm study --config {tmp_path / 'study.yaml'}" in report
    assert "2,560 tokens (10 steps × 8 × 32 tokens" in report
    assert f"the 9 finished cells' wall times sum to {sum(float(r['wall_s']) for r in rows) / 3600:.2f} h" in report
    assert "| series | L=2, lr=0.01 | L=3, lr=0.01 |" in report and "| span span_scale=none |" in report
    pre = [float(r["final_val_loss"]) for r in rows if r["name"].startswith("pre_L2")]
    mean, std = sum(pre) / 2, abs(pre[0] - pre[1]) / 2**0.5
    assert f"| pre | {mean:.3f} ± {std:.3f}" in report
    assert "![similarity](plots/similarity.png)" in report
    claims = report.split("## Claims")[1]
    for i in range(1, 7):
        line = next(ln for ln in claims.splitlines() if ln.startswith(f"{i}. **"))
        assert any(f": {v}.**" in line for v in ("supported", "not supported", "inconclusive")), line
    assert "6. **All of the above in MoE models: inconclusive.** the study has no MoE cells" in claims
    # the second run trains nothing: every summary keeps its mtime, results.csv is byte-identical
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/summary.json")}
    before = (out / "results.csv").read_text()
    assert main(argv) == 0
    assert capsys.readouterr().out.count(": reused, val loss") == 9
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/*/summary.json")} == mtimes
    assert (out / "results.csv").read_text() == before
    assert "0 trained in this session, 9 reused" in (out / "report.md").read_text()


def _values(rows):
    """results.csv without the timing columns."""
    return [{k: v for k, v in r.items() if k not in ("wall_s", "tokens_per_s")} for r in rows]


def test_interrupted_study_resumes_to_the_same_results(corpus, tmp_path):
    data = small_study(
        corpus,
        grids=[{"name": "g", "axes": {"model.scheme": ["pre", "span"], "model.n_layers": [2], "train.seed": [1]}}],
        probe=False,
    )
    data["set"].append("train.ckpt_interval=5")
    data["tokens_per_cell"] = 5120  # 20 steps
    study = study_from_dict(data)
    run_study(study, tmp_path / "full", "cmd", log=lambda *a: None)
    # as if killed mid-study: the first cell finished, the second stopped at step 13 (checkpoint at 10)
    cells = expand(plan_study(study))
    train(cells[0].cfg, tmp_path / "cut" / "cells" / cells[0].name, progress=False)
    assert train(cells[1].cfg, tmp_path / "cut" / "cells" / cells[1].name, progress=False, stop_after=13) == {
        "step": 13,
        "finished": False,
    }
    logged = []
    run_study(study, tmp_path / "cut", "cmd", log=logged.append)
    assert any(cells[0].name in ln and "reused" in ln for ln in logged)
    assert any(cells[1].name in ln and "trained" in ln for ln in logged)
    assert _values(read_csv(tmp_path / "cut" / "results.csv")) == _values(read_csv(tmp_path / "full" / "results.csv"))
    for c in cells:
        assert _values(read_metrics(tmp_path / "cut" / "cells" / c.name)) == _values(
            read_metrics(tmp_path / "full" / "cells" / c.name)
        )


def test_diverged_cell_is_stopped_and_reported(corpus, tmp_path, capsys):
    data = small_study(
        corpus,
        grids=[{"name": "g", "axes": {"model.scheme": ["pre"], "model.n_layers": [2], "train.lr": [3e-3, 10.0]}}],
    )
    data["set"].append("train.grad_clip=0")
    data["tokens_per_cell"] = 5120  # 20 steps
    out = tmp_path / "st"
    assert main(["study", "--config", str(write_study(tmp_path, data)), "--out", str(out), "--quiet"]) == 0
    assert "2 cells: " in capsys.readouterr().out
    ok, bad = read_csv(out / "results.csv")
    assert ok["status"] in ("ok", "stalled") and ok["steps"] == "20" and ok["diverged"] == "False"
    assert bad["status"] == "diverged" and bad["diverged"] == "True" and int(bad["steps"]) < 20
    assert (
        bad["diverged_step"] == bad["steps"] and bad["diverged_reason"] == "loss above its initial value after warmup"
    )
    assert bad["final_val_loss"] == "" and not (out / "cells" / bad["name"] / "probe.json").exists()
    report = (out / "report.md").read_text()
    assert "| pre | " in report and "div (1/1)" in report
    assert (
        f"- `{bad['name']}`: diverged at step {bad['steps']} of 20 (loss above its initial value after warmup)"
        in report
    )


def test_divergence_guard_in_the_trainer(corpus, tmp_path):
    base = [f"data.corpus={corpus}", "model.scheme=pre", "train.max_steps=20"]
    # a healthy run is the same with or without the guard
    train(load_config("tiny", base), tmp_path / "on", progress=False)
    off = train(load_config("tiny", base + ["train.stop_on_divergence=false"]), tmp_path / "off", progress=False)
    assert read_metrics(tmp_path / "on") == [
        r | {"tokens_per_s": a["tokens_per_s"]}
        for r, a in zip(read_metrics(tmp_path / "off"), read_metrics(tmp_path / "on"))
    ]
    assert not off["diverged"] and off["diverged_step"] is None and isinstance(off["stalled"], bool)
    # without warmup the guard starts at step 2 (step 1's loss is the reference itself)
    assert not train(load_config("tiny", base + ["train.warmup_steps=0"]), tmp_path / "w0", progress=False)["diverged"]
    # a huge lr without clipping: the loss stays above the first from step 6 (warmup 5), so the guard
    # stops the run after PATIENCE such steps; off, it runs on
    wild = base + ["train.lr=10", "train.grad_clip=0", "train.ckpt_interval=2"]
    s = train(load_config("tiny", wild), tmp_path / "wild", progress=False)
    assert s["diverged"] and s["diverged_step"] == 5 + PATIENCE == s["steps"] and s["final_val_loss"] is None
    assert s["diverged_reason"] == "loss above its initial value after warmup"
    s_off = train(load_config("tiny", wild + ["train.stop_on_divergence=false"]), tmp_path / "wild-off", progress=False)
    assert s_off["steps"] == 20
    # interrupted during warmup and resumed: the guard's reference (the first loss) is the same
    cfg = load_config("tiny", wild)
    train(cfg, tmp_path / "cut", progress=False, stop_after=3)
    assert train(cfg, tmp_path / "cut", resume=True, progress=False)["diverged_step"] == 5 + PATIENCE
    with pytest.raises(ConfigError, match="train.stop_on_divergence='yes' is invalid"):
        load_config("tiny", ["train.stop_on_divergence='yes'"])


def test_jobs_2_gives_the_same_results(corpus, tmp_path, capsys):
    data = small_study(corpus, grids=[{"name": "g", "axes": {"model.scheme": ["pre", "post"], "model.n_layers": [2]}}])
    path = write_study(tmp_path, data)
    for jobs in (1, 2):
        assert main(["study", "--config", str(path), "--out", str(tmp_path / f"j{jobs}"), "--jobs", str(jobs)]) == 0
    assert capsys.readouterr().out.count(": trained, val loss") == 4
    assert _values(read_csv(tmp_path / "j2" / "results.csv")) == _values(read_csv(tmp_path / "j1" / "results.csv"))


def test_a_cell_of_another_config_is_refused(corpus, tmp_path, capsys):
    data = small_study(corpus, grids=[{"name": "g", "axes": {"model.n_layers": [2]}}], probe=False)
    path = write_study(tmp_path, data)
    assert main(["study", "--config", str(path), "--out", str(tmp_path / "st"), "--quiet"]) == 0
    capsys.readouterr()
    code = main(["study", "--config", str(path), "--out", str(tmp_path / "st"), "--set", "train.weight_decay=0"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "with another config" in err


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"bogus": 1}, "unknown key bogus; valid keys: base, set, tokens_per_cell"),
        ({"tokens_per_cell": None}, "tokens_per_cell=None is invalid: expected an integer"),
        ({"grids": [{"axes": {"model.n_layers": [2]}}]}, "missing key grids[0].name; required keys: grids[0].name"),
        (
            {"tokens_per_cell": 5000},
            "tokens_per_cell=5000 is invalid for the base config: expected a multiple of "
            "train.batch_size × train.seq_len × train.grad_accum_steps × nproc_per_cell = 256",
        ),
        ({"tokens_per_cell": 0}, "tokens_per_cell=0 is invalid: expected a positive integer"),
        (
            {"tokens_per_cell": 1024},
            "train.warmup_steps=5 is invalid for the base config: expected fewer than the 4 steps",
        ),
        ({"grids": []}, "grids=[] is invalid: expected a non-empty list"),
        ({"grids": [{"name": "g", "axes": {"model.n_layers": [2]}, "extra": 1}]}, "unknown key grids[0].extra; valid"),
        (
            {"grids": [{"name": "g", "axes": {"model.n_layers": []}}]},
            "grids[0].axes.model.n_layers=[] is invalid: expected a non-empty list",
        ),
        (
            {"grids": [{"name": "g", "axes": {"model.bogus": [1]}}]},
            "unknown key model.bogus; valid keys: model.vocab_size",
        ),
        (
            {"grids": [{"name": "g", "axes": {"model.scheme": ["pre", "nope"]}}]},
            "model.scheme='nope' is invalid: expected one of pre, post, span",
        ),
        ({"grids": [{"name": "g", "axes": {"train.max_steps": [5]}}]}, "which tokens_per_cell sets"),
        ({"grids": [{"name": "g", "axes": {"n_layers": [2]}}]}, "a dotted config path such as model.n_layers"),
        ({"base": "huge"}, "--config 'huge' is neither a YAML file nor a preset"),
        ({"probe": "yes"}, "probe='yes' is invalid: expected true or false"),
        ({"nproc_per_cell": 0}, "nproc_per_cell=0 is invalid: expected a positive integer"),
        ({"nproc_per_cell": 2}, "nproc_per_cell=2 is invalid for the base config: train.distributed is none"),
        (
            {
                "grids": [
                    {"name": "g", "axes": {"train.lr": [1e-3, 1e-2], "train.seed": [1, 2]}, "best_lr_seeds": [3, 2]}
                ]
            },
            "grids[0].best_lr_seeds=2 is invalid: expected a seed not in the grid's train.seed axis [1, 2]",
        ),
        (
            {"grids": [{"name": "g", "axes": {"train.lr": [1e-3, 1e-2]}, "best_lr_seeds": [1337]}]},
            "grids[0].best_lr_seeds=1337 is invalid: expected a seed other than the base config's train.seed",
        ),
        (
            {"grids": [{"name": "g", "axes": {"train.lr": [1e-3, 1e-2]}, "best_lr_seeds": 2}]},
            "grids[0].best_lr_seeds=2 is invalid: expected a list",
        ),
        (
            {"grids": [{"name": "g", "axes": {"train.lr": [1e-3, 1e-2]}, "best_lr_seeds": [2, "3"]}]},
            "grids[0].best_lr_seeds[1]='3' is invalid: expected an integer",
        ),
        (
            {"grids": [{"name": "g", "axes": {"train.lr": [1e-3, 1e-2]}, "best_lr_seeds": [2, 2]}]},
            "grids[0].best_lr_seeds=[2, 2] is invalid: expected a list of distinct integer seeds",
        ),
        (
            {"grids": [{"name": "g", "axes": {"train.lr": [1e-3, 1e-3]}, "best_lr_seeds": [2]}]},
            "grids[0].axes.train.lr=[0.001, 0.001] is invalid: expected a list of 2 or more learning rates",
        ),
        (
            {"grids": [{"name": "g", "axes": {"model.n_layers": [2]}, "best_lr_seeds": [2]}]},
            "grids[0].axes.train.lr=None is invalid: expected a list of 2 or more learning rates",
        ),
    ],
)
def test_bad_study_yaml_is_a_one_line_error(corpus, tmp_path, capsys, change, fragment):
    out = tmp_path / "st"
    code = main(["study", "--config", str(write_study(tmp_path, small_study(corpus, **change))), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert fragment in err, err
    assert not (out / "cells").exists()


# each imports only earlier ones
STUDY_MODULES = (
    "launch",
    "grid",
    "cells",
    "archive",
    "results",
    "search",
    "claims",
    "verdicts",
    "plots",
    "report",
    "runner",
)


def test_study_modules_import_one_way():
    """spannorm.study's modules import each other in one direction, at module level, and no private names."""
    import ast
    from pathlib import Path

    import spannorm.study

    folder = Path(spannorm.study.__file__).parent
    assert sorted(p.stem for p in folder.glob("*.py")) == sorted(STUDY_MODULES + ("__init__",))
    for i, name in enumerate(STUDY_MODULES):
        tree = ast.parse((folder / f"{name}.py").read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or node.level == 0:
                continue
            assert id(node) in top, f"{name}.py imports .{node.module or ''} inside a function"
            assert not any(a.name.startswith("_") for a in node.names), f"{name}.py imports a private name"
            if node.level == 1:
                assert node.module in STUDY_MODULES[:i], f"{name}.py imports .{node.module}, not an earlier module"


def test_bad_study_command_line(tmp_path, capsys):
    for argv, fragment in (
        (["study", "--config", "nosuch"], "neither a YAML file nor a shipped study; studies:"),
        (["study", "--config", "tiny", "--jobs", "0"], "--jobs 0 is invalid"),
        (["study", "--config", "lr", "--set", "train.max_steps=5"], "--set train.max_steps is invalid here"),
    ):
        assert main(argv + ["--out", str(tmp_path / "st")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "st").exists()


def _children(pid):
    """Process ids whose parent is ``pid`` (Linux /proc)."""
    from pathlib import Path

    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid):
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_leaves_a_resumable_study(corpus, tmp_path, signame):
    """SIGINT (Ctrl-C) or SIGTERM (kill) to `spannorm study --jobs 2` mid-cell: exit 130 with one line, no worker
    left running, and the next run finishes with the same results."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data = small_study(
        corpus, grids=[{"name": "g", "axes": {"model.scheme": ["pre", "span"]}}], probe=False, tokens_per_cell=256 * 100
    )
    data["set"] += ["train.ckpt_interval=5", "train.log_interval=5", "train.eval_interval=100"]
    path = write_study(tmp_path, data)
    cli = [sys.executable, "-m", "spannorm.cli", "study", "--config", str(path), "--quiet"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    run_study(study_from_dict(data), tmp_path / "full", "cmd", log=lambda *a: None)
    proc = subprocess.Popen(
        [*cli, "--out", str(tmp_path / "cut"), "--jobs", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # (a test run started in the background with & ignores SIGINT, and a child inherits that: the study's own)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    last = expand(plan_study(study_from_dict(data)))[-1].name
    latest = tmp_path / "cut" / "cells" / last / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and not (latest.is_file() and latest.read_text() >= "step-0000010"):
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) >= 2, workers  # the two workers (and multiprocessing's resource tracker)
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.splitlines() == ["spannorm: interrupted"], err  # (issue 25, defect 35:
    # no warning of leaked semaphores after it)
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers), "a worker outlived the study"
    assert not (tmp_path / "cut" / "results.csv").exists(), "the study finished before it could be interrupted"
    res = subprocess.run([*cli, "--out", str(tmp_path / "cut")], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert _values(read_csv(tmp_path / "cut" / "results.csv")) == _values(read_csv(tmp_path / "full" / "results.csv"))


def test_report_only_reports_finished_cells_and_trains_nothing(corpus, tmp_path):
    data = small_study(
        corpus, grids=[{"name": "g", "axes": {"model.scheme": ["pre", "span"], "model.n_layers": [2]}}], probe=False
    )
    out = tmp_path / "st"
    rows = run_study(study_from_dict(data), out, "cmd", log=lambda *a: None, report_only=True)
    assert [r["status"] for r in rows] == ["not run", "not run"]
    assert not (out / "cells").exists() or not any((out / "cells").iterdir())
    assert "**2 not run yet** (a partial report)" in (out / "report.md").read_text()
    # one cell finished (as by a study stopped early): it is reported, the other is still "not run"
    one = small_study(
        corpus, grids=[{"name": "g", "axes": {"model.scheme": ["pre"], "model.n_layers": [2]}}], probe=False
    )
    run_study(study_from_dict(one), out, "cmd", log=lambda *a: None)
    rows = run_study(study_from_dict(data), out, "cmd", log=lambda *a: None, report_only=True)
    pre, span = (c.name for c in expand(plan_study(study_from_dict(data))))
    assert pre.startswith("pre_L2") and span.startswith("span_L2")
    assert [(r["name"], r["status"]) for r in rows] == [(pre, rows[0]["status"]), (span, "not run")]
    assert rows[0]["status"] in ("ok", "stalled") and float(rows[0]["final_val_loss"]) > 0
    assert "**1 not run yet**" in (out / "report.md").read_text()


def test_lr_sensitivity_names_the_scalings_that_train_at_the_high_lr(corpus):
    """The report's answer to "which scaling removes SpanNorm's high-lr sensitivity", on made-up results."""
    from spannorm.study import lr_sensitivity

    data = small_study(corpus)
    data["grids"][0]["axes"]["train.lr"] = [1e-3, 1e-2]
    data["grids"][1]["axes"]["train.lr"] = [1e-3, 1e-2]
    data["grids"][1]["axes"]["model.span.c"] = [1.0, 4.0]
    cells = expand(plan_study(study_from_dict(data)))
    val = {
        ("pre", "norm", 1.0): (2.0, 2.5),
        ("span", "norm", 1.0): (1.9, 3.3),  # default span: stalls
        ("span", "none", 1.0): (2.1, 2.4),
        ("span", "norm", 4.0): (2.0, 2.6),  # below pre / above pre
        ("span", "none", 4.0): (2.0, None),
    }  # diverged
    rows = []
    for c in cells:
        m = c.cfg.model
        lo, hi = val[(m.scheme.value, m.span.scale.value, m.span.c)]
        v = lo if c.cfg.train.lr < 5e-3 else hi
        status = "diverged" if v is None else "stalled" if v > 3.2 else "ok"
        rows.append({"status": status, "final_val_loss": v})
    text = lr_sensitivity(cells, rows)
    assert "At L=3, between lr=0.001 and lr=0.01" in text
    line = {r.split(" | ")[0].lstrip("| "): r for r in text.splitlines() if r.startswith("| ")}
    assert line["pre"].endswith("| 2.000 ± 0.000 | 2.500 ± 0.000 | +0.500 | (reference) |")  # 2 seeds
    assert line["span span_scale=norm span_c=1"].endswith("| 3.300 ± 0.000 stalled (2/2) | — | no |")
    assert line["span span_scale=none span_c=1"].endswith("| 2.400 | +0.300 | yes |")
    assert line["span span_scale=norm span_c=4"].endswith("| 2.600 | +0.600 | no |")
    assert line["span span_scale=none span_c=4"].endswith("| div (1/1) | — | no |")
    assert "at most PreNorm's 2.500): `span span_scale=none span_c=1`. With span_scale=none, span_c is not used" in text
    # a cell not run yet: the answer says it is provisional
    rows[[c.name for c in cells].index(next(c.name for c in cells if c.cfg.model.span.c == 4.0))]["status"] = "not run"
    assert "so far; some cells are not run yet." in lr_sensitivity(cells, rows)
    # no scaling axis, no section
    main_only = [(c, r) for c, r in zip(cells, rows) if "abl" not in c.grids]
    assert lr_sensitivity([c for c, _ in main_only], [r for _, r in main_only]) == ""


def test_signal_and_gradient_claims_leave_out_stalled_cells(corpus, tmp_path):
    """Claims 1 and 2 score the probes of cells that trained; a stalled cell's probe is shown, not scored."""
    from spannorm.study import NOT_SUPPORTED, SUPPORTED, claims

    cells = [c for c in expand(plan_study(study_from_dict(small_study(corpus)))) if not c.extras]
    stalled = next(c for c in cells if c.cfg.model.scheme.value == "span" and c.cfg.model.n_layers == 3)
    rows = []
    for c in cells:
        d, bad = c.cfg.model.n_layers, c is stalled
        rms = 100.0 if bad else 1.0
        probe = {
            "presum_rms": [{"attn": rms, "ffn": rms}] * d,
            "stream_rms": [1.0] * d + [1.0 if c.cfg.model.scheme.value == "span" else float(d)],
            "grad_ratio_first_last": 1e-9 if bad else 1.5,
            "adjacent_cosine": [0.5] * d,
            "layer_drop": [0.1] * d,
        }
        (tmp_path / "cells" / c.name).mkdir(parents=True)
        (tmp_path / "cells" / c.name / "probe.json").write_text(json.dumps(probe))
        rows.append({"status": "stalled" if bad else "ok", "final_val_loss": 2.0})
    init = [
        {
            "variant": v,
            "depth": d,
            "presum_rms": [{"attn": 1.0}],
            "stream_rms": [1.0],
            "grad_ratio_first_last": 1e3 if v == "post" and d == 3 else 1.2,
        }
        for v in ("pre", "post", "span")
        for d in (2, 3)
    ]
    verdict = dict(claims(cells, rows, tmp_path, init))
    signal, grads = verdict["Bounded forward signal"], verdict["Bounded gradients"]
    assert signal.verdict == SUPPORTED and grads.verdict == SUPPORTED
    assert f"left out, diverged or stalled: {stalled.name} 100" in signal.evidence
    assert f"left out, diverged or stalled: {stalled.name} 1e-09" in grads.evidence
    # the same probe from a cell that trained is scored, and then it refutes both claims
    rows[cells.index(stalled)]["status"] = "ok"
    verdict = dict(claims(cells, rows, tmp_path, init))
    assert verdict["Bounded forward signal"].verdict == NOT_SUPPORTED
    assert verdict["Bounded gradients"].verdict == NOT_SUPPORTED


def lr_study(corpus, **changes):
    """small_study with two lrs, one seed, and seeds 2 and 3 at each point's best lr."""
    data = small_study(corpus, **changes)
    for g in data["grids"]:
        g["axes"] |= {"train.lr": [1e-3, 1e-2], "train.seed": [1]}
        g["best_lr_seeds"] = [2, 3]
    return data


def fake_rows(cells, results):
    """results.csv rows from {cell name: (status, val loss)}; other cells: not run."""
    return [
        {"status": results.get(c.name, ("not run", None))[0], "final_val_loss": results.get(c.name, (0, None))[1]}
        for c in cells
    ]


def test_follow_ups_add_seeds_at_the_best_lr_only(corpus):
    from spannorm.study import follow_ups

    plan = plan_study(study_from_dict(lr_study(corpus)))
    cells = expand(plan)
    assert all(c.cfg.train.seed == 1 for c in cells)
    rows = fake_rows(
        cells,
        {
            "pre_L2_lr0.001_s1": ("ok", 2.5),
            "pre_L2_lr0.01_s1": ("ok", 2.3),  # best 1e-2
            "pre_L3_lr0.001_s1": ("ok", 2.4),
            "pre_L3_lr0.01_s1": ("stalled", 2.2),  # a stalled cell is never the best
            "span_L2_lr0.001_s1": ("stalled", 3.3),
            "span_L2_lr0.01_s1": ("diverged", None),  # none trained: no seeds
            "span_L3_lr0.01_s1": ("ok", 2.0),  # span_L3 at 1e-3 not run yet: no best lr so far
            "span_L3_lr0.001_s1_span_scale-none": ("diverged", None),
            "span_L3_lr0.01_s1_span_scale-none": ("ok", 2.6),
        },
    )
    more = follow_ups(plan, cells, rows)
    assert [c.name for c in more[: len(cells)]] == [c.name for c in cells]
    assert [c.name for c in more[len(cells) :]] == [
        "pre_L2_lr0.01_s2",
        "pre_L2_lr0.01_s3",
        "pre_L3_lr0.001_s2",
        "pre_L3_lr0.001_s3",
        "span_L3_lr0.01_s2_span_scale-none",
        "span_L3_lr0.01_s3_span_scale-none",
    ]
    assert more[-1].grids == ["abl"] and more[-1].series == "span span_scale=none"
    # once span_L3 at 1e-3 has finished, it gets its seeds too (at its best lr); a failed cell blocks the point
    rows[[c.name for c in cells].index("span_L3_lr0.001_s1")] = {"status": "ok", "final_val_loss": 1.9}
    assert [c.name for c in follow_ups(plan, cells, rows)[len(cells) :]][4:6] == [
        "span_L3_lr0.001_s2",
        "span_L3_lr0.001_s3",
    ]
    rows[[c.name for c in cells].index("pre_L2_lr0.001_s1")] = {"status": "failed: OSError"}
    assert "pre_L2_lr0.01_s2" not in [c.name for c in follow_ups(plan, cells, rows)]
    # a grid without best_lr_seeds adds nothing
    plain = plan_study(study_from_dict(small_study(corpus)))
    assert [c.name for c in follow_ups(plain, expand(plain), fake_rows(expand(plain), {}))] == [
        c.name for c in expand(plain)
    ]


def test_best_lr_and_stable_range_on_known_rows(corpus):
    from spannorm.study import best_lr, best_lr_table, stable_lrs

    ok = lambda v: {"status": "ok", "final_val_loss": v}  # noqa: E731
    by_lr = {5e-4: ok(2.30), 1e-3: ok(2.14), 2e-3: ok(2.10), 4e-3: ok(2.151), 8e-3: {"status": "diverged"}}
    assert best_lr(by_lr) == 2e-3 and stable_lrs(by_lr) == [1e-3, 2e-3]  # 2.151 is 0.051 above the best
    by_lr[1.6e-2] = {"status": "stalled", "final_val_loss": 2.0}  # lower, but stalled
    assert best_lr(by_lr) == 2e-3
    assert best_lr({1e-3: {"status": "stalled", "final_val_loss": 3.3}, 2e-3: {"status": "diverged"}}) is None
    assert best_lr({1e-3: ok("2.2"), 2e-3: ok("2.1")}) == 2e-3  # results.csv strings
    # the report table: pre at its best lr over 3 seeds, span with nothing trained
    data = lr_study(corpus, grids=[{"name": "g", "axes": {"model.scheme": ["pre", "span"], "model.n_layers": [2]}}])
    data["grids"][0]["axes"]["train.lr"] = [1e-3, 2e-3, 4e-3]
    data["grids"][0]["axes"]["train.seed"] = [1, 2, 3]
    del data["grids"][0]["best_lr_seeds"]
    cells = expand(plan_study(study_from_dict(data)))
    rows = fake_rows(
        cells,
        {
            "pre_L2_lr0.001_s1": ("ok", 2.12),
            "pre_L2_lr0.002_s1": ("ok", 2.10),
            "pre_L2_lr0.004_s1": ("ok", 2.30),
            "pre_L2_lr0.002_s2": ("ok", 2.20),
            "pre_L2_lr0.002_s3": ("ok", 2.30),
            "pre_L2_lr0.001_s2": ("ok", 1.0),  # a later seed is not part of the rule
            "span_L2_lr0.001_s1": ("stalled", 3.3),
            "span_L2_lr0.002_s1": ("diverged", None),
            "span_L2_lr0.004_s1": ("diverged", None),
        },
    )
    table = best_lr_table(cells, rows).splitlines()
    assert table[0] == "| series | L | best lr | val loss at the best lr | stable range | diverged or stalled |"
    assert table[2] == "| pre | 2 | 2e-3 | 2.200 ± 0.100 (n=3) | 1e-3 – 2e-3 (2 of 3) | — |"
    assert table[3] == "| span | 2 | none | — | — | 1e-3 stalled, 2e-3 div, 4e-3 div |"
    one_lr = [i for i, c in enumerate(cells) if c.cfg.train.lr == 1e-3]
    assert best_lr_table([cells[i] for i in one_lr], [rows[i] for i in one_lr]) == ""  # 1 lr: no section


def test_best_lr_seeds_study_runs_the_second_phase_and_resumes(corpus, tmp_path):
    data = lr_study(
        corpus,
        grids=[{"name": "g", "axes": {"model.scheme": ["pre"], "model.n_layers": [2]}}],
        probe=False,
        tokens_per_cell=40960,
    )  # 160 steps: enough to train (not stall) on the test corpus
    data["grids"][0]["axes"]["train.lr"] = [1e-2, 3e-2]
    data["grids"][0]["best_lr_seeds"] = [2]
    study = study_from_dict(data)
    assert study_from_dict(study.to_dict()).to_dict() == study.to_dict() and study.to_dict()["grids"][0][
        "best_lr_seeds"
    ] == [2]
    logged = []
    rows = run_study(study, tmp_path / "full", "cmd", log=logged.append)
    first = {float(r["train.lr"]): r for r in rows[:2]}
    best = min(first, key=lambda lr: first[lr]["final_val_loss"])
    assert all(r["status"] == "ok" for r in rows[:2]) and len(rows) == 3
    assert rows[2]["name"] == f"pre_L2_lr{best:g}_s2" and rows[2]["status"] in ("ok", "stalled")
    assert [ln.split(":")[0] for ln in logged if ln.startswith("[")] == [
        "[1/2] " + rows[0]["name"],
        "[2/2] " + rows[1]["name"],
        "[1/1] " + rows[2]["name"],
    ]
    report = (tmp_path / "full" / "report.md").read_text()
    assert (
        "## Each scheme at its best learning rate" in report
        and f"| pre | 2 | {best:.0e}".replace("e-0", "e-") in report
        and "(n=2)" in report
    )
    assert (tmp_path / "full" / "plots" / "best_lr.png").read_bytes()[:8] == PNG
    # stopped between the phases: --report-only shows the follow-up as not run, the next run adds the same one
    cut = tmp_path / "cut"
    for r in rows[:2]:
        shutil.copytree(tmp_path / "full" / "cells" / r["name"], cut / "cells" / r["name"])
    rows = run_study(study, cut, "cmd", log=lambda *a: None, report_only=True)
    assert [(r["name"], r["status"]) for r in rows][2] == (f"pre_L2_lr{best:g}_s2", "not run")
    logged = []
    run_study(study, cut, "cmd", log=logged.append)
    assert [ln.split(": ")[1].split(",")[0] for ln in logged if ln.startswith("[")] == ["reused", "reused", "trained"]
    assert _values(read_csv(cut / "results.csv")) == _values(read_csv(tmp_path / "full" / "results.csv"))


def test_report_only_probes_nothing_and_names_a_missing_init_probe(corpus, tmp_path, monkeypatch):
    """Issue 28: --report-only trains and probes nothing; a missing init_probe.json is named in the log and the
    report (claims 1 and 2 are then judged without it), not silently recomputed."""
    claims_module = importlib.import_module("spannorm.study.claims")  # (spannorm.study.claims is also a function)

    data = small_study(corpus, grids=[{"name": "g", "axes": {"model.scheme": ["pre", "span"]}}], probe=False)
    out = tmp_path / "st"
    run_study(study_from_dict(data), out, "cmd", log=lambda *a: None)
    assert (out / "init_probe.json").is_file()

    def no_probe(*args, **kwargs):
        raise AssertionError("--report-only probed a model")

    monkeypatch.setattr(claims_module, "probe", no_probe)
    said = []
    run_study(study_from_dict(data), out, "cmd", log=said.append, report_only=True)
    assert "init_probe.json" not in " ".join(said) and "is missing" not in (out / "report.md").read_text()
    (out / "init_probe.json").unlink()
    run_study(study_from_dict(data), out, "cmd", log=said.append, report_only=True)
    assert any("init_probe.json is missing" in line for line in said)
    assert "**`init_probe.json` is missing or was made for another config" in (out / "report.md").read_text()
    assert not (out / "init_probe.json").exists()


def test_an_init_probe_made_under_another_recipe_is_stale(corpus, tmp_path, monkeypatch):
    """A recipe changed in the code since the init probes were made (the cache key names the config, not the
    recipe): --report-only names the cache stale and probes nothing; a run remakes it with today's stds."""
    from spannorm.model_config import Scheme
    from spannorm.schemes import SCHEMES, Measured

    data = small_study(corpus, grids=[{"name": "g", "axes": {"model.scheme": ["pre", "span"]}}], probe=False)
    out = tmp_path / "st"
    run_study(study_from_dict(data), out, "cmd", log=lambda *a: None)
    before = json.loads((out / "init_probe.json").read_text())
    monkeypatch.setattr(SCHEMES[Scheme.POST], "measured", Measured(2.0, "a test"))  # post is probed, not trained
    said = []
    run_study(study_from_dict(data), out, "cmd", log=said.append, report_only=True)
    assert any("init_probe.json is missing or was made for another config or init recipe" in line for line in said)
    run_study(study_from_dict(data), out, "cmd", log=lambda *a: None)
    after = json.loads((out / "init_probe.json").read_text())
    assert after["key"] == before["key"] and after["init"] != before["init"]
    post = [r for r in after["runs"] if r["variant"] == "post"]
    assert post != [r for r in before["runs"] if r["variant"] == "post"]


COMMITTED = {  # study config -> its committed directory (README, docs/spannorm-lr.md)
    "fair-study": "docs/fair-study",
    "fair-recipes": "docs/fair-study/recipes",
    "fair-measured": "docs/fair-study/measured",
    "lr": "docs/lr-study",
    "reference": "docs/results",
    "docs/spannorm-lr/screen.yaml": "docs/spannorm-lr/screen",
    "fair-depth": "docs/fair-study/depth",
    "docs/fair-study/depth/first-rule/study.yaml": "docs/fair-study/depth/first-rule",
    "peers-2026": "docs/peers-2026",
    "transfer": "docs/transfer",
    "fair-peers-2026": "docs/fair-study/peers-2026",  # (partial: its cells still train)
    "fair-post-seeds": "docs/fair-study/post-seeds",
}
STALE = {"docs/spannorm-lr/screen.yaml"}  # its cells predate the width-aware recipes: its report is kept as it ran


@pytest.mark.parametrize("config", sorted(COMMITTED))
def test_report_only_of_every_committed_study_is_quick_probes_nothing_and_agrees(config, tmp_path, monkeypatch):
    """Issue 28: `study --report-only` on each committed study takes under 15 s and trains or probes nothing; its
    fresh report is the committed one (the docs agree with the code), but for the command line it was run with."""
    claims_module = importlib.import_module("spannorm.study.claims")  # (spannorm.study.claims is also a function)
    runner_module = importlib.import_module("spannorm.study.runner")

    root = Path(__file__).parents[1]
    copy = tmp_path / "study"
    # (without the cells/ a study run here leaves: a fresh checkout has only the archive, which this unpacks)
    shutil.copytree(root / COMMITTED[config], copy, ignore=shutil.ignore_patterns("cells"))

    def refuse(*args, **kwargs):
        raise AssertionError("--report-only trained or probed")

    monkeypatch.setattr(claims_module, "probe", refuse)
    monkeypatch.setattr(runner_module, "run_cells", refuse)
    monkeypatch.chdir(root)  # (a config given as a path is relative to the repository)
    start = time.perf_counter()
    assert main(["study", "--config", config, "--out", str(copy), "--report-only", "--quiet"]) == 0
    assert time.perf_counter() - start < 15
    if config not in STALE:
        fresh = (copy / "report.md").read_text().splitlines()
        committed = (root / COMMITTED[config] / "report.md").read_text().splitlines()
        assert [line for line in fresh if not line.startswith("Command: ")] == [
            line for line in committed if not line.startswith("Command: ")
        ], f"{COMMITTED[config]}/report.md is not what --report-only writes now: regenerate it"


def test_committed_studies_are_small_archives_that_pack_to_the_same_bytes():
    """Issue 27: docs/ holds under 10 MB in under 300 files; each committed study keeps its cells in one archive
    (no cells/ tracked by git), and its manifest's hashes are the archive's."""
    root = Path(__file__).parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout (what git tracks is what this checks)")
    tracked = subprocess.run(["git", "ls-files", "docs"], cwd=root, capture_output=True, text=True, check=True)
    files = tracked.stdout.split()
    assert len(files) < 300 and sum((root / f).stat().st_size for f in files) < 10 * 2**20
    assert not [f for f in files if "/cells/" in f]
    for study in COMMITTED.values():
        manifest = json.loads((root / study / "manifest.json").read_text())
        packed = (root / study / "cells.tar.xz").read_bytes()
        assert hashlib.sha256(packed).hexdigest() == manifest["sha256"]
        assert hashlib.sha256(lzma.decompress(packed)).hexdigest() == manifest["tar_sha256"]


def test_archive_round_trip(corpus, tmp_path, capsys):
    """Issue 27: a study packs its finished cells into cells.tar.xz (no checkpoints; diagnostics.jsonl with the
    fields a study reads); where cells/ is gone, the study unpacks it and reports and plots the same; the same
    cells pack to the same bytes; a damaged or foreign archive is a one-line error."""
    out = tmp_path / "st"
    data = small_study(corpus)
    data["grids"] = data["grids"][:1]
    argv = ["study", "--config", str(write_study(tmp_path, data)), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    archive = (out / "cells.tar.xz").read_bytes()
    with tarfile.open(out / "cells.tar.xz") as tar:
        names = tar.getnames()
        diag = tar.extractfile("pre_L2_lr0.01_s1/diagnostics.jsonl").read().decode().splitlines()
    assert len({n.split("/")[0] for n in names}) == 8 and not [n for n in names if "checkpoints" in n]
    full = [
        json.loads(line) for line in (out / "cells" / "pre_L2_lr0.01_s1" / "diagnostics.jsonl").read_text().splitlines()
    ]
    kept = [json.loads(line) for line in diag]
    assert [set(r) for r in kept] == [{"step", "grad_norm", "stream_rms"}] * len(full)
    assert kept[0]["grad_norm"] == pytest.approx(full[0]["grad_norm"], rel=1e-6) and "attn_rms" in full[0]
    report_only = argv[:-1] + ["--report-only", "--quiet"]
    assert main(report_only) == 0
    report, results = (out / "report.md").read_text(), (out / "results.csv").read_text()
    plots = {p.name: p.read_bytes() for p in (out / "plots").iterdir()}
    shutil.rmtree(out / "cells")
    assert main(report_only) == 0
    assert (out / "report.md").read_text() == report and (out / "results.csv").read_text() == results
    assert (out / "cells.tar.xz").read_bytes() == archive
    assert {p.name: p.read_bytes() for p in (out / "plots").iterdir()} == plots
    # a resumed study reads the unpacked cells as finished: it trains nothing
    capsys.readouterr()
    shutil.rmtree(out / "cells")
    assert main(argv) == 0 and (out / "cells.tar.xz").read_bytes() == archive
    # a damaged archive, an archive with a path out of the study
    shutil.rmtree(out / "cells")
    (out / "cells.tar.xz").write_bytes(archive[:100])
    assert main(argv) == 2
    assert "cells.tar.xz' is not a readable archive" in capsys.readouterr().err and not (out / "cells").exists()
    with tarfile.open(out / "cells.tar.xz", "w:xz") as tar:
        info = tarfile.TarInfo("../escape")
        tar.addfile(info, io.BytesIO(b""))
    assert main(argv) == 2
    assert "holds '../escape', which spannorm does not archive" in capsys.readouterr().err
    assert not (tmp_path / "escape").exists() and not (out / "cells").exists()


def test_report_html_is_self_contained_and_renders_in_a_browser(corpus, tmp_path):
    """Issue 32: report.html is report.md as one page: every plot embedded (no file or network reference), the same
    tables; headless Chromium renders it without a console error, loads every image and finds every table, and a
    screenshot is written (to $SPANNORM_ARTIFACTS where set)."""
    out = tmp_path / "st"
    data = small_study(corpus)
    data["grids"] = data["grids"][:1]
    assert main(["study", "--config", str(write_study(tmp_path, data)), "--out", str(out), "--quiet"]) == 0
    assert (out / "report.md").read_text().count("](plots/") >= 4
    check_page(out / "report.html", "report_html.png")


def test_each_study_slot_gets_its_own_gpus(corpus, monkeypatch):
    """Issue 29 (CUDA faked): with --jobs J and nproc_per_cell N, worker slot i gets GPUs i·N .. i·N + N - 1 of the
    visible ones (CUDA_VISIBLE_DEVICES, set in the worker before CUDA starts); more than the machine has is one line;
    on the CPU nothing is set."""
    import queue

    import torch

    cells_module = importlib.import_module("spannorm.study.cells")
    cells = expand(plan_study(study_from_dict(small_study(corpus))))
    assert cells_module.gpu_slots(2, 2, cells) is None  # (the CPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert cells_module.gpu_slots(2, 2, cells) == ["0,1", "2,3"]
    assert cells_module.gpu_slots(4, 1, cells) == ["0", "1", "2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert cells_module.gpu_slots(2, 2, cells) == ["4,5", "6,7"]
    with pytest.raises(ConfigError, match="needs 6 GPUs .* this machine has 4: expected --jobs at most 2"):
        cells_module.gpu_slots(3, 2, cells)
    slots = queue.SimpleQueue()
    slots.put("6,7")
    cells_module._worker_init(slots, True)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6,7"


def test_the_throughput_study_times_cells_of_the_fair_study():
    """docs/throughput/study.yaml (docs/performance.md) trains the fair study's own cells: same names, same configs."""
    from spannorm.run_config import run_config_from_dict, same_experiment

    root = Path(__file__).resolve().parent.parent
    cells = expand(plan_study(load_study(str(root / "docs/throughput/study.yaml"))))
    with tarfile.open(root / "docs/fair-study/cells.tar.xz") as tar:
        for cell in cells:
            committed = yaml.safe_load(tar.extractfile(f"{cell.name}/config.yaml"))
            assert same_experiment(run_config_from_dict(committed), cell.cfg), cell.name
    assert len(cells) == 4
