#!/usr/bin/env bash
# The one prepared check for a machine with a GPU: builds d9d._C in place with that machine's own torch and nvcc,
# runs the op tests on CUDA (CUDA kernels, autocast fp16/bf16, the CPU/CUDA mask agreement), then the op benchmark
# (bfloat16, shapes large enough to fill the chip) and the whole-model benchmark against PEFT on CUDA, and prints
# the tables (also written under $OUT, default /tmp). Nothing is downloaded: torch (with CUDA), nvcc, pytest,
# transformers and peft must be there already (without pytest the tests are skipped, without transformers/peft the
# whole-model benchmark).
#
#   bash scripts/gpu_check.sh            # PYTHON=... to pick the interpreter; QUICK=1 for fewer repeats
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$NVCC")")}
export PATH="$CUDA_HOME/bin:$PATH"
export FORCE_CUDA=1
export MAX_JOBS=${MAX_JOBS:-8}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  export TORCH_CUDA_ARCH_LIST
fi
# pip's CUDA torch keeps the CUDA library headers in site-packages/nvidia/cu*/include.
for include in $("$PY" -c 'import glob, sysconfig; print(" ".join(glob.glob(sysconfig.get_paths()["purelib"] + "/nvidia/cu*/include")))'); do
  export CPATH="$include${CPATH:+:$CPATH}"
done

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {torch.cuda.get_device_name()}")'
"$NVCC" --version | tail -1
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"

echo "== build"
start=$(date +%s)
"$PY" setup.py -q build_ext --inplace
echo "built in $(( $(date +%s) - start )) s"
"$PY" -c '
import torch, d9d._C
for op in ("lora_forward", "lora_backward", "dropout_mask", "grouped_lora_forward", "grouped_lora_backward",
           "grouped_lora_merge_"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"d9d::{op}", "CUDA"), op
assert torch._C._dispatch_has_kernel_for_dispatch_key("d9d::lora_forward", "AutocastCUDA")
assert torch._C._dispatch_has_kernel_for_dispatch_key("d9d::lora_merge_", "CompositeExplicitAutograd")
print("CUDA and autocast kernels registered")'

RESULTS=${OUT:-/tmp}
REPEATS=20; E2E_REPEATS=5
if [ "${QUICK:-0}" = 1 ]; then REPEATS=5; E2E_REPEATS=2; fi

echo "== op tests on CUDA"
if "$PY" -c 'import pytest' 2>/dev/null; then
  "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/ops | tee "$RESULTS/gpu_tests.txt"
else
  echo "pytest is not installed: CUDA tests skipped, nothing checks correctness in this run" >&2
fi

echo "== op benchmark (bfloat16)"
"$PY" scripts/bench_lora.py --device cuda --dtype bfloat16 --tokens 16384 --features 8192 --out-features 8192 \
  --rank 16 --repeats "$REPEATS" --warmup 5 | tee "$RESULTS/gpu_bench.md"

echo "== whole-model benchmark against PEFT (CUDA)"
if "$PY" -c 'import transformers, peft' 2>/dev/null; then
  "$PY" scripts/bench_e2e.py --device cuda --threads 0 --dtypes bfloat16,float32 --tokens 8192 --seq 2048 \
    --repeats "$E2E_REPEATS" --warmup 2 | tee "$RESULTS/gpu_e2e.md"
else
  echo "transformers or peft is not installed: whole-model benchmark skipped" >&2
fi
echo "== done; the tables are also in $RESULTS/gpu_bench.md and $RESULTS/gpu_e2e.md"
echo "   (bench_lora.py / bench_e2e.py take --write BENCHMARKS.md to record them)"
