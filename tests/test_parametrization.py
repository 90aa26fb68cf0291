"""model.parametrization: µP in width and CompleteP in depth (spannorm.parametrization), by its table."""

import math

import pytest
import torch

from spannorm.config import ConfigError
from spannorm.layers import Role
from spannorm.model import build_model
from spannorm.model_config import ModelConfig
from spannorm.parametrization import fan_in_ratio, recipe_config
from spannorm.run_config import TrainConfig
from spannorm.schemes import weight_stds
from spannorm.train import make_optimizer

SCHEMES = ["pre", "span", "post", "b2t", "deepnorm", "admin", "deepscale", "lns", "peri", "hybrid", "mixln"]


def config(**kw) -> ModelConfig:
    return ModelConfig(**{"d_model": 64, "n_layers": 4, "n_heads": 4, "vocab_size": 97} | kw)


def effective(model, t: TrainConfig) -> dict[str, tuple[float, float, float]]:
    """Parameter name -> (lr, decay, ε) as AdamW will apply them at the schedule's peak."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in make_optimizer(model, t).param_groups:
        for p in g["params"]:
            out[names[id(p)]] = (t.lr * g["lr_scale"], g["weight_decay"], g["eps"])
    return out


@pytest.mark.parametrize("scheme", SCHEMES + ["pre-moe"])
@pytest.mark.parametrize("parametrization", ["mup", "completep"])
def test_at_the_base_shape_every_parametrization_is_the_standard_model(scheme, parametrization):
    moe = {"moe": {"n_experts": 4, "top_k": 2}} if scheme.endswith("-moe") else {}
    standard = config(scheme=scheme.removesuffix("-moe"), **moe)
    other = config(scheme=standard.scheme, parametrization=parametrization, base_width=64, base_depth=4, **moe)
    models = []
    for cfg in (standard, other):
        torch.manual_seed(0)
        models.append(build_model(cfg))
    a, b = models
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    x = torch.randint(0, 97, (2, 12))
    assert torch.equal(a(x)[0], b(x)[0])
    t = TrainConfig(lr=3e-3, weight_decay=0.1)
    assert effective(a, t) == effective(b, t)


def rms_of(model, role: Role) -> float:
    """The RMS of the first weight of ``role`` (a whole matrix: not a fused one)."""
    for module in model.modules():
        r = getattr(module, "role", None)
        if (r[0] if isinstance(r, tuple) else r) is role:
            return module.weight.float().pow(2).mean().sqrt().item()
    raise AssertionError(role)


@pytest.mark.parametrize("scheme", ["pre", "span", "post", "b2t"])
def test_mup_carries_the_base_recipe_by_the_table(scheme):
    """At m = 4: hidden stds × 1/2 (FFN down: sqrt of its fan-in ratio), the embedding's unchanged; hidden lr × r,
    decay / r, ε × r; embedding, norms: the base lr; attention logits × sqrt(hd_b)/hd, the logits × 1/m."""
    base = config(scheme=scheme, moe={"n_experts": 4, "top_k": 2})
    wide = config(scheme=scheme, d_model=256, parametrization="mup", base_width=64, moe={"n_experts": 4, "top_k": 2})
    assert recipe_config(wide).d_model == 64 and recipe_config(wide).ffn_dim == base.ffn_dim
    rule, carried = weight_stds(base, 0), weight_stds(wide, 0)
    for role in (Role.ATTN_QK, Role.ATTN_V, Role.ATTN_OUT, Role.FFN_UP):
        assert carried[role] == pytest.approx(rule[role] / 2)
    assert fan_in_ratio(wide, Role.FFN_DOWN) == base.expert_dim / wide.expert_dim  # (not 1/4: the rounding to 32)
    assert carried[Role.FFN_DOWN] == pytest.approx(rule[Role.FFN_DOWN] * math.sqrt(base.expert_dim / wide.expert_dim))
    assert carried[Role.ROUTER] == pytest.approx(rule[Role.ROUTER] / 4)
    assert carried[Role.EMBED] == rule[Role.EMBED] and carried[Role.HEAD] == rule[Role.HEAD]
    torch.manual_seed(0)
    model = build_model(wide)
    assert rms_of(model, Role.EMBED) == pytest.approx(rule[Role.EMBED], rel=0.05)  # the init follows the rule
    assert rms_of(model, Role.ATTN_OUT) == pytest.approx(rule[Role.ATTN_OUT] / 2, rel=0.05)
    t = TrainConfig(lr=4e-3, weight_decay=0.1)
    eff = effective(model, t)
    assert eff["embed.weight"] == (4e-3, 0.1, 1e-8)
    assert eff["blocks.0.attn.qkv.weight"] == pytest.approx((1e-3, 0.4, 2.5e-9))
    r = base.expert_dim / wide.expert_dim
    assert eff["blocks.0.ffn.down.weight"] == pytest.approx((4e-3 * r, 0.1 / r, 1e-8 * r))
    assert eff["blocks.0.ffn.router.weight"] == pytest.approx((1e-3, 0.4, 2.5e-9))
    assert all(v == (4e-3, 0.0, 1e-8) for n, v in eff.items() if model.get_parameter(n).dim() < 2)
    assert model.blocks[0].attn.scale == pytest.approx(math.sqrt(16) / 64)  # hd_b = 16, hd = 64
    assert model.head_scale == pytest.approx(0.25)
    assert model.blocks[0].attn.multiplier == model.blocks[0].ffn.multiplier == 1.0


def test_completep_multiplies_each_branch_and_keeps_the_recipe_of_the_base_depth():
    deep = config(scheme="span", n_layers=16, parametrization="completep", base_depth=4)
    torch.manual_seed(0)
    model = build_model(deep)
    block = model.blocks[0]
    assert block.attn.multiplier == block.ffn.multiplier == 0.25
    assert block.s == pytest.approx(math.sqrt(1 / 4))  # SpanNorm's sqrt(c/L) at L_b = 4, not 16
    assert weight_stds(deep, 3) == weight_stds(config(scheme="span"), 3)
    deepnorm = build_model(config(scheme="deepnorm", n_layers=16, parametrization="completep", base_depth=4))
    assert deepnorm.blocks[0].alpha == pytest.approx(8**0.25)
    pre = config(scheme="pre", n_layers=16, parametrization="completep", base_depth=4)
    assert weight_stds(pre, 0)[Role.ATTN_OUT] == pytest.approx(weight_stds(config(scheme="pre"), 0)[Role.ATTN_OUT])
    eff = effective(build_model(pre), TrainConfig(lr=2e-3))
    assert eff["blocks.0.attn.qkv.weight"] == pytest.approx((2e-3, 0.1, 2.5e-9))  # lr × m_L^0, ε / m_L
    assert eff["blocks.0.norm1.weight"] == (2e-3, 0.0, 1e-8)
    # the multiplier is on each branch's output
    x, rope = torch.randn(2, 12, 64), model.rope(12, torch.device("cpu"))
    with torch.no_grad():
        scaled = (block.attn(x, rope), block.ffn(x))
        block.attn.multiplier = block.ffn.multiplier = 1.0
        torch.testing.assert_close(block.attn(x, rope) / 4, scaled[0])
        torch.testing.assert_close(block.ffn(x) / 4, scaled[1])


@pytest.mark.parametrize(
    "kw, bad",
    [
        ({"scheme": "ngpt", "parametrization": "mup"}, "model.parametrization"),
        ({"scheme": "mhc", "parametrization": "completep"}, "model.parametrization"),
        ({"norm": "dyt", "dyt": {"recipe": "llm"}, "parametrization": "mup"}, "model.parametrization"),
        ({"parametrization": "mup", "base_width": 36}, "model.base_width"),
        ({"parametrization": "mup", "base_width": 0}, "model.base_width"),
        ({"parametrization": "muP"}, "model.parametrization"),
        ({"scheme": "deepscale", "deepscale_k": 3, "parametrization": "completep", "base_depth": 2}, "deepscale_k"),
    ],
)
def test_combinations_it_does_not_define_are_refused_in_one_line(kw, bad):
    with pytest.raises(ConfigError) as err:
        config(**kw)
    message = str(err.value)
    assert bad in message and "\n" not in message


def test_standard_ignores_the_base_shape():
    a, b = config(), config(base_width=32, base_depth=2)
    torch.manual_seed(0)
    m1 = build_model(a)
    torch.manual_seed(0)
    m2 = build_model(b)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert m2.head_scale == 1.0 and m2.blocks[0].attn.scale is None


def test_config_show_prints_the_parametrization_keys_with_their_docs(capsys):
    """`spannorm config show --set model.parametrization=mup --set model.base_width=64`: the three keys under their
    docs, the values set (base_depth null), and YAML that --config reads back to the same config."""
    import dataclasses

    from spannorm.cli import main
    from spannorm.config import parse_yaml
    from spannorm.run_config import load_config, run_config_from_dict

    sets = ["model.parametrization=mup", "model.base_width=64"]
    assert main(["config", "show", *[a for s in sets for a in ("--set", s)]]) == 0
    shown = capsys.readouterr().out
    cfg = load_config("tiny", sets)
    assert run_config_from_dict(parse_yaml(shown, "shown")) == cfg and cfg.model.parametrization.value == "mup"
    lines = shown.splitlines()
    docs = {f.name: f.metadata["doc"] for f in dataclasses.fields(ModelConfig)}
    for key, value in (("parametrization", "mup"), ("base_width", "64"), ("base_depth", "null")):
        at = lines.index(f"  {key}: {value}")
        above = []  # the comment lines right above the key: its doc
        for line in reversed(lines[:at]):
            if not line.lstrip().startswith("#"):
                break
            above.insert(0, line.strip().removeprefix("# "))
        assert " ".join(above) == docs[key], key


def test_the_schemes_constants_under_completep_and_mup_are_what_their_docstrings_say():
    """Admin's ω and DeepScaleLM's β at base_depth (CompleteP's L_b/L carries the rest); DeepScaleLM's sqrt(0.3/d) at
    base_width, × 1/m; LNS's 1/sqrt(l) by the block's index, beside CompleteP's multiplier; Mix-LN's ⌊L/4⌋ PostNorm
    blocks of the real L."""
    deep = {"n_layers": 16, "parametrization": "completep", "base_depth": 4}
    admin = build_model(config(scheme="admin", **deep))
    n = 2 * 4
    assert admin.blocks[0].omega0 == pytest.approx(math.sqrt((n + 1) / math.log(n + 1) - 1))
    assert admin.blocks[0].attn.multiplier == 0.25
    deepscale = build_model(config(scheme="deepscale", d_model=256, base_width=64, **deep))
    assert deepscale.blocks[0].beta == pytest.approx(math.sqrt(1 / 4))
    assert deepscale.head_scale == pytest.approx(math.sqrt(0.3 / 64) / 4)
    lns = build_model(config(scheme="lns", **deep))
    assert [b.scale for b in lns.blocks[:3]] == pytest.approx([1, 2**-0.5, 3**-0.5])
    assert lns.blocks[2].ffn.multiplier == 0.25
    mixln = build_model(config(scheme="mixln", **deep))
    assert [b.post for b in mixln.blocks] == [True] * 4 + [False] * 12  # ⌊16/4⌋, not ⌊4/4⌋
    mup = build_model(config(scheme="mixln", d_model=128, n_layers=8, parametrization="mup", base_width=64))
    assert [b.post for b in mup.blocks] == [True] * 2 + [False] * 6
