"""``d9d::lora_forward`` under ``torch.autocast``: like ``nn.Linear``, it runs in the autocast dtype."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d9d.peft.lora.config import LoRAParameters
from d9d.peft.lora.layer import LoRALinear
from tests.fixtures import NEEDS_CUDA

pytestmark = pytest.mark.local

CUDA_AUTOCAST = [pytest.param(dtype, marks=NEEDS_CUDA) for dtype in (torch.float16, torch.bfloat16)]


def make_lora(in_features, out_features, device="cpu"):
    """A float32 LoRALinear with non-zero adapters (B starts at zero, which would hide the LoRA term)."""
    layer = LoRALinear(nn.Linear(in_features, out_features, device=device), LoRAParameters(r=4, alpha=8))
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
    return layer


def eager_lora(layer, x):
    """The unfused form, each linear of which autocast casts as it casts nn.Linear."""
    return layer.base(x) + layer.scale * F.linear(F.linear(x, layer.lora_A), layer.lora_B)


def assert_close_scaled(got, want, tol):
    error = (got.double() - want.double()).abs().max().item()
    assert error <= tol * want.double().abs().max().item(), f"error {error} over {tol} x max |reference|"


def check_against_eager_under_autocast(device, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24, device=device), make_lora(24, 12, device))
    x = torch.randn(5, 16, device=device)
    outputs, grads = [], []
    for fused in (True, False):
        model.zero_grad()
        with torch.autocast(device, dtype=dtype):
            hidden = model[0](x)
            y = model[1](hidden) if fused else eager_lora(model[1], hidden)
        assert y.dtype == dtype
        y.float().square().sum().backward()
        outputs.append(y)
        grads.append((model[1].lora_A.grad, model[1].lora_B.grad))
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert_close_scaled(outputs[0], outputs[1], tol)
    for got, want in zip(grads[0], grads[1], strict=True):
        assert got.dtype == torch.float32  # the adapters stay float32; the casts are in the graph
        assert_close_scaled(got, want, 2 * tol)


def test_sequential_of_linear_and_lora_under_cpu_autocast_matches_eager():
    # nn.Linear's output is bfloat16 under autocast; the LoRA layer after it takes it like nn.Linear would.
    check_against_eager_under_autocast("cpu", torch.bfloat16)


@pytest.mark.parametrize("dtype", CUDA_AUTOCAST)
def test_sequential_of_linear_and_lora_under_cuda_autocast_matches_eager(dtype):
    check_against_eager_under_autocast("cuda", dtype)


def test_lora_layer_alone_runs_in_the_autocast_dtype():
    layer = make_lora(10, 6)
    x = torch.randn(3, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        want = layer.base(x)
    assert y.dtype == want.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert layer(x).dtype == torch.float32


def test_float64_is_left_alone_under_autocast():
    layer = make_lora(10, 6).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(3, 10, dtype=torch.float64)).dtype == torch.float64


def test_autocast_kernels_are_registered_for_cpu_and_cuda():
    # Registered in C++ for both keys, so a CPU-only build carries the CUDA one too.
    for key in ("AutocastCPU", "AutocastCUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("d9d::lora_forward", key), key


def test_float32_adapters_pass_through_autocast_uncast():
    # A float32 pair goes into the op as it is, so dA and dB are the op's float32 results, bit for bit the same as
    # a direct call in bfloat16 with float32 adapters (a cast under autocast would round them to bfloat16 first).
    # Three blocks of rows at least: with dropout the op sums each block's products over blocks in float32, whichever
    # kernels take the products (ATen's 16-bit GEMMs take the largest blocks: 2^19 bfloat16 elements, 8192 rows of
    # 64 here).
    torch.manual_seed(0)
    x = torch.randn(3 * 8192, 64)
    weight = torch.randn(48, 64) / 8
    lora_A = (torch.randn(4, 64) / 8).requires_grad_()
    lora_B = torch.randn(48, 4).requires_grad_()
    seed = torch.tensor([9])
    grad_y = torch.randn(3 * 8192, 48).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.ops.d9d.lora_forward(x, weight, None, lora_A, lora_B, 0.5, 0.25, seed)
    y.backward(grad_y)
    want = torch.ops.d9d.lora_forward(x.bfloat16(), weight.bfloat16(), None, lora_A, lora_B, 0.5, 0.25, seed)
    _, dA, dB = torch.ops.d9d.lora_backward(
        grad_y, x.bfloat16(), weight.bfloat16(), lora_A.detach(), lora_B.detach(), 0.5, 0.25, seed, False
    )
    assert torch.equal(y, want)
    assert torch.equal(lora_A.grad, dA)
    assert torch.equal(lora_B.grad, dB)
    assert not torch.equal(lora_B.grad, lora_B.grad.bfloat16().float())  # not on the bfloat16 grid


def test_mixed_adapters_are_cast_under_autocast():
    # Only a float32 pair passes uncast; a float32 A with a bfloat16 B is cast like nn.Linear's inputs.
    x, weight = torch.randn(5, 8), torch.randn(6, 8)
    lora_A, lora_B = torch.randn(2, 8), torch.randn(6, 2).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.ops.d9d.lora_forward(x, weight, None, lora_A, lora_B, 1.0, 0.0, torch.tensor([0]))
    want = torch.ops.d9d.lora_forward(
        x.bfloat16(), weight.bfloat16(), None, lora_A.bfloat16(), lora_B, 1.0, 0.0, torch.tensor([0])
    )
    assert torch.equal(y, want)
