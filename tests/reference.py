"""Direct transcriptions of the equations, written independently of spannorm's modules.

Everything here takes raw weight tensors and uses only elementary tensor operations.
"""

import math

import torch


def rms_norm(x, g, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * g


def layer_norm(x, g, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * g + b


def norm(x, module, eps):
    """N(x) with the gain (and bias) taken from a norm module's parameters."""
    if getattr(module, "bias", None) is not None:
        return layer_norm(x, module.weight, module.bias, eps)
    return rms_norm(x, module.weight, eps)


def rope(x, theta):
    """Rotate pairs (i, i + hd/2) of x (..., T, hd) by angle pos · theta^(-2i/hd)."""
    T, hd = x.shape[-2], x.shape[-1]
    out = torch.empty_like(x)
    for pos in range(T):
        for i in range(hd // 2):
            ang = pos * theta ** (-2 * i / hd)
            c, s = math.cos(ang), math.sin(ang)
            a, b = x[..., pos, i], x[..., pos, i + hd // 2]
            out[..., pos, i] = a * c - b * s
            out[..., pos, i + hd // 2] = b * c + a * s
    return out


def attention(x, w_qkv, w_out, n_heads, theta):
    """Causal multi-head softmax attention with RoPE on queries and keys."""
    B, T, D = x.shape
    hd = D // n_heads
    wq, wk, wv = w_qkv[:D], w_qkv[D:2 * D], w_qkv[2 * D:]
    heads = []
    for h in range(n_heads):
        sl = slice(h * hd, (h + 1) * hd)
        q = rope(x @ wq[sl].T, theta)
        k = rope(x @ wk[sl].T, theta)
        v = x @ wv[sl].T
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v)
    return torch.cat(heads, dim=-1) @ w_out.T


def swiglu(x, w_up, w_down):
    d_ff = w_up.shape[0] // 2
    gate, up = x @ w_up[:d_ff].T, x @ w_up[d_ff:].T
    return (gate * torch.sigmoid(gate) * up) @ w_down.T


def sublayers(block, cfg):
    """Attn and FFN of a block as functions of their input, from its raw weights."""
    def A(x):
        return attention(x, block.attn.qkv.weight, block.attn.out.weight, cfg.n_heads, cfg.rope_theta)

    def F(x):
        return swiglu(x, block.ffn.up.weight, block.ffn.down.weight)

    def N1(x):
        return norm(x, block.norm1, cfg.norm_eps)

    def N2(x):
        return norm(x, block.norm2, cfg.norm_eps)

    return A, F, N1, N2


def pre_block(x, block, cfg):
    A, F, N1, N2 = sublayers(block, cfg)
    h = x + A(N1(x))
    return h + F(N2(h))


def post_block(x, block, cfg):
    A, F, N1, N2 = sublayers(block, cfg)
    h = N1(x + A(x))
    return N2(h + F(h))


def span_block(x, block, cfg):
    A, F, N1, N2 = sublayers(block, cfg)
    s = math.sqrt(cfg.span_c / cfg.n_layers) if cfg.span_scale.value == "multiplier" else 1.0
    y = N1(x + A(x))
    return N2(x + s * F(y))


BLOCKS = {"pre": pre_block, "post": post_block, "span": span_block}


def lm_logits(idx, model, cfg):
    """embed → (N_0 for span) → blocks → (final N for pre) → tied head."""
    x = model.embed.weight[idx]
    if cfg.scheme.value == "span":
        x = norm(x, model.embed_norm, cfg.norm_eps)
    for block in model.blocks:
        x = BLOCKS[cfg.scheme.value](x, block, cfg)
    if cfg.scheme.value == "pre":
        x = norm(x, model.final_norm, cfg.norm_eps)
    return x @ model.embed.weight.T
