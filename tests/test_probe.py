"""Signal-propagation probe: measurements against theory, the JSON/PNG outputs, training-time rows."""

import json
import math
import subprocess
import sys

import pytest
import torch

from spannorm import ModelConfig, build_model
from spannorm.cli import main
from spannorm.layers import rope_cache
from spannorm.model_config import Scheme
from spannorm.probe import frozen_branches, layer_drop, probe, skip_gains

FIELDS = {
    "scheme",
    "depth",
    "stream_rms",
    "grad_norm",
    "grad_ratio_first_last",
    "skip_gain_measured",
    "skip_gain_theory",
    "adjacent_cosine",
}


def probed(scheme, L, d=64, seed=0, **kw):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(d_model=d, n_heads=4, n_layers=L, scheme=scheme, **kw))
    idx = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    return probe(model, idx, idx.roll(-1, dims=1))


@pytest.mark.parametrize("span_scale", ["norm", "multiplier", "init"])
@pytest.mark.parametrize("L", [4, 8, 16])
def test_span_with_scaling_matches_theory_and_stays_bounded(L, span_scale):
    r = probed("span", L, span={"scale": span_scale})
    assert r["skip_gain_measured"] == pytest.approx(r["skip_gain_theory"], rel=0.05)
    assert 0.5 <= r["full_gain_measured"] <= 2.0
    assert 0.2 <= r["grad_ratio_first_last"] <= 5.0
    assert r["stream_rms"] == pytest.approx([1.0] * L, rel=1e-3)  # unit gain norms at init


def test_span_without_scaling_loses_the_skip_path():
    shallow, deep = probed("span", 4, span={"scale": "none"}), probed("span", 16, span={"scale": "none"})
    # σ² ≈ 1 per block: the gain falls by about 2^(-1/2) per block, 2^(-6) = 1/64 over 12 more blocks
    assert deep["skip_gain_measured"] < shallow["skip_gain_measured"] / 30
    assert deep["grad_ratio_first_last"] > 5.0


def test_prenorm_stream_grows_with_depth_without_scaled_init():
    rms = [probed("pre", L, init="shared")["stream_rms"][-1] for L in (4, 16)]
    assert rms[1] > 1.5 * rms[0]
    r = probed("pre", 16, init="shared")
    assert r["stream_rms"][-1] == pytest.approx(r["stream_rms_theory"][-1], rel=0.1)
    assert r["skip_gain_measured"] == pytest.approx(1.0, abs=1e-9)  # PreNorm's skip is the identity


def test_olmo2_stream_grows_by_two_unit_branches_a_block():
    """Issue 31: OLMo 2's normalized branches add RMS 1 each, Var(x_L) = Var(x_0) + 2L (theory within 10 %)."""
    for L in (4, 16):
        r = probed("olmo2", L)
        assert r["stream_rms"] == pytest.approx(r["stream_rms_theory"], rel=0.1)
        assert r["skip_gain_measured"] == pytest.approx(1.0, abs=1e-9)  # the identity skip


def test_mhc_stream_grows_as_prenorm_at_init():
    """Issue 31: mHC's n equal streams at init (H_post = 1, a doubly stochastic H_res, H_pre their mean) grow as
    PreNorm's stream, but for the dynamic part (α = 0.01): theory within 10 %, skip gain 1 within 1 %."""
    for L in (4, 16):
        r = probed("mhc", L)
        assert r["stream_rms"] == pytest.approx(r["stream_rms_theory"], rel=0.1)
        assert r["skip_gain_measured"] == pytest.approx(1.0, rel=0.01)


def test_ngpt_stays_on_the_sphere_and_its_skip_gain_matches_theory():
    """Issue 31: nGPT's states have RMS 1/sqrt(d); each sum passes (1 − α)/sqrt((1 − α)² + α²) (theory within 1 %)."""
    for L in (4, 16):
        r = probed("ngpt", L)
        assert r["stream_rms"] == pytest.approx(r["stream_rms_theory"], rel=1e-6)
        assert r["skip_gain_measured"] == pytest.approx(r["skip_gain_theory"], rel=0.01)


@pytest.mark.parametrize("scheme", ["post", "deepnorm"])
def test_post_and_deepnorm_skip_gain_theory(scheme):
    r = probed(scheme, 8)
    assert r["skip_gain_measured"] == pytest.approx(r["skip_gain_theory"], rel=0.05)


def test_skip_gain_equals_finite_differences_with_frozen_branches():
    """The exact J·v of the frozen stack against central differences of the same frozen stack."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(d_model=32, n_heads=2, n_layers=6, scheme="span"))
    idx = torch.randint(0, 256, (2, 16))
    skip, _ = skip_gains(model, idx)
    m = model.double()
    rope = tuple(t.double() for t in rope_cache(16, 16, 10000.0))
    with torch.no_grad():
        x = m.embed_tokens(idx)
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        unit = x / x.norm(dim=-1, keepdim=True)
        v = v - (v * unit).sum(-1, keepdim=True) * unit
        with frozen_branches(m):
            m.trunk(x, rope)
            diff = m.trunk(x + 1e-6 * v, rope) - m.trunk(x - 1e-6 * v, rope)
    fd = diff.pow(2).mean().sqrt().item() / (2e-6 * v.pow(2).mean().sqrt().item())
    assert skip == pytest.approx(fd, rel=1e-6)


def test_the_measurements_do_not_import_the_trainer():
    """probe sits below train (the trainer logs its measurements); probe_command sits above it."""
    code = "import sys, spannorm.probe; assert 'spannorm.train' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_probe_cli_json_and_plots(tmp_path, corpus, capsys):
    out = tmp_path / "p" / "probe.json"
    assert (
        main(
            [
                "probe",
                "--config",
                "tiny",
                "--corpus",
                str(corpus),
                "--scheme",
                "pre,span",
                "--depths",
                "2,3",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    runs = json.loads(out.read_text())["runs"]
    assert [(r["scheme"], r["depth"]) for r in runs] == [("pre", 2), ("pre", 3), ("span", 2), ("span", 3)]
    assert all(
        FIELDS <= set(r)
        and len(r["stream_rms"]) == r["depth"] == len(r["grad_norm"])
        and len(r["adjacent_cosine"]) == r["depth"] - 1
        for r in runs
    )
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "| span | 3 |" in capsys.readouterr().out


def test_training_logs_diagnostics_and_probe_reads_checkpoint(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                "tiny",
                "--corpus",
                str(corpus),
                "--out",
                str(run),
                "--quiet",
                "--set",
                "train.probe_interval=10",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (run / "diagnostics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert all(len(r["grad_norm"]) == 2 and len(r["stream_rms"]) == 2 for r in rows)
    assert all(math.isfinite(x) and x > 0 for r in rows for x in r["grad_norm"] + r["stream_rms"])
    out = tmp_path / "ck.json"
    assert main(["probe", "--checkpoint", str(run), "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())["runs"]
    assert len(r["layer_drop"]) == 2 and all(math.isfinite(x) for x in r["layer_drop"])
    assert r["skip_gain_theory"] is None and r["stream_rms_theory"] is None  # init-only closed forms
    assert (tmp_path / "ck_heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_probe_bad_inputs(capsys, tmp_path):
    assert main(["probe", "--depths", "12,x"]) == 2
    assert "--depths '12,x' is invalid" in capsys.readouterr().err
    assert main(["probe", "--scheme", "bogus"]) == 2
    assert "--schemes='bogus' is invalid" in capsys.readouterr().err
    assert main(["probe", "--checkpoint", str(tmp_path)]) == 2
    assert "holds no run" in capsys.readouterr().err


@pytest.mark.parametrize("scheme", [s.value for s in Scheme])
def test_layer_drop_reuses_the_states_between_blocks_and_gives_the_numbers_of_full_forwards(scheme):
    """Each block dropped by a hook that returns its input, through L + 1 full forwards (the definition)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(d_model=32, n_heads=2, n_layers=4, scheme=scheme))
    for p in model.parameters():  # trained-like weights: every block matters
        p.data += 0.05 * torch.randn_like(p)
    gen = torch.Generator().manual_seed(1)
    batches = [(x, x.roll(-1, dims=1)) for x in torch.randint(0, 256, (3, 2, 16), generator=gen)]

    def loss() -> float:
        return sum(model(x, y)[1].item() for x, y in batches) / len(batches)

    model.eval()
    with torch.no_grad():
        base, full = loss(), []
        for block in model.blocks:
            hook = block.register_forward_hook(lambda m, args, out: args[0])
            full.append(loss() - base)
            hook.remove()
    assert layer_drop(model, batches) == full
    assert all(x != 0 for x in full)
