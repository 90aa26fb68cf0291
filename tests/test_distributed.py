"""Gradient accumulation, and several processes under torchrun (DDP, gloo on the CPU): the same losses as
one process with the same global batch."""

import os
import subprocess
import sys
import time

import pytest

from spannorm.files import read_jsonl
from spannorm.run import read_metrics
from spannorm.run_config import load_config
from spannorm.train import train

TOL = 1e-5
B = 4  # sequences per micro-batch


def tiny(corpus, *more):
    return load_config("tiny", [f"data.corpus={corpus}", "train.log_interval=1", "train.max_steps=10", *more])


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def torchrun(tmp_path, script: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """Run a Python script under torchrun with ``nproc`` processes on the CPU."""
    path = tmp_path / "job.py"
    path.write_text(script)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return subprocess.run(cmd + [str(path)], capture_output=True, text=True, env=env, timeout=240)


JOB = """
from spannorm.run_config import load_config
from spannorm.train import train
cfg = load_config("tiny", {sets!r})
print(train(cfg, {out!r}, resume={resume}, progress=False, stop_after={stop_after}))
"""


def job(corpus, out, *more, resume=False, stop_after=None) -> str:
    sets = [f"data.corpus={corpus}", "train.log_interval=1", "train.max_steps=10", *more]
    return JOB.format(sets=sets, out=str(out), resume=resume, stop_after=stop_after)


def test_accumulation_matches_one_larger_batch(corpus, tmp_path):
    big = train(tiny(corpus, f"train.batch_size={2 * B}"), tmp_path / "big", progress=False)
    acc = train(tiny(corpus, f"train.batch_size={B}", "train.grad_accum_steps=2"), tmp_path / "acc", progress=False)
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "big"), abs=TOL)
    assert acc["final_val_loss"] == pytest.approx(big["final_val_loss"], abs=TOL)


def test_ddp_on_two_processes_matches_one_process(corpus, tmp_path):
    train(tiny(corpus, f"train.batch_size={2 * B}"), tmp_path / "one", progress=False)
    done = torchrun(tmp_path, job(corpus, tmp_path / "ddp", f"train.batch_size={B}", "train.distributed=ddp"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "one"), abs=TOL)
    # with accumulation too: 2 ranks × 2 micro-batches of B/2
    more = [f"train.batch_size={B // 2}", "train.grad_accum_steps=2", "train.distributed=ddp"]
    done = torchrun(tmp_path, job(corpus, tmp_path / "ddp-acc", *more))
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(tmp_path / "ddp-acc") == pytest.approx(losses(tmp_path / "one"), abs=TOL)


def test_a_run_saved_by_two_ranks_resumes_on_one_and_the_reverse(corpus, tmp_path):
    sets = [f"train.batch_size={B}", "train.distributed=ddp", "train.ckpt_interval=5"]
    full = tmp_path / "full"
    assert torchrun(tmp_path, job(corpus, full, *sets)).returncode == 0
    # saved by 2 ranks at step 5, resumed by 1 (which accumulates 2 micro-batches to keep the global batch)
    cut = tmp_path / "cut"
    assert torchrun(tmp_path, job(corpus, cut, *sets, stop_after=5)).returncode == 0
    train(tiny(corpus, *sets), cut, resume=True, progress=False)
    assert losses(cut) == pytest.approx(losses(full), abs=TOL)
    # saved by 1 process with 2 micro-batches, resumed by 2 ranks
    one = [f"train.batch_size={B}", "train.distributed=ddp", "train.ckpt_interval=5", "train.grad_accum_steps=2"]
    back = tmp_path / "back"
    train(tiny(corpus, *one), back, progress=False, stop_after=5)
    done = torchrun(tmp_path, job(corpus, back, *one, resume=True))
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(back) == pytest.approx(losses(full), abs=TOL)


KILL = """
import os, signal
import torch.distributed as dist
from spannorm.train import Trainer
step = Trainer.train_step
def train_step(self, *args):
    if self.step == 7 and dist.get_rank() == 1:  # rank 1 dies in the middle of the run
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, *args)
Trainer.train_step = train_step
"""


def test_killing_one_rank_ends_the_job_and_leaves_a_resumable_run(corpus, tmp_path):
    sets = [f"train.batch_size={B}", "train.distributed=ddp", "train.ckpt_interval=5"]
    full = tmp_path / "full"
    train(tiny(corpus, f"train.batch_size={2 * B}", "train.ckpt_interval=5"), full, progress=False)
    cut = tmp_path / "cut"
    done = torchrun(tmp_path, KILL + job(corpus, cut, *sets))
    assert done.returncode != 0
    assert "exitcode  : -9" in done.stderr and "Signal 9 (SIGKILL) received by PID" in done.stderr, done.stderr[-3000:]
    assert not (cut / "summary.json").exists()
    train(tiny(corpus, *sets), cut, resume=True, progress=False)  # from the checkpoint of step 5, in one process
    assert losses(cut) == pytest.approx(losses(full), abs=TOL)


def test_fsdp_on_two_processes_matches_one_process(corpus, tmp_path):
    diag = ["train.probe_interval=5"]  # (the per-block diagnostics on sharded weights too)
    train(tiny(corpus, f"train.batch_size={2 * B}", *diag), tmp_path / "one", progress=False)
    for name, more in (
        ("fsdp", [f"train.batch_size={B}"]),
        ("acc", [f"train.batch_size={B // 2}", "train.grad_accum_steps=2"]),
    ):
        done = torchrun(tmp_path, job(corpus, tmp_path / name, *more, "train.distributed=fsdp", *diag))
        assert done.returncode == 0, done.stderr[-3000:]
        assert losses(tmp_path / name) == pytest.approx(losses(tmp_path / "one"), abs=TOL)
    one_diag = read_jsonl(tmp_path / "one" / "diagnostics.jsonl")
    fsdp_diag = read_jsonl(tmp_path / "fsdp" / "diagnostics.jsonl")
    per_block = [[g for r in rows for g in r["grad_norm"]] for rows in (fsdp_diag, one_diag)]
    assert len(per_block[0]) == 4 and per_block[0] == pytest.approx(per_block[1], rel=1e-4)  # 2 rows × 2 blocks


MUP = ["model.d_model=64", "model.parametrization=mup", "model.base_width=32"]  # (r = 1/2: lr_scale, decay, ε)


def test_a_mup_model_under_fsdp_matches_one_process_and_resumes_from_its_shards(corpus, tmp_path):
    """Issue 30: a mup model away from its base width, its AdamW groups over each rank's shards (lr_scale, decay
    and ε per group): 2 FSDP ranks give one process's losses; stopped at step 5 and resumed on one process from
    the shards, the same again."""
    train(tiny(corpus, f"train.batch_size={2 * B}", *MUP), tmp_path / "one", progress=False)
    sets = [f"train.batch_size={B}", "train.distributed=fsdp", "train.ckpt_interval=5", *MUP]
    done = torchrun(tmp_path, job(corpus, tmp_path / "fsdp", *sets))
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), abs=TOL)
    cut = tmp_path / "cut"
    done = torchrun(tmp_path, job(corpus, cut, *sets, stop_after=5))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (cut / "checkpoints" / "step-0000005" / "dcp" / ".metadata").is_file()
    train(tiny(corpus, *sets), cut, resume=True, progress=False)
    assert losses(cut) == pytest.approx(losses(tmp_path / "one"), abs=TOL)


def test_a_sharded_checkpoint_resumes_on_one_process_and_the_reverse(corpus, tmp_path):
    sets = [f"train.batch_size={B}", "train.distributed=fsdp", "train.ckpt_interval=5"]
    full = tmp_path / "full"
    assert torchrun(tmp_path, job(corpus, full, *sets)).returncode == 0
    assert (full / "checkpoints" / "step-0000010" / "dcp" / ".metadata").is_file()
    cut = tmp_path / "cut"  # saved by 2 ranks (shards), resumed by 1 process
    assert torchrun(tmp_path, job(corpus, cut, *sets, stop_after=5)).returncode == 0
    train(tiny(corpus, *sets), cut, resume=True, progress=False)
    assert losses(cut) == pytest.approx(losses(full), abs=TOL)
    # the weights of the sharded checkpoint load whole (export, probe)
    from spannorm.model import build_model
    from spannorm.run import RunDir

    whole = build_model(tiny(corpus).model)
    RunDir(full, "--checkpoint").load_weights(whole)
    back = tmp_path / "back"  # saved by 1 process (model.safetensors), resumed by 2 sharded ranks
    one = [f"train.batch_size={B}", "train.distributed=fsdp", "train.ckpt_interval=5", "train.grad_accum_steps=2"]
    train(tiny(corpus, *one), back, progress=False, stop_after=5)
    done = torchrun(tmp_path, job(corpus, back, *one, resume=True))
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(back) == pytest.approx(losses(full), abs=TOL)


def test_a_study_cell_trains_under_torchrun(corpus, tmp_path, capsys):
    from spannorm.study import run_study, study_from_dict

    def study(batch, nproc, distributed):
        return study_from_dict(
            {
                "base": "tiny",
                "set": [f"data.corpus={corpus}", f"train.batch_size={batch}", f"train.distributed={distributed}"],
                "tokens_per_cell": 2560,  # 10 steps of 8 sequences of 32 tokens
                "nproc_per_cell": nproc,
                "grids": [{"name": "g", "axes": {"model.scheme": ["span"], "model.n_layers": [2, 3]}}],
            }
        )

    one = run_study(study(2 * B, 1, "none"), tmp_path / "one", "test", log=lambda *_: None)
    two = run_study(study(B, 2, "ddp"), tmp_path / "two", "test", jobs=2, log=print)
    assert [r["final_val_loss"] for r in two] == pytest.approx([r["final_val_loss"] for r in one], abs=TOL)
    for row in two:  # 10 steps of the global batch, and the probe read the model
        cell = tmp_path / "two" / "cells" / row["name"]
        assert row["tokens"] == 2560 and [r["step"] for r in read_metrics(cell)][-1] == 10
        assert (cell / "probe.json").is_file()
    capsys.readouterr()
    run_study(study(B, 2, "ddp"), tmp_path / "two", "test", log=print)  # finished cells are reused
    assert capsys.readouterr().out.count("reused") == 2


def test_a_failing_torchrun_cell_is_reported_in_one_line(corpus, tmp_path, capsys):
    from spannorm.config import SpannormError
    from spannorm.study import run_study, study_from_dict

    study = study_from_dict(
        {
            "base": "tiny",
            # every rank refuses the config: compile is not supported with MoE
            "set": [f"data.corpus={corpus}", "train.distributed=ddp", "model.moe.n_experts=2", "train.compile=true"],
            "tokens_per_cell": 5120,
            "nproc_per_cell": 2,
            "grids": [{"name": "g", "axes": {"model.scheme": ["span"]}}],
        }
    )
    with pytest.raises(SpannormError, match="1 of 1 cells failed"):
        run_study(study, tmp_path / "s", "test", log=print)
    line = next(x for x in capsys.readouterr().out.splitlines() if "FAILED" in x)
    assert "torchrun with 2 processes exited with code 1: spannorm: error: train.compile=true is not supported" in line


HANG = """
import time
import torch.distributed as dist
from spannorm.train import Trainer
step = Trainer.train_step
def train_step(self, *args):
    if self.step == 3 and dist.get_rank() == 1:  # rank 1 hangs (alive, but never reaches the next collective)
        time.sleep(120)
    return step(self, *args)
Trainer.train_step = train_step
"""


def test_a_hung_rank_ends_the_job_after_train_dist_timeout_s(corpus, tmp_path):
    t0 = time.perf_counter()
    sets = [f"train.batch_size={B}", "train.distributed=ddp", "train.dist_timeout_s=5"]
    done = torchrun(tmp_path, HANG + job(corpus, tmp_path / "hung", *sets))
    assert done.returncode != 0 and time.perf_counter() - t0 < 90, done.stderr[-3000:]
    assert "Timed out waiting 5000ms" in done.stderr, done.stderr[-3000:]  # (gloo's words, on rank 0)


KILL_IN_WRITE = """
import os, signal
import torch.distributed as dist
from torch.distributed.checkpoint import filesystem
write = filesystem._FileSystemWriter.write_data
calls = []
def write_data(self, plan, planner):
    calls.append(1)
    done = write(self, plan, planner)
    if len(calls) == 2 and dist.get_rank() == 1:  # inside the write of step 10's checkpoint: its shard written
        done.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    return done
filesystem._FileSystemWriter.write_data = write_data
"""


def test_a_rank_killed_inside_a_sharded_checkpoint_write_loses_nothing(corpus, tmp_path, monkeypatch):
    """Issue 25: SIGKILL of one of 2 FSDP ranks inside a checkpoint write; resumed by 1 process, then by 2: the
    losses and the final weights are the uninterrupted run's (fp32), and nothing the kill left remains."""
    import torch

    from spannorm import files
    from spannorm.model import build_model
    from spannorm.run import RunDir

    sets = [f"train.batch_size={B}", "train.distributed=fsdp", "train.ckpt_interval=5", "train.max_steps=15"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert torchrun(tmp_path, job(corpus, full, *sets)).returncode == 0
    done = torchrun(tmp_path, KILL_IN_WRITE + job(corpus, cut, *sets))
    assert done.returncode != 0 and "exitcode  : -9" in done.stderr, done.stderr[-3000:]
    assert (cut / "checkpoints" / "latest").read_text() == "step-0000005"
    assert not (cut / "checkpoints" / "step-0000010").exists()  # (rank 0's temporary one: gone, or left stale)

    monkeypatch.setattr(files, "STALE_S", 0.0)  # (a temporary directory no process holds is stale at once)
    train(tiny(corpus, *sets), cut, resume=True, progress=False, stop_after=10)  # 1 process: steps 6-10
    done = torchrun(tmp_path, job(corpus, cut, *sets, resume=True))  # 2 ranks again: steps 11-15
    assert done.returncode == 0, done.stderr[-3000:]

    assert losses(cut) == pytest.approx(losses(full), abs=TOL)
    weights = []
    for run in (full, cut):
        model = build_model(tiny(corpus).model)
        RunDir(run, "--checkpoint").load_weights(model)
        weights.append(model.state_dict())
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    assert not [p for p in cut.rglob("*") if ".tmp-" in p.name], "a temporary file or directory was left behind"


def test_under_nccl_each_rank_sets_its_gpu_and_hands_collectives_cuda_tensors(monkeypatch):
    """Issue 29 (without a GPU: NCCL and CUDA faked): the rank's GPU (LOCAL_RANK) is set before the process group
    starts, and Ranks.mean hands all_reduce a tensor on it (NCCL refuses CPU tensors; it all-reduced a CPU one)."""
    import torch
    import torch.distributed as dist

    from spannorm import distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    ranks = distributed.start(tiny("unused", "train.distributed=ddp").train, torch.device("cuda"))
    assert calls == [("set_device", 1), ("init", "nccl")] and ranks.device == "cuda:1"

    seen = []

    def all_reduce(t):
        seen.append(str(t.device))
        t.mul_(2)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    gloo = distributed.Ranks(rank=0, world=2, joined=True)  # (gloo: CPU tensors; a CUDA one cannot be made here)
    assert gloo.mean(3.0) == 3.0 and seen == ["cpu"]
    made = []  # (the device the reduced tensor is made on: a stand-in on the CPU is reduced)
    monkeypatch.setattr(torch, "tensor", lambda data, dtype, device: made.append(device) or torch.zeros(1))
    ranks.mean(3.0)
    assert made == ["cuda:1"]


def test_each_rank_scores_its_share_of_the_validation_batches(corpus, monkeypatch):
    """Issue 29: every rank scored every validation window; now rank r scores batches r, r + world, ... and the
    ranks' means are averaged (the same number as one process: test_ddp_on_two_processes_matches_one_process)."""
    import torch.distributed as dist

    from spannorm.data import TokenData, prepare
    from spannorm.distributed import Ranks
    from spannorm.model import build_model
    from spannorm.train import evaluate

    cfg = tiny(corpus)
    data = TokenData(prepare(cfg.data), cfg.train.seq_len)
    model = build_model(cfg.model)
    seen = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x, y: seen.append(x[0, :4].tolist()) or forward(x, y))
    one = evaluate(model, data, cfg.train, micro=2)
    everything, seen[:] = list(seen), []
    monkeypatch.setattr(dist, "all_reduce", lambda t: t.mul_(1.0))  # (the other rank's mean: faked as 0)
    half = evaluate(model, data, cfg.train, micro=2, ranks=Ranks(rank=1, world=2, joined=True))
    assert seen == everything[1::2] and len(seen) == cfg.train.eval_batches
    assert half == pytest.approx(one / 2, rel=0.2)  # (rank 1's mean, halved: as if rank 0's were 0)


COUNTED = """
import os

import torch.distributed as dist
from spannorm.run_config import load_config
from spannorm.train import Part, train

calls = []
for name in ("all_reduce", "broadcast", "broadcast_object_list", "all_gather", "all_gather_object", "barrier"):
    setattr(dist, name, (lambda f, name: lambda *a, **k: calls.append(name) or f(*a, **k))(getattr(dist, name), name))


class Count(Part):
    name = "count"

    def __init__(self):
        self.at = []

    def state_dict(self):
        return {{}}

    def after_step(self, trainer, result):
        self.at.append(len(calls))


count = Count()
train(load_config("tiny", {sets!r}), {out!r}, progress=False, parts=[count])
if os.environ["RANK"] == "0":  # (train left the process group)
    print("collectives", [b - a for a, b in zip(count.at, count.at[1:])])
"""


def test_a_step_makes_one_collective_besides_the_gradients(corpus, tmp_path):
    """Issue 29: under torchrun a step averages the loss and agrees on a Ctrl-C in one all-reduce (it made two:
    the loss's all-reduce and a pickled broadcast of the interrupt flag); DDP's own gradient all-reduce runs in
    its C++ reducer, not through these functions."""
    sets = [f"data.corpus={corpus}", f"train.batch_size={B}", "train.distributed=ddp", "train.max_steps=8"]
    sets += ["train.log_interval=1", "train.eval_interval=100", "train.ckpt_interval=100"]
    done = torchrun(tmp_path, COUNTED.format(sets=sets, out=str(tmp_path / "run")))
    assert done.returncode == 0, done.stderr[-3000:]
    per_step = eval(done.stdout.split("collectives", 1)[1].strip().splitlines()[0])
    assert per_step == [1] * 7, per_step  # between steps 1..8; the last step evaluates and checkpoints
