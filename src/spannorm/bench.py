"""``spannorm bench``: training-step cost of every scheme, and of Hugging Face ``LlamaForCausalLM``
with identical dimensions, measured side by side on this machine.

Each configuration runs in its own subprocess, so that its peak memory (resident set size above
the process's size before the model was built) is its own. Step = forward + backward + AdamW; the
result is the median of ``reps`` steps after ``warmup`` steps. FLOPs per token are 6·N (N = all
parameters; the tied embedding, counted once, is the head's matmul) + 6·L·T·d (causal attention);
MFU divides the achieved FLOP/s by this machine's matmul peak, measured in the same run.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

STANDARD = dict(d_model=256, n_layers=8, n_heads=4, vocab_size=8192, seq_len=256, batch_size=8)
DEPTHS = (4, 8, 16, 32)


@dataclass
class Case:
    impl: str  # "spannorm", "hf-llama", or "spannorm-moe" / "spannorm-moe-dense" (the MoE comparison)
    scheme: str  # scheme name ("pre" for hf-llama, whose layout is PreNorm)
    depth: int
    dtype: str  # "fp32" or "bf16" (autocast)
    reps: int = 5  # timed steps (the median is reported)
    warmup: int = 2  # untimed steps first


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _build(case: Case):
    s = STANDARD
    if case.impl == "hf-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        from .model import ModelConfig

        ffn = ModelConfig(d_model=s["d_model"], n_heads=s["n_heads"]).ffn_dim
        cfg = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["d_model"], intermediate_size=ffn,
                          num_hidden_layers=case.depth, num_attention_heads=s["n_heads"],
                          num_key_value_heads=s["n_heads"], max_position_embeddings=s["seq_len"],
                          rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False, mlp_bias=False)
        cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(cfg)
        return model, lambda x, y: model(input_ids=x, labels=y).loss
    from .model import ModelConfig, build_model

    model = build_model(ModelConfig(vocab_size=s["vocab_size"], d_model=s["d_model"], n_layers=case.depth,
                                    n_heads=s["n_heads"], scheme=case.scheme, **moe_fields(case.impl)))
    if case.impl == "spannorm-moe":  # the training loss: cross-entropy + the weighted auxiliary terms
        return model, lambda x, y: model(x, y)[1] + model.moe_loss()
    return model, lambda x, y: model(x, y)[1]


def run_case(case: Case) -> dict:
    """Time one configuration in this process (called in a fresh subprocess)."""
    torch.manual_seed(0)
    base = _rss_mb()
    model, loss_fn = _build(case)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    s = STANDARD
    x = torch.randint(0, s["vocab_size"], (s["batch_size"], s["seq_len"]))
    times = []
    for i in range(case.warmup + case.reps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.dtype == "bf16"):
            loss = loss_fn(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= case.warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    tokens = s["batch_size"] * s["seq_len"]
    d, L, T = s["d_model"], case.depth, s["seq_len"]
    flops_per_token = 6 * active_params(model) + 6 * L * T * d
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB -> MB on Linux
    return asdict(case) | {"step_s": step, "tokens_per_s": tokens / step, "flops_per_s": flops_per_token * tokens / step,
                           "peak_mem_mb": peak - base, "n_params": n_params, "n_active_params": active_params(model)}


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Median FLOP/s of an n×n×n matmul on this machine."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def cases(schemes: list[str], depths: list[int], dtypes: list[str], with_hf: bool) -> list[Case]:
    """Every scheme at the standard depth; pre, span and HF Llama over the depth sweep."""
    out = []
    for dtype in dtypes:
        for scheme in schemes:
            out.append(Case("spannorm", scheme, STANDARD["n_layers"], dtype))
        if with_hf:
            out.append(Case("hf-llama", "pre", STANDARD["n_layers"], dtype))
        for depth in depths:
            if depth == STANDARD["n_layers"]:
                continue
            out += [Case("spannorm", s, depth, dtype) for s in ("pre", "span") if s in schemes]
            if with_hf:
                out.append(Case("hf-llama", "pre", depth, dtype))
    return out


def run(all_cases: list[Case], log=print) -> dict:
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    log(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    rows = []
    for case in all_cases:
        res = subprocess.run([sys.executable, "-m", "spannorm.bench", json.dumps(asdict(case))],
                             capture_output=True, text=True)
        if res.returncode != 0:
            from .config import SpannormError

            raise SpannormError(f"bench case {asdict(case)} failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["mfu"] = row["flops_per_s"] / peaks[row["dtype"]]
        log(f"{row['impl']:9s} {row['scheme']:9s} L={row['depth']:<3d} {row['dtype']}: "
            f"{row['tokens_per_s']:9,.0f} tok/s  {row['peak_mem_mb']:7.0f} MB  MFU {row['mfu']:.1%}")
        rows.append(row)
    return {"matmul_peak_flops": peaks, "rows": rows}


def ratios(result: dict) -> list[str]:
    """The headline ratios: span vs pre, pre vs HF Llama, and a linear fit of step time over depth."""
    import numpy as np

    rows = result["rows"]

    def find(impl, scheme, depth, dtype):
        return next((r for r in rows if (r["impl"], r["scheme"], r["depth"], r["dtype"]) == (impl, scheme, depth, dtype)),
                    None)

    lines = []
    for dtype in ("fp32", "bf16"):
        pre, span, hf = (find("spannorm", "pre", 8, dtype), find("spannorm", "span", 8, dtype),
                         find("hf-llama", "pre", 8, dtype))
        if pre and span:
            lines.append(f"{dtype}: span/pre step time {span['step_s'] / pre['step_s']:.3f}x, "
                         f"peak memory {span['peak_mem_mb'] / pre['peak_mem_mb']:.3f}x")
        if pre and hf:
            lines.append(f"{dtype}: spannorm pre / HF Llama tokens/s {pre['tokens_per_s'] / hf['tokens_per_s']:.3f}x")
        for impl, scheme in (("spannorm", "pre"), ("spannorm", "span"), ("hf-llama", "pre")):
            pts = sorted((r["depth"], r["step_s"]) for r in rows if (r["impl"], r["scheme"], r["dtype"]) == (impl, scheme, dtype))
            if len(pts) >= 3:
                x, y = np.array(pts, dtype=float).T
                slope, icpt = np.polyfit(x, y, 1)
                r2 = 1 - ((y - (slope * x + icpt)) ** 2).sum() / ((y - y.mean()) ** 2).sum()
                lines.append(f"{dtype}: {impl} {scheme} step time = {icpt * 1e3:.1f} ms + {slope * 1e3:.2f} ms × L "
                             f"(R² {r2:.4f})")
    return lines


# --- MoE: an 8-expert top-2 model against a dense one with the same active parameters ---------

MOE = dict(n_experts=8, top_k=2)  # expert width: the default, dense ffn_dim / top_k


def moe_fields(impl: str) -> dict:
    """Extra ModelConfig fields of the MoE comparison's two impls ({} for the others)."""
    from .model import ModelConfig

    if impl == "spannorm-moe":
        return dict(MOE)
    if impl == "spannorm-moe-dense":  # dense d_ff = top_k × expert width: the MoE's active FFN
        moe = ModelConfig(d_model=STANDARD["d_model"], n_heads=STANDARD["n_heads"], **MOE)
        return {"d_ff": moe.top_k * moe.expert_dim}
    return {}


def active_params(model) -> int:
    """Parameters one token uses: all, less the routed experts it does not visit (fraction 1 − k/E)."""
    from .moe import MoE

    n = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, MoE):
            n -= round((m.up.weight.numel() + m.down.weight.numel()) * (1 - m.top_k / m.n_experts))
    return n


def moe_cases(dtypes: list[str], rounds: int = 3, scheme: str = "span") -> list[Case]:
    """MoE and its dense equivalent at the standard size, interleaved over ``rounds`` (noise is shared)."""
    return [Case(impl, scheme, STANDARD["n_layers"], dtype) for dtype in dtypes for _ in range(rounds)
            for impl in ("spannorm-moe-dense", "spannorm-moe")]


def moe_ratios(result: dict) -> list[str]:
    """MoE / dense step time per dtype, from the median step time of each impl's rounds."""
    lines = []
    for dtype in ("fp32", "bf16"):
        step = {impl: [r["step_s"] for r in result["rows"] if (r["impl"], r["dtype"]) == (impl, dtype)]
                for impl in ("spannorm-moe", "spannorm-moe-dense")}
        if all(step.values()):
            moe, dense = (statistics.median(step[i]) for i in ("spannorm-moe", "spannorm-moe-dense"))
            lines.append(f"{dtype}: MoE (8 experts, top-2) / dense with the same active parameters: step time "
                         f"{moe / dense:.3f}x ({moe * 1e3:.0f} ms vs {dense * 1e3:.0f} ms, median of "
                         f"{len(step['spannorm-moe'])} rounds)")
    return lines


if __name__ == "__main__":  # one case, in a fresh process
    print(json.dumps(run_case(Case(**json.loads(sys.argv[1])))))
