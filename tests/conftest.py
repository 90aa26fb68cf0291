import random

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped on a machine without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_check.sh runs these on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


WORDS = (
    "the king and queen of england went to war with france for love of honour and gold "
    "while the fool sang songs of night and day to every lord and lady in the hall"
).split()


def one_line_error(capsys, argv, *fragments, limit=None):
    """``spannorm.cli.main(argv)`` exits 2 with one stderr line, no traceback, holding every one of ``fragments``
    (and shorter than ``limit`` characters, when given); returns that line."""
    from spannorm.cli import main  # (here: conftest is imported before any test, and needs the CLI only here)

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err[:2000]
    assert all(f in err for f in fragments), err[:2000]
    if limit is not None:
        assert len(err) < limit, f"an error line of {len(err):,} characters"
    return err


def write_corpus(root, n_docs=6, words_per_doc=3000, seed=0):
    """A small deterministic multi-document corpus of pseudo-English."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = []
        for _ in range(words_per_doc // 10):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(10)).capitalize() + ".")
        (root / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train fastest on one thread, most of all on a shared, busy machine (use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test uses a private cache, never ~/.cache/spannorm."""
    monkeypatch.setenv("SPANNORM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def tiny_overrides(corpus):
    """--set overrides that make the tiny preset train on the local test corpus."""
    return [f"data.corpus={corpus}"]


def check_page(page_path, shot_name):
    """A report.html: self-contained (every plot a data URI, no file or network reference), the tables of its
    report.md; then headless Chromium renders it without a console error, loads every image, finds every table, and
    a screenshot ``shot_name`` is written (to $SPANNORM_ARTIFACTS where set). Skipped where Chromium is missing."""
    import os
    import re
    import shutil
    import subprocess
    from pathlib import Path

    page, md = page_path.read_text(), page_path.with_suffix(".md").read_text()
    images = len(re.findall(r"!\[[^]]*\]\((?!https?:)[^)]+\.png\)", md))
    assert images >= 1 and page.count('src="data:image/png;base64,') == images
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=\"(https?:|//|file:|[^\"]+\.png)", page)
    tables = page.count("<table>")
    assert tables == md.count("\n|---") >= 1
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    url = page_path.as_uri()
    dom = subprocess.run(
        [*flags, "--enable-logging=stderr", "--v=0", "--dump-dom", url], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    assert f'data-tables="{tables}"' in body and f'data-images="{images}"' in body, body
    assert f'data-images-loaded="{images}"' in body, body
    errors = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not errors, errors
    shot = Path(os.environ.get("SPANNORM_ARTIFACTS", page_path.parent)) / shot_name
    shot.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [*flags, "--hide-scrollbars", "--window-size=1280,1600", f"--screenshot={shot}", url],
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
