"""The trainer's per-step diagnostics (diagnostics.jsonl) and the functions that measure them."""

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spannorm.model import build_model
from spannorm.model_config import ModelConfig
from spannorm.probe import (
    attention_entropy,
    forward_stats,
    mean_pairwise_cosine,
    snapshot,
    taps,
    uniform_causal_entropy,
    update_ratios,
)
from spannorm.probe_command import read_diagnostics
from spannorm.run_config import load_config
from spannorm.train import train

ROLES = ["attn.qk", "attn.v", "attn.out", "ffn.up", "ffn.down", "norm"]
PER_BLOCK = ["grad_norm", "stream_rms", "attn_rms", "ffn_rms", "attn_entropy"]
SCALARS = ["attn_entropy_max", "logit_rms", "head_in_rms", "embed_rms", "embed_cos"]


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """Two tiny runs of 10 steps probed at steps 5 and 10: SpanNorm (tied) and HybridNorm (untied head)."""
    root = tmp_path_factory.mktemp("runs")
    for name, more in (("span", []), ("hybrid_untied", ["model.scheme=hybrid", "model.tie_embeddings=false"])):
        cfg = load_config(
            "tiny",
            [f"data.corpus={corpus}", "train.max_steps=10", "train.probe_interval=5", "train.eval_interval=10", *more],
        )
        train(cfg, root / name, progress=False)
    return root


@pytest.mark.parametrize("name", ["span", "hybrid_untied"])
def test_training_rows_have_the_diagnostics(runs, name):
    rows = read_diagnostics(runs / name)
    assert [r["step"] for r in rows] == [5, 10]
    n_blocks = 2  # the tiny preset
    for row in rows:
        assert set(row) == {"step", "update_ratio", *PER_BLOCK, *SCALARS}
        for key in PER_BLOCK:
            assert len(row[key]) == n_blocks and all(math.isfinite(v) and v > 0 for v in row[key]), key
        assert all(math.isfinite(row[key]) for key in SCALARS)
        assert all(e < row["attn_entropy_max"] for e in row["attn_entropy"])  # trained attention is not uniform
        assert row["attn_entropy_max"] == pytest.approx(uniform_causal_entropy(32))  # tiny: seq_len 32
        ratios = row["update_ratio"]
        assert set(ratios) == set(ROLES) | ({"embed", "head"} if name == "hybrid_untied" else {"embed"})
        for role in ROLES:
            assert len(ratios[role]) == n_blocks and all(0 < r < 1 for r in ratios[role]), role
        assert 0 < ratios["embed"] < 1


def tiny_model(scheme="span", **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, scheme=scheme, **kw))


def batch(model, seq_len=16):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, model.cfg.vocab_size, (3, seq_len + 1), generator=g).split([seq_len, 1], dim=1)[0]


def test_update_ratio_matches_a_frozen_copy():
    """One real AdamW step; each ratio against the same number computed by hand from a frozen copy."""
    model = tiny_model("hybrid", tie_embeddings=False)  # hybrid: q/k/v norms inside attention count as "norm"
    frozen = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = batch(model)
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    before = snapshot(model)
    opt.step()
    got = update_ratios(model, before)
    assert set(got) == {"attn.qk", "attn.v", "attn.out", "ffn.up", "ffn.down", "norm", "embed", "head"}

    def ratio(new, old):
        return math.sqrt(sum((a - b).pow(2).sum().item() for a, b in zip(new, old))) / math.sqrt(
            sum(b.pow(2).sum().item() for b in old)
        )

    d = model.cfg.d_model
    for i, (b, f) in enumerate(zip(model.blocks, frozen.blocks)):
        expect = {
            "attn.qk": ratio([b.attn.qkv.weight[: 2 * d]], [f.attn.qkv.weight[: 2 * d]]),
            "attn.v": ratio([b.attn.qkv.weight[2 * d :]], [f.attn.qkv.weight[2 * d :]]),
            "attn.out": ratio([b.attn.out.weight], [f.attn.out.weight]),
            "ffn.up": ratio([b.ffn.up.weight], [f.ffn.up.weight]),
            "ffn.down": ratio([b.ffn.down.weight], [f.ffn.down.weight]),
            "norm": ratio(
                [p for n, p in b.named_parameters() if "norm" in n], [p for n, p in f.named_parameters() if "norm" in n]
            ),
        }
        for role, value in expect.items():
            assert got[role][i] == pytest.approx(value, rel=1e-6), (role, i)
    assert got["embed"] == pytest.approx(ratio([model.embed.weight], [frozen.embed.weight]), rel=1e-6)
    assert got["head"] == pytest.approx(ratio([model.head.weight], [frozen.head.weight]), rel=1e-6)


def test_update_ratio_splits_fused_rows_and_finds_the_router():
    model = tiny_model("pre", moe={"n_experts": 4})
    d = model.cfg.d_model
    before = snapshot(model)
    with torch.no_grad():
        model.blocks[1].ffn.router.weight.mul_(1.5)
        model.blocks[0].attn.qkv.weight[2 * d :].mul_(0.5)  # the value rows only
    got = update_ratios(model, before)
    assert got["router"] == [0.0, pytest.approx(0.5), 0.0] and got["ffn.up"] == [0.0, 0.0, 0.0]
    assert got["attn.v"] == [pytest.approx(0.5), 0.0, 0.0] and got["attn.qk"] == [0.0, 0.0, 0.0]


def test_attention_entropy_is_uniform_for_zero_queries_and_keys():
    model = tiny_model()
    d, idx = model.cfg.d_model, batch(model)
    with torch.no_grad(), taps(model) as rec:
        model(idx)
    stats = forward_stats(model, rec)
    assert all(e < stats["attn_entropy_max"] - 0.01 for e in stats["attn_entropy"])
    assert all(b.attn.record is None for b in model.blocks)  # off again after the forward
    for block in model.blocks:
        with torch.no_grad():
            block.attn.qkv.weight[: 2 * d] = 0  # q = k = 0: every score 0, uniform over the causal prefix
    with torch.no_grad(), taps(model) as rec:
        model(idx)
    stats = forward_stats(model, rec)
    assert stats["attn_entropy_max"] == pytest.approx(sum(math.log(t) for t in range(1, 17)) / 16, abs=1e-12)
    assert stats["attn_entropy"] == pytest.approx([stats["attn_entropy_max"]] * 3, abs=1e-5)


def test_attention_entropy_against_a_loop():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 5, 4, generator=g)
    ents = []
    for b in range(2):
        for h in range(3):
            for t in range(5):
                p = torch.softmax(q[b, h, t] @ k[b, h, : t + 1].T / 2.0, dim=-1)
                ents.append(-(p * p.log()).sum().item())
    assert attention_entropy(q, k) == pytest.approx(sum(ents) / len(ents), rel=1e-5)


def test_logit_and_head_input_rms():
    model = tiny_model()
    idx = batch(model)
    with torch.no_grad(), taps(model) as rec:
        logits, _ = model(idx)
    stats = forward_stats(model, rec)
    assert stats["logit_rms"] == pytest.approx(logits[0].pow(2).mean().sqrt().item(), rel=1e-5)
    assert stats["head_in_rms"] == pytest.approx(1.0, rel=1e-3)  # SpanNorm's final RMSNorm with unit gain
    assert stats["embed_rms"] == pytest.approx(model.embed.weight.pow(2).mean().sqrt().item(), rel=1e-6)


def test_embed_cos():
    row = torch.randn(1, 8)
    assert mean_pairwise_cosine(row.repeat(10, 1)) == pytest.approx(1.0, abs=1e-12)
    assert mean_pairwise_cosine(torch.eye(6)) == pytest.approx(0.0, abs=1e-12)
    w = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    cos = torch.nn.functional.cosine_similarity(w[:, None], w[None], dim=-1)
    assert mean_pairwise_cosine(w) == pytest.approx(((cos.sum() - cos.diagonal().sum()) / 42).item(), rel=1e-5)


def test_lr_cliff_plots_script(runs, tmp_path):
    script = Path(__file__).parents[1] / "scripts" / "lr_cliff_plots.py"
    out = tmp_path / "plots" / "cliff.png"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    res = subprocess.run(
        [sys.executable, str(script), str(runs / "span"), str(runs / "hybrid_untied"), "--out", str(out), "--table"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the span run's table: Σ σ_l² = c = 1 under model.span.scale=norm (the default), whatever the weights did
    span_rows = res.stdout.split("hybrid_untied:")[0].splitlines()
    rows = [line.split(" | ") for line in span_rows if line.startswith("| ") and line[2].isdigit()]
    assert rows and all(float(r[2]) == pytest.approx(1.0, abs=0.02) for r in rows)
