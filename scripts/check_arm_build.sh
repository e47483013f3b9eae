#!/usr/bin/env bash
# The aarch64 build of d9d's CPU kernels (NEON), compiled and tested on an x86-64 machine: d9d._C is cross-compiled
# with Debian's aarch64 GCC against PyPI's aarch64 CPU wheel of torch, and the CPU op tests run on it under
# qemu-user. This checks correctness only: qemu's timings say nothing about the speed of an ARM CPU.
#
#   sudo scripts/check_arm_build.sh                 # about 10 minutes on 2 cores
#   sudo scripts/check_arm_build.sh -k dora         # more pytest arguments narrow the selection
#   sudo D9D_ARM_TORCH=2.8.0 scripts/check_arm_build.sh   # the oldest torch that d9d supports
#
# torch 2.10 is the newest aarch64 wheel on PyPI without CUDA (later ones need CUDA's libraries to import), so this
# also builds d9d against an older torch than `make` does. Needs root (apt-get and debootstrap), PyPI and Debian's
# mirror. The Debian root and the wheels stay under D9D_ARM_WORK (default /tmp/d9d-arm) for the next run; the
# build is redone every time. One run at a time per work directory.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${D9D_ARM_WORK:-/tmp/d9d-arm}"
TORCH_VERSION="${D9D_ARM_TORCH:-2.10.0}"
# The host's Python, for pip download and unzipping only.
HOST_PYTHON="${D9D_ARM_HOST_PYTHON:-$ROOT/.venv/bin/python}"
command -v "$HOST_PYTHON" >/dev/null || HOST_PYTHON=python3
mkdir -p "$WORK"

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "check_arm_build.sh: $1 needs root" >&2
    exit 1
  fi
}

# 1. The cross compiler and the emulator.
if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64-static >/dev/null ||
  ! command -v debootstrap >/dev/null; then
  need_root "apt-get install qemu-user-static g++-aarch64-linux-gnu debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static g++-aarch64-linux-gnu debootstrap
fi

# 2. An arm64 Debian with Python 3.11 (the wheels' ABI), unpacked only: debootstrap's first stage downloads the
#    packages, and dpkg-deb unpacks them all, so nothing runs inside it.
SYSROOT="$WORK/root"
if [ ! -f "$SYSROOT/.complete" ]; then
  need_root "debootstrap"
  echo "== arm64 Debian root in $SYSROOT"
  rm -rf "$SYSROOT"
  if ! debootstrap --foreign --arch=arm64 --variant=minbase --include=python3.11,libpython3.11-dev,libgomp1 \
    bookworm "$SYSROOT" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1; then
    tail -20 "$WORK/debootstrap.log" >&2
    exit 1
  fi
  for deb in "$SYSROOT"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$SYSROOT"; done
  touch "$SYSROOT/.complete"
fi

# 3. torch and d9d's runtime and test dependencies as aarch64 wheels, unpacked into one directory for PYTHONPATH.
#    torch's metadata lists CUDA's packages for every Linux; its aarch64 CPU wheel needs none of them, so torch comes
#    without its dependencies and those that it imports come by name.
PACKAGES="filelock typing-extensions sympy networkx jinja2 fsspec pydantic safetensors tqdm regex numpy pytest"
PACKAGES="$PACKAGES expecttest"
SITE="$WORK/site-torch-$TORCH_VERSION"
WHEELS="$WORK/wheels-$TORCH_VERSION"
if [ "$(cat "$SITE/.complete" 2>/dev/null)" != "$PACKAGES" ]; then  # redone when the list changes
  echo "== aarch64 wheels in $SITE"
  rm -rf "$SITE" "$WHEELS"
  download=("$HOST_PYTHON" -m pip download -q --only-binary=:all: --python-version 3.11 -d "$WHEELS")
  for tag in manylinux2014 manylinux_2_17 manylinux_2_27 manylinux_2_28; do
    download+=(--platform "${tag}_aarch64")
  done
  # pip's warnings about this machine's configured indexes are noise; its errors pass, and so does its status.
  "${download[@]}" --no-deps "torch==$TORCH_VERSION" 2>&1 | { grep -v "^WARNING" || true; }
  # shellcheck disable=SC2086  # one word per package
  "${download[@]}" $PACKAGES 2>&1 | { grep -v "^WARNING" || true; }
  mkdir -p "$SITE"
  for wheel in "$WHEELS"/*.whl; do "$HOST_PYTHON" -m zipfile -e "$wheel" "$SITE"; done
  echo "$PACKAGES" >"$SITE/.complete"
fi

# 4. d9d._C for aarch64: every .cpp under csrc/ with the flags that setup.py gets from torch (up to 2.10 its
#    extensions are C++17), compiled in parallel (a response file carries the flags, whatever the paths) and linked
#    against the wheel's libraries.
BUILD="$WORK/build"
PKG="$WORK/pkg"
rm -rf "$BUILD" "$PKG"
mkdir -p "$BUILD" "$PKG"
printf '"%s"\n' -O3 -fopenmp -fPIC -std=c++17 -Wno-psabi -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
  -I"$SITE/torch/include" -I"$SITE/torch/include/torch/csrc/api/include" -I"$SYSROOT/usr/include/python3.11" \
  -idirafter "$SYSROOT/usr/include" >"$BUILD/flags.rsp"
echo "== compiling $(cd "$ROOT" && find csrc -name '*.cpp' | wc -l) files for aarch64"
# shellcheck disable=SC2016  # the sh -c program expands its own arguments
(cd "$ROOT" && find csrc -name '*.cpp' -print0 | sort -z) | xargs -0 -n 1 -P "$(nproc)" sh -c \
  'aarch64-linux-gnu-g++ @"$1/flags.rsp" -c "$2/$3" -o "$1/$(echo "$3" | tr / _).o" || exit 255' sh "$BUILD" "$ROOT"
cp -r "$ROOT/d9d" "$ROOT/tests" "$ROOT/pyproject.toml" "$PKG/"
find "$PKG" -name "_C*.so" -delete
find "$PKG" -name "__pycache__" -type d -prune -exec rm -rf {} +
aarch64-linux-gnu-g++ -shared -fopenmp "$BUILD"/*.o -L"$SITE/torch/lib" -lc10 -ltorch -ltorch_cpu -ltorch_python \
  -o "$PKG/d9d/_C.cpython-311-aarch64-linux-gnu.so"

# 5. The CPU op tests under qemu-user, from the copy (the repository's d9d/ holds the x86 build). Always left out:
#    - the CUDA variants (marked cuda);
#    - tests that start Python subprocesses, as qemu-user cannot exec an aarch64 binary without binfmt_misc, which a
#      container may not have: x86's capability and bfloat16-family reruns, and the bad-cap error;
#    - DoRA's torch.compile tests, whose inductor backend compiles C++ at run time, with no aarch64 compiler inside
#      the emulation (the aot_eager ones run).
#    The bfloat16 reference test at K = 2816 may fail on aarch64, as an allowed failure (see its comment).
echo "== op tests on aarch64 (qemu-user)"
cd "$PKG"
export QEMU_LD_PREFIX="$SYSROOT" PYTHONPATH="$PKG:$SITE" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
python=(qemu-aarch64-static "$SYSROOT/usr/bin/python3.11")
"${python[@]}" -c "import torch, d9d._C as c; print('torch', torch.__version__, 'capability', \
torch.backends.cpu.get_cpu_capability(), 'd9d kernels', c.cpu_kernels_capability(), 'bfloat16 products', \
c.cpu_bf16_kernels())"
apply=tests/ops/test_lora_apply_op.py
exec "${python[@]}" -m pytest -q -p no:cacheprovider tests/ops -m "not cuda" \
  --deselect "$apply::test_every_cpu_capability_matches_reference" \
  --deselect "$apply::test_every_bf16_kernel_family_matches_reference" \
  --deselect "$apply::test_a_bad_bf16_kernels_cap_names_the_variable" \
  --deselect tests/ops/test_dora_ops.py::test_compile_fullgraph_matches_eager \
  --deselect tests/ops/test_dora_ops.py::test_cpu_calls_take_the_fused_op_and_compile "$@"
