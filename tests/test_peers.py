"""Init rules and depth constants of the peer schemes, at two depths; `spannorm schemes`."""

import json
import math
import re

import pytest
import torch

from spannorm import ModelConfig, Scheme, build_model
from spannorm.cli import main
from spannorm.schemes import use_tied_embeddings

D = 128


def model(scheme, L, **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(d_model=D, n_heads=4, n_layers=L, scheme=scheme, **kw))


def stds(block):
    w = block.attn.qkv.weight
    return {
        "qk": w[: 2 * D].std().item(),
        "v": w[2 * D :].std().item(),
        "out": block.attn.out.weight.std().item(),
        "up": block.ffn.up.weight.std().item(),
        "down": block.ffn.down.weight.std().item(),
    }


@pytest.mark.parametrize("L", [6, 48])
def test_deepnorm_constants(L):
    m = model("deepnorm", L)
    alpha, beta = (2 * L) ** 0.25, (8 * L) ** -0.25
    f = m.cfg.ffn_dim
    assert all(isinstance(b.alpha, float) and b.alpha == pytest.approx(alpha) for b in m.blocks)
    got = stds(m.blocks[-1])
    assert got["qk"] == pytest.approx(math.sqrt(2 / (2 * D)), rel=0.05)  # xavier, gain 1
    assert got["v"] == pytest.approx(beta * math.sqrt(2 / (2 * D)), rel=0.05)
    assert got["out"] == pytest.approx(beta * math.sqrt(2 / (2 * D)), rel=0.05)
    assert got["up"] == pytest.approx(beta * math.sqrt(2 / (D + f)), rel=0.05)
    assert got["down"] == pytest.approx(beta * math.sqrt(2 / (D + f)), rel=0.05)


@pytest.mark.parametrize("L", [6, 48])
def test_b2t_fairseq_init_times_inverse_sqrt_depth(L):
    """The authors' fairseq init × L^(-1/2) on every block weight; embedding and head N(0, d^(-1/2)); every std
    × 2, the factor the fair study measured (a number for model.init_std drops it: test_recipes.py)."""
    m = model("b2t", L)
    f = m.cfg.ffn_dim
    want = {
        "qk": math.sqrt(2 / (2 * D)) / math.sqrt(2),
        "v": math.sqrt(2 / (2 * D)) / math.sqrt(2),
        "out": math.sqrt(2 / (2 * D)),
        "up": 1 / math.sqrt(3 * D),
        "down": 1 / math.sqrt(3 * f),
    }
    for block in (m.blocks[0], m.blocks[-1]):
        got = stds(block)
        assert all(got[k] == pytest.approx(2 * v / math.sqrt(L), rel=0.05) for k, v in want.items()), got
    assert m.embed.weight.std().item() == pytest.approx(2 * D**-0.5, rel=0.05)
    assert m.head.weight.std().item() == pytest.approx(2 * D**-0.5, rel=0.05)


@pytest.mark.parametrize("L", [6, 48])
def test_admin_omega(L):
    n = 2 * L
    omega = math.sqrt((n + 1) / math.log(n + 1) - 1)
    m = model("admin", L)
    for b in m.blocks:
        assert torch.allclose(b.omega1, torch.full((D,), omega)) and torch.allclose(b.omega2, torch.full((D,), omega))
    assert all(b.omega1.requires_grad for b in m.blocks)  # learnable


@pytest.mark.parametrize("L", [6, 48])
def test_mixln_split_and_init(L):
    m = model("mixln", L, init_std=0.02)
    n_post = math.floor(0.25 * L)
    assert [b.post for b in m.blocks] == [True] * n_post + [False] * (L - n_post)
    # the repository's default post_pre: every linear weight N(0, 0.02), embedding N(0, sqrt(2/5)), untied head
    for block in (m.blocks[0], m.blocks[-1]):
        assert all(v == pytest.approx(0.02, rel=0.05) for v in stds(block).values())
    assert m.embed.weight.std().item() == pytest.approx(math.sqrt(2 / 5), rel=0.05)
    assert m.head is not None and m.head.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("L", [6, 48])
def test_lns_and_siamese_per_layer_constants(L):
    lns = model("lns", L, init_std=0.02)
    assert [b.scale for b in lns.blocks] == pytest.approx([1 / math.sqrt(i + 1) for i in range(L)])
    assert stds(lns.blocks[-1])["down"] == pytest.approx(0.02, rel=0.05)  # no depth-scaled init
    siamese = model("siamese", L)
    assert [b.z_scale for b in siamese.blocks] == pytest.approx([1 / math.sqrt(2 * (i + 1)) for i in range(L)])


@pytest.mark.parametrize("L", [6, 48])
def test_deepscale_constants_and_unit_variance(L):
    m = model("deepscale", L, deepscale_k=2.0)
    b = m.blocks[0]
    assert b.beta == pytest.approx(math.sqrt(2.0 / L)) and b.lam**2 + b.beta**2 == pytest.approx(1.0)
    assert m.embed.weight.std().item() == pytest.approx(1.0, rel=0.05)
    # the residual stream keeps unit RMS through the whole stack at init
    seen = []
    hooks = [
        blk.register_forward_hook(lambda mod, i, o: seen.append(o.pow(2).mean().sqrt().item())) for blk in m.blocks
    ]
    with torch.no_grad():
        m(torch.randint(0, 256, (4, 64)))
    for h in hooks:
        h.remove()
    assert min(seen) > 0.7 and max(seen) < 1.3


def test_peri_and_sandwich_entry_exit():
    peri, sandwich = model("peri", 4, init_std=0.02), model("sandwich", 4)
    assert isinstance(peri.embed_norm, torch.nn.RMSNorm) and isinstance(peri.final_norm, torch.nn.RMSNorm)
    # CogView's Sandwich-LN: no embedding norm, a final norm before the head
    assert isinstance(sandwich.embed_norm, torch.nn.Identity) and isinstance(sandwich.final_norm, torch.nn.RMSNorm)
    assert stds(peri.blocks[0])["down"] == pytest.approx(0.02 / math.sqrt(8), rel=0.05)


def test_hybrid_normalizes_q_k_v_per_head():
    b = model("hybrid", 4).blocks[0]
    assert b.attn.q_norm.normalized_shape == (D // 4,) and hasattr(b.attn, "v_norm")
    assert not hasattr(b, "norm1")  # no input norm


def test_hybrid_star_has_an_input_norm_only_in_block_0():
    m = model("hybrid_star", 4)
    assert hasattr(m.blocks[0], "attn_norm") and hasattr(m.blocks[0].attn, "q_norm")
    assert not any(hasattr(b, "attn_norm") for b in m.blocks[1:])


def test_dyt_alpha0():
    m = model("pre", 2, norm="dyt", dyt={"alpha0": 0.8})
    assert m.blocks[0].norm1.alpha.item() == pytest.approx(0.8)


# The DyT LLM recipe's attention-input norms (α₀_attn) of a 4-block model, per scheme; every other DyT has α₀_other.
# Post-family schemes have none: their attention reads the stream itself. Mix-LN: block 0 is PostNorm (⌊4/4⌋ = 1).
ATTN_INPUT = {
    "pre": {f"blocks.{i}.norm1" for i in range(4)},
    "post": set(),
    "span": set(),
    "mixln": {f"blocks.{i}.norm1" for i in (1, 2, 3)},
    "hybrid_star": {"blocks.0.attn_norm"},
    "siamese": {f"blocks.{i}.in1" for i in range(4)},
}


def dyts(m):
    from spannorm.layers import DyT

    return {name: mod for name, mod in m.named_modules() if isinstance(mod, DyT)}


@pytest.mark.parametrize("scheme", ATTN_INPUT)
def test_dyt_llm_recipe_alpha0_per_site(scheme):
    m = model(scheme, 4, norm="dyt", dyt={"recipe": "llm", "alpha0_attn": 0.9, "alpha0_other": 0.1})
    found = dyts(m)
    assert set(found) >= ATTN_INPUT[scheme] and len(found) > len(ATTN_INPUT[scheme])
    got = {name: d.alpha.item() for name, d in found.items()}
    want = {name: 0.9 if name in ATTN_INPUT[scheme] else 0.1 for name in found}
    assert got == pytest.approx(want)
    plain = model(scheme, 4, norm="dyt", dyt={"alpha0": 0.3})  # today's recipe: one α₀ everywhere
    assert all(d.alpha.item() == pytest.approx(0.3) for d in dyts(plain).values())


def test_dyt_llm_recipe_defaults_are_the_authors_7b_values():
    cfg = ModelConfig(norm="dyt", dyt={"recipe": "llm"})
    assert (cfg.dyt.alpha0_attn, cfg.dyt.alpha0_other) == (0.8, 0.2)
    m = model("pre", 2, norm="dyt", dyt={"recipe": "llm"})
    assert m.blocks[1].norm1.alpha.item() == pytest.approx(0.8)
    assert m.blocks[1].norm2.alpha.item() == pytest.approx(0.2) and m.final_norm.alpha.item() == pytest.approx(0.2)


@pytest.mark.parametrize("scheme", ["pre", "span"])
def test_dyt_llm_recipe_has_no_bias(scheme):
    m = model(scheme, 2, norm="dyt", dyt={"recipe": "llm"})
    assert dyts(m) and all(d.bias is None for d in dyts(m).values())
    assert not any(n.endswith("bias") for n, _ in m.named_parameters())
    assert all(d.bias is not None for d in dyts(model(scheme, 2, norm="dyt")).values())  # plain keeps β


@pytest.mark.parametrize("scheme", ["pre", "span"])  # span: the scalar comes before the embedding norm
def test_dyt_llm_recipe_embedding_scalar(scheme):
    m = model(scheme, 2, norm="dyt", dyt={"recipe": "llm"})
    assert m.embed_scale.shape == (1,) and m.embed_scale.item() == pytest.approx(math.sqrt(D))
    assert any(p is m.embed_scale for p in m.parameters())  # learnable
    idx = torch.randint(0, m.cfg.vocab_size, (2, 8))
    with torch.no_grad():
        before = m(idx)[0]
        m.embed_scale.fill_(0.5 * math.sqrt(D))
        after = m(idx)[0]
    assert (after - before).abs().max() > 1e-3
    # plain DyT and the other norm types have no scalar (model.dyt.recipe only concerns DyT)
    assert model(scheme, 2, norm="dyt").embed_scale is None
    assert model(scheme, 2, norm="rms", dyt={"recipe": "llm"}).embed_scale is None


@pytest.mark.parametrize("scheme", [s.value for s in Scheme])
def test_constants_survive_meta_device_build(scheme):
    """Depth constants are Python floats, not buffers: a model built on the meta device and
    materialized with reset_parameters equals one built directly."""
    cfg = ModelConfig(d_model=32, n_heads=2, n_layers=6, scheme=scheme, vocab_size=64)
    direct = build_model(cfg)
    torch.manual_seed(0)
    direct.reset_parameters()
    with torch.device("meta"):
        lazy = build_model(cfg)
    lazy.to_empty(device="cpu")
    torch.manual_seed(0)
    lazy.reset_parameters()
    assert list(direct.buffers()) == []
    for (name, p), q in zip(direct.named_parameters(), lazy.parameters()):
        assert torch.equal(p, q), name
    idx = torch.randint(0, 64, (2, 8))
    assert torch.equal(direct(idx)[0], lazy(idx)[0])


def test_schemes_command(capsys):
    assert main(["schemes", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == [s.value for s in Scheme]
    assert all(r["equation"] and r["init"] and r["reference"] for r in rows)
    assert main(["schemes"]) == 0
    text = capsys.readouterr().out
    assert "deepnorm (DeepNorm): h = N(α·x + Attn(x))" in text and text.count("reference:") == len(rows)


@pytest.mark.parametrize(
    ("scheme", "norm"),
    [(s.value, n) for s in Scheme for n in ("rms", "layer", "dyt", "derf") if s is not Scheme.NGPT or n == "rms"],
)  # (nGPT has no norm modules: rms only)
def test_every_scheme_and_norm_trains(corpus, tmp_path, scheme, norm):
    from spannorm.run import read_metrics
    from spannorm.run_config import load_config
    from spannorm.train import train

    cfg = load_config(
        "tiny",
        [
            f"data.corpus={corpus}",
            f"model.scheme={scheme}",
            f"model.norm={norm}",
            "train.max_steps=50",
            "train.log_interval=1",
            "train.eval_interval=50",
            "train.ckpt_interval=50",
        ],
    )
    summary = train(cfg, tmp_path / "run", progress=False)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert len(losses) == 50 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.3, losses
    # DeepScaleLM starts at ≈ ln V (its head scale) and, with DyT's bounded final norm, has small logits:
    # measured 5.54 -> 4.68 in 50 steps, so it must drop 0.5 nats; nGPT's logits are cosines × s_z (1 at init, moving
    # lr·sqrt(d) a step): measured 5.56 -> 4.86 (any norm: it has none); every other case 1 nat
    drop = 0.5 if (scheme == "deepscale" and norm in ("dyt", "derf")) or scheme == "ngpt" else 1.0
    assert losses[-1] < losses[0] - drop, losses
    assert not summary["diverged"] and math.isfinite(summary["final_val_loss"])


def test_readme_schemes_table_is_current(capsys):
    from pathlib import Path

    assert main(["schemes", "--markdown"]) == 0
    table = capsys.readouterr().out
    assert table in (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.mark.parametrize("L", [6, 48])
@pytest.mark.parametrize("scheme", ["post", "residual", "siamese", "admin"])
def test_plain_init_schemes(scheme, L):
    """Schemes whose recommended init is plain N(0, σ): no depth scaling at any depth."""
    m = model(scheme, L, init_std=0.02)
    for block in (m.blocks[0], m.blocks[-1]):
        assert all(v == pytest.approx(0.02, rel=0.05) for v in stds(block).values())


@pytest.mark.parametrize("L", [6, 48])
@pytest.mark.parametrize("scheme", ["hybrid", "hybrid_star"])
def test_hybrid_megatron_init(scheme, L):
    """The authors' OLMo configs (init_fn full_megatron): out and down × 1/sqrt(2L), the rest plain."""
    m = model(scheme, L, init_std=0.02)
    for block in (m.blocks[0], m.blocks[-1]):
        got = stds(block)
        assert got["qk"] == pytest.approx(0.02, rel=0.05) and got["up"] == pytest.approx(0.02, rel=0.05)
        assert got["out"] == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.05)
        assert got["down"] == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.05)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("L", [6, 48])
def test_deepscale_first_loss_is_near_ln_vocab(L, d):
    """The tied head sees the final state × sqrt(0.3/d): the first loss is ≈ ln V, not tens of nats."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(d_model=d, n_heads=4, n_layers=L, scheme="deepscale"))
    assert m.head is None and m.head_scale == pytest.approx(math.sqrt(0.3 / d))
    idx, targets = torch.randint(0, 256, (8, 64)), torch.randint(0, 256, (8, 64))
    with torch.no_grad():
        loss = m(idx, targets)[1].item()
    assert abs(loss - math.log(256)) < 0.5, loss


TIED = {
    "pre": True,
    "post": False,
    "span": True,
    "deepnorm": False,
    "b2t": False,
    "admin": False,
    "peri": True,
    "sandwich": True,
    "mixln": False,
    "hybrid": True,
    "hybrid_star": True,
    "lns": True,
    "residual": True,
    "siamese": True,
    "deepscale": True,
    "olmo2": False,
    "mhc": True,
    "ngpt": False,
}


@pytest.mark.parametrize("scheme", [s.value for s in Scheme])
def test_tied_head_is_part_of_each_recipe(scheme):
    m = build_model(ModelConfig(d_model=32, n_heads=2, n_layers=2, scheme=scheme, vocab_size=64))
    assert use_tied_embeddings(m.cfg) is TIED[scheme]
    assert (m.head is None) is TIED[scheme]
    for explicit in (True, False):  # an explicit value overrides the recipe
        m = build_model(
            ModelConfig(d_model=32, n_heads=2, n_layers=2, scheme=scheme, vocab_size=64, tie_embeddings=explicit)
        )
        assert (m.head is None) is explicit
    # init=shared: one recipe for every scheme, tied unless set
    shared = ModelConfig(d_model=32, n_heads=2, n_layers=2, scheme=scheme, vocab_size=64, init="shared")
    assert use_tied_embeddings(shared) and build_model(shared).head is None
    assert not use_tied_embeddings(ModelConfig(scheme=scheme, init="shared", tie_embeddings=False))


def test_shared_init_is_plain_for_every_weight():
    m = model("b2t", 6, init="shared", tie_embeddings=False, init_std=0.02)
    assert all(v == pytest.approx(0.02, rel=0.05) for v in stds(m.blocks[-1]).values())
    assert m.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.head.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_tie_embeddings_from_config_file():
    from spannorm.run_config import load_config

    assert use_tied_embeddings(load_config("tiny", ["model.scheme=post"]).model) is False
    assert use_tied_embeddings(load_config("tiny", ["model.scheme=post", "model.tie_embeddings=true"]).model) is True


def test_schemes_command_states_each_recipe(capsys):
    assert main(["schemes", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for name, tied in TIED.items():
        assert bool(re.search(r"\btied head", rows[name]["init"])) is tied
        assert ("untied head" in rows[name]["init"]) is not tied
    assert "closed-form ω of admin-torch, not the profiled ω" in rows["admin"]["init"]
    assert "sqrt(2/5)" in rows["mixln"]["init"] and "1/sqrt(2L)" in rows["hybrid"]["init"]
