#!/usr/bin/env bash
# The one prepared check for a machine with a GPU: builds d9d._C in place with that machine's own torch and nvcc,
# runs the CUDA tests, then the GPU benchmark (bfloat16, shapes large enough to fill the chip), and prints a table.
# Nothing is downloaded: torch (with CUDA), nvcc and pytest must be there already (pytest is optional).
#
#   bash scripts/gpu_check.sh            # PYTHON=... to pick the interpreter
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
for op in ("lora_forward", "lora_backward", "lora_merge_", "lora_unmerge_", "dropout_mask"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"d9d::{op}", "CUDA"), op
print("CUDA kernels registered")'

echo "== CUDA tests"
if "$PY" -c 'import pytest' 2>/dev/null; then
  "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/ops
else
  echo "pytest is not installed: CUDA tests skipped, nothing checks correctness in this run" >&2
fi

echo "== benchmark (bfloat16)"
"$PY" scripts/bench_lora.py --device cuda --dtype bfloat16 --tokens 16384 --features 8192 --out-features 8192 \
  --rank 16 --repeats 20 --warmup 5 | tee "${OUT:-/tmp}/gpu_bench.md"
echo "== done; the table is also in ${OUT:-/tmp}/gpu_bench.md (add --write BENCHMARKS.md to record it)"
