"""Signal propagation, measured and predicted.

Everything reads the model through ``torch`` forward hooks (taps); nothing patches a forward:
  * per block: RMS of the residual stream (block output), of every norm's input (the
    pre-normalization sums) and of every branch output (Attn, FFN);
  * per block: gradient norms of the parameter groups (attn, ffn, norms/other) for a real batch;
  * skip-path gain: how much a small perturbation of the first block's input, tangent to the
    stream, reaches the last block's output when every branch output is held at its value
    (replayed by a hook), and the same through the full network; central finite differences
    in float64 (forward-mode AD through CPU SDPA is not implemented in torch 2.13);
  * cosine similarity and angular distance between adjacent blocks' outputs;
  * layer-drop sensitivity: the validation-loss increase when one block is the identity;
  * MoE models: per layer, the fraction of assignments per expert, max/mean load and dropped
    assignments (what each MoE module records on its forward; None for a dense model);
  * per training step (the trainer's diagnostics.jsonl): branch RMS, attention entropy, logit,
    head-input and embedding scales (``forward_stats``) and Adam update-to-weight ratios per weight
    role (``snapshot`` before the optimizer step, ``update_ratios`` after).
Closed-form predictions at init (each scheme's ``theory``, ``schemes.py``) sit beside the measurements.
The model is run through its own steps (``LM.embed_tokens``, ``LM.trunk``), so the probe measures the
model's path. This module measures; ``probe_command`` builds the models, runs the probe and reports.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from .layers import NORMS, Role
from .model import LM
from .schemes import SCHEMES, Streams


def _rms(t: torch.Tensor) -> float:
    return t.detach().double().pow(2).mean().sqrt().item()


def _stream(state) -> torch.Tensor:
    """The tensor that stands for a block's output (the post-like stream of two-stream schemes)."""
    return state.post if isinstance(state, Streams) else state


@contextlib.contextmanager
def taps(model: LM):
    """Record per-block stream, pre-norm sums and branch outputs of the next forward pass, the (q, k)
    of each block's attention for the first sequence (``Attention.record``) and the head input."""
    rec = {"stream": [], "presum": [[] for _ in model.blocks], "attn": [], "ffn": [], "qk": [], "head_in": []}
    hooks = [model.final_norm.register_forward_hook(lambda m, a, out: rec["head_in"].append(out.detach()))]
    for i, block in enumerate(model.blocks):
        block.attn.record = rec["qk"]
        hooks.append(block.register_forward_hook(lambda m, a, out: rec["stream"].append(_stream(out).detach())))
        hooks.append(block.attn.register_forward_hook(lambda m, a, out: rec["attn"].append(out.detach())))
        hooks.append(block.ffn.register_forward_hook(lambda m, a, out: rec["ffn"].append(out.detach())))
        for name, module in block.named_children():
            if isinstance(module, NORMS):
                hooks.append(
                    module.register_forward_pre_hook(
                        lambda m, a, i=i, name=name: rec["presum"][i].append((name, _rms(a[0])))
                    )
                )
    try:
        yield rec
    finally:
        for h in hooks:
            h.remove()
        for block in model.blocks:
            block.attn.record = None


@contextlib.contextmanager
def frozen_branches(model: LM):
    """First forward pass records every Attn/FFN output; later passes replay them (branches held fixed)."""
    store: dict[int, torch.Tensor] = {}

    def hook(module, args, out):
        key = id(module)
        if key not in store:
            store[key] = out.detach()
            return None
        return store[key]

    hooks = [m.register_forward_hook(hook) for b in model.blocks for m in (b.attn, b.ffn)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def skip_gains(model: LM, idx: torch.Tensor, eps: float = 1e-6, seed: int = 0) -> tuple[float, float]:
    """(skip-path gain, full end-to-end gain) of a tangent perturbation v of the first block's input,
    both as rms(J·v)/rms(v) in float64.

    Skip path: every branch output is replayed (held fixed), so no attention is left in the graph and
    J·v is exact, by double backward (gains down to 1e-300 are resolved). Full path: central finite
    differences, since torch 2.13 has neither forward-mode AD nor double backward through CPU SDPA.
    """
    m = copy.deepcopy(model).double().eval()
    rope = m.rope(idx.shape[1], idx.device)
    with torch.no_grad():
        x = m.embed_tokens(idx)
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.device)  # drawn on the CPU: any device
    unit = x / x.norm(dim=-1, keepdim=True)
    v = v - (v * unit).sum(-1, keepdim=True) * unit  # tangent to the stream, token by token

    with torch.no_grad():
        plus, minus = m.trunk(x + eps * v, rope), m.trunk(x - eps * v, rope)
    full = _rms(plus - minus) / (2 * eps * _rms(v))
    with frozen_branches(m):
        with torch.no_grad():
            m.trunk(x, rope)  # record the unperturbed branch outputs
        xg = x.clone().requires_grad_()
        out = m.trunk(xg, rope)
        u = torch.zeros_like(out, requires_grad=True)
        (vjp,) = torch.autograd.grad(out, xg, grad_outputs=u, create_graph=True)  # Jᵀu, linear in u
        (jv,) = torch.autograd.grad(vjp, u, grad_outputs=v)  # d(Jᵀu·v)/du = J·v
    return _rms(jv) / _rms(v), full


def whole(t):
    """A tensor whole: a DTensor (a weight or gradient sharded over the ranks, FSDP2) gathered, on every rank
    (every rank must call it, in the same order); any other value as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def grad_norms(model: LM) -> list[dict[str, float]]:
    """Per block: gradient norm of attn, ffn and the other (norm/scheme) parameters, and the total."""
    rows = []
    for block in model.blocks:
        grads: dict[str, list[torch.Tensor]] = {"attn": [], "ffn": [], "other": []}
        for name, p in block.named_parameters():
            if p.grad is not None:
                module = name.split(".")[0]
                grads[module if module in ("attn", "ffn") else "other"].append(whole(p.grad))
        row = {group: math.sqrt(sum(g.double().pow(2).sum().item() for g in gs)) for group, gs in grads.items()}
        row["total"] = math.sqrt(sum(norm * norm for norm in row.values()))
        rows.append(row)
    return rows


# --- per-step training diagnostics ---------------------------------------------------------


@torch.no_grad()
def attention_entropy(q: torch.Tensor, k: torch.Tensor) -> float:
    """Mean over heads, batch and positions of the Shannon entropy (nats) of the causal attention
    distribution softmax(q·kᵀ/sqrt(hd) + mask), in fp32; q, k: (B, H, T, hd) as SDPA gets them."""
    q, k = q.float(), k.float()
    T = q.shape[-2]
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    logp = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(future, -math.inf).log_softmax(-1)
    return -(logp.exp() * logp.masked_fill(future, 0.0)).sum(-1).mean().item()


def uniform_causal_entropy(seq_len: int) -> float:
    """The entropy of uniform causal attention, mean over positions t of ln(t + 1): the maximum."""
    return sum(math.log(t + 1) for t in range(seq_len)) / seq_len


@torch.no_grad()
def mean_pairwise_cosine(rows: torch.Tensor) -> float:
    """Mean cosine over the pairs i ≠ j of rows (1: all rows point the same way; a collapse indicator
    for embeddings). Exact and O(n·d) with u the unit rows: Σ_{i≠j} u_i·u_j = ‖Σ u_i‖² − Σ ‖u_i‖²."""
    u = F.normalize(rows.detach().double(), dim=-1)
    n = u.shape[0]
    return ((u.sum(0).pow(2).sum() - u.pow(2).sum()) / (n * (n - 1))).item()


@torch.no_grad()
def forward_stats(model: LM, rec: dict) -> dict:
    """Per-step numbers from a forward recorded by :func:`taps`:
    attn_rms, ffn_rms: per block, RMS of the raw branch module outputs (SpanNorm's s is not applied);
    attn_entropy: per block, mean causal attention entropy (nats) on the first sequence;
    attn_entropy_max: the uniform-causal entropy for this sequence length (the upper bound);
    head_in_rms: RMS of the final hidden state (the final norm's output, before a scheme's head_scale);
    logit_rms: RMS of the LM logits of the first sequence (head_scale applied, as in the forward);
    embed_rms: RMS of the embedding weight;
    embed_cos: mean pairwise cosine between the token embedding rows (all rows)."""
    head_in, embed = rec["head_in"][-1], whole(model.embed.weight)
    return {
        "attn_rms": [_rms(a) for a in rec["attn"]],
        "ffn_rms": [_rms(f) for f in rec["ffn"]],
        "attn_entropy": [attention_entropy(q, k) for q, k in rec["qk"]],
        "attn_entropy_max": uniform_causal_entropy(head_in.shape[1]),
        "head_in_rms": _rms(head_in),
        "logit_rms": _rms(F.linear(head_in[:1].float() * whole(model.head_scale), whole(model.head_weight).float())),
        "embed_rms": _rms(embed),
        "embed_cos": mean_pairwise_cosine(embed),
    }


def snapshot(model: LM) -> dict[str, torch.Tensor]:
    """A copy of every parameter by name: the weights before an optimizer step, for :func:`update_ratios`."""
    return {name: whole(p.detach()).clone() for name, p in model.named_parameters()}


def _ratio(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float | None:
    """‖after − before‖ / ‖before‖ (Frobenius, over all (after, before) pairs together); None if
    there are none or the weights before were all zero."""
    norm = math.sqrt(sum(b.double().pow(2).sum().item() for _, b in pairs))
    if norm == 0:
        return None
    return math.sqrt(sum((a.double() - b.double()).pow(2).sum().item() for a, b in pairs)) / norm


def _role_pairs(root: torch.nn.Module, prefix: str, before: dict) -> dict[str, list]:
    """(after, before) tensors under ``root`` by role value: fused weights split into their row
    blocks (as ``model.init_roles`` does), and every parameter of norm modules under "norm"."""
    groups = defaultdict(list)
    for name, module in root.named_modules(prefix=prefix):
        role = getattr(module, "role", None)
        if role is not None:
            roles = role if isinstance(role, tuple) else (role,)
            after, old = whole(module.weight.detach()).chunk(len(roles)), before[f"{name}.weight"].chunk(len(roles))
            for r, a, b in zip(roles, after, old):
                groups[Role(r).value].append((a, b))
        if isinstance(module, NORMS):
            groups["norm"] += [(whole(p.detach()), before[f"{name}.{n}"]) for n, p in module.named_parameters()]
    return groups


def update_ratios(model: LM, before: dict[str, torch.Tensor]) -> dict:
    """The update-to-weight ratio ‖W_after − W_before‖ / ‖W_before‖ of one optimizer step, ``before``
    from :func:`snapshot`: per block (a list) for each weight role the blocks have (attn.qk, attn.v,
    attn.out, ffn.up, ffn.down, router) and "norm" (all norm-module parameters of the block together;
    scheme parameters such as Admin's ω are not included); one number for "embed" and, if untied, "head".
    A block without the role, or whose weights were all zero, gives None."""
    blocks = [_role_pairs(block, f"blocks.{i}", before) for i, block in enumerate(model.blocks)]
    keys = [r.value for r in Role if r not in (Role.EMBED, Role.HEAD)] + ["norm"]
    out = {k: [_ratio(g[k]) if k in g else None for g in blocks] for k in keys if any(k in g for g in blocks)}
    out["embed"] = _ratio([(whole(model.embed.weight.detach()), before["embed.weight"])])
    if model.head is not None:
        out["head"] = _ratio([(whole(model.head.weight.detach()), before["head.weight"])])
    return out


def adjacent_cosine(streams: list[torch.Tensor]) -> list[float]:
    """Mean per-token cosine similarity between consecutive blocks' outputs."""
    return [
        torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()
        for a, b in zip(streams, streams[1:])
    ]


def probe(model: LM, idx: torch.Tensor, targets: torch.Tensor) -> dict:
    """All init-time/checkpoint measurements for one batch (the model's grads are cleared after)."""
    model.zero_grad(set_to_none=True)
    with taps(model) as rec:
        _, loss = model(idx, targets)
    moe = model.moe_stats()  # per-layer expert load of this batch (None for a dense model)
    loss.backward()
    grads = grad_norms(model)
    model.zero_grad(set_to_none=True)
    stream = [_rms(s) for s in rec["stream"]]
    attn = [_rms(a) for a in rec["attn"]]
    ffn = [_rms(f) for f in rec["ffn"]]
    with torch.no_grad():
        stream0 = _rms(model.embed_tokens(idx))
    skip, full = skip_gains(model, idx)
    predicted = SCHEMES[model.cfg.scheme].theory(model.blocks, stream0, attn, ffn, stream)  # None: no closed form
    totals = [g["total"] for g in grads]
    return {
        "scheme": model.cfg.scheme.value,
        "depth": model.cfg.n_layers,
        "loss": loss.item(),
        "stream_rms": stream,
        "stream_rms_theory": predicted.stream_rms if predicted else None,
        "presum_rms": [dict(p) for p in rec["presum"]],
        "branch_rms": {"attn": attn, "ffn": ffn},
        "grad_norm": totals,
        "grad_norm_groups": grads,
        "grad_ratio_first_last": totals[0] / totals[-1] if totals[-1] > 0 else math.inf,
        "skip_gain_measured": skip,
        "skip_gain_theory": predicted.skip_gain if predicted else None,
        "full_gain_measured": full,
        "adjacent_cosine": (cos := adjacent_cosine(rec["stream"])),
        "adjacent_angle": [math.acos(max(-1.0, min(1.0, c))) / math.pi for c in cos],
        "moe": moe,
    }


@torch.no_grad()
def layer_drop(model: LM, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """Validation-loss increase when each block in turn is replaced by the identity.

    Each batch's states between the blocks are computed once: without block l, the state entering it goes
    straight to block l + 1, so only the blocks after l run again (L²/2 blocks instead of L² for L + 1 full
    forwards; the same operations on the same tensors, so the same numbers)."""

    def loss(state, targets) -> float:
        return model.head_loss(model.final(model.exit(state)), targets).item()

    model.eval()
    base, dropped = 0.0, [0.0] * len(model.blocks)
    for x, y in batches:
        rope = model.rope(x.shape[1], x.device)
        states = [model.blocks[0].enter(model.embed_tokens(x))]  # states[i]: what block i reads
        for block in model.blocks:
            states.append(block(states[-1], rope))
        base += loss(states[-1], y)
        for i in range(len(model.blocks)):
            state = states[i]  # without block i: its input goes on to block i + 1
            for block in model.blocks[i + 1 :]:
                state = block(state, rope)
            dropped[i] += loss(state, y)
    return [d / len(batches) - base / len(batches) for d in dropped]
