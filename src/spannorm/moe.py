"""Mixture-of-Experts FFN: a drop-in replacement for the dense SwiGLU FFN of every scheme.

For the N tokens y_n (rows of the flattened input) and E routed SwiGLU experts:

    p_n      = softmax(W_r y_n)                          router probabilities over the E experts
    S_n      = top-k indices of p_n                      k = top_k
    w_{n,i}  = p_{n,i} / Σ_{j ∈ S_n} p_{n,j}, i ∈ S_n    weights renormalized over the k chosen
    MoE(y_n) = Σ_{i ∈ S_n} w_{n,i} · Expert_i(y_n) + Shared(y_n)

Expert_i(y) = W_down,i (silu(W_gate,i y) ⊙ W_up,i y); Shared is one SwiGLU of width
n_shared · d_ff (the n_shared shared experts fused), absent when n_shared = 0.

Auxiliary terms (computed on every forward, stored on the module):
    aux = E · Σ_i f_i · P_i     f_i = fraction of the N·k assignments routed to expert i,
                                P_i = mean over tokens of p_{n,i}   (Switch / GShard; 1 if uniform)
    z   = mean_n (logsumexp_i (W_r y_n)_i)²                          (router z-loss, ST-MoE)

Dispatch: the N·k assignments are sorted by expert (stable, so token order is kept within an
expert), the tokens gathered with one index_select, each expert applied to its contiguous slice in
one matmul (a loop over experts, never over tokens; on CUDA in bf16 one grouped GEMM), weighted, and
scattered back with index_add_.
Dropless by default. With a capacity factor c each expert takes at most ceil(c·N·k/E) assignments,
the first in token order; the rest are dropped (contribute 0) and counted.

Init: the stacked expert weights carry the roles ffn.up and ffn.down and the router ffn.router,
so every scheme's init rule applies to them unchanged. Calibrated rules (SpanNorm, DeepScaleLM)
size W_down for one expert of width d_ff and divide by sqrt(E[Σ w_i²] + n_shared): with k experts
that are independent at init, Var(Σ w_i Expert_i) = Σ w_i² · Var(Expert); Σ w_i² is 1/k for equal
weights and more for a non-uniform router (its expectation at init: ``schemes.ffn_down_std``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .device import compute_dtype
from .layers import Role, SwiGLU, silu_gate


class ExpertWeight(nn.Module):
    """E stacked weight matrices of shape (E, out, in) with one init role."""

    def __init__(self, n_experts: int, out_features: int, in_features: int, role: Role):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, out_features, in_features))
        self.role = role
        nn.init.normal_(self.weight, std=0.02)  # replaced by the model's init rule


class MoE(nn.Module):
    """Top-k routed SwiGLU experts plus optional shared experts (equations in the module docstring).

    After each forward: ``aux_loss`` and ``z_loss`` (tensors in the graph), and ``stats``, a dict of
    plain Python numbers: ``fraction`` (per expert, of the N·k assignments before dropping),
    ``imbalance`` (max_i count_i / mean_i count_i) and ``dropped`` (assignments over capacity).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        n_experts: int,
        top_k: int,
        n_shared: int = 0,
        capacity_factor: float | None = None,
    ):
        super().__init__()
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.router.role = Role.ROUTER
        self.up = ExpertWeight(n_experts, 2 * d_ff, d_model, Role.FFN_UP)  # fused gate and up rows
        self.down = ExpertWeight(n_experts, d_model, d_ff, Role.FFN_DOWN)
        self.shared = SwiGLU(d_model, n_shared * d_ff) if n_shared > 0 else None
        self.aux_loss = self.z_loss = None
        self.stats: dict | None = None
        self.multiplier = 1.0  # a factor on the output (CompleteP's branch multiplier)

    def __getstate__(self):  # the stored losses hold a graph: not part of a copy or a pickle
        return super().__getstate__() | {"aux_loss": None, "z_loss": None}

    def capacity(self, n_tokens: int) -> int | None:
        """Most assignments one expert takes: ceil(c·N·k/E); None when dropless."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, probabilities, top-k weights renormalized, top-k expert ids) for tokens x (N, d),
        in at least float32, also under autocast: bf16 logits would flip near-tied choices."""
        with torch.autocast(x.device.type, enabled=False):  # routing in full precision (Switch's selective precision)
            logits = self.router(x.to(torch.promote_types(x.dtype, torch.float32)))
        probs = logits.softmax(-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return logits, probs, weights / weights.sum(-1, keepdim=True), experts

    @staticmethod
    def experts(
        xs: torch.Tensor, kept: list[int], w_up: torch.Tensor, w_down: torch.Tensor, grouped: bool | None = None
    ) -> torch.Tensor:
        """Expert i applied to its contiguous slice of ``xs`` (``kept[i]`` rows): a loop of matmuls,
        or with ``grouped`` two grouped GEMMs (``F.grouped_mm``; default: on CUDA in bf16, its kernels' domain)."""
        if grouped is None:
            grouped = xs.is_cuda and xs.dtype == torch.bfloat16
        if grouped:
            offs = torch.tensor(kept, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(xs.device)
            grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm  # torch._grouped_mm in older releases
            h = grouped_mm(xs, w_up.transpose(-2, -1), offs=offs)
            return grouped_mm(silu_gate(h), w_down.transpose(-2, -1), offs=offs)
        return torch.cat(
            [
                F.linear(silu_gate(F.linear(xe, up)), down)
                for xe, up, down in zip(xs.split(kept), w_up.unbind(0), w_down.unbind(0))
            ]
        )

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        x = y.reshape(-1, y.shape[-1])
        N, E, k = x.shape[0], self.n_experts, self.top_k
        logits, probs, weights, experts = self.route(x)

        flat = experts.reshape(-1)  # assignment a = n·k + slot -> its expert
        order = flat.argsort(stable=True)  # grouped by expert, token order inside a group
        counts = torch.bincount(flat, minlength=E)
        n_assigned = counts.tolist()
        cap = self.capacity(N)
        if cap is not None:  # keep the first `cap` of each expert's group
            starts = counts.cumsum(0) - counts
            rank = torch.arange(N * k, device=x.device) - starts.repeat_interleave(counts)
            order = order[rank < cap]
        kept = [c if cap is None else min(c, cap) for c in n_assigned]

        tokens = order // k
        dtype = compute_dtype(x)  # under autocast: cast once, then gather and matmul in the low precision
        xs = x.to(dtype).index_select(0, tokens)
        h = self.experts(xs, kept, self.up.weight.to(dtype), self.down.weight.to(dtype))
        routed = h * weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(h.dtype)
        out = routed.new_zeros(N, x.shape[-1]).index_add_(0, tokens, routed)
        if self.shared is not None:
            out = out + self.shared(x)

        frac = counts.to(probs.dtype) / (N * k)
        self.aux_loss = E * (frac * probs.mean(0)).sum()
        self.z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        mean = N * k / E
        self.stats = {
            "fraction": [c / (N * k) for c in n_assigned],
            "imbalance": max(n_assigned) / mean,
            "dropped": N * k - sum(kept),
        }
        out = out.view(y.shape[:-1] + out.shape[-1:])
        return out if self.multiplier == 1.0 else out * self.multiplier
