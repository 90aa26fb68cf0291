"""Trackers: a run's JSONL rows replayed into TensorBoard and an offline W&B run, and read back."""

import glob
import json
import math
import struct

import pytest
import yaml
from conftest import one_line_error

from spannorm.cli import main
from spannorm.config import ConfigError, to_dict
from spannorm.files import dumps
from spannorm.run import read_metrics
from spannorm.run_config import load_config
from spannorm.trackers import make_trackers, scalars
from spannorm.train import train

DIAGNOSTICS = {  # a 2-block MoE run's diagnostics row (the keys the trainer writes)
    "grad_norm": [0.5, 0.25],
    "stream_rms": [1.0, 2.0],
    "attn_entropy_max": 2.5,
    "logit_rms": float("nan"),
    "update_ratio": {"attn.qk": [0.01, 0.02], "router": [None, 0.03], "embed": 0.07},
    "moe": [
        {"layer": 0, "fraction": [0.25, 0.75], "imbalance": 1.5, "dropped": 0},
        {"layer": 1, "fraction": [0.5, 0.5], "imbalance": 1.0, "dropped": 2},
    ],
}


def test_scalars_names_every_number_by_its_path():
    assert dict(scalars("diagnostics", {"step": 10} | DIAGNOSTICS)) == {
        "diagnostics/grad_norm/block_00": 0.5,
        "diagnostics/grad_norm/block_01": 0.25,
        "diagnostics/stream_rms/block_00": 1.0,
        "diagnostics/stream_rms/block_01": 2.0,
        "diagnostics/attn_entropy_max": 2.5,
        "diagnostics/update_ratio/attn.qk/block_00": 0.01,
        "diagnostics/update_ratio/attn.qk/block_01": 0.02,
        "diagnostics/update_ratio/router/block_01": 0.03,
        "diagnostics/update_ratio/embed": 0.07,
        "diagnostics/moe/block_00/fraction/expert_00": 0.25,
        "diagnostics/moe/block_00/fraction/expert_01": 0.75,
        "diagnostics/moe/block_00/imbalance": 1.5,
        "diagnostics/moe/block_00/dropped": 0.0,
        "diagnostics/moe/block_01/fraction/expert_00": 0.5,
        "diagnostics/moe/block_01/fraction/expert_01": 0.5,
        "diagnostics/moe/block_01/imbalance": 1.0,
        "diagnostics/moe/block_01/dropped": 2.0,
    }


def loss(step):
    return 5.5 * math.exp(-step / 20) + 0.1 * math.sin(step)


@pytest.fixture
def run_dir(tmp_path):
    """A run directory written by hand: 30 loss rows (validation every 10 steps), a guard row, and
    diagnostics every 10 steps."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(load_config("tiny")), sort_keys=False))
    rows = [
        {"step": s, "loss": loss(s), "val_loss": loss(s) + 0.2 if s % 10 == 0 else None, "lr": 1e-3, "grad_norm": 1.0}
        for s in range(1, 31)
    ]
    rows.insert(12, {"step": 12, "kind": "skip", "reason": "non-finite loss"})
    (run / "metrics.jsonl").write_text("".join(dumps(r) + "\n" for r in rows))
    diag = [{"step": s} | DIAGNOSTICS | {"grad_norm": [s / 10, s / 20]} for s in (10, 20, 30)]
    (run / "diagnostics.jsonl").write_text("".join(dumps(r) + "\n" for r in diag))
    return run


def tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard reads the run's tensorboard folder (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_replay_to_tensorboard_reads_back_the_curves(run_dir, capsys):
    pytest.importorskip("tensorboard")
    for _ in range(2):  # a second replay supersedes the first: TensorBoard shows each step once
        assert main(["track", str(run_dir), "--to", "tensorboard"]) == 0
    assert "30 metrics rows, 3 diagnostics rows" in capsys.readouterr().out
    tb = tensorboard_scalars(run_dir)
    assert [s for s, _ in tb["metrics/loss"]] == list(range(1, 31))
    assert [v for _, v in tb["metrics/loss"]] == pytest.approx([loss(s) for s in range(1, 31)], rel=1e-6)
    assert tb["metrics/val_loss"] == [(s, pytest.approx(loss(s) + 0.2, rel=1e-6)) for s in (10, 20, 30)]
    assert tb["diagnostics/grad_norm/block_01"] == [(s, pytest.approx(s / 20)) for s in (10, 20, 30)]
    assert tb["diagnostics/update_ratio/router/block_01"] == [(s, pytest.approx(0.03)) for s in (10, 20, 30)]
    assert "diagnostics/update_ratio/router/block_00" not in tb and "diagnostics/logit_rms" not in tb
    assert not any(t.startswith("metrics/") and t.split("/")[1] in ("kind", "reason") for t in tb)


def test_tensorboard_forgets_the_steps_a_resume_or_rollback_redoes(tmp_path):
    """A rollback (rewind) and a resume (start_step) hide what was logged after their step."""
    pytest.importorskip("tensorboard")
    first = make_trackers(["tensorboard"], tmp_path, {})
    for s in range(1, 11):
        first.log_metrics({"step": s, "loss": 1.0})
    first.rewind(6)  # a guard rollback to the checkpoint of step 6
    for s in range(7, 9):
        first.log_metrics({"step": s, "loss": 2.0})
    first.close()
    resumed = make_trackers(["tensorboard"], tmp_path, {}, start_step=4)  # killed, resumed from step 4
    for s in range(5, 7):
        resumed.log_metrics({"step": s, "loss": 3.0})
    resumed.close()
    assert tensorboard_scalars(tmp_path)["metrics/loss"] == [(s, v) for s, v in [(1, 1), (2, 1), (3, 1), (4, 1)]] + [
        (5, 3.0),
        (6, 3.0),
    ]


def wandb_records(run_dir):
    """The records of the run's offline W&B file(s), oldest first. The file is a LevelDB-style log: a
    7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks, each a 7-byte header
    (CRC32, length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes; a record is a protobuf."""
    from wandb.proto import wandb_internal_pb2

    for path in sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))):
        data, pos, chunk = open(path, "rb").read(), 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if kind == 0:
                break
            chunk, pos = chunk + data[pos + 7 : pos + 7 + n], pos + 7 + n
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(chunk)
                yield record
                chunk = b""


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """W&B's folders under tmp_path, and no login (no API key, no ~/.netrc)."""
    pytest.importorskip("wandb")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)


def wandb_runs(run_dir) -> list[tuple[str, str, str]]:
    """(run id, project, display name) of each offline W&B run in RUN_DIR/wandb, oldest first."""
    return [
        (r.run.run_id, r.run.project, r.run.display_name)
        for r in wandb_records(run_dir)
        if r.WhichOneof("record_type") == "run"
    ]


def test_replay_to_wandb_offline(run_dir, wandb_home, capsys):
    assert main(["track", str(run_dir), "--to", "wandb"]) == 0
    history, config = [], {}
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "run":  # the run's first record: its name, project and config
            assert record.run.display_name == "run" and record.run.project == "spannorm"
            config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
    losses = [(h["step"], h["metrics/loss"]) for h in history if "metrics/loss" in h]
    assert losses == [(s, pytest.approx(loss(s))) for s in range(1, 31)]
    assert [
        (h["step"], h["diagnostics/grad_norm/block_00"]) for h in history if "diagnostics/grad_norm/block_00" in h
    ] == [(s, pytest.approx(s / 10)) for s in (10, 20, 30)]
    assert config["model"]["scheme"] == "span" and config["train"]["max_steps"] == load_config("tiny").train.max_steps


def test_tracker_errors_are_one_line(run_dir, tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="tracker 'mlflow' is unknown: expected tensorboard or wandb"):
        make_trackers(["tensorboard", "mlflow"], tmp_path, {})
    assert not (tmp_path / "tensorboard").exists()  # nothing made before the names are checked
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"tracker wandb needs wandb: pip install 'spannorm\[wandb\]'"):
        make_trackers(["wandb"], tmp_path, {})
    monkeypatch.undo()
    assert make_trackers([], tmp_path, {}).log_metrics({"step": 1, "loss": 1.0}) is None  # none: nothing to do
    for args, words in [
        ([str(run_dir), "--to", "nope"], "tracker 'nope' is unknown"),
        ([str(run_dir), "--to", ","], "--to ','"),
        ([str(tmp_path / "missing"), "--to", "tensorboard"], "is not a run directory"),
    ]:
        assert main(["track", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err


def test_a_run_with_train_trackers_writes_its_loss_curve_to_tensorboard(corpus, tmp_path):
    """The trainer feeds the tracker as it writes metrics.jsonl; a session killed after step 25 (checkpoint at
    20) and resumed shows each step once in TensorBoard, with the losses of metrics.jsonl."""
    more = ["train.trackers=[tensorboard]", "train.log_interval=1", "train.ckpt_interval=10", "train.probe_interval=10"]
    cfg = load_config("tiny", [f"data.corpus={corpus}", *more])
    run = tmp_path / "run"
    assert train(cfg, run, progress=False, stop_after=25)["finished"] is False
    train(cfg, run, resume=True, progress=False)
    rows = read_metrics(run)
    tb = tensorboard_scalars(run)
    assert [s for s, _ in tb["metrics/loss"]] == [r["step"] for r in rows] == list(range(1, cfg.train.max_steps + 1))
    assert [v for _, v in tb["metrics/loss"]] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert [s for s, _ in tb["diagnostics/grad_norm/block_00"]] == list(range(10, cfg.train.max_steps + 1, 10))


def test_train_trackers_is_checked_when_the_config_loads(corpus):
    with pytest.raises(ConfigError, match=r"train.trackers=\['mlflow'\] is invalid: expected a list of tensorboard"):
        load_config("tiny", [f"data.corpus={corpus}", "train.trackers=[mlflow]"])


def test_a_quiet_run_with_wandb_prints_nothing_of_wandb(corpus, tmp_path, wandb_home, capfd):
    sets = ["--set", f"data.corpus={corpus}", "--set", "train.max_steps=3", "--set", "train.trackers=[wandb]"]
    sets += ["--set", "train.wandb_project=my-project"]
    assert main(["train", "--config", "tiny", *sets, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    out, err = capfd.readouterr()
    assert "wandb:" not in out + err and out.count("\n") == 1, out + err  # the trainer's one line
    # (the W&B run is written all the same: in the project asked for, with the run's id, which a resume continues)
    assert wandb_runs(tmp_path / "run") == [((tmp_path / "run" / "run_id").read_text(), "my-project", "run")]


def test_a_replay_supersedes_the_previous_one(run_dir, wandb_home, monkeypatch, capsys):
    """Two replays leave one (the second); a previous online replay is deleted on the server (W&B's Api faked)."""
    import wandb

    for _ in range(2):
        assert main(["track", str(run_dir), "--to", "wandb", "--wandb-project", "replays"]) == 0
    (replay,) = wandb_runs(run_dir)
    record = json.loads((run_dir / "wandb" / "replay.json").read_text())
    assert replay[1:] == ("replays", "run") and record["id"] == replay[0] and record["mode"] == "offline"
    deleted = []

    class Api:
        def run(self, path):
            return type("Run", (), {"delete": lambda self: deleted.append(path)})()

    monkeypatch.setattr(wandb, "Api", Api)
    online = {"id": "run-replay-0123abcd", "mode": "online", "project": "replays", "entity": "me"}
    (run_dir / "wandb" / "replay.json").write_text(json.dumps(online))
    assert main(["track", str(run_dir), "--to", "wandb"]) == 0
    assert deleted == ["me/replays/run-replay-0123abcd"] and len(wandb_runs(run_dir)) == 2  # (that one was online)
    monkeypatch.setattr(wandb, "Api", lambda: 1 / 0)  # (no connection, say): the new replay stands, one warning
    (run_dir / "wandb" / "replay.json").write_text(json.dumps(online))
    capsys.readouterr()
    assert main(["track", str(run_dir), "--to", "wandb"]) == 0
    ours = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("wandb:")]
    assert len(ours) == 1 and "me/replays/run-replay-0123abcd is still there (ZeroDivisionError)" in ours[0], ours


def test_wandb_mode_and_project_errors_are_one_line(run_dir, corpus, tmp_path, wandb_home, capsys):
    sets = ["--set", f"data.corpus={corpus}", "--set", "train.max_steps=2", "--set", "train.trackers=[wandb]"]
    disabled = ["--set", "train.wandb_mode=disabled"]
    assert main(["train", "--config", "tiny", *sets, *disabled, "--out", str(tmp_path / "off"), "--quiet"]) == 0
    assert not (tmp_path / "off" / "wandb").exists()  # disabled: no W&B at all
    capsys.readouterr()
    for args, words in [
        (["--wandb-mode", "nope"], ["train.wandb_mode='nope' is invalid", "offline or online or disabled"]),
        (["--wandb-project", "a/b"], ["train.wandb_project='a/b' is invalid", "without any of"]),
        (["--wandb-mode", "disabled"], ["replays nothing"]),
        (["--wandb-mode", "online"], ["train.wandb_mode=online failed", "wandb login"]),  # (no login here)
    ]:
        one_line_error(capsys, ["track", str(run_dir), "--to", "wandb", *args], *words)
    argv = ["train", "--config", "tiny", *sets, "--set", "train.wandb_mode=online", "--out", str(tmp_path / "on")]
    one_line_error(capsys, argv, "train.wandb_mode=online failed", "wandb login")
