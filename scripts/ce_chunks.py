"""Time the fused head + cross-entropy (nn.linear_cross_entropy) forward + backward at the bench's
standard size (2,048 tokens, d_model 256, vocab 8192) for several chunk sizes, in fp32 and bf16
autocast, on one thread (CPU time of this thread, so other jobs on the machine matter less).
Chunk sizes are interleaved round-robin; the median of the rounds is printed.

    .venv/bin/python scripts/ce_chunks.py [--reps 15]
"""

import argparse
import statistics
import time

import torch

from spannorm.layers import linear_cross_entropy

CHUNKS = (128, 256, 512, 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 256, generator=g, requires_grad=True)
    w = (0.02 * torch.randn(8192, 256, generator=g)).requires_grad_()
    t = torch.randint(0, 8192, (2048,), generator=g)
    print(f"{'dtype':6} " + " ".join(f"{c:>9}" for c in CHUNKS) + "   (ms per forward + backward; chunk = rows)")
    for dtype in ("fp32", "bf16"):

        def step(c, bf16=dtype == "bf16"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = linear_cross_entropy(x, w, t, chunk_rows=c)
            loss.backward()

        times = {c: [] for c in CHUNKS}
        for r in range(args.reps + 1):
            for c in CHUNKS:
                t0 = time.thread_time()
                step(c)
                if r:  # round 0 is warm-up
                    times[c].append(time.thread_time() - t0)
        print(f"{dtype:6} " + " ".join(f"{1e3 * statistics.median(times[c]):9.1f}" for c in CHUNKS))


if __name__ == "__main__":
    main()
