"""On a CUDA GPU (marked ``cuda``: skipped without one; ``scripts/gpu_check.sh`` runs them):
training in fp32 and bf16, the fused cross-entropy against torch's, exact resume, and checkpoints
that move between the CPU and the GPU."""

import math

import pytest
import torch
import torch.nn.functional as F

from spannorm.files import read_jsonl
from spannorm.layers import linear_cross_entropy
from spannorm.probe_command import run_probe
from spannorm.run import load_run, read_metrics
from spannorm.run_config import load_config
from spannorm.train import train

pytestmark = pytest.mark.cuda


def tiny(corpus, *more):
    return load_config("tiny", [f"data.corpus={corpus}", "train.device=cuda", *more])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("preset,scheme", [("tiny", "pre"), ("tiny", "span"), ("moe-tiny", "span")])
def test_trains_on_cuda(corpus, tmp_path, preset, scheme, precision):
    cfg = load_config(
        preset,
        [
            f"data.corpus={corpus}",
            "train.device=cuda",
            f"model.scheme={scheme}",
            f"train.precision={precision}",
            "train.probe_interval=10",
        ],
    )
    summary = train(cfg, tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")
    assert summary["finished"] and not summary["diverged"] and math.isfinite(summary["final_val_loss"])
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    diagnostics = read_jsonl(tmp_path / "run" / "diagnostics.jsonl")  # the per-block diagnostics ran on CUDA
    assert [r["step"] for r in diagnostics] == [10, 20, 30, 40]
    probed = run_probe(None, [], [], 2, checkpoint=tmp_path / "run", device="cuda")[0]
    assert all(math.isfinite(x) for x in probed["stream_rms"])


def test_cuda_matches_cpu_at_the_first_step(corpus, tmp_path):
    """The same seed gives the same initial weights and batch on both devices: fp32 losses agree."""
    first = {}
    for device in ("cpu", "cuda"):
        cfg = load_config(
            "tiny",
            [
                f"data.corpus={corpus}",
                f"train.device={device}",
                "train.max_steps=5",
                "train.log_interval=1",
                "train.eval_interval=5",
                "train.ckpt_interval=5",
            ],
        )
        train(cfg, tmp_path / device, progress=False)
        first[device] = read_metrics(tmp_path / device)[0]["loss"]
    assert first["cuda"] == pytest.approx(first["cpu"], abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cross_entropy_matches_torch_on_cuda(dtype):
    torch.manual_seed(0)
    x = torch.randn(1000, 64, device="cuda", requires_grad=True)
    w = (torch.randn(5000, 64, device="cuda") * 0.1).requires_grad_()
    t = torch.randint(0, 5000, (1000,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ours = linear_cross_entropy(x, w, t, chunk_rows=300)
    ours.backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = F.cross_entropy((x.to(dtype) @ w.to(dtype).t()).float(), t)
    ref.backward()
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ours, ref, **tol)
    torch.testing.assert_close(gx, x.grad, **tol)
    torch.testing.assert_close(gw, w.grad, **tol)


def test_cuda_resume_reproduces_uninterrupted_run(corpus, tmp_path):
    cfg = tiny(corpus, "train.ckpt_interval=10")
    train(cfg, tmp_path / "full", progress=False)
    train(cfg, tmp_path / "cut", progress=False, stop_after=25)
    train(cfg, tmp_path / "cut", resume=True, progress=False)
    strip = lambda rows: [(r["step"], r["loss"], r["val_loss"]) for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "cut")) == strip(read_metrics(tmp_path / "full"))


@pytest.mark.parametrize("first,then", [("cpu", "cuda"), ("cuda", "cpu")])
def test_checkpoint_moves_between_devices(corpus, tmp_path, first, then):
    """Stopped on one device and resumed on the other: the run finishes, and its first steps after
    the resume are close to the uninterrupted run's on the first device."""
    cfg = load_config("tiny", [f"data.corpus={corpus}", f"train.device={first}", "train.ckpt_interval=10"])
    train(cfg, tmp_path / "full", progress=False)
    train(cfg, tmp_path / "cut", progress=False, stop_after=20)
    moved = load_run(tmp_path / "cut")
    moved.train.device = then
    summary = train(moved, tmp_path / "cut", resume=True, progress=False)
    assert summary["finished"] and not summary["diverged"]
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == [r["step"] for r in full]
    step25 = [(a["loss"], b["loss"]) for a, b in zip(full, cut) if a["step"] == 25][0]
    assert step25[1] == pytest.approx(step25[0], abs=1e-3)
