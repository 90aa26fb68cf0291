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
Closed-form predictions at init (``theory``) sit beside the measurements.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections import defaultdict

import torch
import torch.nn.functional as F

from .layers import NORMS, Role, rope_cache
from .model import LM
from .model_config import Scheme
from .schemes import Streams


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


def _entry(model: LM, idx: torch.Tensor) -> torch.Tensor:
    return model.embed_norm(model.embed(idx))


def _stack(model: LM, x: torch.Tensor, rope) -> torch.Tensor:
    """The first block's input -> the last block's output (merged for two-stream schemes)."""
    state = model.blocks[0].enter(x)
    for block in model.blocks:
        state = block(state, rope)
    return model.exit(state)


def skip_gains(model: LM, idx: torch.Tensor, eps: float = 1e-6, seed: int = 0) -> tuple[float, float]:
    """(skip-path gain, full end-to-end gain) of a tangent perturbation v of the first block's input,
    both as rms(J·v)/rms(v) in float64.

    Skip path: every branch output is replayed (held fixed), so no attention is left in the graph and
    J·v is exact, by double backward (gains down to 1e-300 are resolved). Full path: central finite
    differences, since torch 2.13 has neither forward-mode AD nor double backward through CPU SDPA.
    """
    m = copy.deepcopy(model).double().eval()
    rope = tuple(t.double() for t in rope_cache(idx.shape[1], m.cfg.d_model // m.cfg.n_heads, m.cfg.rope_theta))
    with torch.no_grad():
        x = _entry(m, idx)
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    unit = x / x.norm(dim=-1, keepdim=True)
    v = v - (v * unit).sum(-1, keepdim=True) * unit  # tangent to the stream, token by token

    with torch.no_grad():
        plus, minus = _stack(m, x + eps * v, rope), _stack(m, x - eps * v, rope)
    full = _rms(plus - minus) / (2 * eps * _rms(v))
    with frozen_branches(m):
        with torch.no_grad():
            _stack(m, x, rope)  # record the unperturbed branch outputs
        xg = x.clone().requires_grad_()
        out = _stack(m, xg, rope)
        u = torch.zeros_like(out, requires_grad=True)
        (vjp,) = torch.autograd.grad(out, xg, grad_outputs=u, create_graph=True)  # Jᵀu, linear in u
        (jv,) = torch.autograd.grad(vjp, u, grad_outputs=v)  # d(Jᵀu·v)/du = J·v
    return _rms(jv) / _rms(v), full


def grad_norms(model: LM) -> list[dict[str, float]]:
    """Per block: gradient norm of attn, ffn and the other (norm/scheme) parameters, and the total."""
    rows = []
    for block in model.blocks:
        groups: dict[str, list[torch.Tensor]] = {"attn": [], "ffn": [], "other": []}
        for name, p in block.named_parameters():
            if p.grad is not None:
                groups[name.split(".")[0] if name.split(".")[0] in ("attn", "ffn") else "other"].append(p.grad)
        row = {k: math.sqrt(sum(g.double().pow(2).sum().item() for g in v)) for k, v in groups.items()}
        row["total"] = math.sqrt(sum(x * x for x in row.values()))
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
    head_in = rec["head_in"][-1]
    return {
        "attn_rms": [_rms(a) for a in rec["attn"]],
        "ffn_rms": [_rms(f) for f in rec["ffn"]],
        "attn_entropy": [attention_entropy(q, k) for q, k in rec["qk"]],
        "attn_entropy_max": uniform_causal_entropy(head_in.shape[1]),
        "head_in_rms": _rms(head_in),
        "logit_rms": _rms(F.linear(head_in[:1].float() * model.head_scale, model.head_weight.float())),
        "embed_rms": _rms(model.embed.weight),
        "embed_cos": mean_pairwise_cosine(model.embed.weight),
    }


def snapshot(model: LM) -> dict[str, torch.Tensor]:
    """A copy of every parameter by name: the weights before an optimizer step, for :func:`update_ratios`."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


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
            after, old = module.weight.detach().chunk(len(roles)), before[f"{name}.weight"].chunk(len(roles))
            for r, a, b in zip(roles, after, old):
                groups[Role(r).value].append((a, b))
        if isinstance(module, NORMS):
            groups["norm"] += [(p.detach(), before[f"{name}.{n}"]) for n, p in module.named_parameters()]
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
    out["embed"] = _ratio([(model.embed.weight.detach(), before["embed.weight"])])
    if model.head is not None:
        out["head"] = _ratio([(model.head.weight.detach(), before["head.weight"])])
    return out


def adjacent_cosine(streams: list[torch.Tensor]) -> list[float]:
    """Mean per-token cosine similarity between consecutive blocks' outputs."""
    return [
        torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()
        for a, b in zip(streams, streams[1:])
    ]


def theory(model: LM, stream_rms0: float, attn_rms: list[float], ffn_rms: list[float], stream_rms: list[float]) -> dict:
    """Closed-form predictions at init (unit norm gains) from the measured branch scales.

    Branches are taken as uncorrelated with the stream, so a sum z = α·x + F has
    rms(z)² = α²·rms(x)² + rms(F)², and a norm N(z) passes a tangent perturbation with gain
    1/rms(z), so an α-weighted skip passes α/rms(z); with rms(x) = 1 that is (1 + σ²/α²)^(-1/2),
    σ² = Var(F)/Var(x) (SPANNORM.md).
      pre:      Var(x_{l+1}) = Var(x_l) + Var(a_l) + Var(f_l); skip gain 1.
      post:     stream RMS 1; skip gain ∏ over the 2L sums of 1/rms(z) (α = 1).
      deepnorm: as post with α = (2L)^(1/4): each sum passes α/rms(α·x + F).
      span:     stream RMS 1; skip gain ∏_l 1/rms(x_l + s·f_l) = ∏_l (1 + σ_l²)^(-1/2) (f_l/rms(f_l) under
                span_scale=norm).
    Other schemes: None (no closed form here yet).
    """
    scheme = model.cfg.scheme
    ins = [stream_rms0] + stream_rms[:-1]  # each block's input RMS
    if scheme is Scheme.PRE:
        var, pred = stream_rms0**2, []
        for a, f in zip(attn_rms, ffn_rms):
            var += a * a + f * f
            pred.append(math.sqrt(var))
        return {"stream_rms": pred, "skip_gain": 1.0}
    if scheme is Scheme.SPAN:
        gain = 1.0
        for block, f, x in zip(model.blocks, ffn_rms, ins):
            gain /= math.sqrt(x * x + block.entering_rms(f) ** 2)
        return {"stream_rms": [1.0] * len(stream_rms), "skip_gain": gain}
    if scheme in (Scheme.POST, Scheme.DEEPNORM):
        alpha = model.blocks[0].alpha if scheme is Scheme.DEEPNORM else 1.0
        gain = 1.0
        for a, f, x in zip(attn_rms, ffn_rms, ins):  # attention sum: input x; FFN sum: input h, RMS 1
            gain *= alpha / math.sqrt((alpha * x) ** 2 + a * a) * alpha / math.sqrt(alpha**2 + f * f)
        return {"stream_rms": [1.0] * len(stream_rms), "skip_gain": gain}
    return {"stream_rms": None, "skip_gain": None}


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
        stream0 = _rms(_entry(model, idx))
    skip, full = skip_gains(model, idx)
    th = theory(model, stream0, attn, ffn, stream)
    totals = [g["total"] for g in grads]
    return {
        "scheme": model.cfg.scheme.value,
        "depth": model.cfg.n_layers,
        "loss": loss.item(),
        "stream_rms": stream,
        "stream_rms_theory": th["stream_rms"],
        "presum_rms": [dict(p) for p in rec["presum"]],
        "branch_rms": {"attn": attn, "ffn": ffn},
        "grad_norm": totals,
        "grad_norm_groups": grads,
        "grad_ratio_first_last": totals[0] / totals[-1] if totals[-1] > 0 else math.inf,
        "skip_gain_measured": skip,
        "skip_gain_theory": th["skip_gain"],
        "full_gain_measured": full,
        "adjacent_cosine": (cos := adjacent_cosine(rec["stream"])),
        "adjacent_angle": [math.acos(max(-1.0, min(1.0, c))) / math.pi for c in cos],
        "moe": moe,
    }


@torch.no_grad()
def layer_drop(model: LM, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """Validation-loss increase when each block in turn is replaced by the identity."""

    def loss() -> float:
        return sum(model(x, y)[1].item() for x, y in batches) / len(batches)

    model.eval()
    base = loss()
    out = []
    for block in model.blocks:
        h = block.register_forward_hook(lambda m, args, o: args[0])
        out.append(loss() - base)
        h.remove()
    return out


# --- the probe job -------------------------------------------------------------------------


def load_checkpoint_model(run_dir) -> tuple[LM, object]:
    """The model of a run directory, with the weights of its newest checkpoint that verifies against its
    sha256 manifest (as a resume would load), and its RunConfig."""
    from pathlib import Path

    from safetensors.torch import load_model

    from .config import SpannormError
    from .model import build_model
    from .train import find_checkpoint, load_run

    run_dir = Path(run_dir)
    cfg = load_run(run_dir, "--checkpoint")
    ckpt = find_checkpoint(run_dir)
    if ckpt is None:
        raise SpannormError(f"--checkpoint {str(run_dir)!r} has no checkpoint yet (no checkpoints/step-N)")
    model = build_model(cfg.model)
    try:
        load_model(model, str(ckpt / "model.safetensors"))
    except Exception as e:
        raise SpannormError(
            f"--checkpoint {str(run_dir)!r}: cannot load its weights: {str(e).splitlines()[0]}"
        ) from None
    if not all(p.isfinite().all() for p in model.parameters()):
        raise SpannormError(f"--checkpoint {str(run_dir)!r}: {ckpt.name} holds non-finite weights")
    return model, cfg


def run_probe(
    cfg, schemes: list[Scheme], depths: list[int], batch_size: int, checkpoint=None, device: str | None = None
) -> list[dict]:
    """Probe fresh models (every scheme × depth, built from ``cfg`` with seed cfg.train.seed) or one
    checkpoint; the batch is the first validation batch of the run's data. ``device``: a device
    setting (auto, cpu, cuda, cuda:N); default the config's ``train.device``."""
    import dataclasses

    from .data import TokenData, prepare
    from .device import resolve, to_device
    from .model import build_model

    if checkpoint is not None:
        model, cfg = load_checkpoint_model(checkpoint)
    # a bad device setting or a missing GPU is said before any model is built
    device = resolve(device or cfg.train.device, "--device" if device else "train.device")
    if checkpoint is not None:
        models = [model]
    else:
        models = []
        for scheme in schemes:
            for depth in depths:
                torch.manual_seed(cfg.train.seed)
                models.append(build_model(dataclasses.replace(cfg.model, scheme=scheme, n_layers=depth)))
    data = TokenData(prepare(cfg.data), cfg.train.seq_len)
    batches = [to_device(b, device) for b in data.val_batches(batch_size, cfg.train.eval_batches)]
    runs = []
    for model in models:
        model.to(device)
        row = probe(model, *batches[0])
        if checkpoint is not None:
            row["layer_drop"] = layer_drop(model, batches)
            # the closed forms assume unit norm gains, true only at init
            row["stream_rms_theory"] = row["skip_gain_theory"] = None
        runs.append(row)
    return runs


def probe_table(runs: list[dict]) -> str:
    """A Markdown table of the headline numbers of each probed model."""

    def g(x) -> str:
        return "—" if x is None else f"{x:.4g}"

    lines = [
        "| scheme | L | final stream RMS | stream RMS theory | grad ratio first/last | skip gain | "
        "skip gain theory | full gain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        theory_rms = r["stream_rms_theory"][-1] if r["stream_rms_theory"] else None
        lines.append(
            f"| {r['scheme']} | {r['depth']} | {g(r['stream_rms'][-1])} | {g(theory_rms)} | "
            f"{g(r['grad_ratio_first_last'])} | {g(r['skip_gain_measured'])} | {g(r['skip_gain_theory'])} | "
            f"{g(r['full_gain_measured'])} |"
        )
    return "\n".join(lines)


def plot_probe(runs: list[dict], out) -> None:
    """Per-layer curves: stream RMS (theory dashed), gradient norm, adjacent-block cosine."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import atomic_write_bytes

    panels = [
        ("stream_rms", "residual stream RMS (dashed: theory)", True),
        ("grad_norm", "gradient norm per block", True),
        ("adjacent_cosine", "cosine(block l, block l+1)", False),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4))
    for ax, (key, title, log) in zip(axes, panels):
        for run in runs:
            (line,) = ax.plot(range(1, len(run[key]) + 1), run[key], label=f"{run['scheme']} L={run['depth']}")
            if key == "stream_rms" and run.get("stream_rms_theory"):
                ax.plot(range(1, len(run[key]) + 1), run["stream_rms_theory"], "--", color=line.get_color())
        ax.set_title(title)
        ax.set_xlabel("block")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())


def read_diagnostics(run_dir) -> list[dict]:
    """The rows the trainer logged to diagnostics.jsonl (see the module docstring of ``train``)."""
    from pathlib import Path

    from .files import read_jsonl

    return read_jsonl(Path(run_dir) / "diagnostics.jsonl")


def plot_heatmaps(rows: list[dict], out) -> None:
    """Layer × training-step heatmaps of log10 gradient norm and stream RMS."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .files import atomic_write_bytes

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key in zip(axes, ("grad_norm", "stream_rms")):
        grid = np.log10(np.maximum(np.array([r[key] for r in rows], dtype=float).T, 1e-30))
        im = ax.imshow(grid, aspect="auto", origin="lower", extent=(steps[0], steps[-1], 0.5, grid.shape[0] + 0.5))
        ax.set_title(f"log10 {key}")
        ax.set_xlabel("step")
        ax.set_ylabel("block")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
