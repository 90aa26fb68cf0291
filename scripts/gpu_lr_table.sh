#!/usr/bin/env bash
# Issue 13's learning-rate table on a GPU: pre, span (default) and span (`init`) at lr 1e-3, 3e-3, 1e-2,
# d_model 256, 24 layers, 800 steps of 8,192 tokens, fp32 (configs/studies/gpu-lr.yaml), nine cells in
# parallel processes on one GPU; prints val loss per (series, lr). A few minutes on one H200.
# Usage, from the repository root:  bash scripts/gpu_lr_table.sh OUT_DIR
# The machine has no internet: the corpus must be in $SPANNORM_CACHE (copy ~/.cache/spannorm/corpora
# there), or pass --corpus through EXTRA="--corpus PATH".
set -uo pipefail
out=${1:?usage: bash scripts/gpu_lr_table.sh OUT_DIR}
cd "$(dirname "$0")/.."
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# shellcheck disable=SC2086
"$py" -m spannorm.cli study --config gpu-lr --out "$out/study" --device "${DEVICE:-cuda}" --jobs 9 ${EXTRA:-}
rc=$?
"$py" - "$out/study/results.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
lrs = sorted({float(r["train.lr"]) for r in rows})
print("| series | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |\n|---|" + "---|" * len(lrs))
for series in dict.fromkeys((r["model.scheme"], r["model.span.scale"] or "") for r in rows):
    cell = {float(r["train.lr"]): r for r in rows if (r["model.scheme"], r["model.span.scale"] or "") == series}
    fmt = lambda r: "—" if r is None or not r["final_val_loss"] else f"{float(r['final_val_loss']):.3f}" + (
        "" if r["status"] == "ok" else f" {r['status']}")
    print(f"| {' '.join(s for s in series if s)} | " + " | ".join(fmt(cell.get(lr)) for lr in lrs) + " |")
PY
exit $rc
