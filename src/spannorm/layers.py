"""Sublayers shared by every scheme: norms, rotary embedding, causal attention, SwiGLU FFN.

Each weight matrix carries a ``role`` (see :class:`Role`) so that one init function can apply
any scheme's init rule (``schemes.py``) without knowing the module tree.
"""

from __future__ import annotations

import enum
import math

import torch
import torch.nn.functional as F
from torch import nn

from .device import compute_dtype
from .model_config import DyTRecipe, NormType


class Site(str, enum.Enum):
    """Where a norm sits, for the per-site α₀ of the DyT LLM recipe."""

    ATTN = "attn"  # the attention-input norm: the attention reads its output (Block.attn_input)
    OTHER = "other"  # every other norm: FFN input, sublayer outputs, stream, embedding, final, q/k/v


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
    "Transformers without Normalization"); ``bias=False``: γ · tanh(α·x), no β parameter (the
    authors' LLaMA code, jiachenzhu/DyT ``other_tasks/LLaMA/fms_fsdp/models/llama.py``)."""

    def __init__(self, dim: int, alpha0: float, bias: bool = True):
        super().__init__()
        self.alpha0 = alpha0  # a plain float, re-applied by reset_parameters
        self.alpha = nn.Parameter(torch.empty(1))
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.alpha0)
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight * torch.tanh(self.alpha * x)
        return y if self.bias is None else y + self.bias


class Derf(nn.Module):
    """Derf(x) = γ · erf(α·x + s) + β, α and s learnable scalars initialized to α₀ and 0 (Chen et al. 2025,
    "Stronger Normalization-Free Transformers", arXiv 2512.10938; their code, zlab-princeton/Derf at 8dd9ea3
    ``Dynamic_erf``: α₀ 0.5 by default; their GPT-2 patch of nanoGPT, ``language model/model_derf.patch``, sets α₀
    per site, attention input, FFN input and final norm, 1.0 each in its config (its README leaves the values to
    the user), keeps β and scales the embedding by a learnable sqrt(d): here ``model.dyt.recipe=llm``
    with ``alpha0_attn=1`` and ``alpha0_other=1``, β kept)."""

    def __init__(self, dim: int, alpha0: float):
        super().__init__()
        self.alpha0 = alpha0  # a plain float, re-applied by reset_parameters
        self.alpha = nn.Parameter(torch.empty(1))
        self.shift = nn.Parameter(torch.empty(1))
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.alpha0)
        nn.init.zeros_(self.shift)
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, self.weight, torch.erf(self.alpha * x + self.shift))


class _RMSNorm(torch.autograd.Function):
    """y = x · r · γ with r = (mean(x²) + eps)^(-1/2), and its backward written out:
    dγ = Σ g·x̂,  dx = r · (g·γ − x̂ · mean(g·γ·x̂)) with x̂ = x·r. Computed in fp32 (or the input's
    wider dtype); torch's composite rms_norm is several times slower on CPU, above all backward.
    mean(x²) is one ``vector_norm`` and mean(g·γ·x̂) one ``vecdot``: no squared temporaries."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        acc = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
        xf = x.to(acc)
        r = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, r)
        return (xf * r).mul_(weight)

    @staticmethod
    def backward(ctx, g):
        x, weight, r = ctx.saved_tensors
        xhat = x.to(r.dtype) * r
        grad_w = (g * xhat).sum(dim=tuple(range(g.dim() - 1))).to(weight.dtype)
        gy = g * weight
        minus_mean = torch.linalg.vecdot(gy, xhat).unsqueeze(-1).div_(-x.shape[-1])  # −mean(g·γ·x̂)
        grad_x = torch.addcmul(gy, xhat, minus_mean).mul_(r).to(x.dtype)
        return grad_x, grad_w, None


class RMSNorm(nn.RMSNorm):
    """torch's RMSNorm (same parameters and equation) with the faster :class:`_RMSNorm` autograd."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNorm.apply(x, self.weight, self.eps)


class ScaleVector(nn.Module):
    """A learned vector s of nGPT (Loshchilov et al. 2025, section 2.6) in its reparametrization: the parameter θ
    starts at ``scale`` and s = θ · init/scale, so s starts at ``init`` and moves init/scale times as fast as θ
    (one global learning rate suits them all). ``init`` and ``scale`` are plain floats."""

    def __init__(self, dim: int, init: float, scale: float):
        super().__init__()
        self.init, self.scale = init, scale
        self.theta = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.theta, self.scale)

    def forward(self) -> torch.Tensor:
        return self.theta * (self.init / self.scale)


NORMS = (RMSNorm, nn.LayerNorm, DyT, Derf)  # the modules make_norm builds


def make_norm(cfg, dim: int | None = None, site: Site = Site.OTHER) -> nn.Module:
    """N(x) of type ``cfg.norm`` over the last dimension (``dim``, default ``cfg.d_model``).

    ``site`` matters only to DyT and Derf under ``model.dyt.recipe=llm``: α₀ = ``alpha0_attn`` at the
    attention-input site, ``alpha0_other`` elsewhere (DyT without bias); ``plain``: bias, α₀ = ``alpha0``."""
    dim = cfg.d_model if dim is None else dim
    if cfg.norm is NormType.RMS:
        return RMSNorm(dim, eps=cfg.norm_eps)
    if cfg.norm is NormType.LAYER:
        return nn.LayerNorm(dim, eps=cfg.norm_eps)
    if cfg.dyt.recipe is DyTRecipe.PLAIN:
        return (Derf if cfg.norm is NormType.DERF else DyT)(dim, cfg.dyt.alpha0)
    if cfg.norm is NormType.DERF:
        return Derf(dim, cfg.dyt.alpha0_attn if site == Site.ATTN else cfg.dyt.alpha0_other)
    return DyT(dim, cfg.dyt.alpha0_attn if site == Site.ATTN else cfg.dyt.alpha0_other, bias=False)


def rope_cache(
    seq_len: int, head_dim: int, theta: float, device=None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed-sin tables of shape (seq_len, head_dim) in ``dtype``, rotate-half (Llama)
    layout: the sin table's first half is negated, so that rotate_half(x)·sin = roll(x)·sin_signed."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return torch.cat([freqs, freqs], dim=-1).cos().to(dtype), torch.cat([-freqs, freqs], dim=-1).sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate (..., T, hd) queries or keys: x·cos + rotate_half(x)·sin, where
    rotate_half(x) = [−x₂, x₁] = roll(x, hd/2)·sign; one roll and an addcmul, no cat or neg."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


class Attention(nn.Module):
    """Multi-head causal self-attention with RoPE, fused QKV and SDPA; no biases.

    ``qkv_norm``: a norm module factory; if given, each head's q, k and v are normalized
    (HybridNorm) before RoPE. ``qk_norm``: ``head`` or ``all`` (``model.qk_norm``), with ``norm`` its norm
    factory: q and k (not v) are normalized before RoPE, per head over the head size (``q_norm`` and ``k_norm``
    of head size, shared by the heads) or over all heads at once (of size d_model, before the split into heads).

    ``record``: None (the default: no cost), or a list to which each forward appends (q, k) of the
    first sequence, detached, as SDPA gets them (after qkv-norm and RoPE), shape (1, H, T, hd);
    the trainer's probing steps set it to measure attention entropy (``diagnostics.taps``).

    ``kv_cache``: None (the default: training and full-sequence forwards), or a function
    (k, v) -> (K, V) that stores this forward's keys and values (after qkv-norm and RoPE, so the
    rope tables must hold the new tokens' absolute positions) and returns them with the S − T
    cached ones before: shape (B, H, S, hd). Query i (absolute position S − T + i) then attends
    keys j ≤ S − T + i (``hf.py`` sets it for incremental generation).

    ``s_qk``: None, or a :class:`ScaleVector` of size d_model that nGPT's block sets (``schemes.NGPT``): then each
    head's q and k are L2-normalized after RoPE and multiplied by s_qk (per head and dimension), and the softmax
    scale is sqrt(hd) instead of 1/sqrt(hd).
    """

    def __init__(
        self, d_model: int, n_heads: int, qkv_norm=None, qk_norm: str = "none", norm=None, scale: float | None = None
    ):
        super().__init__()
        self.n_heads = n_heads
        self.scale = scale  # the softmax scale; None: SDPA's 1/sqrt(hd) (µP's sqrt(hd_b)/hd: spannorm.parametrization)
        self.multiplier = 1.0  # a factor on the output (CompleteP's branch multiplier)
        if qkv_norm is not None:
            self.q_norm, self.k_norm, self.v_norm = (qkv_norm(d_model // n_heads) for _ in range(3))
        self.qkv_norm = qkv_norm is not None
        self.qk_norm = qk_norm
        if qk_norm != "none":
            assert not self.qkv_norm, "q, k and v are already normalized"
            dim = d_model if qk_norm == "all" else d_model // n_heads
            self.q_norm, self.k_norm = norm(dim), norm(dim)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.qkv.role = (Role.ATTN_QK, Role.ATTN_QK, Role.ATTN_V)  # row blocks q, k, v
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.out.role = Role.ATTN_OUT
        self.record: list | None = None
        self.kv_cache = None
        self.s_qk: ScaleVector | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x)
        if self.qk_norm == "all":
            q, k, v = qkv.split(D, dim=-1)
            qkv = torch.cat((self.q_norm(q), self.k_norm(k), v), dim=-1)
        qkv = qkv.view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
        if self.qkv_norm:
            qkv = torch.stack((self.q_norm(qkv[0]), self.k_norm(qkv[1]), self.v_norm(qkv[2])))
        elif self.qk_norm == "head":
            qkv = torch.stack((self.q_norm(qkv[0]), self.k_norm(qkv[1]), qkv[2]))
        q, k, v = qkv.unbind(0)  # unbind, not slicing: its backward is one stack, not zero-fills and adds
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        scale = self.scale
        if self.s_qk is not None:
            s = self.s_qk().view(self.n_heads, 1, -1)  # (H, 1, hd)
            q, k = F.normalize(q, dim=-1) * s, F.normalize(k, dim=-1) * s
            scale = math.sqrt(D // self.n_heads)
        if self.record is not None:  # (the probe reads q·kᵀ/sqrt(hd) as the logits: an nGPT q is rescaled to give them)
            q_seen = q[:1] if scale is None else q[:1] * (scale * math.sqrt(D // self.n_heads))  # (and a µP q)
            self.record.append((q_seen.detach(), k[:1].detach()))
        if self.kv_cache is None:
            y = attend(q, k, v, is_causal=True, scale=scale)
        else:
            k, v = self.kv_cache(k, v)
            S = k.shape[-2]
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)  # key j ≤ S − T + i
            y = attend(q, k, v, attn_mask=mask, scale=scale)
        y = self.out(y.transpose(1, 2).reshape(B, T, D))
        return y if self.multiplier == 1.0 else y * self.multiplier


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, but in fp32 on the CPU under bf16 autocast for heads under 64 or fewer
    than 256 keys: there torch's bf16 kernel (forward and backward) is slower than its fp32 one, 5.3× at head size
    16 and 128 tokens, the fair study's shape; at head size 64 and 256 keys the two are about even, and bf16 wins
    beyond (``scripts/cpu_matmul.py``, docs/performance.md). The output has autocast's dtype either way."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu") and (q.shape[-1] < 64 or k.shape[-2] < 256):
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw)
        return y.to(torch.get_autocast_dtype("cpu"))
    return F.scaled_dot_product_attention(q, k, v, **kw)


class _SiluGate(torch.autograd.Function):
    """silu(a) ⊙ b for h = [a, b] split on the last dimension, with both gradients written into one
    buffer: da = silu'(a)·g·b, db = silu(a)·g (autograd's chunk would ``cat`` them: one more pass)."""

    @staticmethod
    def forward(ctx, h):
        a, b = h.chunk(2, dim=-1)
        s = F.silu(a)
        ctx.save_for_backward(h, s)
        return s * b

    @staticmethod
    def backward(ctx, g):
        h, s = ctx.saved_tensors
        a, b = h.chunk(2, dim=-1)
        grad = torch.empty_like(h)
        grad_a, grad_b = grad.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(g * b, a, grad_input=grad_a)
        torch.mul(g, s, out=grad_b)
        return grad


def silu_gate(h: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gating: silu(a) ⊙ b of h = [a, b] (the fused gate and up projections). Under torch.compile, the
    composite ops, which inductor fuses: the written-out backward's ``out=`` into a strided half breaks the graph at
    every block (8 graphs instead of 1 for a 2-block model)."""
    if torch.compiler.is_compiling():
        a, b = h.chunk(2, dim=-1)
        return F.silu(a) * b
    return _SiluGate.apply(h)


class SwiGLU(nn.Module):
    """FFN(x) = W_down (silu(W_gate x) ⊙ W_up x), with W_gate and W_up fused in one matmul; with ``s_uv`` (nGPT),
    W_up·x (gate and up rows) is multiplied by it first."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.up.role = Role.FFN_UP
        self.down = nn.Linear(d_ff, d_model, bias=False)
        self.down.role = Role.FFN_DOWN
        self.s_uv: ScaleVector | None = None  # nGPT's block sets it: a learned factor per row of W_up·x
        self.multiplier = 1.0  # a factor on the output (CompleteP's branch multiplier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (s_uv scales W_up's rows: (W·x) ⊙ s = (s ⊙ W)·x, a d_ff × d product instead of a tokens × d_ff one)
        h = self.up(x) if self.s_uv is None else F.linear(x, self.up.weight * self.s_uv()[:, None])
        y = self.down(silu_gate(h))
        return y if self.multiplier == 1.0 else y * self.multiplier


class _LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(x_i·Wᵀ, t_i) without materializing the (N, V) logits.

    Rows are processed in chunks; each chunk's logits live only inside the forward, where the
    gradients are formed at once: dℓ/dlogits = (softmax − onehot)/N, dx = that·W, dW += thatᵀ·x.
    The backward only scales them by the incoming gradient. Matmuls run in ``dtype`` (bf16 under
    autocast), softmax and the accumulated dW in fp32 (or fp64); gradients return in the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, dtype, chunk_rows):
        n = x.shape[0]
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        acc = torch.promote_types(dtype, torch.float32)  # softmax and dW accumulation dtype
        xd, wd = x.to(dtype), weight.to(dtype)
        grad_x = torch.empty_like(x) if need_grad else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_grad else None
        total = torch.zeros((), dtype=acc, device=x.device)
        for start in range(0, n, chunk_rows):
            xc, tc = xd[start : start + chunk_rows], targets[start : start + chunk_rows, None]
            logits = (xc @ wd.t()).to(acc)
            target = logits.gather(1, tc)
            top = logits.amax(-1, keepdim=True)
            # exp(z) for z below about -87 is a denormal, which CPUs compute 10-50x slower; so
            # z = logit - max is floored at -60: probabilities under e^-60 ≈ 9e-27 become e^-60,
            # a change far below fp32 resolution of the loss and of every gradient
            e = logits.sub_(top).clamp_(min=-60.0).exp_()  # in place of the logits
            sum_e = e.sum(-1, keepdim=True)
            total += (top + sum_e.log() - target).sum()
            if need_grad:
                g = e.div_(sum_e * n)  # softmax / N
                g.scatter_add_(1, tc, torch.full_like(sum_e, -1.0 / n))
                g = g.to(dtype)
                grad_x[start : start + chunk_rows] = g @ wd
                grad_w += g.t() @ xc
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_out, (grad_w * grad_out).to(ctx.weight_dtype), None, None, None


# logits per chunk: CPU 8 MB in fp32 (cache-sized); CUDA 256 MB (few kernel launches)
CHUNK_LOGITS = {"cpu": 2**21, "cuda": 2**26}


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of the logits x·Wᵀ against ``targets`` (x: (N, d), W: (V, d)), in chunks
    of ``chunk_rows`` rows (default: about ``CHUNK_LOGITS`` of x's device per chunk): memory
    O(chunk·V) instead of O(N·V), and faster than materializing the logits. Under bf16 autocast
    the matmuls run in bf16, as ``F.linear`` would."""
    per_chunk = CHUNK_LOGITS.get(x.device.type, CHUNK_LOGITS["cpu"])
    chunk_rows = chunk_rows or max(64, per_chunk // weight.shape[0])  # CPU bf16: 256 rows (V=8192) beat 128, 512
    return _LinearCrossEntropy.apply(x, weight, targets, compute_dtype(x), chunk_rows)
