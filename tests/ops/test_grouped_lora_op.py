"""The grouped (per-expert) LoRA ops against a float64 reference, gradcheck, opcheck and torch.compile."""

import pytest
import torch

from d9d.ops.experts import grouped_lora_linear, grouped_lora_merge_
from d9d.ops.lora import dropout_mask
from tests.fixtures import assert_compiled_autograd_matches_eager

pytestmark = pytest.mark.local


def _inputs(experts=4, rows=(3, 0, 5, 2), out=6, inp=5, r=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(rows), inp, generator=g, dtype=dtype)
    weight = torch.randn(experts, out, inp, generator=g, dtype=dtype)
    lora_A = torch.randn(experts, r, inp, generator=g, dtype=dtype)
    lora_B = torch.randn(experts, out, r, generator=g, dtype=dtype)
    offsets = torch.tensor(rows, dtype=torch.int64).cumsum(0)
    return x, weight, lora_A, lora_B, offsets


def _reference(x, weight, lora_A, lora_B, offsets, scale, keep=None):
    out, start = [], 0
    x_lora = x if keep is None else x * keep
    for e, end in enumerate(offsets.tolist()):
        out.append(x[start:end] @ weight[e].T + scale * x_lora[start:end] @ lora_A[e].T @ lora_B[e].T)
        start = end
    return torch.cat(out)


def test_forward_matches_the_reference_and_only_routes_each_experts_rows():
    x, weight, lora_A, lora_B, offsets = _inputs(dtype=torch.float32)
    got = grouped_lora_linear(x, weight, lora_A, lora_B, offsets, 0.7, 0.0, training=True)
    expected = _reference(*(t.double() for t in (x, weight, lora_A, lora_B)), offsets, 0.7)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_dropout_mask_is_seeded_and_scaled():
    x, weight, lora_A, lora_B, offsets = _inputs()
    seed = torch.tensor([1234])
    a = grouped_lora_linear(x, weight, lora_A, lora_B, offsets, 0.5, 0.3, True, seed)
    b = grouped_lora_linear(x, weight, lora_A, lora_B, offsets, 0.5, 0.3, True, seed)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    keep = dropout_mask(x, 0.3, seed).double() / 0.7
    assert 0 < keep.count_nonzero() < keep.numel()
    torch.testing.assert_close(a, _reference(x, weight, lora_A, lora_B, offsets, 0.5, keep))
    other = grouped_lora_linear(x, weight, lora_A, lora_B, offsets, 0.5, 0.3, True, torch.tensor([1235]))
    assert not torch.allclose(a, other)
    evaluated = grouped_lora_linear(x, weight, lora_A, lora_B, offsets, 0.5, 0.3, False, seed)
    torch.testing.assert_close(evaluated, _reference(x, weight, lora_A, lora_B, offsets, 0.5))


def test_dropout_mask_equals_the_2d_ops_mask_of_the_same_rows():
    # With W_e = 0 and A_e = B_e = I, y = dropout(x): its zeros are the mask, element by element, on every expert's
    # rows (widths not a multiple of the 8-column Philox groups, an expert without rows, rows past the last expert).
    experts, width, rows = 3, 21, (7, 0, 12)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(sum(rows) + 2, width, generator=g, dtype=torch.float64)
    weight = torch.zeros(experts, width, width, dtype=torch.float64)
    eye = torch.eye(width, dtype=torch.float64).expand(experts, width, width).contiguous()
    offsets = torch.tensor(rows).cumsum(0)
    seed = torch.tensor(77)
    y = grouped_lora_linear(x, weight, eye, eye, offsets, 1.0, 0.4, True, seed)
    mask = dropout_mask(x, 0.4, seed)
    routed = int(offsets[-1])
    torch.testing.assert_close(y[:routed], x[:routed] * mask[:routed] / 0.6, rtol=1e-12, atol=0)
    assert torch.equal(y[routed:], torch.zeros_like(y[routed:]))
    # One expert over all rows is the 2-D op: the same output for the same seed.
    x32, w32, A32, B32 = (t.float() for t in (x, torch.randn(1, 5, width, generator=g),
                                              torch.randn(1, 3, width, generator=g), torch.randn(1, 5, 3, generator=g)))
    grouped = grouped_lora_linear(x32, w32, A32, B32, torch.tensor([x.shape[0]]), 0.5, 0.4, True, seed)
    flat = torch.ops.d9d.lora_forward(x32, w32[0], None, A32[0], B32[0], 0.5, 0.4, seed)
    torch.testing.assert_close(grouped, flat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_gradcheck_float64(dropout, weight_grad):
    x, weight, lora_A, lora_B, offsets = _inputs()
    for t in (x, lora_A, lora_B):
        t.requires_grad_(True)
    weight.requires_grad_(weight_grad)
    seed = torch.tensor([99])

    def f(x, weight, lora_A, lora_B):
        return grouped_lora_linear(x, weight, lora_A, lora_B, offsets, 1.5, dropout, True, seed)

    assert torch.autograd.gradcheck(f, (x, weight, lora_A, lora_B))


def test_compiled_autograd_traces_the_backward():
    x, weight, lora_A, lora_B, offsets = _inputs(dtype=torch.float32)
    seed = torch.tensor([5])
    assert_compiled_autograd_matches_eager(
        lambda x, A, B: torch.ops.d9d.grouped_lora_forward(x, weight, A, B, offsets, 0.5, 0.2, seed).square().sum(),
        (x, lora_A, lora_B))


def test_opcheck():
    x, weight, lora_A, lora_B, offsets = _inputs(dtype=torch.float32)
    for t in (x, lora_A, lora_B):
        t.requires_grad_(True)
    for dropout, seed in ((0.0, torch.tensor([0])), (0.2, torch.tensor([5]))):
        torch.library.opcheck(torch.ops.d9d.grouped_lora_forward.default,
                              (x, weight, lora_A, lora_B, offsets, 0.5, dropout, seed))
    torch.library.opcheck(torch.ops.d9d.grouped_lora_merge_.default,
                          (weight.clone(), lora_A.detach(), lora_B.detach(), 0.5))


def test_torch_compile_forward_and_backward_match_eager():
    x, weight, lora_A, lora_B, offsets = _inputs(dtype=torch.float32)
    lora_A.requires_grad_(True)

    def step(x, lora_A):
        return (grouped_lora_linear(x, weight, lora_A, lora_B, offsets, 0.5, 0.0, True).sin()).sum()

    eager = torch.autograd.grad(step(x, lora_A), lora_A)[0]
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(torch.autograd.grad(compiled(x, lora_A), lora_A)[0], eager)


def test_merge_adds_each_experts_update_in_place():
    _, weight, lora_A, lora_B, _ = _inputs()
    merged = weight.clone()
    grouped_lora_merge_(merged, lora_A.float(), lora_B.float(), 0.25)
    torch.testing.assert_close(merged, weight + 0.25 * torch.einsum("eor,eri->eoi", lora_B, lora_A))


def test_bad_shapes_are_refused_naming_the_op():
    x, weight, lora_A, lora_B, offsets = _inputs()
    with pytest.raises(ValueError, match=r"grouped_lora_forward: for weight \(4, 6, 5\) lora_A must be"):
        grouped_lora_linear(x, weight, lora_A[:, :, :4], lora_B, offsets, 1.0, 0.0, False)
    with pytest.raises(ValueError, match=r"offsets must be int64 of shape \(4,\)"):
        grouped_lora_linear(x, weight, lora_A, lora_B, offsets[:3], 1.0, 0.0, False)


def test_bfloat16_forward_and_backward_follow_the_float64_reference():
    x, weight, lora_A, lora_B, offsets = _inputs(rows=(40, 0, 70, 30), inp=24, out=20, r=4, seed=3)
    seed = torch.tensor(8)
    keep = dropout_mask(x, 0.2, seed).double() / 0.8
    ref_inputs = [t.clone().requires_grad_(True) for t in (x, lora_A, lora_B)]
    expected = _reference(ref_inputs[0], weight, ref_inputs[1], ref_inputs[2], offsets, 0.5, keep)
    low = [t.bfloat16().requires_grad_(True) for t in (x, lora_A, lora_B)]
    got = grouped_lora_linear(low[0], weight.bfloat16(), low[1], low[2], offsets, 0.5, 0.2, True, seed)
    torch.testing.assert_close(got.double(), expected, rtol=3e-2, atol=0.3)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    got.backward(grad.bfloat16())
    for reference, value in zip(ref_inputs, low, strict=True):
        scale = reference.grad.abs().max()
        torch.testing.assert_close(value.grad.double() / scale, reference.grad / scale, rtol=0, atol=3e-2)


def test_bad_offsets_and_dtypes_are_refused_by_the_kernel_naming_the_op_and_argument():
    x, weight, lora_A, lora_B, _ = _inputs()
    seed = torch.tensor(0)
    with pytest.raises(RuntimeError, match=r"grouped_lora_forward: offsets must be non-decreasing.*offsets\[2\]"):
        torch.ops.d9d.grouped_lora_forward(x, weight, lora_A, lora_B, torch.tensor([3, 5, 4, 10]), 1.0, 0.0, seed)
    with pytest.raises(RuntimeError, match=r"grouped_lora_forward: offsets must be non-decreasing end rows in \[0, "):
        torch.ops.d9d.grouped_lora_forward(x, weight, lora_A, lora_B, torch.tensor([3, 5, 8, 11]), 1.0, 0.0, seed)
    with pytest.raises(RuntimeError, match=r"grouped_lora_forward: lora_B must have x's dtype"):
        torch.ops.d9d.grouped_lora_forward(x, weight, lora_A, lora_B.float(), torch.tensor([3, 3, 8, 10]), 1.0,
                                           0.0, seed)
    with pytest.raises(RuntimeError, match=r"grouped_lora_backward: grad must be \(rows, out\)"):
        torch.ops.d9d.grouped_lora_backward(x, x, weight, lora_A, lora_B, torch.tensor([3, 3, 8, 10]), 1.0, 0.0,
                                            seed, False)
    before = weight.clone()
    with pytest.raises(RuntimeError, match=r"grouped_lora_merge_: scale must be finite"):
        torch.ops.d9d.grouped_lora_merge_(weight, lora_A, lora_B, float("nan"))
    assert torch.equal(weight, before)


@pytest.mark.parametrize("op", ["grouped_lora_forward", "grouped_lora_backward", "grouped_lora_merge_"])
def test_the_ops_are_cpp_kernels(op):
    """The schema and the CPU kernel come from d9d._C (csrc/grouped_lora*.cpp); CUDA builds add a CUDA kernel."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"d9d::{op}", "CPU")
    if torch.cuda.is_available():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"d9d::{op}", "CUDA")
