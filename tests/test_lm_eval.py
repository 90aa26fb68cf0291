"""spannorm eval --lm-eval: lm-eval-harness's hf model on spannorm's shipped local task, offline."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from spannorm.cli import main  # noqa: E402
from spannorm.harness import TASKS_DIR  # noqa: E402
from spannorm.run_config import load_config  # noqa: E402
from spannorm.train import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """A byte run and a BPE run of 10 steps, each with a checkpoint."""
    root = tmp_path_factory.mktemp("runs")
    for name, more in {"byte": [], "bpe": ["model.scheme=pre", "data.tokenizer=bpe", "data.vocab_size=320"]}.items():
        cfg = load_config(
            "tiny",
            [
                f"data.corpus={corpus}",
                f"data.cache_dir={tmp_path_factory.mktemp('cache')}",
                "train.max_steps=10",
                "train.eval_interval=10",
                "train.ckpt_interval=10",
                "train.probe_interval=0",
                *more,
            ],
        )
        train(cfg, root / name, progress=False)
    return root


def expected_accuracy(model_dir, limit=None) -> float:
    """spannorm_spelling's accuracy scored here without lm-eval: the choice of highest log-likelihood
    log p(" " + choice | context), the continuation's tokens being those of the whole text after the
    context's (as lm-eval splits them)."""
    from spannorm.hf import load

    model, tokenizer, _ = load(model_dir)
    rows = [json.loads(line) for line in (TASKS_DIR / "spelling.jsonl").read_text().splitlines()][:limit]
    hits = 0
    for row in rows:
        n = len(tokenizer(row["context"], add_special_tokens=False).input_ids)
        scores = []
        for choice in row["choices"]:
            ids = torch.tensor([tokenizer(row["context"] + " " + choice, add_special_tokens=False).input_ids])
            with torch.no_grad():
                logp = model(ids[:, :-1]).logits.log_softmax(-1)
            scores.append(logp[0, n - 1 :].gather(-1, ids[0, n:, None]).sum().item())
        hits += max(range(len(scores)), key=scores.__getitem__) == row["label"]
    return hits / len(rows)


def lm_eval_cli(args, tmp_path):
    """``spannorm eval`` in a process of its own, offline: any access to the Hugging Face hub fails."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    return subprocess.run(
        [sys.executable, "-m", "spannorm.cli", "eval", *args, "--device", "cpu"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )


def user_tasks(root, n):
    """A folder of the user's own: task my_spelling, the first n items of spannorm_spelling."""
    root.mkdir()
    yaml = (TASKS_DIR / "spelling.yaml").read_text().replace("task: spannorm_spelling", "task: my_spelling")
    (root / "mine.yaml").write_text(yaml.replace("local.load_jsonl", "mine.load"))
    (root / "mine.py").write_text((TASKS_DIR / "local.py").read_text().replace("def load_jsonl", "def load"))
    (root / "spelling.jsonl").write_text("".join((TASKS_DIR / "spelling.jsonl").read_text().splitlines(True)[:n]))
    return root


def test_lm_eval_scores_the_local_tasks(runs, tmp_path):
    """lm-eval's accuracy on spannorm_spelling and on a task of the user's (--include-path) is the
    model's own; the byte run is read from its run directory (exported on the fly to a folder that
    lm-eval's hf model loads with pretrained=DIR)."""
    tasks = user_tasks(tmp_path / "my_tasks", 10)
    out = tmp_path / "lm_eval.json"
    args = [str(runs / "byte"), "--lm-eval", "spannorm_spelling,my_spelling", "--include-path", str(tasks)]
    done = lm_eval_cli([*args, "--json", str(out)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "spannorm_spelling" in done.stdout and "my_spelling" in done.stdout
    report = json.loads(out.read_text())["lm_eval"]
    for task, n in [("spannorm_spelling", 40), ("my_spelling", 10)]:
        acc = report["results"][task]["acc,none"]
        assert report["n-samples"][task]["effective"] == n
        assert 0 <= acc <= 1 and acc == pytest.approx(expected_accuracy(runs / "byte", n))


@pytest.mark.slow
def test_lm_eval_on_an_exported_bpe_folder(runs, tmp_path):
    """A BPE run's export (its prefix token: <|endoftext|>) with --limit."""
    assert main(["export", str(runs / "bpe"), str(tmp_path / "hf")]) == 0
    out = tmp_path / "lm_eval.json"
    args = [str(tmp_path / "hf"), "--lm-eval", "spannorm_spelling", "--limit", "12", "--batch-size", "5"]
    done = lm_eval_cli([*args, "--json", str(out)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())["lm_eval"]
    assert report["n-samples"]["spannorm_spelling"]["effective"] == 12
    assert report["results"]["spannorm_spelling"]["acc,none"] == pytest.approx(expected_accuracy(tmp_path / "hf", 12))


@pytest.mark.parametrize(
    "bad, words",
    [
        (["--lm-eval", "spannorm_spelling", "--include-path", "nope"], "--include-path 'nope'"),
        (["--lm-eval", "spannorm_spelling", "--limit", "0"], "--limit 0"),
        (["--lm-eval", "spannorm_spelling", "--text", "x.txt"], "--text"),
        (["--lm-eval", " , "], "--lm-eval ' , '"),
        (["--limit", "3"], "--lm-eval"),
        pytest.param(["--lm-eval", "no_such_task"], "unknown task no_such_task", marks=pytest.mark.slow),
    ],
    ids=str,
)
def test_lm_eval_bad_input_is_one_line(runs, bad, words, capsys):
    assert main(["eval", str(runs / "byte"), *bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err


def test_an_unreadable_task_file_is_named_not_an_unknown_task(runs, tmp_path, capsys):
    """Issue 25, defect 34: lm-eval skips a task YAML it cannot parse, so its task was reported as unknown."""
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mine.yaml").write_text("task: my_task\ndataset_path: [unclosed\n")
    argv = ["eval", str(runs / "byte"), "--lm-eval", "my_task", "--include-path", str(tmp_path / "tasks")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mine.yaml" in err and "cannot be read" in err, err
