"""The training guard (train.guard): faults are injected into chosen batches, by their content, so that a
resumed run meets them exactly where an uninterrupted one does."""

import contextlib
import functools
import json
import math
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file

import spannorm.train as train_module
from spannorm.config import ConfigError
from spannorm.data import TokenData, prepare
from spannorm.run import RunDir, read_metrics
from spannorm.run_config import load_config
from spannorm.train import Part, lr_at, train

NAN = float("nan")


def tiny(corpus, *more):
    return load_config("tiny", [f"data.corpus={corpus}", "train.ckpt_interval=10", *more])


def guarded(corpus, *more):
    return tiny(corpus, "train.guard.enabled=true", "train.guard.window=8", *more)


@dataclass
class Faults(Part):
    """Multiplies the training loss by ``factor[batch]`` whenever the batch is one of those chosen (by content):
    a part of the trainer, passed in ``train(..., parts=[...])`` as a user's monitor would be, which wraps each
    micro-batch's forward in a forward hook on the model. ``seen``: the training batches met, in order. Not part
    of the run's state (a resume meets the same faults by the batches' content)."""

    name: ClassVar[str] = "faults"
    factor: dict = field(default_factory=dict)
    seen: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state) -> None:
        pass

    @contextlib.contextmanager
    def micro_batch(self, trainer, micro):
        def scale(module, args, out):
            logits, loss = out
            if module.training and len(args) > 1:
                self.seen.append(key := args[0].cpu().numpy().tobytes())
                return logits, loss * self.factor.get(key, 1.0)
            return out

        hook = trainer.model.register_forward_hook(scale)
        try:
            yield
        finally:
            hook.remove()


def inject(cfg, faults: dict[int, float]) -> Faults:
    """A :class:`Faults` part for the i-th (1-based) batches of the run's data order without rollbacks."""
    data = TokenData(prepare(cfg.data), cfg.train.seq_len)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    order = [data.sample(gen, cfg.train.batch_size)[0].numpy().tobytes() for _ in range(max(faults))]
    return Faults({order[i - 1]: f for i, f in faults.items()})


def curve(run_dir):
    return [(r["step"], r["loss"], r["val_loss"]) for r in read_metrics(run_dir)]


def test_non_finite_step_is_skipped(corpus, tmp_path):
    cfg = guarded(corpus)
    faults = inject(cfg, {12: NAN})
    summary = train(cfg, tmp_path / "run", progress=False, parts=[faults])
    assert RunDir(tmp_path / "run").interventions() == [{"step": 12, "kind": "skip", "reason": "non-finite loss"}]
    rows = read_metrics(tmp_path / "run")
    assert [r.get("skipped") for r in rows] == [None, None, 1, None, None, None, None, None]  # row 15
    assert summary["finished"] and not summary["diverged"] and math.isfinite(summary["final_val_loss"])
    assert (summary["guard_skipped"], summary["guard_rollbacks"], summary["guard_lr_scale"]) == (1, 0, 1.0)
    assert len(faults.seen) == 40 and rows[-1]["loss"] < rows[0]["loss"]
    # without the guard, the same fault ends the run
    off = train(tiny(corpus), tmp_path / "off", progress=False, parts=[faults])
    assert off["diverged"] and off["diverged_step"] == 12 and off["diverged_reason"] == "non-finite loss"
    assert "guard_skipped" not in off


def test_skip_streak_rolls_back_past_the_batches(corpus, tmp_path):
    cfg = guarded(corpus, "train.guard.lr_factor=0.5")
    faults = inject(cfg, {23: NAN, 24: NAN, 25: NAN})
    summary = train(cfg, tmp_path / "run", progress=False, parts=[faults])
    assert RunDir(tmp_path / "run").interventions() == [
        {"step": 23, "kind": "skip", "reason": "non-finite loss"},
        {"step": 24, "kind": "skip", "reason": "non-finite loss"},
        {"step": 25, "kind": "skip", "reason": "non-finite loss"},
        {"step": 25, "kind": "rollback", "reason": "3 skipped steps in a row", "to_step": 20},
    ]
    assert len(faults.seen) == 45 and len(set(faults.seen)) == 45  # no batch is replayed
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(5, 41, 5))  # the abandoned rows are gone
    assert all(r.get("skipped") is None for r in rows)
    lrs = {r["step"]: r["lr"] for r in rows}
    assert lrs[20] == lr_at(19, cfg.train) and lrs[25] == pytest.approx(0.5 * lr_at(24, cfg.train))
    assert summary["finished"] and not summary["diverged"] and math.isfinite(summary["final_val_loss"])
    assert (summary["guard_skipped"], summary["guard_rollbacks"], summary["guard_lr_scale"]) == (3, 1, 0.5)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step-0000040" / "state.pt", weights_only=True)
    assert saved["guard"]["rollbacks"] == 1 and saved["guard"]["lr_scale"] == 0.5


def test_rollbacks_spent_make_the_run_diverged(corpus, tmp_path):
    cfg = guarded(corpus, "train.guard.max_rollbacks=1", "train.guard.skip_limit=2")
    faults = inject(cfg, {13: NAN, 14: NAN, 17: NAN, 18: NAN})  # after the rollback: steps 13, 14
    summary = train(cfg, tmp_path / "run", progress=False, parts=[faults])
    kinds = [(r["step"], r["kind"]) for r in RunDir(tmp_path / "run").interventions()]
    assert kinds == [(13, "skip"), (14, "skip"), (14, "rollback"), (13, "skip"), (14, "skip")]
    assert summary["diverged"] and summary["diverged_step"] == 14
    assert summary["diverged_reason"].startswith("non-finite loss (2 skipped steps in a row")


def test_rollback_without_a_checkpoint_restarts_from_the_initial_weights(corpus, tmp_path):
    cfg = guarded(corpus, "train.ckpt_interval=20")
    faults = inject(cfg, {3: NAN, 4: NAN, 5: NAN})
    summary = train(cfg, tmp_path / "run", progress=False, parts=[faults])
    assert RunDir(tmp_path / "run").interventions()[-1] == {
        "step": 5,
        "kind": "rollback",
        "reason": "3 skipped steps in a row",
        "to_step": 0,
    }
    assert len(faults.seen) == 45 and len(set(faults.seen)) == 45
    assert summary["finished"] and not summary["diverged"] and math.isfinite(summary["final_val_loss"])


def test_loss_spike_rolls_back(corpus, tmp_path):
    cfg = guarded(corpus)
    faults = inject(cfg, {27: 10.0})
    summary = train(cfg, tmp_path / "run", progress=False, parts=[faults])
    (row,) = RunDir(tmp_path / "run").interventions()
    assert (row["step"], row["kind"], row["to_step"]) == (27, "rollback", 20)
    assert row["reason"].startswith("loss spike: z=") and float(row["reason"][14:].split()[0]) >= 6
    assert len(faults.seen) == 47 and len(set(faults.seen)) == 47
    assert summary["finished"] and not summary["diverged"] and math.isfinite(summary["final_val_loss"])
    assert (summary["guard_skipped"], summary["guard_rollbacks"]) == (0, 1)
    # the spike check can be turned off
    off = train(guarded(corpus, "train.guard.spike_z=0"), tmp_path / "off", progress=False)
    assert RunDir(tmp_path / "off").interventions() == [] and off["guard_rollbacks"] == 0


def test_resume_after_rollbacks_is_exact(corpus, tmp_path):
    cfg = guarded(corpus, "train.guard.lr_factor=0.5")
    # NaN in batches 23-25: rollback at step 25 to 20; a spike in batch 38, met at step 33: rollback to 30
    faults = [inject(cfg, {23: NAN, 24: NAN, 25: NAN, 38: 10.0})]
    full = train(cfg, tmp_path / "full", progress=False, parts=faults)
    assert [(r["step"], r["kind"]) for r in RunDir(tmp_path / "full").interventions()][-2:] == [
        (25, "rollback"),
        (33, "rollback"),
    ]
    cut = tmp_path / "cut"
    assert not train(cfg, cut, progress=False, stop_after=27, parts=faults)["finished"]  # resumes from 20, before
    assert not train(cfg, cut, resume=True, progress=False, stop_after=35, parts=faults)["finished"]  # 30, after
    summary = train(cfg, cut, resume=True, progress=False, parts=faults)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]

    def lines(run):
        return strip(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())

    assert lines(cut) == lines(tmp_path / "full")
    assert strip([summary]) == strip([full])
    weights = [
        load_file(run / "checkpoints" / "step-0000040" / "model.safetensors") for run in (cut, tmp_path / "full")
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])


def test_guard_never_fires_on_a_healthy_run(corpus, tmp_path):
    """On the tiny preset (a window of 8 steps: the spike check runs from step 9 on) the guard changes nothing."""
    golden = ["model.scheme=pre", "model.tie_embeddings=true", "model.init_std=0.02", "train.max_steps=20"]
    golden += ["train.log_interval=5"]  # test_train.py's golden curve, its former recipe pinned
    for name, more in (("off", []), ("on", ["train.guard.enabled=true", "train.guard.window=8"])):
        summary = train(tiny(corpus, *golden, *more), tmp_path / name, progress=False)
    assert RunDir(tmp_path / "on").interventions() == []
    assert curve(tmp_path / "on") == curve(tmp_path / "off")  # exactly
    assert [r["loss"] for r in read_metrics(tmp_path / "on")] == pytest.approx(
        [5.2047, 4.5716, 4.1656, 3.9872], rel=2e-3
    )  # the golden curve
    assert (summary["guard_skipped"], summary["guard_rollbacks"], summary["guard_lr_scale"]) == (0, 0, 1.0)
    a, b = (load_file(tmp_path / n / "checkpoints" / "step-0000020" / "model.safetensors") for n in ("off", "on"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "value",
    [
        "train.guard.enabled=1",
        "train.guard.skip_limit=0",
        "train.guard.window=1",
        "train.guard.spike_z=-1",
        "train.guard.spike_z=.inf",
        "train.guard.lr_factor=0",
        "train.guard.lr_factor=1.5",
        "train.guard.max_rollbacks=-1",
        "train.guard.window=true",
    ],
)
def test_bad_guard_values_are_refused(value):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [value])
    assert value.split("=")[0] in str(e.value) and "\n" not in str(e.value)


def test_a_study_reports_the_guards_interventions(corpus, tmp_path, monkeypatch):
    """results.csv has the guard's counts per cell and report.md names the cells it saved."""
    import csv

    from spannorm.study import run_study, study_from_dict

    study = study_from_dict(
        {
            "base": "tiny",
            "set": [
                f"data.corpus={corpus}",
                "train.guard.enabled=true",
                "train.guard.window=8",
                "train.ckpt_interval=10",
            ],
            "tokens_per_cell": 40 * 8 * 32,
            "probe": False,
            "grids": [
                {
                    "name": "g",
                    "axes": {"model.scheme": ["pre"], "model.n_layers": [2], "train.lr": [3e-3], "train.seed": [1337]},
                }
            ],
        }
    )
    cell_cfg = guarded(corpus, "model.scheme=pre", "model.n_layers=2")
    faults = inject(cell_cfg, {12: NAN})
    # (a study's cells take no parts: its trainer gets the Faults part the way a test of train() passes it)
    monkeypatch.setattr(train_module, "train", functools.partial(train, parts=[faults]))
    run_study(study, tmp_path / "st", "test", jobs=1, log=lambda *a: None)
    with open(tmp_path / "st" / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["guard_skipped"], row["guard_rollbacks"]) == ("1", "0")
    report = (tmp_path / "st" / "report.md").read_text()
    assert f"intervened in {row['name']} (1 steps skipped, 0 rollbacks)" in report
