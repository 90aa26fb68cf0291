"""The model's options: ``ModelConfig`` and the enums of its fields.

Plain data, validated on construction; this module imports neither torch nor the model, so that
configs can be read, checked and written (CLI, studies, reports) without either.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from .config import (
    POSITIVE_NUMBER,
    Bound,
    check_bounds,
    coerce_enum,
    from_dict,
    is_int,
    is_number,
    moved_keywords,
    option,
    require,
)


class Scheme(str, enum.Enum):
    """Normalization placement."""

    PRE = "pre"
    POST = "post"
    SPAN = "span"
    DEEPNORM = "deepnorm"
    B2T = "b2t"
    ADMIN = "admin"
    PERI = "peri"
    SANDWICH = "sandwich"
    MIXLN = "mixln"
    HYBRID = "hybrid"
    HYBRID_STAR = "hybrid_star"
    LNS = "lns"
    RESIDUAL = "residual"
    SIAMESE = "siamese"
    DEEPSCALE = "deepscale"
    OLMO2 = "olmo2"
    MHC = "mhc"
    NGPT = "ngpt"


class SpanScale(str, enum.Enum):
    """How SpanNorm keeps the branch variance at c/L (see SPANNORM.md, "The scaling strategy")."""

    INIT = "init"  # output projections initialized so that branch RMS ≈ sqrt(c/L)
    MULTIPLIER = "multiplier"  # fixed multiplier sqrt(c/L) on the FFN branch, unit-RMS init
    NORM = "norm"  # FFN branch RMS-normalized (no gain), times sqrt(c/L): Var(s·f) = c/L at every step
    NONE = "none"  # no depth scaling: unit-RMS branch


class QKNorm(str, enum.Enum):
    """Norms on the queries and keys, before RoPE (orthogonal to the placement)."""

    NONE = "none"
    HEAD = "head"  # per head, over the head size; one gain shared by the heads (Qwen3, torchtitan's qk_norm)
    ALL = "all"  # over all heads at once, the d_model-wide q and k (OLMo 2: HF Olmo2Attention, OLMo-core)


# schemes whose attention already normalizes q, k and v per head (HybridNorm): model.qk_norm must be none
QKV_NORMED = {Scheme.HYBRID, Scheme.HYBRID_STAR}


class InitMode(str, enum.Enum):
    """Which init rule the model uses."""

    RECOMMENDED = "recommended"  # each scheme's own rule (the default)
    SHARED = "shared"  # one common rule for every scheme: every weight N(0, base std), tied head


class NormType(str, enum.Enum):
    """Which normalization N is; each has a learnable gain."""

    RMS = "rms"  # RMSNorm: x / rms(x) · γ
    LAYER = "layer"  # LayerNorm: (x − mean) / std · γ + β
    DYT = "dyt"  # Dynamic Tanh: γ · tanh(α·x) + β, α learnable from α₀ (not a normalization)
    DERF = "derf"  # Dynamic erf: γ · erf(α·x + s) + β, α and s learnable scalars from α₀ and 0 (Chen et al. 2025)


class DyTRecipe(str, enum.Enum):
    """How ``norm=dyt`` is set up (:func:`make_norm`, and the embedding scalar of ``model.LM``).

    ``llm`` follows the authors' LLaMA code (Zhu et al. 2025, jiachenzhu/DyT at aab5dde,
    ``other_tasks/LLaMA``), read there: (1) the DyT module is γ·tanh(α·x), no β; (2) α₀ is set per
    site by three flags, attention-input norm, FFN-input norm and final norm, whose README commands
    give 0.8/0.2/0.2 (7B), 0.6/0.15/0.15 (13B), 0.2/0.05/0.05 (34B, 70B): FFN and final are always
    equal, hence our two values ``model.dyt.alpha0_attn`` / ``alpha0_other``; (3) the embedding output is
    multiplied by a learnable scalar filled with sqrt(d). That α₀ should grow as the width shrinks is
    the paper's finding (not verified: we did not read the paper's text; the size table agrees).
    Our reading for sites LLaMA lacks: sublayer-output, stream, embedding and per-head q/k/v norms
    get α₀_other.
    """

    PLAIN = "plain"  # γ·tanh(α·x) + β at every site, α₀ = model.dyt.alpha0
    LLM = "llm"  # Zhu et al.'s LLaMA recipe: no β; α₀ per site; learnable scalar sqrt(d) on the embedding


class Parametrization(str, enum.Enum):
    """How the tuned lr and init carry across width and depth (``spannorm.parametrization``)."""

    STANDARD = "standard"  # every rule at the model's own shape
    MUP = "mup"  # µP: the recipe at base_width, carried in width (Tensor Programs V)
    COMPLETEP = "completep"  # µP, and the recipe at base_depth carried in depth: branches × L_b/L (CompleteP, α = 1)


# schemes that take no parametrization but standard, and why (ModelConfig.check_parametrization)
STANDARD_ONLY = {
    Scheme.NGPT: "nGPT's unit-norm matrices are a width rule of their own",
    Scheme.MHC: "mHC's hyper-connection matrices have no µP rule here",
}

MAX_EXPERTS = 4096  # routed or shared experts per MoE layer (today's largest models use a few hundred)
# mhc's residual streams: the paper's n is 4; each stream is a copy of the d-wide state and H_res has n² entries a token
MAX_STREAMS = 64
MAX_SIZE = 2**20  # vocab, width, depth, heads, FFN width: above it a weight matrix could not even be indexed
SIZE = Bound(lambda v: is_int(v) and 0 < v <= MAX_SIZE, f"a positive integer (at most {MAX_SIZE:,})")
SIZE_OR_NULL = Bound(lambda v: v is None or SIZE.ok(v), f"{SIZE.valid} or null")
# (the init of an MoE draws 2^16 router samples per expert: a bound keeps that finite)
EXPERTS = Bound(lambda v: is_int(v) and 0 <= v <= MAX_EXPERTS, f"an integer in [0, {MAX_EXPERTS}]")


@dataclass
class DyTConfig:
    """``model.dyt``: the α₀ of the dyt and derf norm types and their recipe (:class:`DyTRecipe`)."""

    alpha0: float = option(0.5, "initial α of the dyt and derf norm types (recipe=plain)", POSITIVE_NUMBER)
    recipe: DyTRecipe = option(
        DyTRecipe.PLAIN,
        "norm=dyt or derf only: plain (γ·tanh(α·x) + β, α₀ = alpha0 at every site) or llm (Zhu et al.'s LLaMA "
        "recipe: no β, α₀ per site, a learnable scalar sqrt(d) after the embedding; derf keeps β); no effect "
        "otherwise",
    )
    # (the defaults: the authors' LLaMA2-7B values; 13B: 0.6/0.15; 34B, 70B: 0.2/0.05. Our models are far narrower,
    # and the authors found α₀ should grow as the width shrinks (the paper; not verified here): likely too small)
    alpha0_attn: float = option(
        0.8, "recipe=llm: α₀ of the attention-input DyT (the authors' LLaMA2-7B value)", POSITIVE_NUMBER
    )
    alpha0_other: float = option(
        0.2, "recipe=llm: α₀ of every other DyT (the authors' LLaMA2-7B value)", POSITIVE_NUMBER
    )

    def __post_init__(self):
        self.recipe = coerce_enum(DyTRecipe, "model.dyt.recipe", self.recipe)
        check_bounds(self, "model.dyt")


@dataclass
class SpanConfig:
    """``model.span``: how SpanNorm (scheme span) scales its branch (see SPANNORM.md, "The scaling strategy")."""

    scale: SpanScale = option(SpanScale.NORM, "SpanNorm scaling: norm, multiplier, init or none (docs/spannorm-lr.md)")
    c: float = option(1.0, "SpanNorm's c: target branch variance c/L", POSITIVE_NUMBER)

    def __post_init__(self):
        self.scale = coerce_enum(SpanScale, "model.span.scale", self.scale)
        check_bounds(self, "model.span")


@dataclass
class MoEConfig:
    """``model.moe``: the FFN of every block as a mixture of experts (n_experts >= 1), or dense (0)."""

    n_experts: int = option(0, "0: dense SwiGLU FFN; >= 1: MoE FFN with this many routed experts", EXPERTS)
    top_k: int = option(2, "routed experts per token (at most n_experts)")
    n_shared_experts: int = option(0, "experts every token passes through, besides the routed ones", EXPERTS)
    expert_d_ff: int | None = option(
        None,
        "hidden width of one expert; None: ceil(ffn_dim / (top_k + n_shared_experts))",
        SIZE_OR_NULL,
    )
    capacity_factor: float | None = option(
        None,
        "None: dropless; c: an expert takes at most ceil(c·N·k/E) assignments",
        Bound(lambda v: v is None or (is_number(v) and v > 0), "a positive number or null (dropless)"),
    )
    aux_coef: float = option(
        0.01,
        "weight of the load-balancing loss E·Σ f_i·P_i (mean over MoE layers)",
        Bound(lambda v: is_number(v) and v >= 0, "a number >= 0"),
    )
    z_coef: float = option(
        0.001,
        "weight of the router z-loss mean(logsumexp(logits)²) (mean over MoE layers)",
        Bound(lambda v: is_number(v) and v >= 0, "a number >= 0"),
    )

    def __post_init__(self):
        check_bounds(self, "model.moe")
        if self.n_experts == 0:
            for name in ("n_shared_experts", "expert_d_ff", "capacity_factor"):
                value = getattr(self, name)
                require(
                    value in (0, None),
                    f"model.moe.{name}",
                    value,
                    f"{'0' if name == 'n_shared_experts' else 'null'} with model.moe.n_experts=0 (dense FFN)",
                )
        require(
            is_int(self.top_k) and 1 <= self.top_k <= (self.n_experts or self.top_k),
            "model.moe.top_k",
            self.top_k,
            f"an integer in [1, n_experts={self.n_experts}]" if self.enabled else "a positive integer",
        )

    @property
    def enabled(self) -> bool:
        """Whether the FFN of every block is an MoE layer."""
        return self.n_experts > 0


GROUPS = {"dyt": DyTConfig, "span": SpanConfig, "moe": MoEConfig}  # ModelConfig's option groups: field -> class


@moved_keywords("model")
@dataclass
class ModelConfig:
    # long: every option of the model, each declared once with its doc and bound, then their cross-field checks
    vocab_size: int = option(256, "number of token ids (256 for the byte tokenizer)", SIZE)
    d_model: int = option(128, "width of the residual stream", SIZE)
    n_layers: int = option(6, "number of transformer blocks L", SIZE)
    n_heads: int = option(4, "attention heads; must divide d_model, head size must be even (RoPE)", SIZE)
    d_ff: int | None = option(
        None, "SwiGLU hidden width; None: 8/3·d_model rounded up to a multiple of 32", SIZE_OR_NULL
    )
    scheme: Scheme = option(Scheme.SPAN, "normalization placement (see `spannorm schemes`)")
    norm: NormType = option(NormType.RMS, "norm type N: rms, layer, dyt or derf")
    norm_eps: float = option(1e-6, "epsilon inside every rms/layer norm", POSITIVE_NUMBER)
    dyt: DyTConfig = option(doc="the dyt and derf norm types' α₀ and recipe", factory=DyTConfig)
    final_norm: bool | None = option(None, "norm before the LM head; None: the scheme's default")
    tie_embeddings: bool | None = option(
        None,
        "share the token embedding with the LM head; None: the scheme's recommended choice with init=recommended, "
        "True with init=shared (one recipe for every scheme)",
    )
    rope_theta: float = option(10000.0, "rotary embedding base", POSITIVE_NUMBER)
    qk_norm: QKNorm | None = option(
        None,
        "norms of type `norm` on the queries and keys before RoPE, with any scheme: none, head (per head, over the "
        "head size, a gain shared by the heads: Qwen3, torchtitan) or all (over all heads, d_model wide: OLMo 2); "
        "None: the scheme's recipe (all for olmo2, none for the others)",
    )
    init: InitMode = option(InitMode.RECOMMENDED, "recommended (each scheme's own rule) or shared")
    init_std: float | None = option(
        None,
        "base std of the init rules; null: the scheme's width rule (`spannorm schemes`: the fan-in 1/sqrt(d_model), "
        "or its authors' constant carried from the width they tuned it at); a number: that std at every width (under "
        "mup and completep: at base_width, then carried like the rule)",
        Bound(
            lambda v: v is None or (is_number(v) and v > 0), "a positive number, or null for the scheme's width rule"
        ),
    )
    init_scale: float = option(
        1.0,
        "every weight std of the init rule × this (the fair study's init axis); norms untouched",
        POSITIVE_NUMBER,
    )
    span: SpanConfig = option(doc="SpanNorm's branch scaling (scheme span)", factory=SpanConfig)
    deepscale_k: float = option(1.0, "DeepScaleLM's k: branch weight β² = k/L (at most L)", POSITIVE_NUMBER)
    hc_streams: int = option(
        4,
        "mHC's residual streams n (the paper's 4); no effect with other schemes",
        Bound(
            lambda v: is_int(v) and 2 <= v <= MAX_STREAMS, f"an integer in [2, {MAX_STREAMS}] (mhc's residual streams)"
        ),
    )
    parametrization: Parametrization = option(
        Parametrization.STANDARD,
        "standard, mup (µP: the scheme's recipe at base_width, carried to d_model) or completep (µP, and the recipe "
        "at base_depth carried to n_layers, branches × base_depth/n_layers); see `spannorm.parametrization`",
    )
    base_width: int | None = option(
        None,
        "mup, completep: the width the lr and init were tuned at; null: d_model (no effect under standard)",
        SIZE_OR_NULL,
    )
    base_depth: int | None = option(
        None, "completep: the depth the lr and init were tuned at; null: n_layers (no effect otherwise)", SIZE_OR_NULL
    )
    moe: MoEConfig = option(doc="mixture of experts: the FFN of every block (n_experts=0: dense)", factory=MoEConfig)

    def __post_init__(self):
        for name, cls in GROUPS.items():  # (a group given as a mapping: its fields)
            if not isinstance(getattr(self, name), cls):
                setattr(self, name, from_dict(cls, getattr(self, name), f"model.{name}"))
        self.scheme = coerce_enum(Scheme, "model.scheme", self.scheme)
        self.norm = coerce_enum(NormType, "model.norm", self.norm)
        self.init = coerce_enum(InitMode, "model.init", self.init)
        self.parametrization = coerce_enum(Parametrization, "model.parametrization", self.parametrization)
        if self.qk_norm is not None:
            self.qk_norm = coerce_enum(QKNorm, "model.qk_norm", self.qk_norm)
        require(
            self.qk_norm in (None, QKNorm.NONE) or self.scheme not in QKV_NORMED,
            "model.qk_norm",
            getattr(self.qk_norm, "value", None),
            f"none or null with model.scheme={self.scheme.value}, whose attention already normalizes q, k and v",
        )
        check_bounds(self, "model")
        self.check_ngpt()
        self.check_parametrization()
        require(
            self.d_model % self.n_heads == 0,
            "model.d_model",
            self.d_model,
            f"a multiple of model.n_heads={self.n_heads}",
        )
        require(
            (self.d_model // self.n_heads) % 2 == 0,
            "model.n_heads",
            self.n_heads,
            f"a divisor of d_model={self.d_model} that leaves an even head size (RoPE)",
        )
        depth = "n_layers" if self.recipe_depth == self.n_layers else "base_depth"
        require(
            self.deepscale_k <= self.recipe_depth,
            "model.deepscale_k",
            self.deepscale_k,
            f"a number in (0, {depth}={self.recipe_depth}] (β² = k/L must not exceed 1)",
        )

    def check_parametrization(self) -> None:
        """What mup and completep do not define (``spannorm.parametrization``), refused in one line; and a base
        width whose heads could not be built."""
        if self.parametrization is Parametrization.STANDARD:
            return
        name = self.parametrization.value
        why = STANDARD_ONLY.get(self.scheme)
        require(why is None, "model.parametrization", name, f"standard with model.scheme={self.scheme.value} ({why})")
        require(
            not self.use_embed_scale,
            "model.parametrization",
            name,
            f"standard with model.norm={self.norm.value} and model.dyt.recipe=llm (its sqrt(d) embedding scalar is a "
            "width rule of its own; recipe=plain takes any)",
        )
        width = self.recipe_width
        require(
            width % self.n_heads == 0 and (width // self.n_heads) % 2 == 0,
            "model.base_width",
            width,
            f"a multiple of model.n_heads={self.n_heads} that leaves an even head size (the base model's heads)",
        )

    def check_ngpt(self) -> None:
        """What nGPT's normalization does not define (scheme ngpt): q/k norms of its own kind, MoE experts; and what
        would change nothing: a norm type (it has no norm modules), an init std or scale (every matrix is normalized
        to the unit sphere at init)."""
        if self.scheme is not Scheme.NGPT:
            return
        require(
            self.qk_norm in (None, QKNorm.NONE),
            "model.qk_norm",
            getattr(self.qk_norm, "value", None),
            "none or null with model.scheme=ngpt, whose attention already normalizes q and k (per head)",
        )
        require(
            self.moe.n_experts == 0,
            "model.moe.n_experts",
            self.moe.n_experts,
            "0 with model.scheme=ngpt: nGPT's normalization is defined for dense matrices, not experts or a router",
        )
        sphere = "with model.scheme=ngpt, whose matrices are normalized to the unit sphere at init (no effect)"
        require(
            self.norm is NormType.RMS, "model.norm", self.norm.value, "rms with model.scheme=ngpt (no norm modules)"
        )
        require(self.init_std is None, "model.init_std", self.init_std, f"null {sphere}")
        require(self.init_scale == 1, "model.init_scale", self.init_scale, f"1 {sphere}")

    @property
    def recipe_width(self) -> int:
        """The width a scheme's width constants are evaluated at: base_width under mup and completep, else d_model."""
        if self.parametrization is not Parametrization.STANDARD and self.base_width is not None:
            return self.base_width
        return self.d_model

    @property
    def recipe_depth(self) -> int:
        """The depth a scheme's depth constants are evaluated at: base_depth under completep, else n_layers."""
        if self.parametrization is Parametrization.COMPLETEP and self.base_depth is not None:
            return self.base_depth
        return self.n_layers

    @property
    def expert_dim(self) -> int:
        """The hidden width of one expert (MoE models): active FFN parameters ≈ the dense model's."""
        if self.moe.expert_d_ff is not None:
            return self.moe.expert_d_ff
        return math.ceil(self.ffn_dim / (self.moe.top_k + self.moe.n_shared_experts))

    @property
    def ffn_dim(self) -> int:
        """The dense SwiGLU hidden width (MoE models derive ``expert_dim`` from it)."""
        return self.d_ff if self.d_ff is not None else 32 * math.ceil(8 * self.d_model / 3 / 32)

    @property
    def use_embed_scale(self) -> bool:
        """Whether a learnable scalar, initialized to sqrt(d), multiplies the token embedding (DyT LLM recipe)."""
        return self.norm in (NormType.DYT, NormType.DERF) and self.dyt.recipe is DyTRecipe.LLM
