"""Device-agnostic code: every scheme on the ``meta`` device, the device setting, and the trainer
and CLI following it. The CUDA side is in test_cuda.py (skipped without a GPU)."""

import pytest
import torch

from spannorm import cli
from spannorm.config import ConfigError
from spannorm.device import resolve, valid_device
from spannorm.model import build_model
from spannorm.model_config import ModelConfig, NormType, Scheme
from spannorm.moe import MoE
from spannorm.run import read_metrics
from spannorm.run_config import load_config
from spannorm.train import train


@pytest.mark.parametrize(
    ("scheme", "norm"), [(s, n) for s in Scheme for n in NormType if s is not Scheme.NGPT or n is NormType.RMS]
)  # (nGPT has no norm modules: rms only)
def test_every_scheme_runs_forward_and_backward_on_meta(scheme, norm):
    """No tensor is created on a fixed device: built, run and differentiated on ``meta``, the loss and
    every gradient stay there (a stray CPU tensor would fail or bring the loss back to the CPU)."""
    with torch.device("meta"):
        model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, scheme=scheme, norm=norm))
    idx = torch.randint(0, 64, (2, 8), device="meta")
    logits, _ = model(idx)
    assert logits.device.type == "meta" and logits.shape == (2, 8, 64)
    _, loss = model(idx, idx)
    assert loss.device.type == "meta"
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.device.type == "meta" for g in grads)


@pytest.mark.parametrize("spec", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_forms_are_valid(spec):
    assert valid_device(spec)


@pytest.mark.parametrize("spec", ["gpu", "CUDA", "cuda:", "cuda:-1", "mps:0", "", 0, None])
def test_bad_device_settings_are_refused_by_name(spec, corpus):
    assert not valid_device(spec)
    with pytest.raises(
        ConfigError, match=r"train\.device=.* is invalid: expected (auto, cpu, cuda or cuda:N|a string)"
    ):
        load_config("tiny", [f"data.corpus={corpus}", f"train.device={spec}"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_missing_gpu_is_a_one_line_error_before_anything_is_written(corpus, tmp_path):
    assert resolve("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"train\.device='cuda' is invalid: this machine has no CUDA device"):
        train(load_config("tiny", [f"data.corpus={corpus}", "train.device=cuda"]), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_trainer_follows_train_device(corpus, tmp_path):
    """auto resolves to this machine's device; on a CPU machine cpu and auto train identically."""
    runs = {}
    for spec in ("cpu", "auto"):
        cfg = load_config(
            "tiny",
            [
                f"data.corpus={corpus}",
                f"train.device={spec}",
                "train.max_steps=10",
                "train.eval_interval=10",
                "train.ckpt_interval=10",
            ],
        )
        train(cfg, tmp_path / spec, progress=False)
        runs[spec] = [(r["step"], r["loss"], r["val_loss"]) for r in read_metrics(tmp_path / spec)]
    if not torch.cuda.is_available():
        assert runs["cpu"] == runs["auto"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize(
    "command", [["train", "--config", "tiny"], ["probe", "--depths", "2"], ["bench", "--no-hf"], ["compare"]]
)
def test_cli_device_flag_without_gpu(command, capsys, tmp_path, corpus):
    extra = {
        "train": ["--out", str(tmp_path / "o"), "--corpus", str(corpus)],
        "probe": ["--json", str(tmp_path / "p.json"), "--corpus", str(corpus)],
        "compare": ["--out", str(tmp_path / "o"), "--corpus", str(corpus)],
        "bench": [],
    }[command[0]]
    assert cli.main(command + ["--device", "cuda", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cuda" in err and "no CUDA device" in err


@pytest.mark.parametrize("capacity", [None, 1.0])
def test_grouped_expert_gemm_matches_the_loop(capacity):
    """The CUDA bf16 path (two grouped GEMMs) computes what the CPU path (a loop of matmuls) does,
    forward and backward, with empty experts and capacity drops; grouped_mm also runs on the CPU in bf16."""
    torch.manual_seed(0)
    moe = MoE(d_model=16, d_ff=24, n_experts=4, top_k=2, capacity_factor=capacity)
    x = torch.randn(40, 16).to(torch.bfloat16)
    kept = [0, 15, 40, 25]  # an empty expert
    results = []
    for grouped in (False, True):
        up = moe.up.weight.detach().to(torch.bfloat16).requires_grad_()
        down = moe.down.weight.detach().to(torch.bfloat16).requires_grad_()
        xs = torch.cat([x, x])[:80].clone().requires_grad_()
        out = MoE.experts(xs, kept, up, down, grouped=grouped)
        out.backward(torch.ones_like(out))
        results.append((out.float(), xs.grad.float(), up.grad.float(), down.grad.float()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_device_is_not_part_of_a_runs_identity(corpus):
    """A compare or study directory started on one device resumes on another; any other change is
    another experiment."""
    from spannorm.run_config import same_experiment

    base = [f"data.corpus={corpus}"]
    cpu, auto = (load_config("tiny", base + [f"train.device={d}"]) for d in ("cpu", "auto"))
    assert same_experiment(cpu, auto)
    assert not same_experiment(cpu, load_config("tiny", base + ["train.device=cpu", "train.lr=1e-3"]))
