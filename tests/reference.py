"""Direct transcriptions of the equations, written independently of spannorm's modules.

Everything here takes raw weight tensors and uses only elementary tensor operations.
"""

import math

import torch


def rms_norm(x, g, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * g


def layer_norm(x, g, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * g + b


def dyt(x, alpha, g, b=None):
    """γ·tanh(α·x) + β; without β (b None) in the LLM recipe."""
    y = g * torch.tanh(alpha * x)
    return y if b is None else y + b


def derf(x, alpha, s, g, b):
    """γ·erf(α·x + s) + β."""
    return g * torch.erf(alpha * x + s) + b


def norm(x, module, eps):
    """N(x) with the gain (and bias, α, shift) taken from a norm module's parameters."""
    if hasattr(module, "shift"):
        return derf(x, module.alpha, module.shift, module.weight, module.bias)
    if hasattr(module, "alpha"):
        return dyt(x, module.alpha, module.weight, module.bias)
    if getattr(module, "bias", None) is not None:
        return layer_norm(x, module.weight, module.bias, eps)
    return rms_norm(x, module.weight, eps)


def rope(x, theta):
    """Rotate pairs (i, i + hd/2) of x (..., T, hd) by angle pos · theta^(-2i/hd)."""
    T, hd = x.shape[-2], x.shape[-1]
    out = torch.empty_like(x)
    for pos in range(T):
        for i in range(hd // 2):
            ang = pos * theta ** (-2 * i / hd)
            c, s = math.cos(ang), math.sin(ang)
            a, b = x[..., pos, i], x[..., pos, i + hd // 2]
            out[..., pos, i] = a * c - b * s
            out[..., pos, i + hd // 2] = b * c + a * s
    return out


def attention(x, w_qkv, w_out, n_heads, theta, qkv_norms=None, qk_all=None, s_qk=None):
    """Causal multi-head softmax attention with RoPE on queries and keys; optional per-head
    norms on q, k, v (before RoPE; None for one of them: not normalized), or ``qk_all``, two norms on the
    whole q = x·W_qᵀ and k = x·W_kᵀ (all heads at once) before they are split into heads; or ``s_qk`` (nGPT,
    a d-vector): after RoPE each head's q and k divided by their L2 norm and times s_qk's slice of that head,
    scores q·kᵀ·sqrt(hd)."""
    B, T, D = x.shape
    hd = D // n_heads
    wq, wk, wv = w_qkv[:D], w_qkv[D : 2 * D], w_qkv[2 * D :]
    q_all, k_all = x @ wq.T, x @ wk.T
    if qk_all is not None:
        q_all, k_all = qk_all[0](q_all), qk_all[1](k_all)
    heads = []
    for h in range(n_heads):
        sl = slice(h * hd, (h + 1) * hd)
        q, k, v = q_all[..., sl], k_all[..., sl], x @ wv[sl].T
        if qkv_norms is not None:
            q, k, v = (t if nq is None else nq(t) for nq, t in zip(qkv_norms, (q, k, v)))
        q, k = rope(q, theta), rope(k, theta)
        if s_qk is not None:
            q, k = q / q.norm(dim=-1, keepdim=True) * s_qk[sl], k / k.norm(dim=-1, keepdim=True) * s_qk[sl]
        scores = q @ k.transpose(-1, -2) * (math.sqrt(hd) if s_qk is not None else 1 / math.sqrt(hd))
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v)
    return torch.cat(heads, dim=-1) @ w_out.T


def swiglu(x, w_up, w_down):
    d_ff = w_up.shape[0] // 2
    gate, up = x @ w_up[:d_ff].T, x @ w_up[d_ff:].T
    return (gate * torch.sigmoid(gate) * up) @ w_down.T


def sublayers(block, cfg):
    """Attn, FFN and a norm-applier N(name, x) of a block, from its raw weights."""
    qkv = qk_all = None
    a = block.attn
    # model.qk_norm, or the scheme's recipe: OLMo 2 normalizes q and k over all heads
    qk_norm = cfg.qk_norm.value if cfg.qk_norm is not None else ("all" if cfg.scheme.value == "olmo2" else "none")
    if hasattr(a, "v_norm"):  # HybridNorm: q, k and v per head
        qkv = [lambda t, m=m: norm(t, m, cfg.norm_eps) for m in (a.q_norm, a.k_norm, a.v_norm)]
    elif qk_norm == "head":
        qkv = [lambda t, m=m: norm(t, m, cfg.norm_eps) for m in (a.q_norm, a.k_norm)] + [None]
    elif qk_norm == "all":
        qk_all = [lambda t, m=m: norm(t, m, cfg.norm_eps) for m in (a.q_norm, a.k_norm)]

    def A(x):
        return attention(x, a.qkv.weight, a.out.weight, cfg.n_heads, cfg.rope_theta, qkv, qk_all)

    def F(x):
        return swiglu(x, block.ffn.up.weight, block.ffn.down.weight)

    def N(name, x):
        return norm(x, getattr(block, name), cfg.norm_eps)

    return A, F, N


# --- the block equations of SPANNORM.md and PEERS.md; L = cfg.n_layers, i = block index from 0 ---


def pre_block(x, block, cfg, i):
    A, F, N = sublayers(block, cfg)
    h = x + A(N("norm1", x))
    return h + F(N("norm2", h))


def post_block(x, block, cfg, i):
    A, F, N = sublayers(block, cfg)
    h = N("norm1", x + A(x))
    return N("norm2", h + F(h))


def span_block(x, block, cfg, i):
    A, F, N = sublayers(block, cfg)
    s = math.sqrt(cfg.span.c / cfg.n_layers) if cfg.span.scale.value in ("multiplier", "norm") else 1.0
    y = N("norm1", x + A(x))
    f = F(y)
    if cfg.span.scale.value == "norm":  # the branch RMS-normalized, no gain
        f = rms_norm(f, 1.0, cfg.norm_eps)
    return N("norm2", x + s * f)


def deepnorm_block(x, block, cfg, i):
    A, F, N = sublayers(block, cfg)
    alpha = (2 * cfg.n_layers) ** 0.25
    h = N("norm1", alpha * x + A(x))
    return N("norm2", alpha * h + F(h))


def b2t_block(x, block, cfg, i):
    A, F, N = sublayers(block, cfg)
    h = N("norm1", x + A(x))
    return N("norm2", x + h + F(h))


def admin_block(x, block, cfg, i):
    A, F, N = sublayers(block, cfg)
    h = N("norm1", block.omega1 * x + A(x))
    return N("norm2", block.omega2 * h + F(h))


def peri_block(x, block, cfg, i):
    A, F, N = sublayers(block, cfg)
    h = x + N("norm1_out", A(N("norm1", x)))
    return h + N("norm2_out", F(N("norm2", h)))


def mixln_block(x, block, cfg, i):
    return post_block(x, block, cfg, i) if i < math.floor(0.25 * cfg.n_layers) else pre_block(x, block, cfg, i)


def hybrid_block(x, block, cfg, i):
    A, F, N = sublayers(block, cfg)
    h = x + A(x)
    return N("norm", h) + F(N("norm", h))


def hybrid_star_block(x, block, cfg, i):
    if i > 0:
        return hybrid_block(x, block, cfg, i)
    A, F, N = sublayers(block, cfg)
    h = x + A(N("attn_norm", x))
    return h + F(N("norm", h))


def lns_block(x, block, cfg, i):
    A, F, N = sublayers(block, cfg)
    h = x + A(N("norm1", x) / math.sqrt(i + 1))
    return h + F(N("norm2", h) / math.sqrt(i + 1))


def residual_block(state, block, cfg, i):
    A, F, N = sublayers(block, cfg)
    a, d = state
    fa = A(a)
    a, d = N("norm1", a + fa), d + fa
    ff = F(a)
    return N("norm2", a + ff), d + ff


def siamese_block(state, block, cfg, i):
    A, F, N = sublayers(block, cfg)
    x, y = state
    for sub, (post, inp, pre) in ((A, ("post1", "in1", "pre1")), (F, ("post2", "in2", "pre2"))):
        x = N(post, x)
        z = sub(N(inp, x + N(pre, y)))
        x = x + z / math.sqrt(2 * (i + 1))
        y = y + z
    return x, y


def deepscale_block(x, block, cfg, i):
    A, F, N = sublayers(block, cfg)
    beta = math.sqrt(cfg.deepscale_k / cfg.n_layers)
    lam = math.sqrt(1 - beta**2)
    h = lam * x + beta * A(N("norm1", x))
    return lam * h + beta * F(N("norm2", h))


def olmo2_block(x, block, cfg, i):
    """OLMo 2: h = x + N(Attn(x)); x' = h + N(FFN(h)) (q and k normalized inside Attn)."""
    A, F, N = sublayers(block, cfg)
    h = x + N("norm1", A(x))
    return h + N("norm2", F(h))


SINKHORN_ITERS = 20  # mHC's t_max (the paper's hyper-parameters)


def sinkhorn_knopp(logits, iters=SINKHORN_ITERS):
    """exp, then ``iters`` times: each row divided by its sum, then each column."""
    m = torch.exp(logits)
    for _ in range(iters):
        m = m / m.sum(-1, keepdim=True)
        m = m / m.sum(-2, keepdim=True)
    return m


def hyper_connection(x, hc, F, eps):
    """mHC around a sublayer F, on streams x (B, T, n, d): from z = vec(x)/rms(vec(x)) and c = z·φ (columns
    [pre | post | res]), H_pre = σ(α_pre·c_pre + b_pre), H_post = 2σ(α_post·c_post + b_post),
    H_res = SK(α_res·mat(c_res) + b_res); output stream i: Σ_j H_res[i, j]·x_j + H_post[i]·F(Σ_j H_pre[j]·x_j)."""
    B, T, n, d = x.shape
    z = x.reshape(B, T, n * d)
    z = z / torch.sqrt((z * z).mean(-1, keepdim=True) + eps)
    c = z @ hc.phi
    a, b = hc.alpha, hc.bias
    h_pre = torch.sigmoid(a[0] * c[..., :n] + b[:n])
    h_post = 2 * torch.sigmoid(a[1] * c[..., n : 2 * n] + b[n : 2 * n])
    h_res = sinkhorn_knopp((a[2] * c[..., 2 * n :] + b[2 * n :]).reshape(B, T, n, n))
    y = F(sum(h_pre[..., j, None] * x[..., j, :] for j in range(n)))
    out = [sum(h_res[..., i, j, None] * x[..., j, :] for j in range(n)) + h_post[..., i, None] * y for i in range(n)]
    return torch.stack(out, dim=-2)


def mhc_block(x, block, cfg, i):
    """mHC, PreNorm placement: each sublayer inside a hyper-connection, x (B, T, n, d)."""
    A, F, N = sublayers(block, cfg)
    h = hyper_connection(x, block.hc1, lambda u: A(N("norm1", u)), cfg.norm_eps)
    return hyper_connection(h, block.hc2, lambda u: F(N("norm2", u)), cfg.norm_eps)


def sphere(x):
    """nGPT's Norm: x / ‖x‖₂ over the last dimension."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True))


def ngpt_block(x, block, cfg, i):
    """nGPT: h ← Norm(h + α_A(Norm(h_A) − h)), h ← Norm(h + α_M(Norm(h_M) − h)); each learned vector is its raw
    parameter θ times init/scale: α 0.05·sqrt(d), s_qk sqrt(d); s_v and s_u (the halves of the model's s_uv, which
    carries sqrt(d) on both, NVIDIA's form) 1; the paper's FFN: u·s_u, gate v·s_v·sqrt(d)."""
    d, a, f = cfg.d_model, block.attn, block.ffn
    s_qk = a.s_qk.theta * math.sqrt(d)
    h_a = attention(x, a.qkv.weight, a.out.weight, cfg.n_heads, cfg.rope_theta, s_qk=s_qk)
    h = sphere(x + block.alpha_attn.theta * 0.05 * math.sqrt(d) * (sphere(h_a) - x))
    d_ff = f.down.weight.shape[1]
    s_v, s_u = f.s_uv.theta[:d_ff], f.s_uv.theta[d_ff:]
    v = (h @ f.up.weight[:d_ff].T) * s_v * math.sqrt(d)  # the gate
    u = (h @ f.up.weight[d_ff:].T) * s_u
    h_m = (u * v * torch.sigmoid(v)) @ f.down.weight.T
    return sphere(h + block.alpha_ffn.theta * 0.05 * math.sqrt(d) * (sphere(h_m) - h))


BLOCKS = {
    "pre": pre_block,
    "post": post_block,
    "span": span_block,
    "deepnorm": deepnorm_block,
    "b2t": b2t_block,
    "admin": admin_block,
    "peri": peri_block,
    "sandwich": peri_block,
    "mixln": mixln_block,
    "hybrid": hybrid_block,
    "hybrid_star": hybrid_star_block,
    "lns": lns_block,
    "residual": residual_block,
    "siamese": siamese_block,
    "deepscale": deepscale_block,
    "olmo2": olmo2_block,
    "mhc": mhc_block,
    "ngpt": ngpt_block,
}
EMBED_NORM = {"span", "peri"}
FINAL_NORM = {"pre", "peri", "sandwich", "mixln", "hybrid", "hybrid_star", "lns", "deepscale", "olmo2", "mhc"}
TWO_STREAM = {"residual", "siamese"}
MULTI_STREAM = {"mhc"}  # n = cfg.hc_streams streams, (B, T, n, d): n copies of x_0 in, their mean out


def lm_logits(idx, model, cfg):
    """embed → (DyT LLM recipe: × learnable scalar s) → (N_0) → blocks → (two-stream merge) → (final N)
    → (DeepScaleLM: × sqrt(0.3/d)) → head (the embedding if tied, else the model's head weight)."""
    name = cfg.scheme.value
    eps = cfg.norm_eps
    x = model.embed.weight[idx]
    if cfg.norm.value in ("dyt", "derf") and cfg.dyt.recipe.value == "llm":
        x = x * model.embed_scale
    if name in EMBED_NORM:
        x = norm(x, model.embed_norm, eps)
    if name == "ngpt":
        x = sphere(x)
    state = (x, x) if name in TWO_STREAM else x
    if name in MULTI_STREAM:
        state = torch.stack([x] * cfg.hc_streams, dim=-2)
    for i, block in enumerate(model.blocks):
        state = BLOCKS[name](state, block, cfg, i)
    if name == "residual":  # a_L + N(d_L)
        x = state[0] + norm(state[1], model.exit.norm, eps)
    elif name == "siamese":  # N_f(N_a(x) + N_b(y))
        x = norm(
            norm(state[0], model.exit.norm_a, eps) + norm(state[1], model.exit.norm_b, eps), model.exit.norm_f, eps
        )
    elif name in MULTI_STREAM:
        x = state.mean(-2)
    else:
        x = state
    if name in FINAL_NORM:
        x = norm(x, model.final_norm, eps)
    if name == "deepscale":
        x = x * math.sqrt(0.3 / cfg.d_model)
    head = model.embed.weight if model.head is None else model.head.weight
    if name == "ngpt":  # s_z per token: θ·sqrt(d)
        return (x @ head.T) * model.logit_scale.theta * math.sqrt(cfg.d_model)
    return x @ head.T
