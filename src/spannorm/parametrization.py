"""How a tuned learning rate and init carry across width and depth: ``model.parametrization``.

A model of shape (d, L) relates to its *base shape* (d_b, L_b) = (``model.base_width``, ``model.base_depth``),
where its hyperparameters were tuned. ``standard`` uses every rule at the model's own shape. ``mup`` (µP: Yang
et al., "Tensor Programs V", arXiv 2203.03466, its Adam table in the multiplier form of the ``mup`` package) and
``completep`` (µP, plus CompleteP's depth rule with α = 1: Dey et al. 2025, "Don't be lazy: CompleteP enables
compute-efficient deep transformers", arXiv 2505.01618) evaluate the scheme's recipe at the base shape and carry
it to (d, L) with the multipliers below; at the base shape all three are the same model and the same optimizer.
With m = d/d_b, m_L = L/L_b and r = fan_in_b/fan_in of a weight (1/m for every hidden weight but FFN down, whose
fan-in is the FFN width):

                             standard         mup                              completep
  the scheme's recipe        at (d, L)        at (d_b, L)                      at (d_b, L_b)
  hidden weights: std        the recipe's     the recipe's × sqrt(r)           as mup
                  Adam lr    lr               lr · r                           as mup (× m_L^(α−1) = 1)
                  decay      wd               wd / r (lr·wd kept)              as mup
                  Adam ε     ε                ε · r                            ε · r / m_L
  router: std, lr, decay     as hidden        std × r, lr · r, wd / r          as mup
  embedding, head, norms     lr               lr (std constant in d)           as mup
  attention logits           q·k / sqrt(hd)   q·k · sqrt(hd_b) / hd            as mup
  logits                     h·Wᵀ             h·Wᵀ / m                         as mup
  each branch's output F     F                F                                F / m_L

Hidden weights: q, k, v, attention out, FFN up and down (each expert's). The router, whose fan-out is the
number of experts, is an output weight of µP (init variance 1/fan_in²). The head keeps its init and lr: the
multiplier 1/m on the logits gives the untied head µP's 1/fan_in² variance and 1/fan_in Adam lr, and lets a
tied embedding (an input weight, constant lr) serve as the head (the ``mup`` package's ``MuSharedReadout``).
Decay is the decoupled decay of AdamW, lr·wd·W: wd / r keeps it per step what it was at the base width
(CompleteP's table); ε follows the gradients' size.

*The scheme's recipe at the base shape* means its init rule and every depth or width constant of its equation
(SpanNorm's s = sqrt(c/L), DeepNorm's α and β, Admin's ω, DeepScaleLM's β and sqrt(0.3/d), the 1/sqrt(2L) of
GPT-2's rule, B2T's L^(-1/2)): the recipe as it was tuned, which the parametrization then carries. So under
``completep`` CompleteP's branch multiplier, not the scheme's own depth scaling, carries the model beyond L_b;
LNS's 1/sqrt(l) depends on the block's index, not on L, and applies as well; Mix-LN's ⌊L/4⌋ PostNorm blocks
are its architecture and follow L. Refused in one line (``ModelConfig.check_parametrization``): nGPT, whose
unit-norm matrices and learned scales are a width rule of their own, mHC, whose hyper-connection matrices have no
rule here, and the DyT/Derf LLM recipe, whose sqrt(d) embedding scalar is a width rule of its own.
"""

from __future__ import annotations

import dataclasses
import math

from .layers import Role
from .model_config import ModelConfig, Parametrization

HIDDEN = (Role.ATTN_QK, Role.ATTN_V, Role.ATTN_OUT, Role.FFN_UP, Role.FFN_DOWN)


def width_mult(cfg: ModelConfig) -> float:
    """m = d/d_b (1 under standard)."""
    return cfg.d_model / cfg.recipe_width


def depth_mult(cfg: ModelConfig) -> float:
    """m_L = L/L_b (1 unless completep)."""
    return cfg.n_layers / cfg.recipe_depth


def recipe_config(cfg: ModelConfig) -> ModelConfig:
    """The config whose recipe the model uses: ``cfg`` under standard, else ``cfg`` at its base shape (an explicit
    FFN width scaled with it)."""
    if cfg.parametrization is Parametrization.STANDARD:
        return cfg
    d_b = cfg.recipe_width

    def scaled(width):
        return None if width is None else max(1, round(width * d_b / cfg.d_model))

    return dataclasses.replace(
        cfg,
        d_model=d_b,
        n_layers=cfg.recipe_depth,
        d_ff=scaled(cfg.d_ff),
        moe=dataclasses.replace(cfg.moe, expert_d_ff=scaled(cfg.moe.expert_d_ff)),
    )


def fan_in(cfg: ModelConfig, role: Role) -> int:
    """The fan-in of a weight of ``role``: the FFN width (one expert's) for FFN down, else d."""
    if role is Role.FFN_DOWN:
        return cfg.expert_dim if cfg.moe.enabled else cfg.ffn_dim
    return cfg.d_model


def fan_in_ratio(cfg: ModelConfig, role: Role) -> float:
    """r = fan_in_b/fan_in of a hidden weight or the router; 1 for the others and under standard."""
    if cfg.parametrization is Parametrization.STANDARD or role not in (*HIDDEN, Role.ROUTER):
        return 1.0
    return fan_in(recipe_config(cfg), role) / fan_in(cfg, role)


def init_multiplier(cfg: ModelConfig, role: Role) -> float:
    """The factor on the recipe's std of a ``role`` weight: sqrt(r) hidden, r the router, 1 otherwise."""
    r = fan_in_ratio(cfg, role)
    return r if role is Role.ROUTER else math.sqrt(r)


def attention_scale(cfg: ModelConfig) -> float | None:
    """The softmax scale of attention: None (SDPA's 1/sqrt(hd)) under standard, µP's sqrt(hd_b)/hd otherwise."""
    if cfg.recipe_width == cfg.d_model:
        return None
    return math.sqrt(cfg.recipe_width // cfg.n_heads) / (cfg.d_model // cfg.n_heads)


def output_multiplier(cfg: ModelConfig) -> float:
    """The factor on the logits: 1/m."""
    return 1.0 / width_mult(cfg)


def branch_multiplier(cfg: ModelConfig) -> float:
    """The factor on every branch's output: 1/m_L (CompleteP, α = 1), 1 otherwise."""
    return 1.0 / depth_mult(cfg)


def param_groups(model, weight_decay: float, eps: float = 1e-8) -> list[dict]:
    """AdamW's parameter groups for ``model``; each has ``lr_scale``, the factor on the schedule's lr.

    Standard: decay on every matrix, none on vectors (two groups). mup, completep: a group per (lr, decay, ε) of
    the table above; a matrix without a role would get no rule, and is refused."""
    cfg = model.cfg
    if cfg.parametrization is Parametrization.STANDARD:
        matrices = [p for p in model.parameters() if p.dim() >= 2]
        vectors = [p for p in model.parameters() if p.dim() < 2]
        return [
            {"params": matrices, "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": vectors, "weight_decay": 0.0, "lr_scale": 1.0},
        ]
    roles = {}
    for module in model.modules():
        role = getattr(module, "role", None)
        if role is not None:
            roles[id(module.weight)] = role[0] if isinstance(role, tuple) else role  # (fused: all hidden)
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if p.dim() < 2:
            key = (1.0, 0.0, eps)
        elif id(p) not in roles:
            raise ValueError(f"{name}: a matrix without a role has no {cfg.parametrization.value} rule")
        elif roles[id(p)] in (*HIDDEN, Role.ROUTER):
            r = fan_in_ratio(cfg, roles[id(p)])
            key = (r, weight_decay / r, eps * r / depth_mult(cfg))
        else:  # embedding, head
            key = (1.0, weight_decay, eps)
        groups.setdefault(key, []).append(p)
    return [{"params": params, "lr_scale": r, "weight_decay": wd, "eps": e} for (r, wd, e), params in groups.items()]
