"""The fused head + cross-entropy against torch's cross_entropy on materialized logits."""

import pytest
import torch
import torch.nn.functional as F

from spannorm.layers import linear_cross_entropy


def _grads(fn, x, w, t):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(x, w, t)
    (3.0 * loss).backward()  # a non-unit upstream gradient
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk", [None, 7, 64])
@pytest.mark.parametrize("scale", [1.0, 40.0])  # 40: peaked logits, most probabilities under the e^-60 floor
def test_matches_cross_entropy(dtype, chunk, scale):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(50, 16, generator=g, dtype=dtype), scale * torch.randn(33, 16, generator=g, dtype=dtype)
    t = torch.randint(0, 33, (50,), generator=g)
    want = _grads(lambda x, w, t: F.cross_entropy(x @ w.t(), t), x, w, t)
    got = _grads(lambda x, w, t: linear_cross_entropy(x, w, t, chunk), x, w, t)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype is torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


def test_bf16_autocast_is_close_to_the_autocast_reference():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(300, 32, generator=g), torch.randn(500, 32, generator=g) * 0.2
    t = torch.randint(0, 500, (300,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _grads(lambda x, w, t: F.cross_entropy(F.linear(x, w).float(), t), x, w, t)
        got = _grads(lambda x, w, t: linear_cross_entropy(x, w, t, 64), x, w, t)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


def test_no_grad_computes_only_the_loss():
    x, w, t = torch.randn(10, 4), torch.randn(6, 4), torch.randint(0, 6, (10,))
    with torch.no_grad():
        loss = linear_cross_entropy(x, w, t, 3)
    torch.testing.assert_close(loss, F.cross_entropy(x @ w.t(), t))
    assert not loss.requires_grad


def test_rmsnorm_matches_torch_forward_and_backward():
    from spannorm.layers import RMSNorm, _RMSNorm

    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    ours, ref = RMSNorm(16, eps=1e-6).double(), torch.nn.RMSNorm(16, eps=1e-6).double()
    with torch.no_grad():
        ours.weight.copy_(torch.randn(16, generator=g))
        ref.weight.copy_(ours.weight)
    up = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    grads = []
    for module in (ours, ref):
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(up)
        grads.append((y.detach(), xi.grad, module.weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x, w: _RMSNorm.apply(x, w, 1e-6),
        (x[0, :2].clone().requires_grad_(), ours.weight.detach().clone().requires_grad_()),
    )


def test_rmsnorm_keeps_low_precision_inputs_in_fp32():
    from spannorm.layers import RMSNorm

    y = RMSNorm(8, eps=1e-6)(torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True))
    assert y.dtype == torch.float32
    y.sum().backward()


def test_rope_is_the_rotate_half_rotation():
    """apply_rope (roll and signed sin) against Llama's written form x·cos + [−x₂, x₁]·sin."""
    from spannorm.layers import apply_rope, rope_cache

    T, hd, theta = 7, 8, 10000.0
    x = torch.randn(2, 3, T, hd, dtype=torch.float64)
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq  # (T, hd/2)
    cos, sin = angle.cos().repeat(1, 2), angle.sin().repeat(1, 2)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    want = x * cos + torch.cat([-x2, x1], dim=-1) * sin
    got = apply_rope(x, *(t.double() for t in rope_cache(T, hd, theta)))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # the tables are built in fp32


def test_silu_gate_matches_autograd():
    from spannorm.layers import _SiluGate

    g = torch.Generator().manual_seed(3)
    h = torch.randn(3, 4, 10, generator=g, dtype=torch.float64, requires_grad=True)
    a, b = h.chunk(2, dim=-1)
    torch.testing.assert_close(_SiluGate.apply(h), F.silu(a) * b, rtol=0, atol=0)
    assert torch.autograd.gradcheck(_SiluGate.apply, (h,))


@pytest.mark.parametrize("hd, T, fp32", [(16, 128, True), (64, 128, True), (16, 256, True), (64, 256, False)])
def test_cpu_bf16_attention_runs_in_fp32_for_small_heads_or_few_keys(hd, T, fp32):
    """Under CPU bf16 autocast, attention with heads under 64 or fewer than 256 keys is torch's fp32 kernel on the
    bf16 inputs (its bf16 kernel is slower there), forward and backward; larger shapes keep the bf16 kernel."""
    from spannorm.layers import attend

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, T, hd, generator=g).bfloat16() for _ in range(3))
    dy = torch.randn(2, 2, T, hd, generator=g).bfloat16()
    dtype = torch.float32 if fp32 else torch.bfloat16
    leaves = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*leaves, is_causal=True)
    want.backward(dy.to(dtype))
    got_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attend(*got_leaves, is_causal=True)
    got.backward(dy)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want.bfloat16(), rtol=0, atol=0)
    for a, b in zip(got_leaves, leaves):
        torch.testing.assert_close(a.grad, b.grad.bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["pre", "span"])
def test_a_model_compiles_to_one_graph(scheme):
    """torch.compile traces the whole training forward (and the backward it derives) without a graph break: a break
    at each block's SwiGLU gate kept inductor from fusing across it (docs/performance.md, torch.compile)."""
    import torch._dynamo

    from spannorm.model import build_model
    from spannorm.model_config import ModelConfig

    model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, scheme=scheme))
    x = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(x, x)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
