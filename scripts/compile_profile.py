"""Where compiled spannorm pre and compiled HF Llama spend a training step: torch.profiler over 3 steps of each
at the bench's standard size (L = 8), after 3 warm-up steps, each in its own process; prints each one's step time
and its top operators (inductor's fused kernels by name), per step.

    .venv/bin/python scripts/compile_profile.py [--dtype bf16|fp32] [--top 12]     # about 3 minutes
"""

import argparse
import subprocess
import sys
import time


def profile(impl: str, dtype: str, top: int) -> None:
    import torch._inductor.config as inductor
    from torch.profiler import profile as torch_profile

    from spannorm.bench import Case, _build

    inductor.cpp.enable_kernel_profile = True  # (each fused kernel is a profiler event)
    _, step, _ = _build(Case(impl, "pre", 8, dtype, compile=True))
    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    print(f"\n{impl} pre, L = 8, {dtype}, compiled: {(time.perf_counter() - t0) / 3 * 1e3:.0f} ms a step")
    with torch_profile() as prof:
        for _ in range(3):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    print("| operator | ms a step | calls a step |\n|---|---|---|")
    for e in events:
        print(f"| {e.key[:90]} | {e.self_cpu_time_total / 3e3:.1f} | {e.count / 3:g} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--impl", help=argparse.SUPPRESS)  # (the child process: one implementation)
    args = ap.parse_args()
    if args.impl:
        return profile(args.impl, args.dtype, args.top)
    for impl in ("spannorm", "hf-llama"):  # (a process each: neither's compiled code or caches warm the other's)
        subprocess.run(
            [sys.executable, __file__, "--impl", impl, "--dtype", args.dtype, "--top", str(args.top)], check=True
        )


if __name__ == "__main__":
    main()
