"""Training-step time of this checkout against an earlier git revision, interleaved in one process.

The revision's ``src/spannorm`` is extracted (``git archive``) into a temporary directory as the
package ``spannorm_rev``; both versions build the bench's standard model (``spannorm.bench``) and
their steps alternate, rotating who goes first, so that the machine's drift hits both alike.

    .venv/bin/python scripts/step_vs_rev.py REV [--schemes pre,span] [--dtype bf16] [--depth 8] [--reps 15]
"""

import argparse
import importlib
import io
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch


def load_revision(rev: str, into: Path):
    """Import ``src/spannorm`` of git revision ``rev`` as ``spannorm_rev.bench``."""
    tar = subprocess.run(["git", "archive", rev, "src/spannorm"], capture_output=True, check=True).stdout
    tarfile.open(fileobj=io.BytesIO(tar)).extractall(into, filter="data")
    shutil.move(into / "src" / "spannorm", into / "spannorm_rev")
    sys.path.insert(0, str(into))
    return importlib.import_module("spannorm_rev.bench")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rev")
    ap.add_argument("--schemes", default="pre,span")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    import spannorm.bench as now

    with tempfile.TemporaryDirectory() as tmp:
        old = load_revision(args.rev, Path(tmp))
        runs = []  # (scheme, version, step function)
        for scheme in args.schemes.split(","):
            for version, mod in ((args.rev, old), ("checkout", now)):
                torch.manual_seed(0)
                runs.append((scheme, version, mod._build(mod.Case("spannorm", scheme, args.depth, args.dtype))[1]))
        times = now.interleaved_times([step for _, _, step in runs], args.reps)
    med = [statistics.median(t) for t in times]
    print(f"{args.dtype}, L={args.depth}, {torch.get_num_threads()} threads, median of {args.reps} interleaved steps")
    for j in range(0, len(runs), 2):
        print(
            f"{runs[j][0]:9s} {args.rev}: {med[j] * 1e3:7.1f} ms   checkout: {med[j + 1] * 1e3:7.1f} ms   "
            f"checkout / {args.rev}: {med[j + 1] / med[j]:.3f}x"
        )


if __name__ == "__main__":
    main()
