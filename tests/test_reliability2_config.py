"""Issue 25 (reliability, round 2): what a user types or points at — YAML files and --set values, pipes, devices,
seeds, sizes, the package index's address — is refused in one line before it can hang, exhaust memory or leak a
secret (defects 5, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 31, 32, 33, 36). One test per defect; each fails on the
code before the fix."""

import os
import threading
import time

import numpy as np
import pytest
from conftest import one_line_error as shared_one_line_error

from spannorm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line_error(capsys, argv, fragment, limit=400):
    """``main(argv)`` exits 2 with one short stderr line holding ``fragment``."""
    return shared_one_line_error(capsys, argv, fragment, limit=limit)


def train_args(corpus, tmp_path, *more):
    return ["train", "--config", "tiny", "--corpus", str(corpus), "--out", str(tmp_path / "r"), "--quiet", *more]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus):
    run = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "--config", "tiny", "--corpus", str(corpus), "--out", str(run), "--quiet"]) == 0
    return run


# --- 12, 21, 31: one YAML loader, strict ------------------------------------------------------------------------

BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['lol'] * 9)}]\n"
    for prev, name in zip([None, "a", "b", "c", "d", "e", "f", "g"], "abcdefgh", strict=True)
)  # (395 bytes that expand to 9**8 = 43 million strings)


def test_a_yaml_alias_bomb_is_refused_at_once(corpus, tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("model:\n  scheme: span\n" + BOMB)
    start = time.monotonic()
    one_line_error(
        capsys, ["train", "--config", str(bomb), "--out", str(tmp_path / "r")], "expands to more than 100,000 values"
    )
    assert time.monotonic() - start < 5
    one_line_error(capsys, train_args(corpus, tmp_path, "--set", "model.d_model=[&x 1, *x]"), "expected an integer")
    one_line_error(capsys, train_args(corpus, tmp_path, "--set", "model.d_model=&x [*x]"), "inside its own anchor")


def test_aliases_are_allowed_and_copied():
    # (imported here: new in this change)
    from spannorm.config import parse_yaml

    data = parse_yaml("a: &x {b: [1]}\nc: *x\n", "text")
    assert data == {"a": {"b": [1]}, "c": {"b": [1]}}
    data["a"]["b"].append(2)
    assert data["c"] == {"b": [1]}, "what an alias shares must be a copy"


def test_every_shipped_config_and_study_loads():
    # (imported here: a test of what the package ships)
    from spannorm.run_config import PRESETS, load_config, shipped_names
    from spannorm.study.grid import STUDIES, load_study, plan_study

    assert shipped_names(PRESETS) and shipped_names(STUDIES)
    for name in shipped_names(PRESETS):
        load_config(name)
    for name in shipped_names(STUDIES):
        assert plan_study(load_study(name)), name


def test_an_echoed_value_is_cut_short(corpus, tmp_path, capsys):
    one_line_error(capsys, train_args(corpus, tmp_path, "--set", "model.scheme=" + "x" * 100_000), "model.scheme=")


@pytest.mark.parametrize("where", ["file", "--set"])
def test_a_deeply_nested_yaml_value_is_one_line(corpus, tmp_path, capsys, where):
    deep = "[" * 5000 + "]" * 5000
    if where == "file":
        path = tmp_path / "deep.yaml"
        path.write_text(f"model:\n  d_model: {deep}\n")
        argv = ["train", "--config", str(path), "--out", str(tmp_path / "r")]
    else:
        argv = train_args(corpus, tmp_path, "--set", f"model.d_model={deep}")
    one_line_error(capsys, argv, "nested more than")


def test_a_key_given_twice_is_refused(tmp_path, capsys):
    path = tmp_path / "twice.yaml"
    path.write_text("model:\n  scheme: span\n  n_layers: 2\n  scheme: pre\n")
    one_line_error(
        capsys, ["train", "--config", str(path), "--out", str(tmp_path / "r")], "key 'scheme' is given twice"
    )


def test_a_study_yaml_is_read_by_the_same_loader(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text("base: tiny\nschemes: [pre]\nschemes: [span]\n")
    one_line_error(capsys, ["study", "--config", str(path), "--out", str(tmp_path / "s")], "given twice")


# --- 25, 36: pipes, FIFOs, endless files ---------------------------------------------------------------------------


def test_a_fifo_nobody_writes_is_refused_not_waited_on_forever(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("spannorm.config.PIPE_WAIT_S", 0.5, raising=False)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    codes = []
    worker = threading.Thread(
        target=lambda: codes.append(main(["train", "--config", str(fifo), "--out", str(tmp_path / "r")])), daemon=True
    )
    worker.start()
    worker.join(timeout=20)
    if worker.is_alive():  # (before the fix: blocked in open(); a writer that opens and closes lets it go)
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=20)
        pytest.fail("--config naming a FIFO that nobody writes hung")
    assert codes == [2]
    assert "is a pipe that sent nothing" in capsys.readouterr().err


def test_a_terminal_that_types_nothing_is_waited_on_not_spun_on(tmp_path, capsys, monkeypatch):
    """``--config /dev/stdin`` on a terminal: a device read without blocking would spin forever."""
    monkeypatch.setattr("spannorm.config.PIPE_WAIT_S", 0.5)
    controller, terminal = os.openpty()
    codes = []
    argv = ["train", "--config", os.ttyname(terminal), "--out", str(tmp_path / "r")]
    worker = threading.Thread(target=lambda: codes.append(main(argv)), daemon=True)
    worker.start()
    worker.join(timeout=20)
    alive = worker.is_alive()
    if alive:  # (before the fix: spinning; typing a line and closing the terminal lets it go)
        os.write(controller, b"\x04")
    os.close(controller)
    os.close(terminal)
    worker.join(timeout=20)
    assert not alive, "--config naming a terminal that types nothing spun forever"
    assert codes == [2]
    assert "is a device that sent nothing" in capsys.readouterr().err


def test_config_from_a_pipe_is_accepted(corpus, tmp_path):
    """``--config <(...)``: a /dev/fd path, a pipe with a writer."""
    r, w = os.pipe()
    text = "model: {d_model: 32, n_layers: 2, n_heads: 2}\ntrain: {batch_size: 8, seq_len: 32, max_steps: 4}\n"
    writer = threading.Thread(target=lambda: (os.write(w, text.encode()), os.close(w)))
    writer.start()
    try:
        argv = ["train", "--config", f"/dev/fd/{r}", "--corpus", str(corpus), "--out", str(tmp_path / "r"), "--quiet"]
        argv += ["--set", "train.eval_interval=4", "--set", "train.ckpt_interval=4", "--set", "train.eval_batches=1"]
        assert main(argv) == 0
    finally:
        writer.join()
        os.close(r)
    assert (tmp_path / "r" / "summary.json").is_file()


def test_a_config_that_never_ends_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("spannorm.config.MAX_YAML_BYTES", 1 << 16, raising=False)
    one_line_error(capsys, ["train", "--config", "/dev/zero", "--out", str(tmp_path / "r")], "is larger than 65,536")


def test_a_bench_report_too_large_to_be_one_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("spannorm.cli.MAX_REPORT_BYTES", 1000, raising=False)
    big = tmp_path / "big.json"
    big.write_text('{"rows": [' + ", ".join(["1"] * 1000) + "]}")
    one_line_error(capsys, ["bench", "--report", str(big)], "is larger than 1,000 bytes")


# --- 5: the index's credentials ------------------------------------------------------------------------------------


def test_a_token_in_the_index_url_is_never_printed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPANNORM_CACHE", str(tmp_path / "cache"))  # (the corpus not fetched yet)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # (only the index below)
    monkeypatch.setenv("PIP_INDEX_URL", "http://SECRETTOKEN123@127.0.0.1:9/simple")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)
    assert main(["train", "--config", "tiny", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert "127.0.0.1:9" in captured.err and "****@127.0.0.1" in captured.err, captured.err
    assert "SECRETTOKEN123" not in captured.err + captured.out


# --- 20, 22, 24: values that overflow ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["inf", "1.0e+300"])
def test_an_unbounded_dist_timeout_is_refused(corpus, tmp_path, capsys, value):
    one_line_error(capsys, train_args(corpus, tmp_path, "--set", f"train.dist_timeout_s={value}"), "at most 2,592,000")


@pytest.mark.parametrize("seed", [2**64, -1])
def test_a_seed_outside_64_bits_is_refused(corpus, tmp_path, finished_run, capsys, seed):
    one_line_error(capsys, train_args(corpus, tmp_path, "--set", f"train.seed={seed}"), "[0, 2**64)")
    argv = ["generate", str(finished_run), "--prompt", "The", "--max-new-tokens", "2", "--seed", str(seed)]
    one_line_error(capsys, argv, "[0, 2**64)")


def test_a_device_index_of_twenty_digits_is_one_line(corpus, tmp_path, capsys):
    one_line_error(capsys, train_args(corpus, tmp_path, "--device", "cuda:" + "9" * 20), "expected auto, cpu, cuda")


# --- 17, 23: generate ----------------------------------------------------------------------------------------------


def test_a_prompt_that_is_not_utf8_is_one_line(finished_run, capsys):
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")  # (what Python makes of such bytes in argv)
    one_line_error(capsys, ["generate", str(finished_run), "--prompt", prompt], "--prompt is not UTF-8 text")


def test_a_tiny_positive_temperature_is_refused(finished_run, capsys):
    argv = ["generate", str(finished_run), "--prompt", "The", "--max-new-tokens", "3", "--temperature", "1e-39"]
    one_line_error(capsys, argv, "--temperature 1e-39 is invalid")
    argv[-1] = "0.5"
    assert main(argv) == 0  # (a usual one still samples)


# --- 19, 32: the probe's sizes, named as the probe's options -------------------------------------------------------


@pytest.mark.parametrize(
    "args,said",
    [
        (["--batch", "100000000000"], "the probe needs more than"),
        (["--depths", "100000000000"], "--depths 100,000,000,000 is invalid"),
        (["--d-model", "200000", "--depths", "12"], "make --batch, --depths"),
    ],
)
def test_probe_sizes_are_checked_before_anything_is_built(corpus, tmp_path, capsys, args, said):
    argv = ["probe", "--config", "tiny", "--corpus", str(corpus), "--json", str(tmp_path / "p.json"), *args]
    one_line_error(capsys, argv, said)


# --- 13: validation windows ----------------------------------------------------------------------------------------


def test_eval_batches_beyond_the_validation_windows_is_refused_before_training(corpus, tmp_path, capsys):
    one_line_error(capsys, train_args(corpus, tmp_path, "--set", "train.eval_batches=100000000"), "distinct windows")
    assert not (tmp_path / "r" / "config.yaml").exists()


@pytest.mark.parametrize("batch_size,n_batches", [(1, 1), (4, 1), (16, 16), (7, 3), (1, 9)])
def test_validation_windows_are_drawn_batch_by_batch_and_are_those_of_linspace(batch_size, n_batches):
    from spannorm.data import TokenData

    data = TokenData.__new__(TokenData)  # (only the windows' starts: no dataset on disk)
    data.seq_len, data.val = 32, np.arange(12_345)
    data._windows = lambda _, starts: starts
    batches = data.val_batches(batch_size, n_batches)
    assert next(batches) == np.linspace(0, 12_345 - 33, batch_size * n_batches).astype(np.int64)[:batch_size].tolist()
    starts = next(iter(data.val_batches(batch_size, n_batches))) + [s for b in batches for s in b]
    assert starts == np.linspace(0, 12_345 - 33, batch_size * n_batches).astype(np.int64).tolist()


# --- 33: compare --------------------------------------------------------------------------------------------------


def test_compare_refuses_a_scheme_named_twice(corpus, tmp_path, capsys):
    argv = [
        "compare",
        "--config",
        "tiny",
        "--corpus",
        str(corpus),
        "--out",
        str(tmp_path / "c"),
        "--schemes",
        "span,pre,span",
    ]
    one_line_error(capsys, argv, "names span twice")
    assert not (tmp_path / "c").exists()
