"""Issue 31: nGPT (scheme ngpt): its matrices on the unit sphere after init and after every optimizer step, its learned
scales' reparametrization, its refusals. The equation itself: tests/test_schemes.py against tests/reference.py."""

import dataclasses
import math

import pytest
import torch

from spannorm import ConfigError, ModelConfig, build_model
from spannorm.layers import Role, apply_rope
from spannorm.run_config import load_config
from spannorm.schemes import NGPT
from spannorm.train import Part, UnitWeights, train

pytestmark = pytest.mark.usefixtures("one_thread")


def unit_error(model) -> dict[str, float]:
    """Per weight with a role, max |‖row or column‖ − 1| along the axis nGPT keeps at unit norm (the d_model one)."""
    errors = {}
    for name, module in model.named_modules():
        role = getattr(module, "role", None)
        if role is not None:
            axis = NGPT.unit_axes[role[0] if isinstance(role, tuple) else role]
            errors[name] = (module.weight.detach().norm(dim=axis) - 1).abs().max().item()
    return errors


def test_the_axes_are_the_embedding_dimension_of_each_matrix():
    """Rows of the input-side matrices (d_model in), columns of the output-side ones (d_model out), as the paper."""
    m = build_model(ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, scheme="ngpt"))
    b = m.blocks[0]
    for weight, role in [
        (m.embed.weight, Role.EMBED),
        (m.head.weight, Role.HEAD),
        (b.attn.qkv.weight, Role.ATTN_QK),
        (b.attn.out.weight, Role.ATTN_OUT),
        (b.ffn.up.weight, Role.FFN_UP),
        (b.ffn.down.weight, Role.FFN_DOWN),
    ]:
        assert weight.shape[NGPT.unit_axes[role]] == 16, role
    assert max(unit_error(m).values()) < 1e-6  # normalized at init
    assert set(unit_error(m)) == {"embed", "head"} | {f"blocks.{i}.{w}" for i in (0, 1) for w in WEIGHTS}


WEIGHTS = ("attn.qkv", "attn.out", "ffn.up", "ffn.down")


@dataclasses.dataclass
class Watch(Part):
    """Records the unit-norm error of every matrix after each optimizer step (after the built-in parts)."""

    name = "watch"
    errors: list = dataclasses.field(default_factory=list)

    def after_optimizer_step(self, trainer, skipped):
        self.errors.append(max(unit_error(trainer.model).values()))


def train_ngpt(corpus, tmp_path, steps=3):
    cfg = load_config(
        "tiny",
        [f"data.corpus={corpus}", "model.scheme=ngpt", f"train.max_steps={steps}", "train.warmup_steps=0"]
        + [f"train.eval_interval={steps}", f"train.ckpt_interval={steps}", "train.probe_interval=1"],
    )
    watch = Watch()
    train(cfg, tmp_path, progress=False, parts=[watch])
    return watch.errors


def test_every_matrix_is_unit_after_each_step_and_the_test_sees_it_when_not(corpus, tmp_path, monkeypatch):
    assert max(train_ngpt(corpus, tmp_path / "a")) < 1e-5
    monkeypatch.setattr(UnitWeights, "after_optimizer_step", lambda self, trainer, skipped: None)
    assert min(train_ngpt(corpus, tmp_path / "b")) > 1e-4  # Adam moves them off the sphere at once


def test_learned_scales_start_at_their_init_and_are_reparametrized():
    """Each learned vector is θ·init/scale with θ starting at scale (the paper's s_init, s_scale)."""
    d = 64
    m = build_model(ModelConfig(vocab_size=50, d_model=d, n_layers=2, n_heads=4, scheme="ngpt"))
    b = m.blocks[1]
    for vec, init, scale in [
        (b.alpha_attn, 0.05, d**-0.5),
        (b.alpha_ffn, 0.05, d**-0.5),
        (b.attn.s_qk, 1.0, d**-0.5),
        (b.ffn.s_uv, math.sqrt(d), 1.0),  # [s_v; s_u]·sqrt(d), each s starting at 1 with scale 1
        (m.logit_scale, 1.0, d**-0.5),
    ]:
        assert torch.equal(vec.theta, torch.full_like(vec.theta, scale))
        torch.testing.assert_close(vec().detach(), torch.full_like(vec.theta, init))
    assert m.logit_scale.theta.shape == (50,) and b.attn.s_qk.theta.shape == (d,)


def test_the_state_stays_on_the_unit_sphere():
    m = build_model(ModelConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=2, scheme="ngpt"))
    with torch.no_grad():
        x = m.head_input(torch.randint(0, 50, (2, 7)))
    assert x.norm(dim=-1) == pytest.approx(torch.ones(2, 7), abs=1e-6)
    assert m.final_norm.__class__ is torch.nn.Identity and m.head is not None  # no final norm, untied


def test_first_loss_is_near_ln_vocab():
    """Cosine logits × s_z = 1 at init: the first loss is ≈ ln V."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(vocab_size=256, d_model=64, n_layers=4, n_heads=4, scheme="ngpt"))
    idx = torch.randint(0, 256, (4, 32))
    with torch.no_grad():
        loss = m(idx, torch.randint(0, 256, (4, 32)))[1].item()
    assert abs(loss - math.log(256)) < 0.1


@pytest.mark.parametrize(
    ("more", "message"),
    [
        ({"moe": {"n_experts": 4}}, "model.moe.n_experts=4 is invalid: expected 0 with model.scheme=ngpt"),
        ({"qk_norm": "all"}, "model.qk_norm='all' is invalid: expected none or null with model.scheme=ngpt"),
        ({"init_scale": 4.0}, "model.init_scale=4.0 is invalid: expected 1 with model.scheme=ngpt, whose matrices"),
        ({"init_std": 0.5}, "model.init_std=0.5 is invalid: expected null with model.scheme=ngpt, whose matrices"),
        ({"norm": "layer"}, "model.norm='layer' is invalid: expected rms with model.scheme=ngpt"),
    ],
    ids=["moe", "qk_norm", "init_scale", "init_std", "norm"],
)
def test_what_ngpt_does_not_define_is_a_one_line_error(more, message):
    with pytest.raises(ConfigError, match=message) as e:
        ModelConfig(scheme="ngpt", **more)
    assert "\n" not in str(e.value)


def test_llama_refuses_ngpt_in_one_line():
    from spannorm.hf import llama_refusal

    reason = llama_refusal(build_model(ModelConfig(d_model=32, n_layers=2, n_heads=2, scheme="ngpt")))
    assert reason.startswith("model.scheme=ngpt: ") and "\n" not in reason


def test_the_probe_s_attention_entropy_is_that_of_ngpt_s_softmax():
    """The recorded q is rescaled so that the probe's q·kᵀ/sqrt(hd) are nGPT's logits s_qk²·cos·sqrt(hd)."""
    from spannorm.probe import forward_stats, taps

    torch.manual_seed(0)
    m = build_model(ModelConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=4, scheme="ngpt"))
    idx = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        m.blocks[0].attn.s_qk.theta.mul_(3)  # sharper than at init
        with taps(m) as rec:
            m(idx, idx)
        a, x = m.blocks[0].attn, m.embed_tokens(idx)
        q, k, _ = a.qkv(x).view(1, 16, 3, 4, 16).permute(2, 0, 3, 1, 4)
        rope = m.rope(16, x.device)
        s = a.s_qk().view(4, 1, 16)
        q, k = (torch.nn.functional.normalize(apply_rope(t, *rope), dim=-1) * s for t in (q, k))
    future = torch.ones(16, 16, dtype=torch.bool).triu(1)
    logp = (q @ k.transpose(-1, -2) * 4.0).masked_fill(future, -math.inf).log_softmax(-1)
    want = -(logp.exp() * logp.masked_fill(future, 0)).sum(-1).mean().item()
    assert forward_stats(m, rec)["attn_entropy"][0] == pytest.approx(want, rel=1e-5)


def test_fsdp_is_refused_in_one_line():
    """FSDP shards the columns nGPT renormalizes: refused before any sharding (DDP keeps whole weights)."""
    from spannorm.distributed import Ranks
    from spannorm.run_config import TrainConfig
    from spannorm.train import placed

    model = build_model(ModelConfig(d_model=32, n_layers=2, n_heads=2, scheme="ngpt"))
    with pytest.raises(ConfigError, match="train.distributed=fsdp is invalid with model.scheme=ngpt") as e:
        placed(model, TrainConfig(distributed="fsdp"), Ranks(joined=True))
    assert "\n" not in str(e.value)
