"""Builds d9d and its compiled extension ``d9d._C`` against the torch that is already installed.

Package metadata lives in pyproject.toml. Install with ``pip install --no-build-isolation -e .`` so the extension
links against the torch in the current environment. The CUDA kernels are built when that torch has CUDA and nvcc
is found (``FORCE_CUDA=1`` forces them; ``TORCH_CUDA_ARCH_LIST`` picks the architectures).
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


# The one rule for what gets built, shared with CMakeLists.txt: every .cpp file under csrc/ (recursively), plus every
# .cu file for the CUDA build. A new source file needs no edit here or there.
def _sources(extension: str) -> list[str]:
    paths = glob.glob(os.path.join(ROOT, "csrc", "**", f"*.{extension}"), recursive=True)
    return sorted(os.path.relpath(path, ROOT) for path in paths)


def _extension():
    torch_has_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    with_cuda = os.environ.get("FORCE_CUDA", "0") == "1" or torch_has_cuda
    sources = _sources("cpp")
    # at::parallel_for is inline and only runs in parallel when compiled with OpenMP; libgomp.so.1 then resolves to
    # the copy torch already loaded, so torch.set_num_threads governs the extension too. The per-capability kernels
    # (csrc/cpu/capability/) switch the instruction set in their source, so every file takes the same flags.
    extra_compile_args = {"cxx": ["-O3", "-fopenmp"]}
    options = {"extra_compile_args": extra_compile_args, "extra_link_args": ["-fopenmp"]}
    if not with_cuda:
        return CppExtension("d9d._C", sources, **options)
    extra_compile_args["nvcc"] = ["-O3"]
    return CUDAExtension("d9d._C", [*sources, *_sources("cu")], **options)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
