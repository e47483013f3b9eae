#!/usr/bin/env bash
# The aarch64 build of d9d's CPU kernels (NEON), compiled and tested on an x86-64 machine: d9d._C is cross-compiled
# with Debian's aarch64 GCC against PyPI's aarch64 CPU wheel of torch, and the op tests run on it under qemu-user.
# This checks correctness only: qemu's timings say nothing about the speed of an ARM CPU.
#
#   scripts/check_arm_build.sh                      # build, then the CPU op tests (about 20 minutes on 2 cores)
#   scripts/check_arm_build.sh -k "lora and not dora"   # arguments go to pytest
#
# torch 2.10 is the newest aarch64 wheel on PyPI without CUDA (later ones need CUDA's libraries to import), and
# older than the x86 build's, so this also builds d9d against an older torch than `make` does; D9D_ARM_TORCH=2.8.0
# takes the oldest that d9d supports. Needs root for apt-get (qemu-user-static, g++-aarch64-linux-gnu, debootstrap), and PyPI and Debian's
# mirror. Everything goes under D9D_ARM_WORK (default /tmp/d9d-arm) and is reused by the next run; nothing is
# installed into the repository or its virtual environment.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${D9D_ARM_WORK:-/tmp/d9d-arm}"
TORCH_VERSION="${D9D_ARM_TORCH:-2.10.0}"  # 2.8.0 checks the oldest torch that d9d supports
HOST_PY="${HOST_PY:-$ROOT/.venv/bin/python}"  # runs pip download only
[ -x "$HOST_PY" ] || HOST_PY=python3
mkdir -p "$WORK"

# 1. The cross compiler and the emulator.
if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64-static >/dev/null ||
  ! command -v debootstrap >/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "needs qemu-user-static, g++-aarch64-linux-gnu and debootstrap: sudo apt-get install -y those" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static g++-aarch64-linux-gnu debootstrap
fi

# 2. An arm64 Debian with Python 3.11 (the wheels' ABI), unpacked only: debootstrap's first stage downloads the
#    packages, and dpkg-deb unpacks them all, so nothing runs as root inside it.
SYSROOT="$WORK/root"
if [ ! -x "$SYSROOT/usr/bin/python3.11" ]; then
  echo "== arm64 Debian root in $SYSROOT"
  rm -rf "$SYSROOT"
  debootstrap --foreign --arch=arm64 --variant=minbase --include=python3.11,libpython3.11-dev,libgomp1 \
    bookworm "$SYSROOT" http://deb.debian.org/debian >"$WORK/debootstrap.log"
  for deb in "$SYSROOT"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$SYSROOT"; done
fi

# 3. torch and d9d's runtime and test dependencies as aarch64 wheels, unpacked into one directory for PYTHONPATH.
#    torch's metadata lists CUDA's packages for every Linux; its aarch64 CPU wheel needs none of them, so torch comes
#    without its dependencies and those that it imports come by name.
SITE="$WORK/site-torch-$TORCH_VERSION"
if [ ! -f "$SITE/.complete" ]; then
  echo "== aarch64 wheels in $SITE"
  rm -rf "$SITE" "$WORK/wheels"
  download=("$HOST_PY" -m pip download -q --only-binary=:all: --python-version 3.11 -d "$WORK/wheels")
  for tag in manylinux2014 manylinux_2_17 manylinux_2_27 manylinux_2_28; do download+=(--platform "${tag}_aarch64"); done
  "${download[@]}" --no-deps "torch==$TORCH_VERSION" 2>&1 | { grep -v "^WARNING" || true; }
  "${download[@]}" filelock typing-extensions sympy networkx jinja2 fsspec pydantic safetensors tqdm regex numpy \
    pytest expecttest 2>&1 | { grep -v "^WARNING" || true; }
  mkdir -p "$SITE"
  for wheel in "$WORK"/wheels/*.whl; do python3 -m zipfile -e "$wheel" "$SITE"; done
  touch "$SITE/.complete"
fi

# 4. d9d._C for aarch64: every .cpp under csrc/ with the flags that setup.py gets from torch (up to 2.10 its
#    extensions are C++17), compiled in parallel and linked against the wheel's libraries.
BUILD="$WORK/build"
PKG="$WORK/pkg"
rm -rf "$BUILD" "$PKG"
mkdir -p "$BUILD" "$PKG"
CXXFLAGS=(-O3 -fopenmp -fPIC -std=c++17 -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
  -I "$SITE/torch/include" -I "$SITE/torch/include/torch/csrc/api/include"
  -I "$SYSROOT/usr/include/python3.11" -idirafter "$SYSROOT/usr/include" -Wno-psabi)
export BUILD ROOT
export CXXFLAGS_LINE="${CXXFLAGS[*]}"
echo "== compiling $(cd "$ROOT" && find csrc -name '*.cpp' | wc -l) files for aarch64"
(cd "$ROOT" && find csrc -name '*.cpp' | sort) | xargs -P "$(nproc)" -I{} sh -c \
  'out="$BUILD/$(echo {} | tr / _).o"; aarch64-linux-gnu-g++ $CXXFLAGS_LINE -c "$ROOT/{}" -o "$out" || exit 255'
cp -r "$ROOT/d9d" "$ROOT/tests" "$ROOT/pyproject.toml" "$PKG/"
find "$PKG" -name "_C*.so" -delete
find "$PKG" -name "__pycache__" -type d -prune -exec rm -rf {} +
aarch64-linux-gnu-g++ -shared -fopenmp "$BUILD"/*.o -L "$SITE/torch/lib" -lc10 -ltorch -ltorch_cpu -ltorch_python \
  -o "$PKG/d9d/_C.cpython-311-aarch64-linux-gnu.so"

# 5. The CPU op tests under qemu-user, from the copy (the repository's d9d/ holds the x86 build). Deselected:
#    - tests that start Python subprocesses (qemu-user cannot exec an aarch64 binary without binfmt_misc, which a
#      container may not have): x86's capability and bfloat16-family reruns, and the bad-cap error;
#    - torch.compile (inductor compiles C++ at run time, and there is no aarch64 compiler inside the emulation);
#    - the bfloat16 reference test at K = 2816: on aarch64 nothing of d9d runs bfloat16 products (they are ATen's),
#      and ATen's own bfloat16 x W^T there is off the float64 reference by 0.009 to 0.010 of its largest value,
#      against 0.003 on x86 (torch 2.10, qemu's "max" CPU), which leaves the test's 0.02 no room for the LoRA term.
echo "== op tests on aarch64 (qemu-user)"
cd "$PKG"
export QEMU_LD_PREFIX="$SYSROOT" PYTHONPATH="$PKG:$SITE" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
qemu-aarch64-static "$SYSROOT/usr/bin/python3.11" -c \
  "import torch, d9d._C as c; print('torch', torch.__version__, 'capability', torch.backends.cpu.get_cpu_capability(), \
'd9d kernels', c.cpu_kernels_capability(), 'bfloat16 products', c.cpu_bf16_kernels())"
if [ $# -eq 0 ]; then
  edge=tests/ops/test_lora_apply_op.py::test_bfloat16_products_at_every_tile_edge_match_reference
  set -- -k "not every_bf16_kernel_family and not capability and not bf16_kernels_cap and not compile and not cuda" \
    --deselect "$edge[600-2816-1024-32-0.0]" --deselect "$edge[600-2816-1024-32-0.2]"
fi
exec qemu-aarch64-static "$SYSROOT/usr/bin/python3.11" -m pytest -q -p no:cacheprovider tests/ops "$@"
