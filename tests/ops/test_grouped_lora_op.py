"""The grouped (per-expert) LoRA ops against a float64 reference, gradcheck, opcheck and torch.compile."""

import pytest
import torch

from d9d.ops.experts import grouped_lora_linear, grouped_lora_merge_

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
    generator = torch.Generator().manual_seed(1234)
    keep = (torch.rand(x.shape, generator=generator) >= 0.3).double() / 0.7
    torch.testing.assert_close(a, _reference(x, weight, lora_A, lora_B, offsets, 0.5, keep))
    evaluated = grouped_lora_linear(x, weight, lora_A, lora_B, offsets, 0.5, 0.3, False, seed)
    torch.testing.assert_close(evaluated, _reference(x, weight, lora_A, lora_B, offsets, 0.5))


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
