"""Property-based tests (hypothesis) over config values and ``--set`` arguments: every value is either
valid, and then the model builds, or refused with one line naming the key (the CLI: exit code 2, one
line on stderr, no traceback). Derandomized: CI and every machine draw the same examples."""

import dataclasses

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spannorm.cli import main
from spannorm.config import ConfigError
from spannorm.data_config import DataConfig
from spannorm.model import build_model
from spannorm.model_config import ModelConfig
from spannorm.run_config import TrainConfig, load_config

KEYS = (
    [f"model.{f.name}" for f in dataclasses.fields(ModelConfig)]
    + [f"train.{f.name}" for f in dataclasses.fields(TrainConfig)]
    + [f"data.{f.name}" for f in dataclasses.fields(DataConfig) if f.name not in ("corpus", "cache_dir")]
    + ["model.nope", "train", "nope.key", "model"]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 2, 3, 4, 8, 64, 2**40]),
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False),  # (the trainer flushes denormals)
    st.sampled_from([0.0, 1e-3, 0.5, 1.0, -1.0]),
    st.text(max_size=12),
    st.sampled_from(
        [
            "span",
            "pre",
            "rms",
            "dyt",
            "bf16",
            "cuda",
            "auto",
            "cpu",
            "norm",
            "[1, 2]",
            "{a: 1}",
            "1e-3",
            "null",
            "yes",
            "~",
        ]
    ),
)


def render(value) -> str:
    """A value as it would be typed after --set KEY= (parsed as YAML by the CLI)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {float("inf"): ".inf", float("-inf"): "-.inf"}.get(value, ".nan" if value != value else repr(value))
    return str(value)


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(key=st.sampled_from(KEYS), value=SCALARS)
def test_every_override_is_valid_or_a_one_line_error(corpus, key, value):
    override = f"{key}={render(value)}"
    try:
        cfg = load_config("tiny", [f"data.corpus={corpus}", override])
    except ConfigError as e:
        message = str(e)
        assert "\n" not in message and message.strip()
        assert key.split(".")[-1] in message or "--set" in message or "top-level" in message, message
        return
    with torch.device("meta"):  # any valid model config builds (on meta: no memory, whatever its size)
        build_model(cfg.model)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), value=SCALARS)
def test_the_cli_refuses_a_bad_override_in_one_line(corpus, tmp_path_factory, capsys, key, value):
    override = f"{key}={render(value)}"
    try:
        load_config("tiny", [f"data.corpus={corpus}", override])
    except ConfigError:
        out = tmp_path_factory.mktemp("run")
        capsys.readouterr()
        code = main(["train", "--config", "tiny", "--corpus", str(corpus), "--set", override, "--out", str(out / "r")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("spannorm: error: ") and "Traceback" not in err
        assert not (out / "r").exists()  # nothing written
        return
    # a valid override: the first test builds it


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    argv=st.lists(
        st.sampled_from(
            [
                "--depths",
                "--scheme",
                "--batch",
                "--d-model",
                "--reps",
                "--dtypes",
                "--schemes",
                "--jobs",
                "--device",
                "x",
                "0",
                "-1",
                "1e9",
                "",
                "cuda:x",
                "pre,nope",
                "fp16",
                "--nope",
            ]
        ),
        min_size=1,
        max_size=4,
    ),
    command=st.sampled_from(["probe", "bench", "study", "compare", "train"]),
)
def test_bad_command_lines_exit_2_in_one_line(argv, command, capsys):
    """Command lines made of bad flags and values: exit code 2, one line on stderr. (A draw that forms
    a runnable command is skipped: only lines that fail at parsing or validation are kept.)"""
    valid_runs = {"probe", "bench", "compare", "train", "study"}
    capsys.readouterr()
    try:
        code = main([command, *argv, "--device", "cuda:99"] if command in valid_runs else [command, *argv])
    except SystemExit as e:  # argparse: usage errors exit through our Parser.error with code 2
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
