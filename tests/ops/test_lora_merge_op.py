"""The in-place merge op ``lora_merge_`` (``d9d::lora_merge_``)."""

import pytest
import torch

from d9d.ops import lora_merge_
from tests.fixtures import DEVICES

pytestmark = pytest.mark.local

TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}


def merge_inputs(dtype, adapter_dtype, device, out_features=12, in_features=10, rank=3):
    weight = torch.randn(out_features, in_features, dtype=dtype, device=device)
    lora_A = torch.randn(rank, in_features, dtype=adapter_dtype, device=device)
    lora_B = torch.randn(out_features, rank, dtype=adapter_dtype, device=device)
    return weight, lora_A, lora_B


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, None])
def test_merge_and_merge_with_negative_scale_match_reference(device, dtype, adapter_dtype):
    weight, lora_A, lora_B = merge_inputs(dtype, adapter_dtype or dtype, device)
    original = weight.clone()
    delta = 0.75 * lora_B.double() @ lora_A.double()
    tol = TOLERANCES[dtype] * max(1.0, delta.abs().max().item())
    storage = weight.data_ptr()

    lora_merge_(weight, lora_A, lora_B, 0.75)
    assert weight.data_ptr() == storage
    assert weight.dtype == dtype
    assert (weight.double() - (original.double() + delta)).abs().max().item() <= tol

    lora_merge_(weight, lora_A, lora_B, -0.75)  # undoes the merge, up to rounding
    assert (weight.double() - original.double()).abs().max().item() <= 2 * tol


def test_merge_of_a_parameter_that_requires_grad():
    weight = torch.nn.Parameter(torch.randn(4, 5))
    lora_A, lora_B = torch.randn(2, 5), torch.randn(4, 2)
    want = weight.detach().double() + 2.0 * lora_B.double() @ lora_A.double()
    lora_merge_(weight, lora_A, lora_B, 2.0)
    torch.testing.assert_close(weight.detach().double(), want, rtol=1e-5, atol=1e-5)


def test_merge_works_on_a_non_contiguous_weight():
    base = torch.randn(5, 4)
    weight = base.t()
    lora_A, lora_B = torch.randn(2, 5), torch.randn(4, 2)
    want = weight.double() + lora_B.double() @ lora_A.double()
    lora_merge_(weight, lora_A, lora_B, 1.0)
    torch.testing.assert_close(base.t().double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    weight, lora_A, lora_B = merge_inputs(torch.float32, torch.float32, device)
    torch.library.opcheck(torch.ops.d9d.lora_merge_.default, (weight.clone(), lora_A, lora_B, 0.5))


def test_merge_is_registered_once_for_every_device():
    # Pure ATen: one CompositeExplicitAutograd kernel, no per-device copies; meta tensors go through it too.
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has_kernel("d9d::lora_merge_", "CompositeExplicitAutograd")
    assert not has_kernel("d9d::lora_merge_", "CPU")
    assert not has_kernel("d9d::lora_merge_", "CUDA")
    weight, lora_A, lora_B = (t.to("meta") for t in merge_inputs(torch.float32, torch.float32, "cpu"))
    lora_merge_(weight, lora_A, lora_B, 0.5)
    assert weight.shape == (12, 10)


def test_unmerge_op_is_gone():
    # A merge is undone with -scale; there is no second op to keep in sync.
    assert not hasattr(torch.ops.d9d, "lora_unmerge_")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.randn(6), torch.randn(2, 6), torch.randn(6, 2)), r"lora_merge_: weight must be out x in"),
        ((torch.randn(6, 5), torch.randn(2, 6), torch.randn(6, 2)), r"lora_merge_: lora_A must be r x in"),
        ((torch.randn(6, 5), torch.randn(2, 5), torch.randn(6, 3)), r"lora_merge_: lora_B must be out x r"),
        ((torch.randn(6, 5).int(), torch.randn(2, 5), torch.randn(6, 2)), r"lora_merge_: weight must be float32"),
    ],
)
def test_bad_input_names_the_op_and_argument(args, message):
    weight = args[0].clone()
    with pytest.raises(RuntimeError, match=message):
        lora_merge_(*args, 1.0)
    assert torch.equal(args[0], weight)  # unchanged
