"""fp32 against bf16 matmul and attention on this CPU: whether bf16 autocast pays here.

    .venv/bin/python scripts/cpu_matmul.py      # about 20 seconds

Prints the CPU's capability (torch's dispatch level) and whether it has native bf16 (AVX-512 BF16 or AMX), then
GFLOP/s of (m × k) @ (k × n) for the lr study's shapes (d_model 64, 16 × 128 tokens) and larger ones, one and all
threads; then, on one thread, the time of torch's causal attention kernel (forward and backward) in fp32 and bf16
by head size and sequence length: what ``spannorm.layers.attend`` decides by.
"""

import time

import torch
import torch.nn.functional as F

from spannorm.device import cpu_bf16_is_native

SHAPES = [(2048, 64, 384), (2048, 384, 64), (2048, 256, 256), (2048, 1024, 1024)]
# (batch, heads, tokens, head size): the fair study's attention first, then the bench's standard size
ATTENTION = [(16, 4, 128, 16), (16, 2, 128, 32), (8, 8, 128, 64), (8, 4, 256, 16), (4, 4, 256, 32)]
ATTENTION += [(8, 4, 256, 64), (8, 2, 256, 128), (4, 8, 512, 64)]


def gflops(m: int, k: int, n: int, dtype: torch.dtype, reps: int = 20) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9


def attention_ms(shape: tuple[int, int, int, int], dtype: torch.dtype, reps: int = 10) -> float:
    """Milliseconds of one causal F.scaled_dot_product_attention forward and backward."""
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    dy = torch.randn(shape, dtype=dtype)
    for i in range(2 + reps):
        if i == 2:
            t0 = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dy)
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    print(f"capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_bf16_is_native()}")
    print("| threads | m × k × n | fp32 GFLOP/s | bf16 GFLOP/s | fp32 / bf16 |")
    print("|---|---|---|---|---|")
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        for m, k, n in SHAPES:
            f, b = gflops(m, k, n, torch.float32), gflops(m, k, n, torch.bfloat16)
            print(f"| {threads} | {m} × {k} × {n} | {f:.1f} | {b:.1f} | {f / b:.1f}× |")
    torch.set_num_threads(1)
    print("\n| attention, 1 thread: batch × heads × tokens × head size | fp32 ms | bf16 ms | bf16 / fp32 |")
    print("|---|---|---|---|")
    for shape in ATTENTION:
        f, b = attention_ms(shape, torch.float32), attention_ms(shape, torch.bfloat16)
        print(f"| {' × '.join(map(str, shape))} | {f:.2f} | {b:.2f} | {b / f:.2f}× |")


if __name__ == "__main__":
    main()
