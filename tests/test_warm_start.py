"""Warm starts (issue 26): ``train.init_from`` starts a new run from a run's newest checkpoint or from a folder of
``spannorm export``: its weights exactly; another architecture, a Llama folder or no model at all is one line; a
resume never reads the source again."""

import shutil

import pytest
import torch

from spannorm.cli import main
from spannorm.model import build_model
from spannorm.run import RunDir, read_metrics
from spannorm.run_config import load_config
from spannorm.train import initial_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def source(corpus, tmp_path_factory):
    """A tiny span run of 20 steps, its spannorm export and, of a pre run, its Llama export."""
    root = tmp_path_factory.mktemp("source")
    train = ["train", "--config", "tiny", "--corpus", str(corpus), "--quiet", "--set", "train.max_steps=20"]
    assert main([*train, "--out", str(root / "run")]) == 0
    assert main(["export", str(root / "run"), str(root / "hf")]) == 0
    assert main([*train, "--out", str(root / "pre"), "--set", "model.scheme=pre"]) == 0
    assert main(["export", str(root / "pre"), str(root / "llama"), "--to", "llama"]) == 0
    return root


def weights(run_dir):
    lm = build_model(load_config(run_dir / "config.yaml").model)
    RunDir(run_dir).load_weights(lm)
    return lm.state_dict()


@pytest.mark.parametrize("where", ["run", "hf"])
def test_a_warm_start_begins_with_the_sources_weights(corpus, source, tmp_path, where):
    cfg = load_config("tiny", [f"data.corpus={corpus}", f"train.init_from={source / where}", "train.seed=7"])
    got, want = initial_model(cfg).state_dict(), weights(source / "run")
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def test_a_warm_run_trains_from_where_the_source_ended_and_resumes_without_it(corpus, source, tmp_path):
    cold, warm = read_metrics(source / "run"), tmp_path / "warm"
    argv = ["train", "--config", "tiny", "--corpus", str(corpus), "--quiet", "--out", str(warm)]
    copy = tmp_path / "source"
    shutil.copytree(source / "run", copy)
    assert main([*argv, "--set", f"train.init_from={copy}", "--set", "train.max_steps=10"]) == 0
    assert read_metrics(warm)[0]["loss"] < cold[0]["loss"] - 0.5  # (from the trained weights, not from scratch)
    shutil.rmtree(copy)  # a resume reads its own checkpoint, never the source
    cfg = load_config(warm / "config.yaml")
    assert cfg.train.init_from == str(copy)
    assert main(["train", "--out", str(warm), "--resume", "--quiet"]) == 0


@pytest.mark.parametrize(
    "change, source_name, said",
    [
        (["model.scheme=pre"], "run", "model.scheme='span', this run's has 'pre'"),
        (["model.d_model=64"], "run", "model.d_model=32, this run's has 64"),
        (["model.scheme=pre"], "llama", "is not a folder of `spannorm export --to spannorm`"),
        ([], "nowhere", "is neither a run directory"),
    ],
    ids=["scheme", "width", "llama", "missing"],
)
def test_a_warm_start_of_another_model_is_one_line(corpus, source, tmp_path, capsys, change, source_name, said):
    argv = ["train", "--config", "tiny", "--corpus", str(corpus), "--quiet", "--out", str(tmp_path / "r")]
    argv += ["--set", f"train.init_from={source / source_name}", *[a for c in change for a in ("--set", c)]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and said in err, err
    assert not (tmp_path / "r").exists()
