"""``spannorm bench``: training-step cost of every scheme, and of Hugging Face ``LlamaForCausalLM``
with identical dimensions, measured side by side on this machine.

Shared machines are noisy, so times are compared only within one process: all models of one
(depth, dtype, compile) group are built in the same subprocess and their steps are interleaved
round-robin, ``reps`` rounds after ``warmup`` rounds; each model's step time is its median. Peak
memory (resident set size above the process's size before the model was built) needs a process
per model: each case gets a short one. Step = forward + backward + AdamW (fused, the same for
every implementation). FLOPs per token are 6·N (N = all parameters; a tied embedding, counted
once, is the head's matmul; an untied one is a lookup, not counted) + 6·L·T·d (causal
attention); MFU divides the achieved FLOP/s by this machine's matmul peak, measured in the same run.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from .config import SpannormError
from .device import resolve, set_tf32, synchronize
from .model import build_model
from .model_config import ModelConfig
from .moe import MoE
from .output import md_table, num

STANDARD = dict(d_model=256, n_layers=8, n_heads=4, vocab_size=8192, seq_len=256, batch_size=8)
DEPTHS = (4, 8, 16, 32)
# on a GPU: a ~270M-parameter Llama (SwiGLU width 2816 from d_model), 8 × 1024 tokens per step
GPU_STANDARD = dict(d_model=1024, n_layers=16, n_heads=16, vocab_size=32768, seq_len=1024, batch_size=8)
GPU_DEPTHS = (16,)


@dataclass(frozen=True)
class Case:
    impl: str  # "spannorm", "hf-llama", or "spannorm-moe" / "spannorm-moe-dense" (the MoE comparison)
    scheme: str  # scheme name ("pre" for hf-llama, whose layout is PreNorm)
    depth: int
    dtype: str  # "fp32" or "bf16" (autocast)
    compile: bool = False  # torch.compile the model
    group: str = "main"  # cases of one (group, depth, dtype) are timed together, interleaved
    device: str = "cpu"  # cpu (the CPU standard size) or cuda / cuda:N (the GPU standard size)
    tf32: bool = False  # CUDA: fp32 matmuls in TF32


def size(case: Case) -> dict:
    """The standard dimensions of the case's device."""
    return STANDARD if case.device == "cpu" else GPU_STANDARD


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hf_llama(s: dict, depth: int):
    """Hugging Face's LlamaForCausalLM of our standard size ``s`` (the reference every scheme is timed against)."""
    from transformers import LlamaConfig, LlamaForCausalLM  # (here: only the reference needs transformers)

    cfg = LlamaConfig(
        vocab_size=s["vocab_size"],
        hidden_size=s["d_model"],
        intermediate_size=ModelConfig(d_model=s["d_model"], n_heads=s["n_heads"]).ffn_dim,
        num_hidden_layers=depth,
        num_attention_heads=s["n_heads"],
        num_key_value_heads=s["n_heads"],
        max_position_embeddings=s["seq_len"],
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
    )
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def _build(case: Case):
    """The model, a step function (forward + backward + AdamW; it waits for the device) and the
    training forward alone (returns the loss), on a fixed batch."""
    s, device = size(case), resolve(case.device, "--device")
    if device.type == "cuda":
        set_tf32(case.tf32)
    if case.impl == "hf-llama":
        model = _hf_llama(s, case.depth).to(device)
        forward = torch.compile(model) if case.compile else model

        def loss_fn(x, y):
            return forward(input_ids=x, labels=y).loss
    else:
        model = build_model(
            ModelConfig(
                vocab_size=s["vocab_size"],
                d_model=s["d_model"],
                n_layers=case.depth,
                n_heads=s["n_heads"],
                scheme=case.scheme,
                **moe_fields(case.impl, s["d_model"], s["n_heads"]),
            )
        ).to(device)
        forward = torch.compile(model) if case.compile else model

        def loss_fn(x, y):  # the training loss: cross-entropy (+ the weighted MoE auxiliary terms)
            return forward(x, y)[1] + model.moe_loss()

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(
        0, s["vocab_size"], (s["batch_size"], s["seq_len"]), generator=torch.Generator().manual_seed(0)
    ).to(device)

    def forward_loss():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.dtype == "bf16"):
            return loss_fn(x, x)

    # the trainer's step: nGPT's matrices back on the unit sphere after AdamW (nothing for the other schemes)
    renormalize = model.normalize_weights if case.impl != "hf-llama" else lambda: None

    def step():
        forward_loss().backward()
        opt.step()
        renormalize()
        opt.zero_grad(set_to_none=True)
        synchronize(device)

    return model, step, forward_loss


def saved_activations_mb(model, forward_loss) -> float:
    """MB of the tensors autograd keeps for the backward of one training forward, each storage
    counted once, parameters excluded: the activation memory, exact, without the allocator's and
    oneDNN's caches that make the resident-set peak noisy."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward_loss()
    return sum(saved.values()) / 2**20


def interleaved_times(steps: list, reps: int, warmup: int = 2) -> list[list[float]]:
    """Seconds of each step function over ``reps`` rounds after ``warmup`` rounds; every round
    calls each step once, round-robin, rotating who goes first, so the machine's drift hits all alike."""
    times: list[list[float]] = [[] for _ in steps]
    for r in range(warmup + reps):
        for i in range(len(steps)):
            i = (i + r) % len(steps)
            t0 = time.perf_counter()
            steps[i]()
            if r >= warmup:
                times[i].append(time.perf_counter() - t0)
    return times


def time_group(group: list[Case], reps: int = 5, warmup: int = 2) -> list[dict]:
    """Median step time of each case, with all steps interleaved round-robin in this process."""
    torch.manual_seed(0)
    built = [_build(c) for c in group]
    times = interleaved_times([step for _, step, _ in built], reps, warmup)
    rows = []
    for case, (model, _, forward_loss), ts in zip(group, built, times):
        s = size(case)
        tokens = s["batch_size"] * s["seq_len"]
        n_params, n_active = sum(p.numel() for p in model.parameters()), active_params(model)
        step = statistics.median(ts)
        flops_per_token = 6 * n_active + 6 * case.depth * s["seq_len"] * s["d_model"]
        rows.append(
            asdict(case)
            | {
                "step_s": step,
                "tokens_per_s": tokens / step,
                "n_params": n_params,
                "n_active_params": n_active,
                "flops_per_s": flops_per_token * tokens / step,
                "saved_mb": None if case.compile else saved_activations_mb(model, forward_loss),
            }
        )
    return rows


def peak_memory(case: Case) -> float:
    """MB of resident memory a model adds to a process, over two training steps (run it in a fresh
    process); on CUDA, MB of peak allocated device memory (weights, optimizer and activations)."""
    if case.device != "cpu":
        device = torch.device(case.device)
        torch.cuda.reset_peak_memory_stats(device)
        _, step, _ = _build(case)
        step()
        step()
        return torch.cuda.max_memory_allocated(device) / 2**20
    base = _rss_mb()
    _, step, _ = _build(case)
    step()
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base  # kB -> MB on Linux


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5, device: str = "cpu", tf32: bool = False) -> float:
    """Median FLOP/s of an n×n×n matmul on this machine (or on a CUDA ``device``, where fp32 runs in
    TF32 if ``tf32``, as the cases do)."""
    device = torch.device(device)
    if device.type == "cuda":
        set_tf32(tf32)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    times = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def cases(
    schemes: list[str],
    depths: list[int],
    dtypes: list[str],
    with_hf: bool,
    compile: bool = False,
    device: str = "cpu",
    tf32: bool = False,
) -> list[Case]:
    """pre, span and HF Llama over the depth sweep (the targets: few models per group, so that
    their steps interleave closely); the other schemes at the standard depth, each timed beside
    pre (group "peers"); with ``compile``, every scheme asked for and HF Llama at the standard depth, each eager
    and compiled, in one group (group "compile")."""
    out = []
    on = dict(device=device, tf32=tf32)
    L = (STANDARD if device == "cpu" else GPU_STANDARD)["n_layers"]
    for dtype in dtypes:
        for depth in sorted({L, *depths}):
            out += [Case("spannorm", s, depth, dtype, **on) for s in ("pre", "span") if s in schemes]
            if with_hf:
                out.append(Case("hf-llama", "pre", depth, dtype, **on))
        peers = [s for s in schemes if s not in ("pre", "span")]
        if peers:
            out += [Case("spannorm", s, L, dtype, group="peers", **on) for s in ["pre", *peers]]
        if compile:
            ordered = [s for s in ("pre", "span") if s in schemes] + peers
            impls = [("spannorm", s) for s in ordered] + [("hf-llama", "pre")] * with_hf
            out += [Case(impl, s, L, dtype, c, group="compile", **on) for impl, s in impls for c in (False, True)]
    return out


def _subprocess(*args: str):
    res = subprocess.run([sys.executable, "-m", "spannorm.bench", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise SpannormError(f"bench {args[0]} {args[1]} failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(all_cases: list[Case], reps: int = 5, log=print) -> dict:
    """Time every (dtype, group, depth) group in its own process, then each case's memory in its own."""
    device, tf32 = (all_cases[0].device, all_cases[0].tf32) if all_cases else ("cpu", False)
    n = 2048 if device == "cpu" else 8192
    peaks = {
        "fp32": matmul_peak(torch.float32, n, device=device, tf32=tf32),
        "bf16": matmul_peak(torch.bfloat16, n, device=device),
    }
    log(
        f"matmul peak on {device}: fp32{' (TF32)' if tf32 else ''} {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s"
    )
    rows = []
    key = lambda c: (c.dtype, c.group, c.depth)  # noqa: E731
    for _, group in itertools.groupby(sorted(all_cases, key=key), key=key):
        group = list(group)
        timed = _subprocess("time", json.dumps({"cases": [asdict(c) for c in group], "reps": reps}))
        for case, row in zip(group, timed):
            row["peak_mem_mb"] = _subprocess("memory", json.dumps(asdict(case)))
            row["mfu"] = row["flops_per_s"] / peaks[row["dtype"]]
            log(
                f"{row['impl']:9s} {row['scheme']:11s} L={row['depth']:<3d} {row['dtype']}"
                f"{' compiled' if row['compile'] else '':9s}: {row['tokens_per_s']:9,.0f} tok/s  "
                f"{row['peak_mem_mb']:7.0f} MB  MFU {row['mfu']:.1%}"
                + (f"  saved activations {row['saved_mb']:.0f} MB" if row.get("saved_mb") else "")
            )
            rows.append(row)
    return {"matmul_peak_flops": peaks, "rows": rows}


def _finder(rows: list[dict], L0: int):
    """find(impl, scheme, dtype, compiled, depth, group): the row of that case in ``rows`` (None: not timed)."""

    def find(impl, scheme, dtype, compiled=False, depth=L0, group="main"):
        return next(
            (
                r
                for r in rows
                if (r["impl"], r["scheme"], r["depth"], r["dtype"], r.get("compile", False), r.get("group", "main"))
                == (impl, scheme, depth, dtype, compiled, group)
            ),
            None,
        )

    return find


def _by_depth(find, rows: list[dict], dtype: str) -> list[str]:
    """Each headline ratio at every depth of the sweep (one depth's ratio is as noisy as the machine)."""
    lines = []
    ours_pre, ours_span, hf_pre = ("spannorm", "pre"), ("spannorm", "span"), ("hf-llama", "pre")
    for name, numerator, denominator, attr in (
        ("span/pre step time", ours_span, ours_pre, "step_s"),
        ("span/pre saved activations", ours_span, ours_pre, "saved_mb"),
        ("spannorm pre / HF Llama tokens/s", ours_pre, hf_pre, "tokens_per_s"),
        ("spannorm pre / HF Llama saved activations", ours_pre, hf_pre, "saved_mb"),
    ):
        by_depth = {}
        for d in sorted({r["depth"] for r in rows}):
            a, b = find(*numerator, dtype, depth=d), find(*denominator, dtype, depth=d)
            if a and b and a.get(attr) and b.get(attr):  # saved_mb: absent in older results
                by_depth[d] = a[attr] / b[attr]
        if len(by_depth) > 1:
            geo = math.exp(sum(math.log(v) for v in by_depth.values()) / len(by_depth))
            lines.append(
                f"{dtype}: {name} by depth: "
                + ", ".join(f"L={d} {v:.3f}x" for d, v in by_depth.items())
                + f" (geometric mean {geo:.3f}x)"
            )
    return lines


def _compiled(find, rows: list[dict], dtype: str) -> list[str]:
    """The compiled ratios: spannorm pre against HF Llama, every other scheme against pre, and each compiled
    against eager."""
    lines = []
    cpre, chf = (find(impl, "pre", dtype, True, group="compile") for impl in ("spannorm", "hf-llama"))
    if cpre and chf:
        lines.append(
            f"{dtype} compiled: spannorm pre / HF Llama tokens/s {cpre['tokens_per_s'] / chf['tokens_per_s']:.3f}x"
        )
    timed = [r["scheme"] for r in rows if r.get("group") == "compile" and r["impl"] == "spannorm"]
    schemes = list(dict.fromkeys(timed))  # (in the order timed: pre, span, then the others)
    for scheme in schemes:
        other = find("spannorm", scheme, dtype, True, group="compile")
        if scheme != "pre" and cpre and other:
            lines.append(f"{dtype} compiled: {scheme}/pre step time {other['step_s'] / cpre['step_s']:.3f}x")
    for impl, scheme in [("spannorm", s) for s in schemes] + [("hf-llama", "pre")]:
        eager, compiled = (find(impl, scheme, dtype, c, group="compile") for c in (False, True))
        if eager and compiled:
            lines.append(
                f"{dtype}: {impl} {scheme} compiled / eager tokens/s "
                f"{compiled['tokens_per_s'] / eager['tokens_per_s']:.3f}x"
            )
    return lines


def _depth_fits(rows: list[dict], dtype: str) -> list[str]:
    """A linear fit of eager step time over depth, for pre, span and HF Llama (three depths or more)."""
    import numpy as np  # (here: the CLI starts without numpy)

    lines = []
    for impl, scheme in (("spannorm", "pre"), ("spannorm", "span"), ("hf-llama", "pre")):
        pts = sorted(
            (r["depth"], r["step_s"])
            for r in rows
            if (r["impl"], r["scheme"], r["dtype"]) == (impl, scheme, dtype)
            and not r.get("compile", False)
            and r.get("group", "main") == "main"
        )
        if len(pts) >= 3:
            x, y = np.array(pts, dtype=float).T
            slope, icpt = np.polyfit(x, y, 1)
            r2 = 1 - ((y - (slope * x + icpt)) ** 2).sum() / ((y - y.mean()) ** 2).sum()
            lines.append(
                f"{dtype}: {impl} {scheme} step time = {icpt * 1e3:.1f} ms + {slope * 1e3:.2f} ms × L (R² {r2:.4f})"
            )
    return lines


def ratios(result: dict) -> list[str]:
    """The headline ratios (eager unless marked): span vs pre, pre vs HF Llama, compiled vs eager,
    and a linear fit of step time over depth."""
    rows = result["rows"]
    L0 = (
        size(
            Case(**{k: rows[0][k] for k in ("impl", "scheme", "depth", "dtype")}, device=rows[0].get("device", "cpu"))
        )["n_layers"]
        if rows
        else STANDARD["n_layers"]
    )
    find = _finder(rows, L0)
    lines = []
    for dtype in ("fp32", "bf16"):
        pre, span, hf = find("spannorm", "pre", dtype), find("spannorm", "span", dtype), find("hf-llama", "pre", dtype)
        if pre and span:
            lines.append(
                f"{dtype}: span/pre step time {span['step_s'] / pre['step_s']:.3f}x, "
                f"peak memory {span['peak_mem_mb'] / pre['peak_mem_mb']:.3f}x"
            )
        if pre and hf:
            lines.append(f"{dtype}: spannorm pre / HF Llama tokens/s {pre['tokens_per_s'] / hf['tokens_per_s']:.3f}x")
        lines += _by_depth(find, rows, dtype) + _compiled(find, rows, dtype)
        peers = [r for r in rows if r.get("group") == "peers" and r["dtype"] == dtype]
        anchor = next((r for r in peers if r["scheme"] == "pre"), None)
        if anchor:
            lines.append(
                f"{dtype}: step time / pre's, every scheme at L={L0}: "
                + ", ".join(f"{r['scheme']} {r['step_s'] / anchor['step_s']:.2f}" for r in peers if r is not anchor)
            )
        lines += _depth_fits(rows, dtype)
    return lines


def markdown(result: dict) -> str:
    """Every row of a bench result as a Markdown table."""
    header = ["impl", "scheme", "L", "dtype", "compiled", "group", "tokens/s", "step (ms)", "peak mem (MB)"]
    rows = [
        [
            r["impl"],
            r["scheme"],
            str(r["depth"]),
            r["dtype"],
            "yes" if r.get("compile") else "no",
            r.get("group", "main"),
            f"{r['tokens_per_s']:,.0f}",
            f"{r['step_s'] * 1e3:.0f}",
            f"{r['peak_mem_mb']:.0f}",
            num(r.get("saved_mb") or None, ".0f"),
            f"{r['mfu']:.1%}",
        ]
        for r in result["rows"]
    ]
    return md_table(header + ["saved act. (MB)", "MFU"], rows)


# --- MoE: an 8-expert top-2 model against a dense one with the same active parameters ---------

MOE = {"moe": {"n_experts": 8, "top_k": 2}}  # expert width: the default, dense ffn_dim / top_k


def moe_fields(impl: str, d_model: int, n_heads: int) -> dict:
    """Extra ModelConfig fields of the MoE comparison's two impls ({} for the others)."""
    if impl == "spannorm-moe":
        return {"moe": dict(MOE["moe"])}
    if impl == "spannorm-moe-dense":  # dense d_ff = top_k × expert width: the MoE's active FFN
        moe = ModelConfig(d_model=d_model, n_heads=n_heads, **MOE)
        return {"d_ff": moe.moe.top_k * moe.expert_dim}
    return {}


def active_params(model) -> int:
    """Parameters one token uses in matmuls: all, less the routed experts it does not visit (fraction
    1 − k/E), less an untied embedding (a lookup; with a tied head it is the head's matmul)."""
    n = sum(p.numel() for p in model.parameters())
    if getattr(model, "head", None) is not None:  # spannorm LM with an untied head
        n -= model.embed.weight.numel()
    for m in model.modules():
        if isinstance(m, MoE):
            n -= round((m.up.weight.numel() + m.down.weight.numel()) * (1 - m.top_k / m.n_experts))
    return n


def moe_cases(dtypes: list[str], scheme: str = "span", device: str = "cpu", tf32: bool = False) -> list[Case]:
    """MoE and its dense equivalent at the device's standard size (one group per dtype: steps interleaved)."""
    L = (STANDARD if device == "cpu" else GPU_STANDARD)["n_layers"]
    return [
        Case(impl, scheme, L, dtype, device=device, tf32=tf32)
        for dtype in dtypes
        for impl in ("spannorm-moe-dense", "spannorm-moe")
    ]


def moe_ratios(result: dict) -> list[str]:
    """MoE / dense step time per dtype."""
    lines = []
    for dtype in ("fp32", "bf16"):
        step = {r["impl"]: r["step_s"] for r in result["rows"] if r["dtype"] == dtype}
        if "spannorm-moe" in step and "spannorm-moe-dense" in step:
            moe, dense = step["spannorm-moe"], step["spannorm-moe-dense"]
            lines.append(
                f"{dtype}: MoE (8 experts, top-2) / dense with the same active parameters: step time "
                f"{moe / dense:.3f}x ({moe * 1e3:.0f} ms vs {dense * 1e3:.0f} ms)"
            )
    return lines


if __name__ == "__main__":  # one group's timing or one case's memory, in a fresh process
    arg = json.loads(sys.argv[2])
    if sys.argv[1] == "time":
        print(json.dumps(time_group([Case(**c) for c in arg["cases"]], arg["reps"])))
    else:
        print(json.dumps(peak_memory(Case(**arg))))
