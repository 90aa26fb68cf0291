#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run of at most 10 minutes (for a GPU machine lent briefly):
#   1. the CUDA-marked tests and the device tests      -> OUT_DIR/pytest.txt
#   2. each piece's kernels timed, ours against torch's -> OUT_DIR/kernels.md   (scripts/gpu_kernels.py)
#   3. the GPU bench: pre, span and HF Llama at the GPU standard size, bf16 and fp32 (and fp32 with TF32),
#      steps interleaved, peak allocated memory, MFU   -> OUT_DIR/bench-{bf16,fp32,tf32}.{json,txt}
#   4. torchrun with one process (NCCL on the GPU): a tiny run under ddp and under fsdp -> OUT_DIR/torchrun-*.txt
#   5. with 2 GPUs or more: the small preset under ddp on 1 and on 2 processes, tokens/s -> OUT_DIR/ddp-scaling.txt
# Usage, from the repository root:  bash scripts/gpu_check.sh OUT_DIR
# Python: $PYTHON, else .venv/bin/python, else python3; the source tree is used as is (PYTHONPATH=src),
# so nothing needs installing where torch, transformers and pytest already are. DEVICE=cpu makes a dry run
# of the plumbing on a machine without a GPU (CPU standard size; the cuda tests skip); REPS sets the bench's
# timed rounds (default 10).
set -uo pipefail
out=${1:?usage: bash scripts/gpu_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
device=${DEVICE:-cuda}
status=0
step() {  # step NAME SECONDS FILE COMMAND...: run with a time limit, keep its output, note its exit code
  local name=$1 limit=$2 file=$3; shift 3
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$file" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s -> $out/$file"
  [ $rc -eq 0 ] || status=1
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"
step "cuda tests" 120 pytest.txt "$py" -m pytest -q -p no:cacheprovider -m "cuda or not slow" tests/test_cuda.py tests/test_device.py
step "kernels" 60 kernels.md "$py" scripts/gpu_kernels.py --device "$device"
for mode in bf16 fp32 tf32; do
  dtype=$([ $mode = bf16 ] && echo bf16 || echo fp32)
  step "bench $mode" 120 "bench-$mode.txt" "$py" -m spannorm.cli bench --device "$device" --schemes pre,span \
    --dtypes $dtype --reps "${REPS:-10}" $([ $mode = tf32 ] && echo --tf32) --json "$out/bench-$mode.json"
done
for mode in ddp fsdp; do  # (the NCCL path with one process)
  step "torchrun $mode" 120 "torchrun-$mode.txt" "$py" -m torch.distributed.run --standalone --nproc_per_node 1 \
    -m spannorm train --config tiny --device "$device" --set train.distributed=$mode --out "$out/run-$mode" --quiet
done
# 5. NCCL across 2 processes, one GPU each (skipped with fewer GPUs; DEVICE=cpu: 2 gloo processes, the plumbing):
#    the small preset under ddp with the same global batch on 1 and on 2 processes, and their tokens/s
gpus=$([ "$device" = cpu ] && echo 2 || nvidia-smi -L 2>/dev/null | wc -l)
if [ "$gpus" -ge 2 ]; then
  for n in 1 2; do
    step "torchrun ddp, $n processes" 180 "torchrun-ddp-x$n.txt" "$py" -m torch.distributed.run --standalone \
      --nproc_per_node $n -m spannorm train --config small --device "$device" --set train.distributed=ddp \
      --set train.batch_size=$((16 / n)) --set train.max_steps=60 --set train.eval_interval=1000 --out "$out/ddp-x$n" --quiet
  done
  "$py" -c 'import json, sys; t = [json.load(open(f"{sys.argv[1]}/ddp-x{n}/summary.json"))["tokens_per_s"] for n in (1, 2)]
print(f"ddp tokens/s: 1 process {t[0]:,.0f}, 2 processes {t[1]:,.0f} ({t[1] / t[0]:.2f}x)")' "$out" | tee "$out/ddp-scaling.txt" ||
    status=1
else
  echo "torchrun ddp, 2 processes: skipped ($gpus GPU)" | tee "$out/ddp-scaling.txt"
fi
tail -n 3 "$out/pytest.txt"; cat "$out/kernels.md" "$out"/bench-*.txt "$out"/torchrun-*.txt "$out/ddp-scaling.txt"
exit $status
