"""Each scheme's forward against a direct transcription of its equations (tests/reference.py)."""

import dataclasses
import math

import pytest
import reference
import torch

from spannorm import ModelConfig, Scheme, build_model
from spannorm.layers import Role, rope_cache
from spannorm.schemes import Streams

SCHEMES = [s.value for s in Scheme]
# norm type (and, for dyt, the recipe): the fields each test case adds to the config
NORMS = {
    "rms": dict(norm="rms"),
    "layer": dict(norm="layer"),
    "dyt": dict(norm="dyt"),
    "dyt_llm": dict(norm="dyt", dyt={"recipe": "llm"}),
    "derf": dict(norm="derf"),
    "derf_llm": dict(norm="derf", dyt={"recipe": "llm"}),
}
# every (scheme, norm) a model can be: nGPT has no norm modules and takes rms only (a one-line error otherwise)
PAIRS = [(s, n) for s in SCHEMES for n in NORMS if s != "ngpt" or n == "rms"]
# The model is float64 but its RoPE tables are float32 (as in every LM), hence 1e-6, not 1e-12;
# a wrong equation is off by O(1).
TOL = dict(rtol=1e-6, atol=1e-6)


def tiny(scheme, **kw):
    base = dict(vocab_size=50, d_model=16, n_layers=4, n_heads=2, scheme=scheme)
    return ModelConfig(**(base | kw))


def randomized(cfg, seed=0):
    """A float64 model whose 1-D parameters (norm gains and biases, DyT's α, Admin's ω, the DyT LLM
    recipe's embedding scalar) are random too, so they cannot hide in the test."""
    torch.manual_seed(seed)
    model = build_model(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() < 2:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(("scheme", "norm"), PAIRS)
def test_block_matches_equation(scheme, norm):
    cfg = tiny(scheme, **NORMS[norm])
    model = randomized(cfg)
    x = torch.randn(2, 5, cfg.d_model, dtype=torch.float64) * 3
    if scheme in reference.TWO_STREAM:
        x = Streams(x, torch.randn_like(x))
    if scheme in reference.MULTI_STREAM:  # n different streams
        x = torch.randn(2, 5, cfg.hc_streams, cfg.d_model, dtype=torch.float64) * 3
    rope = tuple(t.double() for t in rope_cache(5, cfg.d_model // cfg.n_heads, cfg.rope_theta))
    for layer in (0, 1):  # Mix-LN: block 0 is PostNorm, block 1 PreNorm; LNS, SiameseNorm depend on l
        got = model.blocks[layer](x, rope)
        want = reference.BLOCKS[scheme](x, model.blocks[layer], cfg, layer)
        torch.testing.assert_close(got, want if scheme not in reference.TWO_STREAM else Streams(*want), **TOL)


@pytest.mark.parametrize(("scheme", "norm"), PAIRS)
def test_model_logits_match_equation(scheme, norm):
    cfg = tiny(scheme, **NORMS[norm])
    model = randomized(cfg, seed=1)
    idx = torch.randint(0, cfg.vocab_size, (2, 6))
    logits, _ = model(idx)
    none, loss = model(idx, idx)  # the fused head + cross-entropy
    assert none is None
    want = reference.lm_logits(idx, model, cfg)
    torch.testing.assert_close(logits, want, **TOL)
    ce = torch.nn.functional.cross_entropy(want.reshape(-1, cfg.vocab_size), idx.reshape(-1))
    torch.testing.assert_close(loss, ce, **TOL)


QK_SCHEMES = [s.value for s in Scheme if s.value not in ("hybrid", "hybrid_star", "ngpt")]


def test_olmo2_normalizes_q_and_k_over_all_heads_unless_told_otherwise():
    """Issue 31: OLMo 2's recipe has qk-norm over all heads; model.qk_norm overrides it (none: plain attention)."""
    attn = build_model(tiny("olmo2", n_heads=4)).blocks[0].attn
    assert attn.q_norm.weight.shape == (16,) and attn.k_norm.weight.shape == (16,)
    assert not hasattr(build_model(tiny("olmo2", qk_norm="none")).blocks[0].attn, "q_norm")


@pytest.mark.parametrize("n", [2, 3])
def test_mhc_matches_equation_with_other_stream_counts(n):
    """Issue 31: model.hc_streams sets mHC's n (the equation tests above run the default)."""
    cfg = tiny("mhc", hc_streams=n)
    model = randomized(cfg, seed=3)
    assert model.blocks[0].hc1.phi.shape == (n * cfg.d_model, n * n + 2 * n)
    idx = torch.randint(0, cfg.vocab_size, (2, 6))
    torch.testing.assert_close(model(idx)[0], reference.lm_logits(idx, model, cfg), **TOL)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_mhc_sinkhorn_rows_and_columns_sum_to_one(n):
    """H_res is doubly stochastic to 1e-6 after the paper's 20 iterations for logits of spread 0.5; the columns are
    exact in the model (the last step), the rows converge more slowly the nearer H_res is to a permutation (at
    init, near the identity: docs/peers-2026.md, "mHC", gives the gap)."""
    from spannorm.schemes import HyperConnection, sinkhorn

    logits = 0.5 * torch.randn(1000, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h = sinkhorn(logits, HyperConnection.SINKHORN_ITERS)
    assert (h >= 0).all()
    for dim in (-1, -2):
        torch.testing.assert_close(h.sum(dim), torch.ones(1000, n, dtype=torch.float64), rtol=0, atol=1e-6)
    cfg = tiny("mhc", hc_streams=n)
    x = torch.randn(2, 5, n, cfg.d_model, dtype=torch.float64)
    h = build_model(cfg).double().blocks[0].hc1.coefficients(x)[2]
    torch.testing.assert_close(h.sum(-2), torch.ones(2, 5, n, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("value", [1, 0, -4, 2.5, "4", True, 65])
def test_bad_hc_streams_is_a_one_line_error(value):
    from spannorm import ConfigError

    with pytest.raises(ConfigError, match=r"model.hc_streams=.* is invalid: expected an integer in \[2, 64\]"):
        tiny("mhc", hc_streams=value)


@pytest.mark.parametrize("norm", ["rms", "layer", "dyt"])
@pytest.mark.parametrize("qk_norm", ["head", "all"])
@pytest.mark.parametrize("scheme", QK_SCHEMES)
def test_qk_norm_matches_equation_with_every_scheme(scheme, qk_norm, norm):
    """Issue 31: model.qk_norm normalizes q and k (not v) before RoPE, per head or over all heads, in every
    scheme's attention; its gains are random, so a norm on the wrong axis or on v cannot pass."""
    cfg = tiny(scheme, qk_norm=qk_norm, norm=norm, n_heads=4)
    model = randomized(cfg, seed=2)
    attn = model.blocks[0].attn
    size = cfg.d_model if qk_norm == "all" else cfg.d_model // cfg.n_heads
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (size,) and not hasattr(attn, "v_norm")
    idx = torch.randint(0, cfg.vocab_size, (2, 6))
    torch.testing.assert_close(model(idx)[0], reference.lm_logits(idx, model, cfg), **TOL)
    plain = dataclasses.replace(cfg, qk_norm="none")
    with torch.no_grad():
        other = randomized(plain, seed=2)
        assert not torch.allclose(other(idx)[0], model(idx)[0])  # (the norms change the output)


@pytest.mark.parametrize("scheme", ["hybrid", "hybrid_star", "ngpt"])
def test_qk_norm_is_refused_where_q_k_v_are_already_normalized(scheme):
    from spannorm import ConfigError

    with pytest.raises(
        ConfigError, match=f"model.qk_norm='head' is invalid: expected none or null with model.scheme={scheme}"
    ):
        tiny(scheme, qk_norm="head")
    with pytest.raises(ConfigError, match="model.qk_norm='both' is invalid: expected one of none, head, all"):
        tiny("pre", qk_norm="both")


@pytest.mark.parametrize("span_scale", ["init", "multiplier", "norm", "none"])
def test_span_logits_match_equation_for_each_scaling(span_scale):
    cfg = tiny("span", span={"scale": span_scale, "c": 2.0})
    model = randomized(cfg, seed=1)
    idx = torch.randint(0, cfg.vocab_size, (2, 6))
    torch.testing.assert_close(model(idx)[0], reference.lm_logits(idx, model, cfg), **TOL)


def test_span_multiplier_is_applied():
    cfg = tiny("span", span={"scale": "multiplier", "c": 2.0}, n_layers=8)
    assert cfg.n_layers == 8
    model = build_model(cfg)
    assert all(b.s == pytest.approx(math.sqrt(2.0 / 8)) for b in model.blocks)
    assert all(isinstance(b.s, float) for b in model.blocks)  # a Python float, not a buffer
    assert not any("s" == n.split(".")[-1] for n, _ in model.named_buffers())


def _zero_ffn(block):
    with torch.no_grad():
        block.ffn.down.weight.zero_()


def test_span_skip_goes_from_block_input_to_final_sum():
    """With the FFN branch silenced, x' = N_2(x) whatever N_1 and the attention do: the skip
    carries the block input itself to the final sum and never passes through N_1."""
    cfg = tiny("span")
    model = randomized(cfg)
    block = model.blocks[0]
    _zero_ffn(block)
    x = torch.randn(2, 5, cfg.d_model, dtype=torch.float64) * 3
    rope = tuple(t.double() for t in rope_cache(5, cfg.d_model // cfg.n_heads, cfg.rope_theta))
    out = block(x, rope)
    torch.testing.assert_close(out, reference.norm(x, block.norm2, cfg.norm_eps), rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # a wild N_1 gain changes nothing on the skip path
        block.norm1.weight.mul_(100.0)
    torch.testing.assert_close(block(x, rope), out, rtol=1e-12, atol=1e-12)
    # PostNorm, by contrast, routes the residual through N_1: silencing its FFN does not give N_2(x).
    post = randomized(tiny("post")).blocks[0]
    _zero_ffn(post)
    assert not torch.allclose(post(x, rope), reference.norm(x, post.norm2, cfg.norm_eps))


def test_span_gradient_reaches_input_through_skip_only():
    """With attention and FFN silenced, dx'/dx is exactly the Jacobian of N_2 at x."""
    cfg = tiny("span")
    model = randomized(cfg)
    block = model.blocks[0]
    _zero_ffn(block)
    rope = tuple(t.double() for t in rope_cache(1, cfg.d_model // cfg.n_heads, cfg.rope_theta))
    x = torch.randn(1, 1, cfg.d_model, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda z: block(z, rope), x)
    want = torch.autograd.functional.jacobian(lambda z: reference.norm(z, block.norm2, cfg.norm_eps), x)
    torch.testing.assert_close(jac, want)


def _ffn_branch_rms(cfg, seed=0):
    """RMS of s·FFN(y) over all blocks, measured by forward hooks on a real forward pass."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    seen = []

    def branch(b, o):  # s·f as it enters N_2 (normalized first under span.scale=norm)
        return b.s * (torch.nn.functional.rms_norm(o, o.shape[-1:], eps=b.eps) if b.branch_norm else o)

    hooks = [
        b.ffn.register_forward_hook(lambda m, i, o, b=b: seen.append(branch(b, o).pow(2).mean().item()))
        for b in model.blocks
    ]
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (4, 64)))
    for h in hooks:
        h.remove()
    return math.sqrt(sum(seen) / len(seen))


@pytest.mark.parametrize("c", [1.0, 4.0])
@pytest.mark.parametrize("span_scale", ["init", "multiplier", "norm"])
@pytest.mark.parametrize("L", [4, 16, 64])
def test_span_branch_rms_is_sqrt_c_over_L_at_init(L, span_scale, c):
    cfg = ModelConfig(
        vocab_size=256, d_model=64, n_heads=4, n_layers=L, scheme="span", span={"scale": span_scale, "c": c}
    )
    rms = _ffn_branch_rms(cfg)
    assert rms == pytest.approx(math.sqrt(c / L), rel=0.1)


def test_span_norm_keeps_the_branch_at_sqrt_c_over_L_whatever_the_weights():
    """span.scale=norm: growing the FFN weights (what Adam does above the cliff) changes nothing:
    the block output is invariant to the scale of W_down, and the branch entering N_2 stays at
    RMS sqrt(c/L); under multiplier the same growth takes the branch with it."""
    outputs = {}
    for span_scale in ("norm", "multiplier"):
        cfg = ModelConfig(vocab_size=256, d_model=64, n_heads=4, n_layers=16, scheme="span", span={"scale": span_scale})
        torch.manual_seed(0)
        block = build_model(cfg).blocks[3]
        rope = rope_cache(8, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        x = torch.randn(2, 8, cfg.d_model)
        before = block(x, rope)
        with torch.no_grad():
            block.ffn.down.weight.mul_(10.0)
        outputs[span_scale] = (before, block(x, rope))
    torch.testing.assert_close(outputs["norm"][1], outputs["norm"][0], rtol=1e-5, atol=1e-5)
    assert (outputs["multiplier"][1] - outputs["multiplier"][0]).abs().max() > 0.1
    rms = _ffn_branch_rms(
        ModelConfig(vocab_size=256, d_model=64, n_heads=4, n_layers=16, scheme="span", span={"scale": "norm", "c": 2.0})
    )
    assert rms == pytest.approx(math.sqrt(2.0 / 16), rel=1e-3)


@pytest.mark.parametrize("L", [4, 64])
def test_span_without_scaling_has_unit_branch(L):
    cfg = ModelConfig(vocab_size=256, d_model=64, n_heads=4, n_layers=L, scheme="span", span={"scale": "none"})
    assert _ffn_branch_rms(cfg) == pytest.approx(1.0, rel=0.1)


@pytest.mark.parametrize("L", [2, 12])
def test_init_rules(L):
    """Measured weight stds follow each scheme's rule at two depths."""

    def stds(cfg):
        torch.manual_seed(0)
        model = build_model(cfg)
        b = model.blocks[0]
        d = cfg.d_model
        return {
            Role.ATTN_QK: b.attn.qkv.weight[: 2 * d].std().item(),
            Role.ATTN_V: b.attn.qkv.weight[2 * d :].std().item(),
            Role.ATTN_OUT: b.attn.out.weight.std().item(),
            Role.FFN_UP: b.ffn.up.weight.std().item(),
            Role.FFN_DOWN: b.ffn.down.weight.std().item(),
            Role.EMBED: model.embed.weight.std().item(),
        }

    d = 128
    pre = stds(ModelConfig(d_model=d, n_layers=L, scheme="pre", init_std=0.02))
    assert pre[Role.ATTN_OUT] == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.05)
    assert pre[Role.FFN_DOWN] == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.05)
    assert pre[Role.FFN_UP] == pytest.approx(0.02, rel=0.05)
    post = stds(ModelConfig(d_model=d, n_layers=L, scheme="post", init_std=0.02))
    assert all(v == pytest.approx(0.02, rel=0.05) for v in post.values())
    for span_scale, target in (("init", math.sqrt(1 / L)), ("norm", 1.0), ("multiplier", 1.0)):
        span = stds(ModelConfig(d_model=d, n_layers=L, scheme="span", span={"scale": span_scale}))
        assert span[Role.ATTN_QK] == pytest.approx(d**-0.5, rel=0.05)
        # attention out: RMS d·σ_v·σ_out = target (sqrt(1/L) or 1) for an identity mixing
        assert span[Role.ATTN_OUT] == pytest.approx(target / (d * d**-0.5), rel=0.05)
    shared = stds(ModelConfig(d_model=d, n_layers=L, scheme="span", init="shared", init_std=0.02))
    assert all(v == pytest.approx(0.02, rel=0.05) for v in shared.values())


def test_final_norm_and_head_options():
    cfg = tiny("span", final_norm=True, tie_embeddings=False)
    model = build_model(cfg)
    assert isinstance(model.final_norm, torch.nn.RMSNorm)
    assert model.head is not None and model.head.weight is not model.embed.weight
    assert isinstance(build_model(tiny("pre")).final_norm, torch.nn.RMSNorm)
    assert isinstance(build_model(tiny("post")).final_norm, torch.nn.Identity)
    assert isinstance(build_model(tiny("pre", final_norm=False)).final_norm, torch.nn.Identity)
    assert isinstance(build_model(tiny("pre", norm="layer")).final_norm, torch.nn.LayerNorm)
