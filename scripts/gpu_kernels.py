"""Time each piece the model has a choice for, forward + backward, on one device: ours against
torch's, to choose the CUDA kernels by measurement (``scripts/gpu_check.sh`` runs it on a GPU).

    python scripts/gpu_kernels.py [--device cuda] [--reps 20]

Pieces, at the GPU standard size (8 × 1024 tokens, d_model 1024, SwiGLU 2816, vocab 32768; a
quarter of each on the CPU), under bf16 autocast:
  rmsnorm   ours (nn._RMSNorm, fp32 inside)      vs F.rms_norm (fp32 gain; bf16 gain: fused)
  silu_gate ours (nn._SiluGate, one grad buffer) vs F.silu(a) * b
  ce        ours chunked at 2^21 .. 2^28 logits  vs F.cross_entropy on the materialized logits
Prints one Markdown table: median ms per call and the ratio to the fastest of its piece.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from spannorm.device import synchronize  # noqa: E402
from spannorm.layers import _LinearCrossEntropy, _RMSNorm, silu_gate  # noqa: E402


def timed(fn, reps: int, device: torch.device) -> float:
    """Median seconds of fn() (forward + backward), after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    device = torch.device(args.device)
    scale = 1 if device.type == "cuda" else 4
    N, d, ff, V = 8 * 1024 // scale, 1024 // scale, 2816 // scale, 32768 // scale
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device).requires_grad_()

    x, gain = rand(N, d), rand(d)
    h = rand(N, 2 * ff)
    xh, w, t = rand(N, d), rand(V, d, std=0.02), torch.randint(0, V, (N,), generator=g).to(device)
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16)

    def backward(y):
        y.float().sum().backward() if y.dim() else y.backward()

    cases = {
        ("rmsnorm", "ours"): lambda: backward(_RMSNorm.apply(x.to(torch.bfloat16), gain, 1e-6)),
        ("rmsnorm", "F.rms_norm"): lambda: backward(F.rms_norm(x.to(torch.bfloat16), (d,), gain, 1e-6)),
        # torch's fused kernel needs input and weight in one dtype
        ("rmsnorm", "F.rms_norm, bf16 gain"): lambda: backward(
            F.rms_norm(x.to(torch.bfloat16), (d,), gain.to(torch.bfloat16), 1e-6)
        ),
        ("silu_gate", "ours"): lambda: backward(silu_gate(h.to(torch.bfloat16))),
        ("silu_gate", "F.silu(a) * b"): lambda: backward(
            (lambda a, b: F.silu(a) * b)(*h.to(torch.bfloat16).chunk(2, -1))
        ),
    }
    for p in (21, 24, 26, 28):
        rows = max(64, 2**p // V)
        if rows <= N:
            cases[("ce", f"ours, 2^{p} logits/chunk")] = lambda rows=rows: backward(
                _LinearCrossEntropy.apply(xh, w, t, torch.bfloat16, rows)
            )

    def materialized():
        with bf16:
            logits = F.linear(xh, w)
        backward(F.cross_entropy(logits.float(), t))

    cases[("ce", "F.cross_entropy, materialized")] = materialized
    results = {k: timed(fn, args.reps, device) for k, fn in cases.items()}
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"torch {torch.__version__}, N={N} d={d} ff={ff} V={V}, median of {args.reps}\n"
    )
    print("| piece | implementation | ms | / fastest |\n|---|---|---|---|")
    for (piece, impl), s in results.items():
        best = min(v for (p, _), v in results.items() if p == piece)
        print(f"| {piece} | {impl} | {s * 1e3:.3f} | {s / best:.2f}x |")


if __name__ == "__main__":
    main()
