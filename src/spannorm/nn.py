"""Sublayers shared by every scheme: norms, rotary embedding, causal attention, SwiGLU FFN.

Each weight matrix carries a ``role`` (see :class:`Role`) so that one init function can apply
any scheme's init rule (``schemes.py``) without knowing the module tree.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import nn


class NormType(str, enum.Enum):
    """Which normalization N is; each has a learnable gain."""

    RMS = "rms"  # RMSNorm: x / rms(x) · γ
    LAYER = "layer"  # LayerNorm: (x − mean) / std · γ + β
    DYT = "dyt"  # Dynamic Tanh: γ · tanh(α·x) + β, α learnable from α₀ (not a normalization)


class Role(str, enum.Enum):
    """What a weight does; init rules map roles to standard deviations."""

    EMBED = "embed"  # token embedding
    ATTN_QK = "attn.qk"  # query and key rows of the fused QKV projection
    ATTN_V = "attn.v"  # value rows of the fused QKV projection
    ATTN_OUT = "attn.out"  # attention output projection
    FFN_UP = "ffn.up"  # fused gate and up projection of the SwiGLU FFN
    FFN_DOWN = "ffn.down"  # FFN down projection
    HEAD = "head"  # untied LM head
    ROUTER = "router"  # MoE router W_r (init rules give it the FFN up-projection's std)


class DyT(nn.Module):
    """DyT(x) = γ · tanh(α·x) + β, α a learnable scalar initialized to α₀ (Zhu et al. 2025,
    "Transformers without Normalization")."""

    def __init__(self, dim: int, alpha0: float):
        super().__init__()
        self.alpha0 = alpha0  # a plain float, re-applied by reset_parameters
        self.alpha = nn.Parameter(torch.empty(1))
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.alpha0)
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.tanh(self.alpha * x) + self.bias


NORMS = (nn.RMSNorm, nn.LayerNorm, DyT)  # the modules make_norm builds


def make_norm(cfg, dim: int | None = None) -> nn.Module:
    """N(x) of type ``cfg.norm`` over the last dimension (``dim``, default ``cfg.d_model``)."""
    dim = cfg.d_model if dim is None else dim
    if cfg.norm is NormType.RMS:
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    if cfg.norm is NormType.LAYER:
        return nn.LayerNorm(dim, eps=cfg.norm_eps)
    return DyT(dim, cfg.dyt_alpha0)


def rope_cache(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim), rotate-half (Llama) layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, hd) queries or keys: x·cos + rotate_half(x)·sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


class Attention(nn.Module):
    """Multi-head causal self-attention with RoPE, fused QKV and SDPA; no biases.

    ``qkv_norm``: a norm module factory; if given, each head's q, k and v are normalized
    (HybridNorm) before RoPE.
    """

    def __init__(self, d_model: int, n_heads: int, qkv_norm=None):
        super().__init__()
        self.n_heads = n_heads
        if qkv_norm is not None:
            self.q_norm, self.k_norm, self.v_norm = (qkv_norm(d_model // n_heads) for _ in range(3))
        self.qkv_norm = qkv_norm is not None
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.qkv.role = (Role.ATTN_QK, Role.ATTN_QK, Role.ATTN_V)  # row blocks q, k, v
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.out.role = Role.ATTN_OUT

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        if self.qkv_norm:
            q, k, v = self.q_norm(q), self.k_norm(k), self.v_norm(v)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    """FFN(x) = W_down (silu(W_gate x) ⊙ W_up x), with W_gate and W_up fused in one matmul."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.up.role = Role.FFN_UP
        self.down = nn.Linear(d_ff, d_model, bias=False)
        self.down.role = Role.FFN_DOWN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)
