"""Normalization schemes: where the norms sit relative to the residual connections.

A scheme is one short block class whose ``forward`` reads like its equation, plus
  * entry/exit flags: ``embed_norm`` (N_0 on the embedding) and ``final_norm`` (N before the head);
  * an init rule as data: ``init_stds(cfg)`` maps each weight :class:`~spannorm.nn.Role` to a std.
Registering a scheme is one :class:`Scheme` value and one entry in ``SCHEMES``.

Notation: block l of L, input x, output x'; N is the norm (rms or layer), Attn and FFN the
sublayers of ``nn.py``.
"""

from __future__ import annotations

import enum
import math
from functools import lru_cache
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import nn

from .nn import Attention, Role, SwiGLU, make_norm

if TYPE_CHECKING:
    from .model import ModelConfig


class Scheme(str, enum.Enum):
    """Normalization placement."""

    PRE = "pre"
    POST = "post"
    SPAN = "span"


class SpanScale(str, enum.Enum):
    """How SpanNorm keeps the branch variance at c/L (see SPANNORM.md, "The scaling strategy")."""

    INIT = "init"  # output projections initialized so that branch RMS ≈ sqrt(c/L)
    MULTIPLIER = "multiplier"  # fixed multiplier sqrt(c/L) on the FFN branch, unit-RMS init
    NONE = "none"  # no depth scaling: unit-RMS branch


class InitMode(str, enum.Enum):
    """Which init rule the model uses."""

    RECOMMENDED = "recommended"  # each scheme's own rule (the default)
    SHARED = "shared"  # one common rule for every scheme: every weight N(0, init_std)


# --- init calibration -------------------------------------------------------------------

@lru_cache(maxsize=None)
def silu_second_moment(var: float) -> float:
    """E[silu(g)^2] for g ~ N(0, var), by 64-point Gauss-Hermite quadrature."""
    x, w = np.polynomial.hermite_e.hermegauss(64)
    g = math.sqrt(var) * x
    silu = g / (1.0 + np.exp(-g))
    return float(np.sum(w * silu**2) / math.sqrt(2.0 * math.pi))


def ffn_down_std(cfg: ModelConfig, up_std: float, target_rms: float) -> float:
    """Std of W_down that gives FFN(y) RMS ``target_rms`` for a unit-RMS input y.

    Pre-activations g, u ~ N(0, v) with v = d·up_std²; E[h²] = E[silu(g)²]·v for h = silu(g)·u;
    Var(FFN) = d_ff · std² · E[h²].
    """
    v = cfg.d_model * up_std**2
    return target_rms / math.sqrt(cfg.ffn_dim * silu_second_moment(v) * v)


def attn_out_std(cfg: ModelConfig, v_std: float, target_rms: float) -> float:
    """Std of W_out that gives Attn(x) RMS ``target_rms`` for a unit-RMS x if attention were the
    identity (causal averaging at init only lowers it): RMS = d · v_std · std."""
    return target_rms / (cfg.d_model * v_std)


def span_factor(cfg: ModelConfig) -> float:
    """SpanNorm's depth scale sqrt(c/L)."""
    return math.sqrt(cfg.span_c / cfg.n_layers)


def shared_init(cfg: ModelConfig) -> dict[Role, float]:
    """The common rule of ``init = shared``: every weight N(0, init_std)."""
    return {role: cfg.init_std for role in Role}


# --- blocks ----------------------------------------------------------------------------

class Block(nn.Module):
    """The parts every single-stream scheme shares: attn, ffn, norm1, norm2."""

    embed_norm: ClassVar[bool] = False  # apply N_0 to the token embedding
    final_norm: ClassVar[bool] = False  # apply N before the LM head (ModelConfig.final_norm overrides)

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer  # 0-based index of this block
        self.attn = Attention(cfg.d_model, cfg.n_heads)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_dim)
        self.norm1 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.norm2 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)

    @classmethod
    def init_stds(cls, cfg: ModelConfig) -> dict[Role, float]:
        """The scheme's recommended init rule: role -> std."""
        return shared_init(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class PreNorm(Block):
    """PreNorm (Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture"; GPT-2).

        h  = x + Attn(N_1(x))
        x' = h + FFN(N_2(h))            final N before the head

        x ──┬──────────────────(+)──┬─────────────────(+)──► x'
            └─ N_1 ─ Attn ──────┘   └─ N_2 ─ FFN ──────┘

    Init (GPT-2): every weight N(0, init_std); attention out and FFN down × 1/sqrt(2L).
    """

    final_norm = True

    @classmethod
    def init_stds(cls, cfg: ModelConfig) -> dict[Role, float]:
        stds = shared_init(cfg)
        scaled = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        return stds | {Role.ATTN_OUT: scaled, Role.FFN_DOWN: scaled}

    def forward(self, x, rope):
        h = x + self.attn(self.norm1(x), rope)
        return h + self.ffn(self.norm2(h))


class PostNorm(Block):
    """PostNorm (Vaswani et al. 2017, "Attention Is All You Need").

        h  = N_1(x + Attn(x))
        x' = N_2(h + FFN(h))

        x ──┬──────────(+)─ N_1 ──┬─────────(+)─ N_2 ──► x'
            └─ Attn ────┘         └─ FFN ────┘

    Init: every weight N(0, init_std), no depth scaling; needs learning-rate warmup.
    """

    def forward(self, x, rope):
        h = self.norm1(x + self.attn(x, rope))
        return self.norm2(h + self.ffn(h))


class SpanNorm(Block):
    """SpanNorm (Wang, Li et al. 2026, arXiv 2601.22580, ICML 2026).

        a  = Attn(x)
        y  = N_1(x + a)                 PostNorm-style attention sub-block
        f  = FFN(y)
        x' = N_2(x + s·f)               the skip spans the block: from x, never through N_1

        x ──┬────────────────────────────────────(+)─ N_2 ──► x'
            ├─ Attn ─(+)─ N_1 ─ FFN ─ ×s ────────┘
            └────────┘
    Entry: x_0 = N_0(embed(tokens)); no final norm by default (x_L is already normalized).

    Scaling (``span_scale``, ``span_c`` = c), keeping Var(s·f) ≈ c/L at init:
      init:       out-projections of Attn and FFN initialized so that their output RMS ≈ sqrt(c/L), s = 1;
      multiplier: out-projections initialized for output RMS ≈ 1, s = sqrt(c/L);
      none:       out-projections initialized for output RMS ≈ 1, s = 1.
    Input projections (q, k, v, FFN up) use the fan-in std 1/sqrt(d); the embedding init_std.
    """

    embed_norm = True

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer)
        # s: a plain Python float, never a buffer
        self.s = span_factor(cfg) if cfg.span_scale is SpanScale.MULTIPLIER else 1.0

    @classmethod
    def init_stds(cls, cfg: ModelConfig) -> dict[Role, float]:
        fan_in = 1.0 / math.sqrt(cfg.d_model)
        target = span_factor(cfg) if cfg.span_scale is SpanScale.INIT else 1.0
        return shared_init(cfg) | {
            Role.ATTN_QK: fan_in,
            Role.ATTN_V: fan_in,
            Role.FFN_UP: fan_in,
            Role.ATTN_OUT: attn_out_std(cfg, fan_in, target),
            Role.FFN_DOWN: ffn_down_std(cfg, fan_in, target),
        }

    def forward(self, x, rope):
        y = self.norm1(x + self.attn(x, rope))
        return self.norm2(x + self.s * self.ffn(y))


SCHEMES: dict[Scheme, type[Block]] = {
    Scheme.PRE: PreNorm,
    Scheme.POST: PostNorm,
    Scheme.SPAN: SpanNorm,
}
