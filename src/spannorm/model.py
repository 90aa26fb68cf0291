"""The decoder-only language model: embedding → scheme entry → blocks → scheme exit → head."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import coerce_enum, require
from .device import compute_dtype
from .layers import NORMS, DyTRecipe, NormType, Role, linear_cross_entropy, make_norm, rope_cache
from .moe import MoE
from .schemes import SCHEMES, InitMode, Scheme, SpanScale, shared_init

MAX_EXPERTS = 4096  # routed or shared experts per MoE layer (today's largest models use a few hundred)
MAX_SIZE = 2**20  # vocab, width, depth, heads, FFN width: above it a weight matrix could not even be indexed


@dataclass
class ModelConfig:
    vocab_size: int = 256  # number of token ids (256 for the byte tokenizer)
    d_model: int = 128  # width of the residual stream
    n_layers: int = 6  # number of transformer blocks L
    n_heads: int = 4  # attention heads; must divide d_model, head size must be even (RoPE)
    d_ff: int | None = None  # SwiGLU hidden width; None: 8/3·d_model rounded up to a multiple of 32
    scheme: Scheme = Scheme.SPAN  # normalization placement (see `spannorm schemes`)
    norm: NormType = NormType.RMS  # norm type N: rms, layer or dyt
    norm_eps: float = 1e-6  # epsilon inside every rms/layer norm
    dyt_alpha0: float = 0.5  # initial α of the dyt norm type (dyt_recipe=plain)
    # norm=dyt only: plain (γ·tanh(α·x) + β, α₀ = dyt_alpha0 at every site) or llm (Zhu et al.'s LLaMA recipe:
    # no β, α₀ per site, a learnable scalar sqrt(d) after the embedding); no effect with norm=rms or layer
    dyt_recipe: DyTRecipe = DyTRecipe.PLAIN
    # dyt_recipe=llm: α₀ of the attention-input DyT and of every other DyT. Defaults: the authors' LLaMA2-7B
    # values (13B: 0.6/0.15; 34B, 70B: 0.2/0.05). Our models are far narrower, and the authors found α₀ should
    # grow as the width shrinks (the paper; not verified here), so these are likely too small for us.
    dyt_alpha0_attn: float = 0.8
    dyt_alpha0_other: float = 0.2
    final_norm: bool | None = None  # norm before the LM head; None: the scheme's default
    # share the token embedding with the LM head; None: the scheme's recommended choice with init=recommended,
    # True with init=shared (one recipe for every scheme)
    tie_embeddings: bool | None = None
    rope_theta: float = 10000.0  # rotary embedding base
    init: InitMode = InitMode.RECOMMENDED  # recommended (each scheme's own rule) or shared
    init_std: float = 0.02  # base std of the init rules
    span_scale: SpanScale = SpanScale.NORM  # SpanNorm scaling: norm, multiplier, init or none (docs/spannorm-lr.md)
    span_c: float = 1.0  # SpanNorm's c: target branch variance c/L
    deepscale_k: float = 1.0  # DeepScaleLM's k: branch weight β² = k/L (at most L)
    n_experts: int = 0  # 0: dense SwiGLU FFN; >= 1: MoE FFN with this many routed experts
    top_k: int = 2  # routed experts per token (at most n_experts)
    n_shared_experts: int = 0  # experts every token passes through, besides the routed ones
    expert_d_ff: int | None = None  # hidden width of one expert; None: ceil(ffn_dim / (top_k + n_shared_experts))
    capacity_factor: float | None = None  # None: dropless; c: an expert takes at most ceil(c·N·k/E) assignments
    moe_aux_coef: float = 0.01  # weight of the load-balancing loss E·Σ f_i·P_i (mean over MoE layers)
    moe_z_coef: float = 0.001  # weight of the router z-loss mean(logsumexp(logits)²) (mean over MoE layers)

    def __post_init__(self):
        self.scheme = coerce_enum(Scheme, "model.scheme", self.scheme)
        self.norm = coerce_enum(NormType, "model.norm", self.norm)
        self.init = coerce_enum(InitMode, "model.init", self.init)
        self.span_scale = coerce_enum(SpanScale, "model.span_scale", self.span_scale)
        self.dyt_recipe = coerce_enum(DyTRecipe, "model.dyt_recipe", self.dyt_recipe)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads"):
            value = getattr(self, name)
            require(
                isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_SIZE,
                f"model.{name}",
                value,
                f"a positive integer (at most {MAX_SIZE:,})",
            )
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
        require(
            self.d_ff is None or (isinstance(self.d_ff, int) and 0 < self.d_ff <= MAX_SIZE),
            "model.d_ff",
            self.d_ff,
            f"a positive integer (at most {MAX_SIZE:,}) or null",
        )
        for name in (
            "norm_eps",
            "init_std",
            "span_c",
            "rope_theta",
            "dyt_alpha0",
            "dyt_alpha0_attn",
            "dyt_alpha0_other",
            "deepscale_k",
        ):
            value = getattr(self, name)
            require(
                isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
                f"model.{name}",
                value,
                "a positive number",
            )
        self._validate_moe()
        require(
            self.deepscale_k <= self.n_layers,
            "model.deepscale_k",
            self.deepscale_k,
            f"a number in (0, n_layers={self.n_layers}] (β² = k/L must not exceed 1)",
        )

    def _validate_moe(self) -> None:
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("n_experts", "n_shared_experts"):
            value = getattr(self, name)
            # (the init of an MoE draws 2^16 router samples per expert: a bound keeps that finite)
            require(
                is_int(value) and 0 <= value <= MAX_EXPERTS, f"model.{name}", value, f"an integer in [0, {MAX_EXPERTS}]"
            )
        for name in ("moe_aux_coef", "moe_z_coef"):
            value = getattr(self, name)
            require(
                isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
                f"model.{name}",
                value,
                "a number >= 0",
            )
        require(
            self.expert_d_ff is None or (is_int(self.expert_d_ff) and 0 < self.expert_d_ff <= MAX_SIZE),
            "model.expert_d_ff",
            self.expert_d_ff,
            f"a positive integer (at most {MAX_SIZE:,}) or null",
        )
        cf = self.capacity_factor
        require(
            cf is None or (isinstance(cf, (int, float)) and math.isfinite(cf) and cf > 0),
            "model.capacity_factor",
            cf,
            "a positive number or null (dropless)",
        )
        if self.n_experts == 0:
            for name in ("n_shared_experts", "expert_d_ff", "capacity_factor"):
                value = getattr(self, name)
                require(
                    value in (0, None),
                    f"model.{name}",
                    value,
                    f"{'0' if name == 'n_shared_experts' else 'null'} with model.n_experts=0 (dense FFN)",
                )
        require(
            is_int(self.top_k) and 1 <= self.top_k <= (self.n_experts or self.top_k),
            "model.top_k",
            self.top_k,
            f"an integer in [1, n_experts={self.n_experts}]" if self.moe else "a positive integer",
        )

    @property
    def moe(self) -> bool:
        """Whether the FFN of every block is an MoE layer."""
        return self.n_experts > 0

    @property
    def expert_dim(self) -> int:
        """The hidden width of one expert (MoE models): active FFN parameters ≈ the dense model's."""
        if self.expert_d_ff is not None:
            return self.expert_d_ff
        return math.ceil(self.ffn_dim / (self.top_k + self.n_shared_experts))

    @property
    def ffn_dim(self) -> int:
        """The dense SwiGLU hidden width (MoE models derive ``expert_dim`` from it)."""
        return self.d_ff if self.d_ff is not None else 32 * math.ceil(8 * self.d_model / 3 / 32)

    @property
    def use_embed_scale(self) -> bool:
        """Whether a learnable scalar, initialized to sqrt(d), multiplies the token embedding (DyT LLM recipe)."""
        return self.norm is NormType.DYT and self.dyt_recipe is DyTRecipe.LLM

    @property
    def use_final_norm(self) -> bool:
        return SCHEMES[self.scheme].final_norm if self.final_norm is None else self.final_norm

    @property
    def use_tied_embeddings(self) -> bool:
        """``tie_embeddings`` resolved: explicit value, else True (init=shared) or the scheme's choice."""
        if self.tie_embeddings is not None:
            return self.tie_embeddings
        return self.init is InitMode.SHARED or SCHEMES[self.scheme].tie_embeddings


class LM(nn.Module):
    """Causal language model: ``forward(idx) -> (logits, None)``; ``forward(idx, targets) -> (None, loss)``.

    With targets the head and the mean cross-entropy are fused (``nn.linear_cross_entropy``):
    the (tokens × vocab) logits are never materialized. ``loss`` is the pure cross-entropy; MoE
    models add ``moe_loss()`` (auxiliary terms of the same forward) to train.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        block = SCHEMES[cfg.scheme]
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed.role = Role.EMBED
        # DyT LLM recipe: x_0 = s·embed(tokens), s learnable from sqrt(d), before any embedding norm
        self.embed_scale = nn.Parameter(torch.empty(1)) if cfg.use_embed_scale else None
        self.embed_norm = make_norm(cfg) if block.embed_norm else nn.Identity()
        self.blocks = nn.ModuleList(block(cfg, layer) for layer in range(cfg.n_layers))
        self.exit = block.Exit(cfg) if block.Exit is not None else nn.Identity()
        self.final_norm = make_norm(cfg) if cfg.use_final_norm else nn.Identity()
        self.head_scale = block.head_scale(cfg)  # a plain float, part of the scheme's equation
        self.head = None
        if not cfg.use_tied_embeddings:
            self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            self.head.role = Role.HEAD
        self.reset_parameters()

    def init_rule(self, layer: int) -> dict[Role, float]:
        """Role -> std for block ``layer`` (layer 0's rule also covers embedding and head)."""
        if self.cfg.init is InitMode.SHARED:
            return shared_init(self.cfg)
        return SCHEMES[self.cfg.scheme].init_stds(self.cfg, layer)

    def reset_parameters(self) -> None:
        """Apply the init rule: a std per weight role, norms to their defaults, scheme parameters."""
        for module in self.modules():
            if isinstance(module, NORMS):
                module.reset_parameters()
        init_roles(self.embed, self.init_rule(0))
        if self.embed_scale is not None:
            nn.init.constant_(self.embed_scale, math.sqrt(self.cfg.d_model))
        if self.head is not None:
            init_roles(self.head, self.init_rule(0))
        for block in self.blocks:
            init_roles(block, self.init_rule(block.layer))
            block.reset_parameters()

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's weight: the token embedding when tied."""
        return self.embed.weight if self.head is None else self.head.weight

    def moe_layers(self) -> list[MoE]:
        """The MoE FFN of every block (empty for a dense model)."""
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    def moe_terms(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(load-balancing loss, router z-loss) of the last forward, unweighted means over the MoE
        layers, in the graph; None for a dense model."""
        layers = self.moe_layers()
        if not layers:
            return None
        return (torch.stack([m.aux_loss for m in layers]).mean(), torch.stack([m.z_loss for m in layers]).mean())

    def moe_loss(self) -> torch.Tensor | float:
        """moe_aux_coef · aux + moe_z_coef · z for the last forward; what the trainer adds to the
        cross-entropy it backpropagates (0.0 for a dense model)."""
        terms = self.moe_terms()
        if terms is None:
            return 0.0
        return self.cfg.moe_aux_coef * terms[0] + self.cfg.moe_z_coef * terms[1]

    def moe_stats(self) -> list[dict] | None:
        """Per MoE layer, from the last forward: {layer, fraction, imbalance, dropped}; None if dense."""
        layers = self.moe_layers()
        if not layers:
            return None
        return [{"layer": i} | m.stats for i, m in enumerate(layers)]

    def head_input(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The state the LM head reads, (B, T, d): logits = head_input · W_headᵀ. ``start``: the
        absolute position of idx[:, 0] (RoPE), > 0 only for incremental decoding with a KV cache."""
        T = idx.shape[1]
        dtype = compute_dtype(self.embed.weight)  # RoPE tables in the matmuls' dtype
        rope = rope_cache(start + T, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_theta, idx.device, dtype)
        if start:
            rope = tuple(t[start:] for t in rope)
        x = self.embed(idx)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        state = self.blocks[0].enter(self.embed_norm(x))
        for block in self.blocks:
            state = block(state, rope)
        x = self.final_norm(self.exit(state))
        if self.head_scale != 1.0:
            x = x * self.head_scale
        return x

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        x = self.head_input(idx)
        if targets is None:
            return F.linear(x, self.head_weight), None
        return None, linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.head_weight, targets.reshape(-1))


def init_roles(root: nn.Module, stds: dict[Role, float]) -> None:
    """N(0, std) for every weight under ``root`` that has a role; fused weights per row block."""
    for module in root.modules():
        role = getattr(module, "role", None)
        if isinstance(role, tuple):  # fused weight: one role per equal row block
            for rows, r in zip(module.weight.data.chunk(len(role)), role):
                nn.init.normal_(rows, std=stds[r])
        elif role is not None:
            nn.init.normal_(module.weight, std=stds[role])


def build_model(cfg: ModelConfig) -> LM:
    """Build and initialize a model; ``cfg`` was validated when it was constructed."""
    return LM(cfg)
