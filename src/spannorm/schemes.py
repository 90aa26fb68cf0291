"""Normalization schemes: where the norms sit relative to the residual connections.

A scheme is one short block class whose ``forward`` reads like its equation, plus
  * entry/exit: ``embed_norm`` (N_0 on the embedding), ``final_norm`` (N before the head),
    ``tie_embeddings`` (the head shares the embedding), ``head_scale`` (a fixed factor on the final
    state before the head) and, for two-stream schemes, ``enter`` (embedding -> state) and ``Exit``
    (state -> one tensor);
  * an init rule as data: ``init_stds(cfg, layer)`` maps each weight :class:`~spannorm.layers.Role`
    to a std; σ in a rule is its base std, ``base_std`` (a :class:`BaseStd`: a rule of the width, the
    authors' constant and width named) unless ``model.init_std`` sets it; ``measured`` (a :class:`Measured`),
    where the authors' rule carried to our width handicaps the scheme, a factor on every std of the rule,
    measured at two widths and named; ``model.init_scale`` multiplies every std (:func:`weight_stds`);
    ``reset_parameters`` initializes scheme-owned parameters (e.g. Admin's ω);
  * ``theory``: its closed-form signal propagation at init, where it has one (``spannorm probe``);
  * ``equation``, ``init_rule`` and ``reference`` strings for ``spannorm schemes``.
Registering a scheme is one :class:`~spannorm.model_config.Scheme` value and one entry in ``SCHEMES``.
Depth constants are plain Python floats computed from the actual depth, never buffers.

Notation: block l of L (0-based in code), input x, output x'; N is the norm (rms, layer or dyt),
Attn and FFN the sublayers of ``layers.py`` (FFN may be any FFN module).

``attn_input`` names the norm whose output the attention reads (PreNorm's N_1), None where the
attention reads the stream itself (the PostNorm family: post, span, deepnorm, b2t, admin, hybrid,
residual, Mix-LN's PostNorm blocks and HybridNorm*'s blocks 1..). Only the DyT LLM recipe (``model.dyt.recipe=llm``)
uses it: that norm gets α₀ = alpha0_attn, every other norm (FFN input, sublayer-output, stream, embedding,
final and per-head q/k/v norms) alpha0_other; a scheme without one has α₀_other everywhere.
"""

from __future__ import annotations

import enum
import math
from functools import cache
from typing import ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .layers import Attention, Role, ScaleVector, Site, SwiGLU, make_norm
from .model_config import InitMode, ModelConfig, QKNorm, Scheme, SpanScale
from .moe import MoE
from .parametrization import attention_scale, branch_multiplier, init_multiplier, recipe_config

# --- init calibration -------------------------------------------------------------------


@cache
def silu_second_moment(var: float) -> float:
    """E[silu(g)^2] for g ~ N(0, var), by 64-point Gauss-Hermite quadrature."""
    x, w = np.polynomial.hermite_e.hermegauss(64)
    g = math.sqrt(var) * x
    silu = g / (1.0 + np.exp(-g))
    return float(np.sum(w * silu**2) / math.sqrt(2.0 * math.pi))


@cache
def routed_weight_square(n_experts: int, top_k: int, var: float, samples: int = 1 << 16) -> float:
    """E[Σ_i w_i²] over the k renormalized top-k weights, for router logits i.i.d. N(0, var);
    Monte Carlo with a fixed seed (1/k if the router were uniform, 1 for k = 1)."""
    logits = np.random.default_rng(0).standard_normal((samples, n_experts)) * math.sqrt(var)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    w = -np.sort(-p, axis=-1)[:, :top_k]
    w /= w.sum(-1, keepdims=True)
    return float((w**2).sum(-1).mean())


def ffn_width(cfg: ModelConfig) -> int:
    """Hidden width of one FFN: the dense SwiGLU's, or one expert's in an MoE model."""
    return cfg.expert_dim if cfg.moe.enabled else cfg.ffn_dim


def ffn_down_std(cfg: ModelConfig, up_std: float, target_rms: float) -> float:
    """Std of W_down that gives FFN(y) RMS ``target_rms`` for a unit-RMS input y.

    Pre-activations g, u ~ N(0, v) with v = d·up_std²; E[h²] = E[silu(g)²]·v for h = silu(g)·u;
    Var(FFN) = d_ff · std² · E[h²].
    MoE (d_ff of one expert): the k routed experts are independent at init, so
    Var(MoE) = (E[Σ w_i²] + n_shared) · Var(Expert), with E[Σ w_i²] for router logits of variance
    v (the router has the up-projection's std); 1/k for a uniform router, up to 1 for a peaked one.
    """
    v = cfg.d_model * up_std**2
    std = target_rms / math.sqrt(ffn_width(cfg) * silu_second_moment(v) * v)
    if cfg.moe.enabled:
        std /= math.sqrt(routed_weight_square(cfg.moe.n_experts, cfg.moe.top_k, v) + cfg.moe.n_shared_experts)
    return std


def xavier_std(fan_in: int, fan_out: int, gain: float = 1.0) -> float:
    """Std of xavier_normal_: gain · sqrt(2 / (fan_in + fan_out))."""
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def attn_out_std(cfg: ModelConfig, v_std: float, target_rms: float) -> float:
    """Std of W_out that gives Attn(x) RMS ``target_rms`` for a unit-RMS x if attention were the
    identity (causal averaging at init only lowers it): RMS = d · v_std · std."""
    return target_rms / (cfg.d_model * v_std)


def span_factor(cfg: ModelConfig) -> float:
    """SpanNorm's depth scale sqrt(c/L) (L: the recipe's depth, ``ModelConfig.recipe_depth``)."""
    return math.sqrt(cfg.span.c / cfg.recipe_depth)


class WidthRule(str, enum.Enum):
    """How a base std follows the width d when ``model.init_std`` is null (:class:`BaseStd`)."""

    FAN_IN = "fan-in"  # 1/sqrt(d)
    CARRIED = "carried"  # the authors' constant at their width, carried at the same multiple of 1/sqrt(d)


class BaseStd(NamedTuple):
    """A scheme's base std as a rule of the width: its authors' constant ``std``, tuned at width ``width``
    (``source`` says whose), and the ``rule`` that carries it to width d: ``fan-in``, 1/sqrt(d), or
    ``carried``, std·sqrt(width/d) (GPT-2's 0.02 at 768 is 0.554/sqrt(d): 0.069 at d = 64). A constant tuned
    at one width is not a recipe at another: at d = 64, 0.02 is 6× below the fan-in scale. Which rule a
    scheme uses was chosen by measurement (docs/fair-study/recipes/)."""

    std: float
    width: int
    source: str
    rule: WidthRule = WidthRule.FAN_IN

    def __call__(self, d_model: int) -> float:
        if self.rule is WidthRule.CARRIED:
            return self.std * math.sqrt(self.width / d_model)
        return d_model**-0.5

    def describe(self) -> str:
        """The rule in words, for `spannorm schemes`."""
        rule = "1/sqrt(d)" if self.rule is WidthRule.FAN_IN else f"{self.std:g}·sqrt({self.width}/d)"
        return (
            f"base std {rule} ({self.rule.value}; authors' constant: {self.std:g} at width {self.width}, {self.source})"
        )


class Measured(NamedTuple):
    """A factor on every std of a scheme's recommended rule, chosen by measurement where the authors' rule carried
    to our width left the scheme away from its own best init scale (``source`` says where it was measured). It
    is part of the width rule: ``model.init_std`` (a number for σ) replaces both."""

    factor: float
    source: str

    def describe(self) -> str:
        return f"× {self.factor:g} on every std, measured ({self.source})"


GPT2_STD = BaseStd(0.02, 768, "GPT-2's initializer_range at GPT-2 small's width")
# fairseq draws token embeddings N(0, d^(-1/2)): already a fan-in rule (512: its transformer_lm width)
FAIRSEQ_STD = BaseStd(512**-0.5, 512, "fairseq's embedding N(0, d^(-1/2)), already a fan-in rule")


def base_std(cfg: ModelConfig) -> float:
    """The base std of ``cfg``'s init rule: ``init_std`` if set, else the scheme's width rule (``init=shared``:
    the shared rule, :data:`SHARED_STD`)."""
    if cfg.init_std is not None:
        return cfg.init_std
    rule = SHARED_STD if cfg.init is InitMode.SHARED else SCHEMES[cfg.scheme].base_std
    return rule(cfg.d_model)


def shared_init(cfg: ModelConfig) -> dict[Role, float]:
    """The common rule of ``init = shared``, and the start of most recommended rules: every weight N(0, base std)."""
    std = base_std(cfg)
    return {role: std for role in Role}


def gpt2_init(cfg: ModelConfig) -> dict[Role, float]:
    """GPT-2: N(0, base std), attention out and FFN down × 1/sqrt(2L)."""
    scaled = base_std(cfg) / math.sqrt(2 * cfg.n_layers)
    return shared_init(cfg) | {Role.ATTN_OUT: scaled, Role.FFN_DOWN: scaled}


def weight_stds(cfg: ModelConfig, layer: int) -> dict[Role, float]:
    """Role -> std for block ``layer`` (layer 0's rule also covers embedding and head): the recommended rule (×
    its ``measured`` factor while ``init_std`` is null) or the shared rule, every std × ``init_scale``; under mup
    and completep the rule at the base shape, × the parametrization's factor per role."""
    recipe = recipe_config(cfg)
    if cfg.init is InitMode.SHARED:
        rule, factor = shared_init(recipe), 1.0
    else:
        scheme = SCHEMES[cfg.scheme]
        rule = scheme.init_stds(recipe, layer)
        factor = scheme.measured.factor if scheme.measured and cfg.init_std is None else 1.0
    return {role: std * factor * cfg.init_scale * init_multiplier(cfg, role) for role, std in rule.items()}


def unit_variance_init(cfg: ModelConfig, target_rms: float) -> dict[Role, float]:
    """Input projections (and the MoE router) at fan-in std 1/sqrt(d); out/down calibrated to output
    RMS ``target_rms``."""
    fan_in = 1.0 / math.sqrt(cfg.d_model)
    return shared_init(cfg) | {
        Role.ATTN_QK: fan_in,
        Role.ATTN_V: fan_in,
        Role.FFN_UP: fan_in,
        Role.ROUTER: fan_in,
        Role.ATTN_OUT: attn_out_std(cfg, fan_in, target_rms),
        Role.FFN_DOWN: ffn_down_std(cfg, fan_in, target_rms),
    }


# --- blocks ----------------------------------------------------------------------------


class Streams(NamedTuple):
    """The state of a two-stream scheme (ResiDual, SiameseNorm)."""

    post: torch.Tensor  # the PostNorm-like stream
    pre: torch.Tensor  # the PreNorm-like stream


class Theory(NamedTuple):
    """A scheme's closed-form signal propagation at init (:meth:`Block.theory`)."""

    stream_rms: list[float]  # per block, the RMS of its output
    skip_gain: float  # the skip-path gain from the first block's input to the last block's output


def post_skip_gain(alpha: float, ins: list[float], attn_rms: list[float], ffn_rms: list[float]) -> float:
    """The skip-path gain of blocks h = N(α·x + Attn(x)), x' = N(α·h + FFN(h)) with unit-gain norms: each
    sum passes α/rms(α·x + F); the attention sum's input x has RMS ``ins[l]``, the FFN sum's input h RMS 1."""
    gain = 1.0
    for a, f, x in zip(attn_rms, ffn_rms, ins):
        gain *= alpha / math.sqrt((alpha * x) ** 2 + a * a) * alpha / math.sqrt(alpha**2 + f * f)
    return gain


class Block(nn.Module):
    """What every scheme shares: ``attn``, ``ffn`` and the norms named in ``norms``."""

    equation: ClassVar[str] = ""  # the block equation, for `spannorm schemes`
    init_rule: ClassVar[str] = ""  # the recommended init, in words
    base_std: ClassVar[BaseStd] = GPT2_STD  # the base std's width rule (model.init_std: null)
    measured: ClassVar[Measured | None] = None  # a measured factor on the whole rule (model.init_std: null)
    reference: ClassVar[str] = ""  # the paper
    norms: ClassVar[tuple[str, ...]] = ("norm1", "norm2")  # norm modules this block owns
    attn_input: ClassVar[str | None] = None  # the norm of ``norms`` the attention reads (module docstring)
    qkv_norm: ClassVar[bool] = False  # per-head norms on q, k, v inside attention
    embed_norm: ClassVar[bool] = False  # apply N_0 to the token embedding
    final_norm: ClassVar[bool] = False  # apply N before the LM head (ModelConfig.final_norm overrides)
    qk_norm: ClassVar[QKNorm] = QKNorm.NONE  # norms on q and k in the recipe (ModelConfig.qk_norm overrides)
    tie_embeddings: ClassVar[bool] = True  # head shares the embedding (ModelConfig.tie_embeddings overrides)
    Exit: ClassVar[type[nn.Module] | None] = None  # merges a two-stream state before the head
    # role -> the axis (the d_model one) along which each weight of that role is kept at unit L2 norm, after init and
    # after every optimizer step (LM.normalize_weights); None: no weight is (nGPT's only)
    unit_axes: ClassVar[dict[Role, int] | None] = None

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer  # 0-based index of this block

        def norm(dim):
            return make_norm(cfg, dim)

        self.attn = Attention(
            cfg.d_model,
            cfg.n_heads,
            norm if self.qkv_norm else None,
            use_qk_norm(cfg).value,
            norm,
            attention_scale(cfg),
        )
        self.ffn = (
            MoE(
                cfg.d_model,
                cfg.expert_dim,
                cfg.moe.n_experts,
                cfg.moe.top_k,
                cfg.moe.n_shared_experts,
                cfg.moe.capacity_factor,
            )
            if cfg.moe.enabled
            else SwiGLU(cfg.d_model, cfg.ffn_dim)
        )
        self.attn.multiplier = self.ffn.multiplier = branch_multiplier(cfg)  # (completep's 1/m_L; else 1)
        attn_input = self.attn_input_norm(cfg, layer)
        for name in self.norms:
            setattr(self, name, make_norm(cfg, site=Site.ATTN if name == attn_input else Site.OTHER))

    @classmethod
    def attn_input_norm(cls, cfg: ModelConfig, layer: int) -> str | None:
        """The attention-input norm of block ``layer`` (``attn_input``; Mix-LN's depends on the layer)."""
        return cls.attn_input

    @classmethod
    def init_stds(cls, cfg: ModelConfig, layer: int) -> dict[Role, float]:
        """The scheme's recommended init rule for block ``layer``: role -> std."""
        return shared_init(cfg)

    @staticmethod
    def head_scale(cfg: ModelConfig) -> float:
        """Fixed factor on the final state before the LM head (part of the equation, 1 for most schemes)."""
        return 1.0

    @staticmethod
    def logit_scale(cfg: ModelConfig) -> ScaleVector | None:
        """A learned factor on each token's logit (nGPT's s_z), or None (most schemes)."""
        return None

    def reset_parameters(self) -> None:
        """Initialize parameters the scheme itself owns (none by default)."""

    @staticmethod
    def enter(x: torch.Tensor):
        """The state the first block receives."""
        return x

    @classmethod
    def theory(
        cls,
        blocks: list[Block],
        stream_rms0: float,
        attn_rms: list[float],
        ffn_rms: list[float],
        stream_rms: list[float],
    ) -> Theory | None:
        """The closed-form prediction at init (unit norm gains) from the measured RMS of the first block's
        input, of each block's branch outputs and of each block's output; None where the scheme has none.

        Branches are taken as uncorrelated with the stream, so a sum z = α·x + F has
        rms(z)² = α²·rms(x)² + rms(F)², and a norm N(z) passes a tangent perturbation with gain 1/rms(z),
        so an α-weighted skip passes α/rms(z); with rms(x) = 1 that is (1 + σ²/α²)^(-1/2),
        σ² = Var(F)/Var(x) (SPANNORM.md).
        """
        return None

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor]):
        raise NotImplementedError


class PreNorm(Block):
    """PreNorm (Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture"; GPT-2).

    h  = x + Attn(N_1(x))
    x' = h + FFN(N_2(h))            final N before the head

    x ──┬──────────────────(+)──┬─────────────────(+)──► x'
        └─ N_1 ─ Attn ──────┘   └─ N_2 ─ FFN ──────┘
    """

    equation = "h = x + Attn(N(x)); x' = h + FFN(N(h)); final N before the head"
    init_rule = "GPT-2: N(0, σ); attention out and FFN down × 1/sqrt(2L); tied head"
    reference = "Xiong et al. 2020, arXiv 2002.04745; Radford et al. 2019 (GPT-2)"
    attn_input = "norm1"
    final_norm = True

    @classmethod
    def init_stds(cls, cfg, layer):
        return gpt2_init(cfg)

    @classmethod
    def theory(cls, blocks, stream_rms0, attn_rms, ffn_rms, stream_rms):
        """Var(x_{l+1}) = Var(x_l) + Var(a_l) + Var(f_l); skip gain 1."""
        var, pred = stream_rms0**2, []
        for a, f in zip(attn_rms, ffn_rms):
            var += a * a + f * f
            pred.append(math.sqrt(var))
        return Theory(pred, 1.0)

    def forward(self, x, rope):
        h = x + self.attn(self.norm1(x), rope)
        return h + self.ffn(self.norm2(h))


class PostNorm(Block):
    """PostNorm (Vaswani et al. 2017, "Attention Is All You Need").

    h  = N_1(x + Attn(x))
    x' = N_2(h + FFN(h))

    x ──┬──────────(+)─ N_1 ──┬─────────(+)─ N_2 ──► x'
        └─ Attn ────┘         └─ FFN ────┘
    """

    equation = "h = N(x + Attn(x)); x' = N(h + FFN(h))"
    init_rule = (
        "N(0, σ), no depth scaling; needs learning-rate warmup; untied head "
        "(fairseq LM default; tying it stalls in the unigram phase)"
    )
    reference = "Vaswani et al. 2017, arXiv 1706.03762"
    base_std = BaseStd(
        0.02,
        768,
        "BERT's initializer_range at BERT-base's width, a PostNorm LM; Vaswani et al. drew xavier",
        WidthRule.CARRIED,  # fan-in stalled at d = 64 (docs/fair-study/recipes/)
    )
    # no depth rule and no measured factor: its best init_scale was 0.5 at L = 48 (d = 64 and 128), but × 0.5 cost
    # 0.18 nats at d = 128, L = 12 (docs/fair-study/measured), and two depth rules written before their data,
    # × sqrt(12/L) and × sqrt(12/max(L, 12)), failed at L = 6 and L = 96 (fair-depth.yaml): a handicap at L = 48
    tie_embeddings = False

    @classmethod
    def theory(cls, blocks, stream_rms0, attn_rms, ffn_rms, stream_rms):
        """Stream RMS 1; skip gain ∏ over the 2L sums of 1/rms(z) (:func:`post_skip_gain`, α = 1)."""
        ins = [stream_rms0] + stream_rms[:-1]
        return Theory([1.0] * len(stream_rms), post_skip_gain(1.0, ins, attn_rms, ffn_rms))

    def forward(self, x, rope):
        h = self.norm1(x + self.attn(x, rope))
        return self.norm2(h + self.ffn(h))


class SpanNorm(Block):
    """SpanNorm (Wang, Li et al. 2026, arXiv 2601.22580, ICML 2026).

        a  = Attn(x)
        y  = N_1(x + a)                 PostNorm-style attention sub-block
        f  = FFN(y) / rms(FFN(y))       (span.scale=norm, the default; f = FFN(y) otherwise)
        x' = N_2(x + s·f)               the skip spans the block: from x, never through N_1

        x ──┬──────────────────────────────────────────(+)─ N_2 ──► x'
            ├─ Attn ─(+)─ N_1 ─ FFN ─ /rms ─ ×s ───────┘
            └────────┘
    Entry: x_0 = N_0(embed(tokens)); no final norm by default (x_L is already normalized).

    Scaling (``model.span.scale``, ``model.span.c`` = c), keeping Var(s·f) ≈ c/L at init:
      init:       out-projections of Attn and FFN initialized so that their output RMS ≈ sqrt(c/L), s = 1;
      multiplier: out-projections initialized for output RMS ≈ 1, s = sqrt(c/L);
      norm:       (the default) as multiplier, and the FFN branch is RMS-normalized without a gain before s:
                  x' = N_2(x + s·f/rms(f)), so Var(s·f) = c/L at every step of training, not only at init;
      none:       out-projections initialized for output RMS ≈ 1, s = 1.
    Input projections (q, k, v, FFN up) use the fan-in std 1/sqrt(d); the embedding N(0, σ).
    Why ``norm`` is the default (docs/spannorm-lr.md): with Adam, a branch's output weights grow at the
    learning rate whatever their init; above a learning-rate cliff the FFN branch outgrows the skip, the
    skip-path gain ∏(1 + σ_l²)^(-1/2) collapses and the model stalls at the unigram loss.
    Under ``completep`` s = sqrt(c/L_b) (base_depth) and CompleteP's branch multiplier L_b/L carries the model beyond
    it (CompleteP wins, not s's own 1/sqrt(L)); under ``mup`` s keeps the real L (only the width is carried).
    """

    equation = (
        "y = N(x + Attn(x)); x' = N(x + s·f), f = FFN(y)/rms(FFN(y)) (span.scale=norm; FFN(y) "
        "otherwise); N on the embedding, no final N"
    )
    init_rule = (
        "q, k, v, FFN up: 1/sqrt(d); attention out and FFN down calibrated to output RMS 1, "
        "s = sqrt(c/L), c = 1, FFN branch RMS-normalized (span.scale=norm, the default; "
        "multiplier: not normalized; init: out/down at RMS sqrt(c/L), s = 1); tied head"
    )
    reference = "Wang, Li et al. 2026, arXiv 2601.22580 (ICML 2026)"
    base_std = BaseStd(0.02, 768, "GPT-2's, for the embedding and tied head; the paper's own is not known to us")
    embed_norm = True

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer)
        # s: a plain Python float, never a buffer
        self.s = span_factor(cfg) if cfg.span.scale in (SpanScale.MULTIPLIER, SpanScale.NORM) else 1.0
        self.branch_norm = cfg.span.scale is SpanScale.NORM  # f/rms(f), no gain
        self.eps = cfg.norm_eps

    @classmethod
    def init_stds(cls, cfg, layer):
        return unit_variance_init(cfg, span_factor(cfg) if cfg.span.scale is SpanScale.INIT else 1.0)

    def entering_rms(self, ffn_rms: float) -> float:
        """RMS of the FFN branch as it enters N_2 (s·f, or s·f/rms(f) under span.scale=norm), given the
        RMS of the FFN module's own output."""
        return self.s * (1.0 if self.branch_norm else ffn_rms)

    @classmethod
    def theory(cls, blocks, stream_rms0, attn_rms, ffn_rms, stream_rms):
        """Stream RMS 1; skip gain ∏_l 1/rms(x_l + s·f_l) = ∏_l (1 + σ_l²)^(-1/2) (f_l/rms(f_l) under
        span.scale=norm)."""
        ins = [stream_rms0] + stream_rms[:-1]
        gain = 1.0
        for block, f, x in zip(blocks, ffn_rms, ins):
            gain /= math.sqrt(x * x + block.entering_rms(f) ** 2)
        return Theory([1.0] * len(stream_rms), gain)

    def forward(self, x, rope):
        y = self.norm1(x + self.attn(x, rope))
        f = self.ffn(y)
        if self.branch_norm:
            f = F.rms_norm(f, f.shape[-1:], eps=self.eps)
        return self.norm2(torch.add(x, f, alpha=self.s))  # x + s·f in one op


class DeepNorm(Block):
    """DeepNorm (Wang et al. 2022, "DeepNet: Scaling Transformers to 1,000 Layers").

        h  = N_1(α·x + Attn(x))
        x' = N_2(α·h + FFN(h))          decoder-only: α = (2L)^(1/4)

    Init: xavier_normal, gain β = (8L)^(-1/4) on v, out, FFN up and down; gain 1 on q, k (an MoE
    router takes the FFN up std; FFN fans are one expert's).
    Under ``completep`` α and β are evaluated at L_b (base_depth) and CompleteP's branch multiplier L_b/L carries
    the model beyond it (CompleteP wins); under ``mup`` they keep the real L (only the width is carried).
    """

    equation = "h = N(α·x + Attn(x)); x' = N(α·h + FFN(h)); α = (2L)^(1/4)"
    init_rule = (
        "xavier_normal; gain β = (8L)^(-1/4) on v, out, FFN up/down, gain 1 on q, k; embedding, head N(0, σ); "
        "untied head (fairseq LM default)"
    )
    reference = "Wang et al. 2022, arXiv 2203.00555 (DeepNet)"
    tie_embeddings = False
    base_std = FAIRSEQ_STD

    def __init__(self, cfg, layer):
        super().__init__(cfg, layer)
        self.alpha = (2 * cfg.recipe_depth) ** 0.25

    @classmethod
    def init_stds(cls, cfg, layer):
        beta = (8 * cfg.n_layers) ** -0.25
        d, f = cfg.d_model, ffn_width(cfg)
        return shared_init(cfg) | {
            Role.ATTN_QK: xavier_std(d, d),
            Role.ATTN_V: xavier_std(d, d, beta),
            Role.ATTN_OUT: xavier_std(d, d, beta),
            Role.FFN_UP: xavier_std(d, f, beta),
            Role.FFN_DOWN: xavier_std(f, d, beta),
            Role.ROUTER: xavier_std(d, f, beta),
        }

    @classmethod
    def theory(cls, blocks, stream_rms0, attn_rms, ffn_rms, stream_rms):
        """As PostNorm with α = (2L)^(1/4): stream RMS 1; each sum passes α/rms(α·x + F)."""
        ins = [stream_rms0] + stream_rms[:-1]
        return Theory([1.0] * len(stream_rms), post_skip_gain(blocks[0].alpha, ins, attn_rms, ffn_rms))

    def forward(self, x, rope):
        h = self.norm1(self.alpha * x + self.attn(x, rope))
        return self.norm2(self.alpha * h + self.ffn(h))


class B2T(Block):
    """B2T connection (Takase et al. 2023, "B2T Connection: Serving Stability and Performance in
    Deep Transformers"): PostNorm plus a skip from the block input over both norms' inputs.

        h  = N_1(x + Attn(x))
        x' = N_2(x + h + FFN(h))

    Init: the authors' fairseq init, then every weight matrix in the blocks × L^(-1/2) (their
    ``rescaling_init``, takase/b2t_connection ``fairseq/modules/transformer_layer.py``):
      q, k, v   xavier_uniform, gain 1/sqrt(2) (fairseq MultiheadAttention, q/k/v of equal dims);
      out       xavier_uniform;
      FFN up, down (and an MoE router: up's std)   torch's nn.Linear default, U(±1/sqrt(fan_in)),
                std 1/sqrt(3·fan_in) (their fc1/fc2 are plain nn.Linear, not fairseq's xavier Linear);
      embedding and untied head   N(0, σ), σ = d^(-1/2) (fairseq's), not depth-scaled.
    We draw normals with these stds (the authors draw uniforms); fairseq also multiplies the
    embedding output by sqrt(d), which our model does not. Untied head: ``share_decoder_input_output_embed``
    is False by default in their ``transformer_lm.py``.
    """

    equation = "h = N(x + Attn(x)); x' = N(x + h + FFN(h))"
    init_rule = (
        "fairseq init × L^(-1/2) on block weights: q, k, v xavier gain 1/sqrt(2), out xavier, "
        "FFN 1/sqrt(3·fan_in); embedding, head N(0, σ); untied head"
    )
    reference = "Takase et al. 2023, arXiv 2206.00330 (Findings of ACL 2023)"
    tie_embeddings = False
    base_std = FAIRSEQ_STD
    measured = Measured(
        2.0,
        "the fair study's search at d = 64: best init_scale 2 at L = 12 and 48, docs/fair-study; "
        "checked at d = 128, L = 12: within 0.05 nats of the best, docs/fair-study/measured",
    )

    @classmethod
    def init_stds(cls, cfg, layer):
        d, f = cfg.d_model, ffn_width(cfg)
        r = cfg.n_layers**-0.5
        up = r / math.sqrt(3 * d)
        return {
            Role.EMBED: base_std(cfg),
            Role.HEAD: base_std(cfg),
            Role.ATTN_QK: r * xavier_std(d, d, 2**-0.5),
            Role.ATTN_V: r * xavier_std(d, d, 2**-0.5),
            Role.ATTN_OUT: r * xavier_std(d, d),
            Role.FFN_UP: up,
            Role.ROUTER: up,
            Role.FFN_DOWN: r / math.sqrt(3 * f),
        }

    def forward(self, x, rope):
        h = self.norm1(x + self.attn(x, rope))
        return self.norm2(x + h + self.ffn(h))


class Admin(Block):
    """Admin (Liu et al. 2020, "Understanding the Difficulty of Training Transformers").

    h  = N_1(ω_1 ⊙ x + Attn(x))
    x' = N_2(ω_2 ⊙ h + FFN(h))      ω learnable vectors, initialized to
                                     ω = sqrt((n+1)/ln(n+1) − 1), n = 2L residual sublayers

    Under ``completep`` ω's init is evaluated at n = 2·L_b (base_depth) and CompleteP's branch multiplier L_b/L
    carries the model beyond it (CompleteP wins); under ``mup`` it keeps the real L (only the width is carried).
    """

    equation = "h = N(ω⊙x + Attn(x)); x' = N(ω⊙h + FFN(h)); ω learnable"
    init_rule = (
        "ω = sqrt((n+1)/ln(n+1) − 1), n = 2L (closed-form ω of admin-torch, not the profiled ω of "
        "the paper); weights N(0, σ); untied head (fairseq LM default)"
    )
    reference = "Liu et al. 2020, arXiv 2004.08249"
    base_std = BaseStd(0.02, 768, "GPT-2's; Admin's fairseq code draws xavier (not read)", WidthRule.CARRIED)  # as post
    tie_embeddings = False

    def __init__(self, cfg, layer):
        super().__init__(cfg, layer)
        n = 2 * cfg.recipe_depth
        self.omega0 = math.sqrt((n + 1) / math.log(n + 1) - 1)
        self.omega1 = nn.Parameter(torch.empty(cfg.d_model))
        self.omega2 = nn.Parameter(torch.empty(cfg.d_model))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.constant_(self.omega1, self.omega0)
        nn.init.constant_(self.omega2, self.omega0)

    def forward(self, x, rope):
        h = self.norm1(self.omega1 * x + self.attn(x, rope))
        return self.norm2(self.omega2 * h + self.ffn(h))


class PeriLN(Block):
    """Peri-LN (Kim et al. 2025, "Peri-LN: Revisiting Layer Normalization in the Transformer
    Architecture"): norms around each sublayer, the stream itself never normalized.

        h  = x + N_1o(Attn(N_1(x)))
        x' = h + N_2o(FFN(N_2(h)))      N on the embedding and a final N before the head
    """

    equation = "h = x + N(Attn(N(x))); x' = h + N(FFN(N(h))); N on the embedding; final N"
    init_rule = "as PreNorm (GPT-2); tied head (not verified)"
    reference = "Kim et al. 2025, arXiv 2502.02732"
    base_std = BaseStd(0.02, 768, "GPT-2's, as PreNorm; Peri-LN's own width not verified")
    norms = ("norm1", "norm1_out", "norm2", "norm2_out")
    attn_input = "norm1"
    embed_norm = True
    final_norm = True

    @classmethod
    def init_stds(cls, cfg, layer):
        return gpt2_init(cfg)

    def forward(self, x, rope):
        h = x + self.norm1_out(self.attn(self.norm1(x), rope))
        return h + self.norm2_out(self.ffn(self.norm2(h)))


class Sandwich(PeriLN):
    """Sandwich-LN (Ding et al. 2021, "CogView"): Peri-LN's block without the embedding norm; CogView
    keeps the final norm before the head.

        h  = x + N_1o(Attn(N_1(x)))
        x' = h + N_2o(FFN(N_2(h)))      final N before the head
    """

    equation = "h = x + N(Attn(N(x))); x' = h + N(FFN(N(h))); final N"
    init_rule = "as PreNorm (GPT-2); tied head (not verified)"
    reference = "Ding et al. 2021, arXiv 2105.13290 (CogView)"
    embed_norm = False


class MixLN(Block):
    """Mix-LN (Li et al. 2024, "Mix-LN: Unleashing the Power of Deeper Layers by Combining
    Pre-LN and Post-LN"): the first ⌊L/4⌋ blocks are PostNorm, the rest PreNorm (final N).

    Init: the repository's default ``norm_type=post_pre`` (its README runs Mix-LN so): every linear
    weight N(0, σ) (their initializer_range 0.02), the embedding N(0, sqrt(2/5)) ≈ N(0, 0.63),
    an untied head (LlamaForCausalLM's own lm_head, N(0, σ)). Read in nikitus20/mixln, a copy of
    pengxiang-li/Mix-LN (``peft_pretraining/modeling_llama.py``, ``_init_weights``); the option
    ``scale_post_pre`` (PreNorm blocks' out and down × 1/sqrt(2L)) is not the default and not ours.
    Under ``mup`` and ``completep`` the ⌊L/4⌋ split follows the real L (it is the architecture, not a constant of
    the recipe); under ``completep`` every block's branches are × L_b/L as well.
    """

    equation = "blocks l < ⌊0.25·L⌋: PostNorm; the rest: PreNorm; final N"
    init_rule = "N(0, σ) for every linear weight; embedding N(0, sqrt(2/5) ≈ 0.63); untied head"
    reference = "Li et al. 2024, arXiv 2412.13795"
    base_std = BaseStd(0.02, 768, "LLaMA's initializer_range in the Mix-LN code; their width not verified")
    final_norm = True
    tie_embeddings = False

    @staticmethod
    def is_post(cfg: ModelConfig, layer: int) -> bool:
        return layer < math.floor(0.25 * cfg.n_layers)

    def __init__(self, cfg, layer):
        super().__init__(cfg, layer)
        self.post = self.is_post(cfg, layer)

    @classmethod
    def init_stds(cls, cfg, layer):
        return shared_init(cfg) | {Role.EMBED: math.sqrt(2 / 5)}

    @classmethod
    def attn_input_norm(cls, cfg, layer):
        return None if cls.is_post(cfg, layer) else "norm1"

    def forward(self, x, rope):
        return PostNorm.forward(self, x, rope) if self.post else PreNorm.forward(self, x, rope)


class HybridNorm(Block):
    """HybridNorm (Zhuo et al. 2025, "HybridNorm: Towards Stable and Efficient Transformer Training
    via Hybrid Normalization"): QKV-normalized attention without an input norm, PostNorm-style FFN.

        h  = x + Attn_qkv-norm(x)       per-head N on q, k and v
        x' = N(h) + FFN(N(h))           final N before the head
    """

    equation = "h = x + Attn(x) with per-head N on q, k, v; x' = N(h) + FFN(N(h)); final N"
    init_rule = "Megatron: N(0, σ); attention out and FFN down × 1/sqrt(2L); tied head"
    reference = "Zhuo et al. 2025, arXiv 2503.04598"
    base_std = BaseStd(0.02, 768, "Megatron's init_method_std in the HybridNorm configs; their width not verified")
    norms = ("norm",)
    qkv_norm = True
    final_norm = True

    @classmethod
    def init_stds(cls, cfg, layer):
        # the authors' OLMo configs: init_fn full_megatron (out and down std/sqrt(2L)), weight_tying true
        return gpt2_init(cfg)

    def forward(self, x, rope):
        h = x + self.attn(x, rope)
        n = self.norm(h)
        return n + self.ffn(n)


class HybridNormStar(HybridNorm):
    """HybridNorm* (Zhuo et al. 2025): HybridNorm with a PreNorm first block. Block 0 gets an input
    norm N_a before its attention and a PreNorm FFN; blocks 1.. are HybridNorm. Block 0 keeps its
    per-head q, k, v norms: the authors' first-block switches add an attention input norm and change
    the FFN residual, and say nothing of removing them (our reading).

        block 0:  h = x + Attn_qkv-norm(N_a(x));  x' = h + FFN(N(h))
        block l:  h = x + Attn_qkv-norm(x);       x' = N(h) + FFN(N(h))     final N before the head
    """

    equation = "HybridNorm, but block 0 is PreNorm: h = x + Attn(N_a(x)); x' = h + FFN(N(h)); final N"
    reference = "Zhuo et al. 2025, arXiv 2503.04598 (HybridNorm*)"

    def __init__(self, cfg, layer):
        super().__init__(cfg, layer)
        if layer == 0:
            self.attn_norm = make_norm(cfg, site=Site.ATTN)

    def forward(self, x, rope):
        if self.layer > 0:
            return super().forward(x, rope)
        h = x + self.attn(self.attn_norm(x), rope)
        return h + self.ffn(self.norm(h))


class LNScaling(PreNorm):
    """LayerNorm Scaling (Sun et al. 2025, "The Curse of Depth in Large Language Models"):
    PreNorm with each input norm's output scaled by 1/sqrt(l), l = block index counted from 1.

        h  = x + Attn(N_1(x) / sqrt(l))
        x' = h + FFN(N_2(h) / sqrt(l))   final N before the head

    1/sqrt(l) depends on the block's index, not on L: under ``completep`` it applies and so does CompleteP's branch
    multiplier L_b/L (both); under ``mup`` nothing of it changes.
    """

    equation = "h = x + Attn(N(x)/sqrt(l)); x' = h + FFN(N(h)/sqrt(l)); l from 1; final N"
    init_rule = "N(0, σ), no depth-scaled init; tied head (not verified)"
    reference = "Sun et al. 2025, arXiv 2502.05795"
    base_std = BaseStd(
        0.02, 768, "the LLaMA initializer_range of Sun et al.; their width not verified", WidthRule.CARRIED
    )

    def __init__(self, cfg, layer):
        super().__init__(cfg, layer)
        self.scale = 1.0 / math.sqrt(layer + 1)

    @classmethod
    def init_stds(cls, cfg, layer):
        return shared_init(cfg)

    @classmethod
    def theory(cls, blocks, stream_rms0, attn_rms, ffn_rms, stream_rms):
        """None: PreNorm's closed form is not checked against LayerNorm Scaling's measurements."""
        return None

    def forward(self, x, rope):
        h = x + self.attn(self.norm1(x) * self.scale, rope)
        return h + self.ffn(self.norm2(h) * self.scale)


class ResiDualExit(nn.Module):
    """ResiDual's output: a_L + N(d_L)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = make_norm(cfg)

    def forward(self, state: Streams) -> torch.Tensor:
        return state.post + self.norm(state.pre)


class ResiDual(Block):
    """ResiDual (Xie et al. 2023, "ResiDual: Transformer with Dual Residual Connections"): a PostNorm
    stream a and a PreNorm-like stream d that accumulates every sublayer output.

        per sublayer F:  a' = N(a + F(a));  d' = d + F(a)
        a_0 = d_0 = embedding;  output a_L + N(d_L)
    """

    equation = "per sublayer: a' = N(a + F(a)); d' = d + F(a); output a_L + N(d_L)"
    init_rule = "N(0, σ), no depth scaling; tied head (not verified)"
    reference = "Xie et al. 2023, arXiv 2304.14802"
    base_std = BaseStd(0.02, 768, "GPT-2's; ResiDual's own init not verified")
    Exit = ResiDualExit

    @staticmethod
    def enter(x):
        return Streams(x, x)

    def forward(self, state, rope):
        a, d = state
        f = self.attn(a, rope)
        a, d = self.norm1(a + f), d + f
        f = self.ffn(a)
        return Streams(self.norm2(a + f), d + f)


class SiameseExit(nn.Module):
    """SiameseNorm's output: N_f(N_a(x) + N_b(y))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_a, self.norm_b, self.norm_f = (make_norm(cfg) for _ in range(3))

    def forward(self, state: Streams) -> torch.Tensor:
        return self.norm_f(self.norm_a(state.post) + self.norm_b(state.pre))


class SiameseNorm(Block):
    """SiameseNorm (Li et al. 2026, ICML 2026): a post-like stream x and a pre-like stream y share
    each sublayer F.

        per sublayer F:  x ← N_post(x);  z = F(N_in(x + N_pre(y)));  x ← x + z/sqrt(2(l+1));  y ← y + z
        x_0 = y_0 = embedding;  output N_f(N_a(x_L) + N_b(y_L));  l = block index from 0 (our reading)
    """

    equation = "per sublayer: x ← N(x); z = F(N(x + N(y))); x ← x + z/sqrt(2(l+1)); y ← y + z; output N(N(x) + N(y))"
    init_rule = "N(0, σ), no depth scaling; tied head (not verified)"
    reference = "Li et al. 2026 (SiameseNorm, ICML 2026)"
    base_std = BaseStd(0.02, 768, "GPT-2's; SiameseNorm's own init not verified")
    norms = ("post1", "in1", "pre1", "post2", "in2", "pre2")
    attn_input = "in1"
    Exit = SiameseExit

    def __init__(self, cfg, layer):
        super().__init__(cfg, layer)
        self.z_scale = 1.0 / math.sqrt(2 * (layer + 1))

    @staticmethod
    def enter(x):
        return Streams(x, x)

    def forward(self, state, rope):
        x, y = state
        x = self.post1(x)
        z = self.attn(self.in1(x + self.pre1(y)), rope)
        x, y = x + self.z_scale * z, y + z
        x = self.post2(x)
        z = self.ffn(self.in2(x + self.pre2(y)))
        return Streams(x + self.z_scale * z, y + z)


class OLMo2(Block):
    """OLMo 2's reordered norm (OLMo et al. 2025, "2 OLMo 2 Furious", arXiv 2501.00656): the norms move from the
    sublayer inputs to their outputs, and the queries and keys are normalized (QK-norm, over all heads).

        h  = x + N_1(Attn(x))
        x' = h + N_2(FFN(h))            q, k normalized over all heads before RoPE; final N before the head

    x ──┬──────────────────(+)──┬─────────────────(+)──► x'
        └─ Attn ─ N_1 ──────┘   └─ FFN ─ N_2 ──────┘

    Recipe (the paper, section 2; HF ``Olmo2`` for the q/k axis and the final norm): every parameter N(0, 0.02)
    (their 7B width 4096; the width rule is not yet measured here, fan-in as most schemes'), no depth scaling,
    RMSNorm, QK-norm over all heads, untied head (OLMo 2 7B does not tie); its z-loss is not part of the block.
    """

    equation = "h = x + N(Attn(x)); x' = h + N(FFN(h)); q, k normalized (all heads); final N before the head"
    init_rule = "N(0, σ) for every weight, no depth scaling; qk_norm=all; untied head"
    reference = "OLMo et al. 2025, arXiv 2501.00656 (OLMo 2)"
    # fan-in: 0.016 nats below the carried 0.02·sqrt(4096/d) = 0.16 at d = 64 (docs/fair-study/recipes/)
    base_std = BaseStd(0.02, 4096, "OLMo 2's every-parameter N(0, 0.02) at OLMo 2 7B's width")
    final_norm = True
    tie_embeddings = False
    qk_norm = QKNorm.ALL

    @classmethod
    def init_stds(cls, cfg, layer):
        return shared_init(cfg)

    @classmethod
    def theory(cls, blocks, stream_rms0, attn_rms, ffn_rms, stream_rms):
        """Each branch is normalized (RMS 1 with unit gains) and uncorrelated with the stream at init:
        Var(x_{l+1}) = Var(x_l) + 2; skip gain 1."""
        var, pred = stream_rms0**2, []
        for _ in attn_rms:
            var += 2.0
            pred.append(math.sqrt(var))
        return Theory(pred, 1.0)

    def forward(self, x, rope):
        h = x + self.norm1(self.attn(x, rope))
        return h + self.norm2(self.ffn(h))


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Sinkhorn–Knopp over the last two dimensions: M = exp(logits), then ``iters`` times every row, then every
    column, divided by its sum (mHC's projection onto the doubly stochastic matrices). Each row's max is subtracted
    before exp (the same iterates, as the first row step divides it out; no overflow, no row of zeros)."""
    m = torch.exp(logits - logits.amax(-1, keepdim=True))
    for _ in range(iters):
        m = m / m.sum(-1, keepdim=True)
        m = m / m.sum(-2, keepdim=True)
    return m


class HyperConnection(nn.Module):
    """mHC's connection around one sublayer F (Xie et al. 2025, arXiv 2512.24880) on n streams x (..., n, d), each
    token's n×d matrix:

        z = vec(x) / rms(vec(x))                                the n·d row, RMS-normalized (its gain absorbed in φ)
        H_pre  = σ(α_pre·z·φ_pre + b_pre)                       1×n: how F's input reads the streams
        H_post = 2σ(α_post·z·φ_post + b_post)                   1×n: how F's output is written to them
        H_res  = Sinkhorn-Knopp(α_res·mat(z·φ_res) + b_res)     n×n, doubly stochastic: how the streams mix
        x' = H_res·x + H_postᵀ·F(H_pre·x)

    Both parts, as the paper: static (the biases b) and dynamic (α·z·φ, per token). Init: α = 0.01 (the paper's, as
    Megatron-LM's default); the rest is our reading (Megatron-LM's): b_pre = logit(1/n) (F reads the streams' mean),
    b_post = 0 (H_post = 1: F's output added to every stream), b_res 0 on the diagonal and ``RES_OFF`` off it (H_res
    near the identity), φ N(0, 1/sqrt(n·d)) (z·φ of RMS 1: α alone sets the dynamic part's size). On equal streams
    this is PreNorm's x + F(x), but for the dynamic part.
    """

    ALPHA = 0.01  # the gating factors' init
    RES_OFF = -5.0  # b_res off the diagonal: H_res's diagonal 0.98 at n = 4 (Megatron-LM's init)
    SINKHORN_ITERS = 20  # the paper's t_max

    def __init__(self, n: int, d: int, eps: float):
        super().__init__()
        self.n, self.eps = n, eps
        self.phi = nn.Parameter(torch.empty(n * d, n * (n + 2)))  # [φ_pre | φ_post | φ_res]
        self.alpha = nn.Parameter(torch.empty(3))  # α_pre, α_post, α_res
        self.bias = nn.Parameter(torch.empty(n * (n + 2)))  # [b_pre | b_post | b_res]

    def reset_parameters(self) -> None:
        n = self.n
        nn.init.normal_(self.phi, std=self.phi.shape[0] ** -0.5)
        nn.init.constant_(self.alpha, self.ALPHA)
        b_pre, b_post, b_res = self.bias.detach().split([n, n, n * n])
        b_pre.fill_(-math.log(n - 1))  # σ(b_pre) = 1/n
        b_post.fill_(0.0)
        b_res.view(n, n).fill_(self.RES_OFF).fill_diagonal_(0.0)

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """H_pre (..., n), H_post (..., n) and H_res (..., n, n) of streams x (..., n, d)."""
        n = self.n
        z = x.flatten(-2)
        z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + self.eps)
        pre, post, res = (z @ self.phi).to(x.dtype).split([n, n, n * n], -1)  # (autocast: the coefficients in x's)
        b_pre, b_post, b_res = self.bias.split([n, n, n * n])
        a_pre, a_post, a_res = self.alpha
        return (
            torch.sigmoid(a_pre * pre + b_pre),
            2 * torch.sigmoid(a_post * post + b_post),
            sinkhorn((a_res * res + b_res).unflatten(-1, (n, n)), self.SINKHORN_ITERS),
        )

    def forward(self, x: torch.Tensor, sublayer) -> torch.Tensor:
        h_pre, h_post, h_res = self.coefficients(x)
        y = sublayer((h_pre.unsqueeze(-2) @ x).squeeze(-2))
        return h_res @ x + h_post.unsqueeze(-1) * y.unsqueeze(-2)


class StreamMean(nn.Module):
    """mHC's output: the mean of the n streams (Hyper-Connections sum them before the final norm: the same after
    an RMSNorm, but for its ε; the mean keeps the scale with ``final_norm=false``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(-2)


class MHC(Block):
    """Manifold-constrained hyper-connections (Xie et al. 2025, DeepSeek, "mHC: Manifold-Constrained
    Hyper-Connections", arXiv 2512.24880), PreNorm placement: n residual streams (``model.hc_streams``), each
    sublayer wrapped in a :class:`HyperConnection` that reads its input from the streams (H_pre), writes its output
    back (H_post) and mixes the streams by a doubly stochastic H_res (Sinkhorn-Knopp, 20 iterations).

        h  = H_res,1·x + H_post,1ᵀ·Attn(N_1(H_pre,1·x))
        x' = H_res,2·h + H_post,2ᵀ·FFN(N_2(H_pre,2·h))        H's static + dynamic (per token)
        x_0 = n copies of the embedding;  output: the streams' mean, then the final N

    x ─┬──── H_res ─────────────────────────────(+)─┬── H_res ───────────────────────(+)──► x'   (n×d a token)
       └─ H_pre ─ N_1 ─ Attn ─ H_postᵀ ──────────┘   └─ H_pre ─ N_2 ─ FFN ─ H_postᵀ ───┘

    Recipe: PreNorm's (GPT-2 init, tied head), so that mhc and pre differ only by the connections; the paper's own
    model recipe is not carried. ``probe``'s stream RMS is over all n streams. It takes only
    ``model.parametrization=standard``: its hyper-connection matrix φ (n·d × n(n+2)) has no µP rule here.
    """

    equation = (
        "per sublayer F: x' = H_res·x + H_postᵀ·F(N(H_pre·x)) on n streams (model.hc_streams); H_pre = σ(·), "
        "H_post = 2σ(·), H_res = Sinkhorn-Knopp(·), each α·(rms-normalized x)·φ + b; x_0 = n copies of the "
        "embedding; output the streams' mean; final N"
    )
    init_rule = "as PreNorm (GPT-2); α = 0.01, H_pre = 1/n, H_post = 1, H_res ≈ I (near PreNorm at init); tied head"
    reference = "Xie et al. 2025, arXiv 2512.24880 (mHC, DeepSeek); Zhu et al. 2024, arXiv 2409.19606 (HC)"
    base_std = BaseStd(0.02, 768, "GPT-2's, as PreNorm; the paper's own init not carried")
    attn_input = "norm1"
    final_norm = True
    Exit = StreamMean

    def __init__(self, cfg, layer):
        super().__init__(cfg, layer)
        self.n = cfg.hc_streams
        self.hc1, self.hc2 = (HyperConnection(cfg.hc_streams, cfg.d_model, cfg.norm_eps) for _ in range(2))

    @classmethod
    def init_stds(cls, cfg, layer):
        return gpt2_init(cfg)

    def reset_parameters(self):
        self.hc1.reset_parameters()
        self.hc2.reset_parameters()

    def enter(self, x):
        return x.unsqueeze(-2).expand(*x.shape[:-1], self.n, x.shape[-1])

    @classmethod
    def theory(cls, blocks, stream_rms0, attn_rms, ffn_rms, stream_rms):
        """PreNorm's: at init the streams are equal (n copies; F's output written to each with H_post = 1, and a
        doubly stochastic H_res maps equal streams to themselves) and H_pre reads their mean, but for the dynamic
        part (α = 0.01)."""
        return PreNorm.theory(blocks, stream_rms0, attn_rms, ffn_rms, stream_rms)

    def forward(self, x, rope):
        h = self.hc1(x, lambda u: self.attn(self.norm1(u), rope))
        return self.hc2(h, lambda u: self.ffn(self.norm2(u)))


def unit(x: torch.Tensor) -> torch.Tensor:
    """x / ‖x‖ over the last dimension: nGPT's Norm, onto the unit sphere (no gain)."""
    return F.normalize(x, dim=-1)


class NGPT(Block):
    """nGPT (Loshchilov et al. 2025, "nGPT: Normalized Transformer with Representation Learning on the Hypersphere",
    ICLR 2025): the state h stays on the unit sphere; each sublayer moves it toward its normalized output by learned
    per-dimension eigen learning rates α, and every matrix is kept at unit norm along the embedding dimension.

        h ← U(h + α_A ⊙ (U(Attn(h)) − h))       U(x) = x/‖x‖
        h ← U(h + α_M ⊙ (U(FFN(h)) − h))        x_0 = U(embed(tokens)); logits = s_z ⊙ (E_out·h_L); no final norm

    h ──┬──────────────────────(+)─ U ──┬──────────────────────(+)─ U ──► h'
        ├─ Attn ─ U ─(−h)─ ×α_A ─┘      ├─ FFN ─ U ─(−h)─ ×α_M ─┘

    Attn: each head's q and k normalized after RoPE, times s_qk, softmax scale sqrt(d_head) (``Attention.s_qk``).
    FFN: SwiGLU with u·s_u and the gate v·s_v·sqrt(d), computed as NVIDIA/ngpt's model.py does: one vector
    s_uv = [s_v; s_u]·sqrt(d) (``SwiGLU.s_uv``); its sqrt(d) on u only scales FFN(h), which U undoes: the paper's
    model. α, s_qk, s_uv and s_z are :class:`ScaleVector` modules, (init, scale) = (0.05, 1/sqrt(d)) for α,
    (1, 1/sqrt(d)) for s_qk and s_z, (1, 1) for s_u and s_v (the paper's section 2.6; NVIDIA/ngpt's model.py).
    After init and after every optimizer step (the trainer's ``UnitWeights`` part) each matrix is normalized along
    its d_model axis: rows of q, k, v, FFN up and both embeddings, columns of attention out and FFN down
    (``unit_axes``).

    The authors' recipe beyond the model, which a scheme cannot set (train.*): no learning-rate warmup and no weight
    decay. Our defaults (train.warmup_steps 50; train.weight_decay 0.1 on the matrices, whose shrinking the
    renormalization undoes: it only enlarges the step's update relative to the weight by 1/(1 − lr·wd)) stay unless
    the config sets train.warmup_steps=0 and train.weight_decay=0, as ``init_rule`` says (as PostNorm's warmup is).
    Our reading: U as the paper writes it (NVIDIA's code also takes |α|; here α is not clamped), with F.normalize's
    1e-12 floor on ‖x‖. Refused, as they would change nothing: model.norm but rms (nGPT has no norm modules),
    model.init_std and init_scale (only the draw's direction remains on the normalized matrices). Refused as
    undefined: MoE and model.qk_norm (config), FSDP (the renormalization needs whole columns), and any
    model.parametrization but standard: its unit-norm matrices and learned scales are a width rule of their own.
    """

    equation = (
        "h ← U(h + α_A⊙(U(Attn(h)) − h)); h ← U(h + α_M⊙(U(FFN(h)) − h)); U(x) = x/‖x‖; q, k per head U·s_qk, "
        "softmax scale sqrt(d_head); FFN u·s_u, gate·s_v·sqrt(d); U on the embedding; logits × s_z; no final N"
    )
    init_rule = (
        "every matrix N(0, 1/sqrt(d)), then unit along d (rows of q, k, v, up, embeddings; columns of out, down), "
        "again after each optimizer step; α = 0.05, s_qk = s_z = 1 (scale 1/sqrt(d)), s_u = s_v = 1; untied head; "
        "the authors train without warmup or weight decay (train.warmup_steps=0, train.weight_decay=0)"
    )
    reference = "Loshchilov et al. 2025, arXiv 2410.01131 (nGPT, ICLR 2025)"
    base_std = BaseStd(1024**-0.5, 1024, "NVIDIA/ngpt's base_scale 1/sqrt(n_embd), a fan-in rule")
    norms = ()
    tie_embeddings = False
    unit_axes = {
        Role.EMBED: 1,
        Role.HEAD: 1,
        Role.ATTN_QK: 1,
        Role.ATTN_V: 1,
        Role.FFN_UP: 1,
        Role.ATTN_OUT: 0,
        Role.FFN_DOWN: 0,
    }

    def __init__(self, cfg, layer):
        super().__init__(cfg, layer)
        d, scale = cfg.d_model, cfg.d_model**-0.5
        self.alpha_attn, self.alpha_ffn = ScaleVector(d, 0.05, scale), ScaleVector(d, 0.05, scale)
        self.attn.s_qk = ScaleVector(d, 1.0, scale)
        self.ffn.s_uv = ScaleVector(2 * cfg.ffn_dim, math.sqrt(d), 1.0)  # [s_v; s_u]·sqrt(d), the docstring's
        self.sqrt_d = math.sqrt(d)

    @staticmethod
    def enter(x):
        return unit(x)

    @staticmethod
    def logit_scale(cfg):
        return ScaleVector(cfg.vocab_size, 1.0, cfg.d_model**-0.5)

    @classmethod
    def theory(cls, blocks, stream_rms0, attn_rms, ffn_rms, stream_rms):
        """Every state on the unit sphere: RMS 1/sqrt(d). Each sum (1 − α)·h + α·U(F), with U(F) uncorrelated with h
        at init, has norm sqrt((1 − α)² + α²) and passes a tangent perturbation of h with gain (1 − α)/that norm
        (0.9986 for α = 0.05); α: the mean of each block's α vector."""
        gain = 1.0
        for block in blocks:
            for alpha in (block.alpha_attn().mean().item(), block.alpha_ffn().mean().item()):
                gain *= (1 - alpha) / math.hypot(1 - alpha, alpha)
        return Theory([1 / block.sqrt_d for block in blocks], gain)

    def forward(self, h, rope):
        h = unit(h + self.alpha_attn() * (unit(self.attn(h, rope)) - h))
        return unit(h + self.alpha_ffn() * (unit(self.ffn(h)) - h))


class DeepScale(Block):
    """DeepScaleLM (Kedia et al. 2024, "Transformers Get Stable: An End-to-End Signal Propagation
    Theory for Language Models"), PreNorm form: variance-preserving residual mixing.

        h  = λ·x + β·Attn(N_1(x))
        x' = λ·h + β·FFN(N_2(h))        λ² + β² = 1, β² = k/L (k = deepscale_k); final N
        logits = (sqrt(0.3/d) · N(x_L)) · Eᵀ     tied head

    Init: unit-variance embedding; q, k, v, FFN up 1/sqrt(d); out and down calibrated to output RMS 1.
    Before the tied head the unit-RMS final state is scaled by sqrt(0.3/d): logit variance 0.3 with a
    unit-variance embedding, so that the first loss is ≈ ln V, not tens of nats (unscaled: logit
    variance d). Our reading, not verified against the paper's code (arXiv 2403.09635): issue 13 names
    the factor 1/sqrt(0.3·d), which measured a first loss 2-4 nats above ln V at d = 64, 128 (logit
    variance 1/0.3); sqrt(0.3/d) is the reading that gives the first loss the issue asks for.
    Under ``completep`` β² = k/L_b (base_depth) and CompleteP's branch multiplier L_b/L carries the model beyond it
    (CompleteP wins); under ``mup`` and ``completep`` sqrt(0.3/d) is evaluated at the base width d_b and the logit
    multiplier 1/m = d_b/d carries it.
    """

    equation = (
        "h = λ·x + β·Attn(N(x)); x' = λ·h + β·FFN(N(h)); λ² + β² = 1, β² = k/L; final N; × sqrt(0.3/d) before the head"
    )
    init_rule = "embedding N(0, 1); q, k, v, up 1/sqrt(d); out, down calibrated to unit output variance; tied head"
    reference = "Kedia et al. 2024, arXiv 2403.09635"
    base_std = BaseStd(
        0.02, 768, "GPT-2's, used only by an untied head: the embedding is N(0, 1), the inputs 1/sqrt(d)"
    )
    attn_input = "norm1"
    final_norm = True

    def __init__(self, cfg, layer):
        super().__init__(cfg, layer)
        self.beta = math.sqrt(cfg.deepscale_k / cfg.recipe_depth)
        self.lam = math.sqrt(1.0 - self.beta**2)

    @classmethod
    def init_stds(cls, cfg, layer):
        return unit_variance_init(cfg, 1.0) | {Role.EMBED: 1.0}

    @staticmethod
    def head_scale(cfg):
        return math.sqrt(0.3 / cfg.d_model)

    def forward(self, x, rope):
        h = self.lam * x + self.beta * self.attn(self.norm1(x), rope)
        return self.lam * h + self.beta * self.ffn(self.norm2(h))


SCHEMES: dict[Scheme, type[Block]] = {
    Scheme.PRE: PreNorm,
    Scheme.POST: PostNorm,
    Scheme.SPAN: SpanNorm,
    Scheme.DEEPNORM: DeepNorm,
    Scheme.B2T: B2T,
    Scheme.ADMIN: Admin,
    Scheme.PERI: PeriLN,
    Scheme.SANDWICH: Sandwich,
    Scheme.MIXLN: MixLN,
    Scheme.HYBRID: HybridNorm,
    Scheme.HYBRID_STAR: HybridNormStar,
    Scheme.LNS: LNScaling,
    Scheme.RESIDUAL: ResiDual,
    Scheme.SIAMESE: SiameseNorm,
    Scheme.DEEPSCALE: DeepScale,
    Scheme.OLMO2: OLMo2,
    Scheme.MHC: MHC,
    Scheme.NGPT: NGPT,
}


# ``init=shared``: one base std for every scheme, with the width rule of PreNorm's (GPT-2's) recipe
SHARED_STD = SCHEMES[Scheme.PRE].base_std


def use_final_norm(cfg: ModelConfig) -> bool:
    """``final_norm`` resolved: the explicit value, else the scheme's default."""
    return SCHEMES[cfg.scheme].final_norm if cfg.final_norm is None else cfg.final_norm


def use_qk_norm(cfg: ModelConfig) -> QKNorm:
    """``qk_norm`` resolved: the explicit value, else the scheme's recipe."""
    return SCHEMES[cfg.scheme].qk_norm if cfg.qk_norm is None else cfg.qk_norm


def use_tied_embeddings(cfg: ModelConfig) -> bool:
    """``tie_embeddings`` resolved: the explicit value, else True (init=shared) or the scheme's choice."""
    if cfg.tie_embeddings is not None:
        return cfg.tie_embeddings
    return cfg.init is InitMode.SHARED or SCHEMES[cfg.scheme].tie_embeddings
