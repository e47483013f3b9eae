"""Loads ``d9d._C`` (the C++/CUDA kernels of ``torch.ops.d9d``) and registers their fake kernels.

The autograd of the apply ops is in C++ (``csrc/apply_autograd.cpp``).
"""

import torch

try:
    import d9d._C
except ImportError as error:
    raise ImportError(
        "d9d's compiled extension d9d._C is missing or failed to load "
        f"({error}). Build it against the installed torch with `pip install --no-build-isolation -e .` "
        "from the repository root."
    ) from error

__all__ = ["cpu_bfloat16_kernels", "cpu_kernels_capability", "draw_seed", "no_seed"]


def cpu_kernels_capability() -> str:
    """The CPU capability whose build of d9d's vectorized kernels runs here ("DEFAULT", "AVX2", "AVX512").

    It follows ``torch.backends.cpu.get_cpu_capability()`` (and so ``ATEN_CPU_CAPABILITY``).
    """
    return d9d._C.cpu_kernels_capability()


def cpu_bfloat16_kernels() -> str:
    """What runs the bfloat16 LoRA products on the CPU here: "AMX" (d9d's kernels, on CPUs with AMX-BF16 under the
    AVX512 capability), "AVX512_BF16" (d9d's kernels, on CPUs with AVX512_BF16 but no AMX, under the AVX512
    capability) or "ATen" (oneDNN's GEMMs).

    The environment variable ``D9D_CPU_BF16_KERNELS`` (``amx``, ``avx512_bf16`` or ``aten``) caps the choice, as
    ``ONEDNN_MAX_CPU_ISA`` caps oneDNN's; it is read once per process.
    """
    return d9d._C.cpu_bf16_kernels()


def draw_seed() -> torch.Tensor:
    """A fresh dropout seed from torch's default generator, so ``torch.manual_seed`` makes the masks reproducible.

    The seed travels as a 0-dim CPU int64 tensor rather than a Python int so that ``torch.compile`` traces it as
    data; 0-dim, so that DTensor takes it as a replicated scalar without a warning.
    """
    return torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu")  # never the default device


def no_seed() -> torch.Tensor:
    """The seed argument for calls without dropout (its value is ignored)."""
    return torch.zeros((), dtype=torch.int64, device="cpu")


@torch.library.register_fake("d9d::lora_forward")
def _lora_forward_fake(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    dropout: float,
    seed: torch.Tensor,
) -> torch.Tensor:
    torch._check(x.dim() >= 1, lambda: "lora_forward: x must have at least 1 dimension")
    torch._check(weight.shape[1] == x.shape[-1], lambda: f"lora_forward: weight must be out x in, got {weight.shape}")
    torch._check(lora_A.shape[1] == x.shape[-1], lambda: f"lora_forward: lora_A must be r x in, got {lora_A.shape}")
    torch._check(
        lora_B.shape[0] == weight.shape[0], lambda: f"lora_forward: lora_B must be out x r, got {lora_B.shape}"
    )
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("d9d::lora_backward")
def _lora_backward_fake(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    dropout: float,
    seed: torch.Tensor,
    need_grad_x: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_x = x.new_empty(x.shape) if need_grad_x else x.new_empty((0,))
    return grad_x, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


@torch.library.register_fake("d9d::lora_merge_")
def _lora_merge_fake(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> None:
    return None


@torch.library.register_fake("d9d::dropout_mask")
def _dropout_mask_fake(x: torch.Tensor, dropout: float, seed: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.bool)
