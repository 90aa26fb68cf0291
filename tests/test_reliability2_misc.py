"""Issue 25 (reliability, round 2): the smaller defects of reports and commands (9, 27, 34, 35 and what a new user
saw: empty tables in a partial study report, the wording of ``stalled``). Each test fails on the code before the
fix."""

import json
import re

import pytest
from conftest import one_line_error

from spannorm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_compare_report_states_the_global_batch(corpus, tmp_path, capsys, monkeypatch):
    """Defect 9: with grad_accum_steps > 1 (and under torchrun) a step trains on more than batch_size sequences."""
    from spannorm.compare import budget  # (the sentence under torchrun: WORLD_SIZE set, no process group needed)
    from spannorm.run_config import load_config

    out = tmp_path / "cmp"
    argv = ["compare", "--config", "tiny", "--corpus", str(corpus), "--out", str(out), "--quiet", "--schemes", "span"]
    assert main([*argv, "--set", "train.max_steps=6", "--set", "train.grad_accum_steps=2"]) == 0
    tokens = json.loads((out / "span" / "summary.json").read_text())["tokens"]
    report = (out / "report.md").read_text()
    assert f"({tokens:,} tokens)" in report and "2 micro-batches" in report, report[:800]

    monkeypatch.setenv("WORLD_SIZE", "4")
    t = load_config("tiny", ["train.distributed=ddp", "train.max_steps=10"]).train
    assert re.search(
        rf"{t.batch_size * 4}×{t.seq_len} tokens \(.*4 processes\) \({10 * 4 * t.batch_size * t.seq_len:,}", budget(t)
    )


def test_a_partial_study_report_has_no_empty_table(corpus, tmp_path, capsys):
    """A new user's report of an unfinished study: a grid of which no cell finished is one sentence, not a table of
    headers; a planned cell that did not finish is "not run", not a blank."""
    import shutil

    import yaml

    study = {
        "base": "tiny",
        "set": [f"data.corpus={corpus}"],
        "tokens_per_cell": 2560,
        "probe": False,
        "grids": [
            {"name": "main", "axes": {"model.scheme": ["pre", "span"]}},
            {"name": "later", "axes": {"model.scheme": ["post"], "model.n_layers": [3]}},
        ],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    out = tmp_path / "st"
    assert main(["study", "--config", str(path), "--out", str(out), "--quiet"]) == 0
    for cell in (out / "cells").iterdir():
        if not cell.name.startswith("pre"):
            shutil.rmtree(cell)  # (as if the study were interrupted after its first cell)
    assert main(["study", "--config", str(path), "--out", str(out), "--report-only", "--quiet"]) == 0
    report = (out / "report.md").read_text()
    grid = report.split("## Grid `later`")[1].split("##")[0]
    assert grid.strip() == "No cell of this grid has finished yet (1 planned).", grid
    main_grid = report.split("## Grid `main`")[1].split("##")[0]
    assert re.search(r"^\| span \| not run \|$", main_grid, re.M), main_grid
    assert "*stalled (k/n)*: the final validation loss is not at least 0.05 nats below the unigram entropy" in report


def test_stalled_is_described_as_it_is_computed(corpus, tmp_path):
    """What a new user saw: "stalled" was documented as "within 0.05 nats of the unigram loss" but is computed as
    val >= unigram - 0.05 (a run above the unigram loss stalled too). The README says so (a study report's wording:
    test_a_partial_study_report_has_no_empty_table)."""
    from pathlib import Path

    from spannorm.train import STALL_MARGIN

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert f"val >= unigram - {STALL_MARGIN}" in readme and "within 0.05 nats of the unigram" not in readme


@pytest.mark.parametrize(
    "name, content, argv",
    [
        (
            "metrics.jsonl",
            '{"step": "five", "loss": 1.0}\n{"step": 10, "loss": 1.0}\n',
            ["track", "RUN", "--to", "tensorboard"],
        ),
        ("summary.json", "[]", ["train", "--out", "RUN", "--resume", "--quiet"]),
        ("summary.json", '{"scheme": 7}', ["study", "--config", "STUDY", "--out", "OUT", "--report-only", "--quiet"]),
        ("cell.json", '{"wall_s": "slow"}', ["study", "--config", "STUDY", "--out", "OUT", "--report-only", "--quiet"]),
    ],
    ids=["metrics-track", "summary-resume", "summary-study", "cell-study"],
)
def test_valid_json_of_the_wrong_shape_is_one_line(corpus, tmp_path, capsys, name, content, argv):
    """Defect 15: JSON that parses but is not what spannorm writes was a KeyError or TypeError traceback."""
    import yaml

    study = {"base": "tiny", "set": [f"data.corpus={corpus}"], "tokens_per_cell": 2560, "probe": False}
    study["grids"] = [{"name": "g", "axes": {"model.scheme": ["span"]}}]
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    out = tmp_path / "st"
    assert main(["study", "--config", str(tmp_path / "study.yaml"), "--out", str(out), "--quiet"]) == 0
    run = next((out / "cells").iterdir())
    (run / name).write_text(content)
    paths = {"RUN": str(run), "STUDY": str(tmp_path / "study.yaml"), "OUT": str(out)}
    one_line_error(capsys, [paths.get(a, a) for a in argv], name)


def test_a_run_of_another_init_recipe_is_not_reused(corpus, tmp_path, capsys, monkeypatch):
    """A run records the weight stds it was initialized with (init.json): once a scheme's recipe changes in the code, a
    compare or a study refuses to reuse the run under its old name, which would mix two recipes in one table."""
    from spannorm import run as run_module

    out = tmp_path / "cmp"
    argv = ["compare", "--config", "tiny", "--corpus", str(corpus), "--out", str(out), "--quiet", "--schemes", "span"]
    assert main([*argv, "--set", "train.max_steps=6"]) == 0
    assert main([*argv, "--set", "train.max_steps=6"]) == 0  # (the same recipe: reused)
    recipe = run_module.weight_stds
    monkeypatch.setattr(run_module, "weight_stds", lambda cfg, i: {r: 2 * s for r, s in recipe(cfg, i).items()})
    one_line_error(capsys, [*argv, "--set", "train.max_steps=6"], "initialized by another recipe")
