"""MoE FFN: equivalence with the dense FFN, routing against a per-token reference, the auxiliary
losses, init calibration, every scheme with MoE, config errors, and the statistics in the outputs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from spannorm import ConfigError, ModelConfig, Scheme, build_model
from spannorm.cli import main
from spannorm.layers import Role, SwiGLU
from spannorm.moe import MoE
from spannorm.probe import taps
from spannorm.run import read_metrics
from spannorm.run_config import load_config, preset_names
from spannorm.train import train


def moe(d=16, f=24, E=4, k=2, shared=0, cf=None, seed=0):
    torch.manual_seed(seed)
    m = MoE(d, f, E, k, shared, cf).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.3)
    return m


def naive(m: MoE, x: torch.Tensor):
    """Per-token reference: route each token in Python, apply its experts one by one, drop an
    assignment when its expert already took `capacity` assignments of earlier tokens."""
    E, k = m.n_experts, m.top_k
    cap = m.capacity(len(x))
    taken, out, dropped = [0] * E, torch.zeros_like(x), 0
    for n, xn in enumerate(x):
        p = torch.softmax(m.router.weight @ xn, -1)
        chosen = sorted(range(E), key=lambda i: -p[i].item())[:k]
        total = sum(p[i] for i in chosen)
        for i in chosen:
            if cap is not None and taken[i] >= cap:
                dropped += 1
                continue
            taken[i] += 1
            g, u = (m.up.weight[i] @ xn).chunk(2)
            out[n] += p[i] / total * (m.down.weight[i] @ (F.silu(g) * u))
        if m.shared is not None:
            out[n] += m.shared(xn)
    return out, dropped


def test_one_expert_top1_equals_dense_swiglu():
    m = moe(E=1, k=1)
    dense = SwiGLU(16, 24).double()
    with torch.no_grad():
        dense.up.weight.copy_(m.up.weight[0])
        dense.down.weight.copy_(m.down.weight[0])
    y = torch.randn(3, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(m(y), dense(y), rtol=1e-12, atol=1e-12)
    m.up.weight.data[0, 0, 0] += 1.0  # the test can fail: different weights give a different output
    assert not torch.allclose(m(y), dense(y))


@pytest.mark.parametrize(
    "E, k, shared, cf",
    [(4, 2, 0, None), (8, 2, 0, None), (8, 3, 1, None), (5, 1, 2, None), (4, 2, 0, 0.5), (8, 2, 1, 0.75)],
)
def test_routing_matches_naive_per_token_reference(E, k, shared, cf):
    m = moe(E=E, k=k, shared=shared, cf=cf, seed=E + k)
    y = torch.randn(2, 20, 16, dtype=torch.float64)
    want, dropped = naive(m, y.reshape(-1, 16))
    torch.testing.assert_close(m(y).reshape(-1, 16), want, rtol=1e-10, atol=1e-10)
    assert m.stats["dropped"] == dropped
    assert (dropped > 0) == (cf is not None)  # these capacities are small enough to drop
    cap = m.capacity(40)
    assert cf is None or cap == math.ceil(cf * 40 * k / E)


def test_top_k_selection_and_weights():
    m = moe(E=6, k=3, seed=3)
    x = torch.randn(50, 16, dtype=torch.float64)
    logits, probs, w, idx = m.route(x)
    for n in range(50):
        p = torch.softmax(m.router.weight @ x[n], -1)
        order = sorted(range(6), key=lambda i: -p[i].item())[:3]
        assert idx[n].tolist() == order
        torch.testing.assert_close(w[n], p[order] / p[order].sum())
    torch.testing.assert_close(w.sum(-1), torch.ones(50, dtype=torch.float64))


def test_aux_loss_matches_formula_on_hand_made_routing():
    """Router weights that send token n to expert n mod 2 (first) and 2 (second) with known logits."""
    m = moe(d=4, E=3, k=1)
    with torch.no_grad():
        m.router.weight.copy_(torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 0]], dtype=torch.float64))
    # tokens: 3 go to expert 0, 1 to expert 1, none to expert 2
    x = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0]], dtype=torch.float64)
    m(x)
    e2 = math.exp(2)
    p0, p1 = [e2 / (e2 + 2), 1 / (e2 + 2), 1 / (e2 + 2)], [1 / (e2 + 2), e2 / (e2 + 2), 1 / (e2 + 2)]
    P = [(3 * a + b) / 4 for a, b in zip(p0, p1)]
    f = [3 / 4, 1 / 4, 0.0]
    assert m.aux_loss.item() == pytest.approx(3 * sum(fi * Pi for fi, Pi in zip(f, P)), rel=1e-12)
    assert m.z_loss.item() == pytest.approx(math.log(e2 + 2) ** 2, rel=1e-12)
    assert m.stats == {"fraction": [0.75, 0.25, 0.0], "imbalance": pytest.approx(0.75 * 3), "dropped": 0}
    m.router.weight.data.zero_()  # uniform router: aux = E · Σ f_i / E = 1
    m(x)
    assert m.aux_loss.item() == pytest.approx(1.0)


def test_gradients_reach_the_router():
    torch.manual_seed(0)
    model = build_model(ModelConfig(d_model=32, n_heads=2, n_layers=2, moe={"n_experts": 4, "top_k": 2}))
    idx = torch.randint(0, 256, (2, 16))
    router = model.blocks[0].ffn.router.weight
    _, loss = model(idx, idx)
    loss.backward()  # through the renormalized top-k weights
    assert router.grad is not None and router.grad.abs().sum() > 0
    model.zero_grad()
    model(idx, idx)
    aux, z = model.moe_terms()
    aux.backward()  # through P_i only
    assert router.grad.abs().sum() > 0
    assert model.blocks[-1].ffn.up.weight.grad is None  # the last layer's aux does not reach its experts


def test_router_role_is_in_every_init_rule_and_every_scheme_builds():
    for scheme in Scheme:
        if scheme is Scheme.NGPT:  # (it refuses MoE in one line: tests/test_ngpt.py)
            continue
        cfg = ModelConfig(
            d_model=32, n_heads=2, n_layers=4, scheme=scheme, moe={"n_experts": 4, "top_k": 2, "n_shared_experts": 1}
        )
        model = build_model(cfg)
        for layer in range(4):
            rule = model.init_rule(layer)
            assert set(rule) == set(Role) and rule[Role.ROUTER] == rule[Role.FFN_UP], scheme
        ffn = model.blocks[-1].ffn
        assert isinstance(ffn, MoE) and ffn.up.weight.shape == (4, 2 * cfg.expert_dim, 32)
        rule = model.init_rule(3)
        assert ffn.router.weight.std().item() == pytest.approx(rule[Role.ROUTER], rel=0.25)
        assert ffn.down.weight.std().item() == pytest.approx(rule[Role.FFN_DOWN], rel=0.1)


@pytest.mark.parametrize(
    "kw",
    [
        dict(moe={"n_experts": 8, "top_k": 2}),
        dict(moe={"n_experts": 8, "top_k": 1}),
        dict(moe={"n_experts": 4, "top_k": 4}),
        dict(moe={"n_experts": 8, "top_k": 2, "n_shared_experts": 1}),
    ],
)
@pytest.mark.parametrize("L", [4, 16])
def test_span_branch_rms_at_init_with_moe(kw, L):
    """SpanNorm's calibrated down-projection gives FFN branch RMS ≈ sqrt(c/L) with MoE, as dense."""
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(d_model=128, n_heads=4, n_layers=L, scheme="span", span={"scale": "init", "c": 2.0}, **kw)
    )
    with torch.no_grad(), taps(model) as rec:
        model(torch.randint(0, 256, (4, 64)))
    rms = [f.pow(2).mean().sqrt().item() for f in rec["ffn"]]
    assert sum(rms) / L == pytest.approx(math.sqrt(2.0 / L), rel=0.05)


def test_active_parameters_match_dense_by_default():
    cfg = ModelConfig(d_model=256, n_heads=4, moe={"n_experts": 8, "top_k": 2})
    assert cfg.expert_dim * cfg.moe.top_k == cfg.ffn_dim == 704
    assert (
        ModelConfig(d_model=256, n_heads=4, moe={"n_experts": 8, "top_k": 1, "n_shared_experts": 2}).expert_dim == 235
    )


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(moe={"n_experts": -1}), "model.moe.n_experts=-1 is invalid: expected an integer in [0, 4096]"),
        (
            dict(moe={"n_experts": 4, "top_k": 5}),
            "model.moe.top_k=5 is invalid: expected an integer in [1, n_experts=4]",
        ),
        (dict(moe={"n_experts": 1}), "model.moe.top_k=2 is invalid: expected an integer in [1, n_experts=1]"),
        (dict(moe={"top_k": 0}), "model.moe.top_k=0 is invalid: expected a positive integer"),
        (
            dict(moe={"n_experts": 4, "capacity_factor": 0.0}),
            "model.moe.capacity_factor=0.0 is invalid: expected a positive number",
        ),
        (
            dict(moe={"n_experts": 4, "expert_d_ff": 0}),
            "model.moe.expert_d_ff=0 is invalid: expected a positive integer (at most 1,048,576) or null",
        ),
        (dict(moe={"n_experts": 4, "aux_coef": -0.1}), "model.moe.aux_coef=-0.1 is invalid: expected a number >= 0"),
        (dict(moe={"n_experts": 4, "z_coef": float("nan")}), "model.moe.z_coef=nan is invalid"),
        (
            dict(moe={"n_shared_experts": 1}),
            "model.moe.n_shared_experts=1 is invalid: expected 0 with model.moe.n_experts=0",
        ),
        (
            dict(moe={"capacity_factor": 1.25}),
            "model.moe.capacity_factor=1.25 is invalid: expected null with model.moe.n_experts=0",
        ),
    ],
)
def test_moe_config_errors_are_one_line(kwargs, fragment):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_moe_preset_error_through_cli(capsys, corpus, tmp_path):
    assert (
        main(
            [
                "train",
                "--config",
                "moe-tiny",
                "--corpus",
                str(corpus),
                "--out",
                str(tmp_path / "r"),
                "--set",
                "model.moe.top_k=9",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        err.strip().count("\n") == 0 and "model.moe.top_k=9 is invalid: expected an integer in [1, n_experts=4]" in err
    )


def test_dense_model_is_unchanged_by_moe_fields():
    """MoE fields do not touch a dense model: same parameters, no MoE terms."""
    torch.manual_seed(0)
    a = build_model(ModelConfig(d_model=32, n_heads=2, n_layers=2))
    torch.manual_seed(0)
    b = build_model(ModelConfig(d_model=32, n_heads=2, n_layers=2, moe={"top_k": 3, "aux_coef": 1.0}))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.moe_terms() is None and a.moe_loss() == 0.0 and a.moe_stats() is None


@pytest.mark.parametrize("scheme", [s.value for s in Scheme if s is not Scheme.NGPT])  # (ngpt refuses MoE)
def test_every_scheme_trains_with_moe(corpus, tmp_path, scheme):
    cfg = load_config(
        "moe-tiny",
        [
            f"data.corpus={corpus}",
            f"model.scheme={scheme}",
            "train.max_steps=30",
            "train.log_interval=1",
            "train.eval_interval=30",
            "train.ckpt_interval=30",
            "model.moe.n_shared_experts=1",
            "model.moe.capacity_factor=1.5",
        ],
    )
    summary = train(cfg, tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")
    losses = [r["loss"] for r in rows]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert not summary["diverged"] and math.isfinite(summary["final_val_loss"])
    assert all(0.5 <= r["aux_loss"] <= 4 and math.isfinite(r["z_loss"]) for r in rows)  # aux = 1 if balanced, ≤ E


def test_stats_in_metrics_diagnostics_and_probe(corpus, tmp_path):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                "moe-tiny",
                "--corpus",
                str(corpus),
                "--out",
                str(run),
                "--quiet",
                "--set",
                "train.probe_interval=10",
                "--set",
                "model.moe.capacity_factor=1.0",
            ]
        )
        == 0
    )
    rows = read_metrics(run)
    assert set(rows[0]) == {
        "step",
        "loss",
        "val_loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "aux_loss",
        "z_loss",
        "moe_imbalance",
    }
    assert all(0.5 <= r["aux_loss"] <= 4 and r["z_loss"] > 0 and r["moe_imbalance"] >= 1.0 for r in rows)
    diag = [json.loads(line) for line in (run / "diagnostics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in diag] == [10, 20, 30, 40]
    for r in diag:
        assert [s["layer"] for s in r["moe"]] == [0, 1]
        for s in r["moe"]:
            assert len(s["fraction"]) == 4 and sum(s["fraction"]) == pytest.approx(1.0)
            assert s["imbalance"] == pytest.approx(max(s["fraction"]) * 4)
            assert isinstance(s["dropped"], int) and s["dropped"] >= 0
    out = tmp_path / "p.json"
    assert main(["probe", "--checkpoint", str(run), "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())["runs"]
    assert len(r["moe"]) == 2 and len(r["moe"][0]["fraction"]) == 4
    out = tmp_path / "q.json"  # fresh models: a dense scheme has moe null
    assert (
        main(
            [
                "probe",
                "--config",
                "tiny",
                "--corpus",
                str(corpus),
                "--scheme",
                "pre",
                "--depths",
                "2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["runs"][0]["moe"] is None


def test_moe_presets_exist_and_train(corpus, tmp_path):
    assert {"moe-tiny", "moe-small"} <= set(preset_names())
    small = load_config("moe-small").model
    assert (small.moe.n_experts, small.moe.top_k, small.d_model, small.n_layers) == (8, 2, 128, 8)
    summary = train(load_config("moe-tiny", [f"data.corpus={corpus}"]), tmp_path / "run", progress=False)
    assert not summary["diverged"] and math.isfinite(summary["final_val_loss"])


def test_training_loss_includes_the_weighted_moe_terms(corpus, tmp_path):
    """The logged loss stays the pure CE; the aux coefficients change the training only through
    the backpropagated sum (a large coefficient moves the run, a zero one does not add anything)."""

    def run(name, *sets):
        cfg = load_config("moe-tiny", [f"data.corpus={corpus}", "train.max_steps=10", "train.log_interval=1", *sets])
        train(cfg, tmp_path / name, progress=False)
        return [r["loss"] for r in read_metrics(tmp_path / name)]

    base, big = run("a"), run("b", "model.moe.aux_coef=10.0")
    assert base[0] == big[0]  # the first logged loss is the CE of the same initial model
    assert base[-1] != big[-1]


def test_bf16_autocast_matches_fp32_and_trains(corpus, tmp_path):
    m = moe(E=8, k=2, shared=1, seed=5).float()
    y = torch.randn(4, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(y)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), m(y), rtol=0.05, atol=0.05)
    summary = train(
        load_config("moe-tiny", [f"data.corpus={corpus}", "train.precision=bf16"]), tmp_path / "run", progress=False
    )
    assert not summary["diverged"] and math.isfinite(summary["final_val_loss"])
