"""The decoder-only language model: embedding → scheme entry → blocks → scheme exit → head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .device import compute_dtype
from .layers import NORMS, Role, ScaleVector, linear_cross_entropy, make_norm, rope_cache
from .model_config import ModelConfig
from .moe import MoE
from .parametrization import output_multiplier, recipe_config
from .schemes import SCHEMES, use_final_norm, use_tied_embeddings, weight_stds


class LM(nn.Module):
    """Causal language model: ``forward(idx) -> (logits, None)``; ``forward(idx, targets) -> (None, loss)``.

    The forward is three steps, then the head: ``embed_tokens`` (tokens -> the first block's input),
    ``trunk`` (the blocks) and ``final`` (the final norm); the probe calls the same steps, so that it
    measures the model's own path.

    With targets the head and the mean cross-entropy are fused (``layers.linear_cross_entropy``):
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
        self.final_norm = make_norm(cfg) if use_final_norm(cfg) else nn.Identity()
        # a plain float: the scheme's (at the base shape), × µP's 1/m on the logits (spannorm.parametrization)
        self.head_scale = block.head_scale(recipe_config(cfg)) * output_multiplier(cfg)
        self.logit_scale = block.logit_scale(cfg)  # nGPT's learned s_z, a factor per token's logit (else None)
        self.head = None
        if not use_tied_embeddings(cfg):
            self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            self.head.role = Role.HEAD
        self.reset_parameters()

    def init_rule(self, layer: int) -> dict[Role, float]:
        """Role -> std for block ``layer`` (layer 0's rule also covers embedding and head)."""
        return weight_stds(self.cfg, layer)

    def reset_parameters(self) -> None:
        """Apply the init rule: a std per weight role, norms to their defaults, scheme parameters."""
        for module in self.modules():
            if isinstance(module, (*NORMS, ScaleVector)):
                module.reset_parameters()
        init_roles(self.embed, self.init_rule(0))
        if self.embed_scale is not None:
            nn.init.constant_(self.embed_scale, math.sqrt(self.cfg.d_model))
        if self.head is not None:
            init_roles(self.head, self.init_rule(0))
        for block in self.blocks:
            init_roles(block, self.init_rule(block.layer))
            block.reset_parameters()
        self.normalize_weights()

    @torch.no_grad()
    def normalize_weights(self) -> None:
        """Each weight whose role the scheme lists in ``unit_axes`` divided by its L2 norm along that axis (nGPT's
        matrices back on the unit sphere); nothing for the other schemes. After init, and after each optimizer step
        (the trainer's ``UnitWeights`` part): the model's, since only the model knows which weight is which."""
        axes = SCHEMES[self.cfg.scheme].unit_axes
        for module in self.modules() if axes else ():
            role = getattr(module, "role", None)
            if role is not None:  # (a fused weight's row blocks share their axis)
                module.weight.copy_(F.normalize(module.weight, dim=axes[role[0] if isinstance(role, tuple) else role]))

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's weight: the token embedding when tied; nGPT's s_z scales its rows (z_v·s_v = h·(s_v·w_v))."""
        weight = self.embed.weight if self.head is None else self.head.weight
        return weight if self.logit_scale is None else weight * self.logit_scale()[:, None]

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
        """moe.aux_coef · aux + moe.z_coef · z for the last forward; what the trainer adds to the
        cross-entropy it backpropagates (0.0 for a dense model)."""
        terms = self.moe_terms()
        if terms is None:
            return 0.0
        return self.cfg.moe.aux_coef * terms[0] + self.cfg.moe.z_coef * terms[1]

    def moe_stats(self) -> list[dict] | None:
        """Per MoE layer, from the last forward: {layer, fraction, imbalance, dropped}; None if dense."""
        layers = self.moe_layers()
        if not layers:
            return None
        return [{"layer": i} | m.stats for i, m in enumerate(layers)]

    def rope(self, seq_len: int, device: torch.device, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE tables of positions start .. start + seq_len − 1, in the matmuls' dtype."""
        dtype = compute_dtype(self.embed.weight)
        rope = rope_cache(start + seq_len, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_theta, device, dtype)
        return tuple(t[start:] for t in rope) if start else rope

    def embed_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """Step 1, tokens -> x_0, the first block's input: the token embedding, times the DyT LLM recipe's
        scalar, through the scheme's embedding norm N_0."""
        x = self.embed(idx)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        return self.embed_norm(x)

    def trunk(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Step 2, x_0 -> the blocks' output: the scheme's entry state, every block, the scheme's exit
        (which merges a two-stream state into one tensor)."""
        state = self.blocks[0].enter(x)
        for block in self.blocks:
            state = block(state, rope)
        return self.exit(state)

    def final(self, x: torch.Tensor) -> torch.Tensor:
        """Step 3, the blocks' output -> the state the LM head reads: the final norm, times the scheme's
        head_scale."""
        x = self.final_norm(x)
        if self.head_scale != 1.0:
            x = x * self.head_scale
        return x

    def head_input(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The state the LM head reads, (B, T, d): logits = head_input · W_headᵀ. ``start``: the
        absolute position of idx[:, 0] (RoPE), > 0 only for incremental decoding with a KV cache."""
        x = self.trunk(self.embed_tokens(idx), self.rope(idx.shape[1], idx.device, start))
        return self.final(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        x = self.head_input(idx)
        if targets is None:
            return F.linear(x, self.head_weight), None
        return None, self.head_loss(x, targets)

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Step 4, the state the LM head reads -> the mean cross-entropy against ``targets`` (no logits kept)."""
        return linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.head_weight, targets.reshape(-1))


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
