"""fp32 against bf16 matmul throughput on this CPU, one and all threads: whether bf16 autocast pays here.

    .venv/bin/python scripts/cpu_matmul.py      # a few seconds

Prints the CPU's capability (torch's dispatch level) and whether it has native bf16 (AVX-512 BF16 or AMX), then
GFLOP/s of (m × k) @ (k × n) for the lr study's shapes (d_model 64, 16 × 128 tokens) and larger ones.
"""

import time

import torch

from spannorm.device import cpu_bf16_is_native

SHAPES = [(2048, 64, 384), (2048, 384, 64), (2048, 256, 256), (2048, 1024, 1024)]


def gflops(m: int, k: int, n: int, dtype: torch.dtype, reps: int = 20) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9


def main() -> None:
    print(f"capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_bf16_is_native()}")
    print("| threads | m × k × n | fp32 GFLOP/s | bf16 GFLOP/s | fp32 / bf16 |")
    print("|---|---|---|---|---|")
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        for m, k, n in SHAPES:
            f, b = gflops(m, k, n, torch.float32), gflops(m, k, n, torch.bfloat16)
            print(f"| {threads} | {m} × {k} × {n} | {f:.1f} | {b:.1f} | {f / b:.1f}× |")


if __name__ == "__main__":
    main()
