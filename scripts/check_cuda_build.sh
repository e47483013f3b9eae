#!/usr/bin/env bash
# Proves, on a machine without a GPU, that d9d._C's CUDA build compiles, links, loads and registers CUDA kernels.
#
# It uses its own virtual environment with a CUDA build of torch (default .venv-cuda, git-ignored; the first run
# installs torch==2.14.1, about 5.5 GB) and builds from a copy of the sources in a temporary folder, so the CPU
# build in the working tree is left alone. CUDA_HOME defaults to /usr/local/cuda and TORCH_CUDA_ARCH_LIST to 9.0.
# The CUDA library headers (cusparse.h, ...) of pip's torch live in site-packages/nvidia/cu13/include, which is
# therefore put on the include path.
#
#   bash scripts/check_cuda_build.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=$(realpath -m "${VENV:-.venv-cuda}")
TORCH_VERSION=${TORCH_VERSION:-2.14.1}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export FORCE_CUDA=1
export PATH="$CUDA_HOME/bin:$PATH"
export MAX_JOBS=${MAX_JOBS:-2}

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
fi
"$VENV/bin/pip" install -q ninja setuptools wheel
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
"$VENV/bin/python" -c 'import torch; print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")'
"$CUDA_HOME/bin/nvcc" --version | tail -1

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r setup.py pyproject.toml csrc "$work/"
cp README.md "$work/" 2>/dev/null || touch "$work/README.md"
mkdir -p "$work/d9d"
(cd "$work" && "$VENV/bin/python" setup.py -q build_ext --inplace)

"$VENV/bin/python" - "$work" <<'PY'
import glob
import importlib.util
import sys

import torch

(library,) = glob.glob(f"{sys.argv[1]}/d9d/_C*.so")
spec = importlib.util.spec_from_file_location("d9d._C", library)
spec.loader.exec_module(importlib.util.module_from_spec(spec))  # the Python entry point loads and registers the ops
ops = ["lora_forward", "lora_backward", "dropout_mask", "grouped_lora_forward", "grouped_lora_backward",
       "grouped_lora_merge_", "dora_forward", "dora_backward"]
expected = [(op, key) for op in ops for key in ("CPU", "CUDA")]
expected += [("lora_forward", "AutocastCPU"), ("lora_forward", "AutocastCUDA")]
expected += [(op, "CompositeExplicitAutograd") for op in ("lora_merge_", "dora_weight_norm", "dora_merge_")]
missing = [
    f"{op} ({key})" for op, key in expected if not torch._C._dispatch_has_kernel_for_dispatch_key(f"d9d::{op}", key)
]
if missing:
    sys.exit(f"d9d._C is missing kernels: {', '.join(missing)}")
print(f"OK: {library.rsplit('/', 1)[1]} loads; registered: {', '.join(f'{op} ({key})' for op, key in expected)}")
PY
echo "check_cuda_build: done in $(( $(date +%s) - start )) s"
