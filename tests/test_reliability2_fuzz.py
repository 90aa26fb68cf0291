"""Issue 25 (reliability, round 2): a fuzz test (hypothesis) over the files spannorm reads back — a run's config.yaml,
metrics.jsonl, summary.json, data.json, run_id and checkpoint pointers, a study's cell files and its YAML, an exported
folder's config and tokenizer files. Whatever bytes they hold, the command that reads them exits 0 or 2; exit 2 is one
line, never a traceback; a file the command cannot do without (a config), unreadable as one, is never a success.
Derandomized and bounded: CI and every machine draw the same examples."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spannorm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_subnormal=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def damaged(draw, valid: bytes) -> bytes:
    """Bytes a file of ``valid`` content might hold after a crash, an edit or an attack: random bytes, a random
    JSON value, the file cut short, or one value (of a JSON or YAML mapping, or of one JSON line) replaced."""
    kind = draw(st.sampled_from(["bytes", "json", "cut", "value", "line"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    if kind == "cut":
        return valid[: draw(st.integers(0, max(0, len(valid) - 1)))]
    lines = valid.decode().splitlines() if kind == "line" else [valid.decode()]
    i = draw(st.integers(0, max(0, len(lines) - 1)))
    try:
        doc = yaml.safe_load(lines[i])  # (JSON is YAML)
    except yaml.YAMLError:
        doc = None
    if isinstance(doc, dict) and doc:
        key = draw(st.sampled_from(sorted(doc, key=str)))
        section = doc[key]
        if isinstance(section, dict) and section and draw(st.booleans()):  # (a config's section: one of its keys)
            section[draw(st.sampled_from(sorted(section, key=str)))] = draw(JSON)
        elif draw(st.booleans()):
            doc[key] = draw(JSON)
        else:
            del doc[key]
        lines[i] = json.dumps(doc) if kind == "line" or lines[i].lstrip().startswith("{") else yaml.safe_dump(doc)
    else:
        lines[i] = json.dumps(draw(JSON))
    return "\n".join(lines).encode() + (b"\n" if kind == "line" else b"")


def is_mapping(content: bytes) -> bool:
    try:
        return isinstance(yaml.safe_load(content.decode()), dict)
    except (UnicodeDecodeError, yaml.YAMLError, ValueError):
        return False


@pytest.fixture(scope="module")
def pristine(corpus, tmp_path_factory):
    """A run that stopped after its last checkpoint (no summary yet), a finished one, a finished two-cell study (its
    YAML beside it) and an exported folder: the trees each example copies and damages."""
    root = tmp_path_factory.mktemp("pristine")
    train = ["train", "--config", "tiny", "--corpus", str(corpus), "--quiet"]
    assert main([*train, "--out", str(root / "run"), "--set", "train.max_steps=10"]) == 0
    shutil.copytree(root / "run", root / "unfinished")
    (root / "unfinished" / "summary.json").unlink()  # (a resume of it loads step 10, validates and ends)
    study = {
        "base": "tiny",
        "set": [f"data.corpus={corpus}"],
        "tokens_per_cell": 2560,
        "probe": False,
        "grids": [{"name": "g", "axes": {"model.scheme": ["pre", "span"]}}],
    }
    (root / "study.yaml").write_text(yaml.safe_dump(study))
    assert main(["study", "--config", str(root / "study.yaml"), "--out", str(root / "study"), "--quiet"]) == 0
    assert main(["export", str(root / "run"), str(root / "hf")]) == 0
    (root / "text.txt").write_text("a few words to score. " * 10)
    return root


def checkpoint(tree: Path) -> str:
    return (tree / "unfinished" / "checkpoints" / "latest").read_text()


RESUME = ["train", "--out", "TREE/unfinished", "--resume", "--quiet"]
TARGETS = {  # name -> (file under the tree, argv (TREE: the copy), whether the command cannot do without the file)
    "run config.yaml": ("unfinished/config.yaml", RESUME, True),
    "run metrics.jsonl": ("unfinished/metrics.jsonl", RESUME, False),
    "run data.json": ("unfinished/data.json", RESUME, False),
    "run run_id": ("unfinished/run_id", RESUME, False),
    "checkpoint latest": ("unfinished/checkpoints/latest", RESUME, False),
    "checkpoint manifest": ("unfinished/checkpoints/CKPT/manifest.json", RESUME, False),
    "finished summary.json": ("run/summary.json", ["train", "--out", "TREE/run", "--resume", "--quiet"], False),
    "track metrics.jsonl": ("run/metrics.jsonl", ["track", "TREE/run", "--to", "tensorboard"], False),
    "cell summary.json": (
        "study/cells/span_L2_lr0.003_s1337/summary.json",
        ["study", "--config", "TREE/study.yaml"],
        False,
    ),
    "cell cell.json": ("study/cells/span_L2_lr0.003_s1337/cell.json", ["study", "--config", "TREE/study.yaml"], False),
    "cell metrics.jsonl": (
        "study/cells/pre_L2_lr0.003_s1337/metrics.jsonl",
        ["study", "--config", "TREE/study.yaml"],
        False,
    ),
    "cell config.yaml": (
        "study/cells/pre_L2_lr0.003_s1337/config.yaml",
        ["study", "--config", "TREE/study.yaml"],
        False,
    ),
    "cell init.json": (
        "study/cells/span_L2_lr0.003_s1337/init.json",
        ["study", "--config", "TREE/study.yaml", "--out", "TREE/study", "--quiet"],
        False,
    ),
    "study yaml": ("study.yaml", ["study", "--config", "TREE/study.yaml", "--out", "TREE/new", "--report-only"], True),
    "folder config.json": ("hf/config.json", ["eval", "TREE/hf", "--text", "TREE/text.txt"], True),
    "folder spannorm_run.yaml": ("hf/spannorm_run.yaml", ["eval", "TREE/hf", "--text", "TREE/text.txt"], False),
    "folder tokenizer.json": ("hf/tokenizer.json", ["eval", "TREE/hf", "--text", "TREE/text.txt"], False),
    "folder tokenizer_config.json": ("hf/tokenizer_config.json", ["eval", "TREE/hf", "--text", "TREE/text.txt"], False),
}
STUDY_TAIL = ["--out", "TREE/study", "--report-only", "--quiet"]


@pytest.mark.parametrize("target", sorted(TARGETS))
@settings(max_examples=20, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_bytes_in_a_file_read_back_are_one_line_or_a_success(pristine, capsys, target, data):
    name, argv, required = TARGETS[target]
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        shutil.copytree(pristine, tree, symlinks=True)
        path = tree / name.replace("CKPT", checkpoint(tree))
        content = data.draw(damaged(path.read_bytes()), label="content")
        path.write_bytes(content)
        if argv[0] == "study" and "--out" not in argv:
            argv = argv + STUDY_TAIL
        capsys.readouterr()
        code = main([a.replace("TREE", str(tree)) for a in argv])
        err = capsys.readouterr().err
        assert code in (0, 2), (code, err[-2000:])
        if code == 2:
            assert len(err.strip().splitlines()) == 1 and err.startswith("spannorm: "), err[-2000:]
        assert "Traceback" not in err, err[-2000:]
        if required and not is_mapping(content):
            assert code == 2, f"{target} holding {content[:200]!r} was accepted"
