"""DoRA's ops: the row norm and merge of ``d9d::dora_weight_norm`` / ``d9d::dora_merge_``, and ``dora_linear``."""

import pytest
import torch
import torch.nn.functional as F

from d9d.ops import dora_linear, dora_merge_, dora_weight_norm
from tests.fixtures import DEVICES, assert_compiled_autograd_matches_eager

pytestmark = pytest.mark.local

TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}


def make_weights(out_features, in_features, rank, dtype=torch.float32, device="cpu"):
    weight = torch.randn(out_features, in_features, dtype=dtype, device=device)
    lora_A = torch.randn(rank, in_features, dtype=dtype, device=device) / in_features**0.5
    lora_B = torch.randn(out_features, rank, dtype=dtype, device=device)
    return weight, lora_A, lora_B


def reference_norm(weight, lora_A, lora_B, scale):
    return torch.linalg.vector_norm(weight.double() + scale * lora_B.double() @ lora_A.double(), dim=1)


def reference_dora(x, weight, bias, lora_A, lora_B, magnitude, scale, dropped=None):
    """PEFT's formula in float64: ``x W^T + b + (f - 1) d W^T + f s d A^T B^T`` with ``d`` the dropped-out input."""
    x, weight, lora_A, lora_B, magnitude = (t.double() for t in (x, weight, lora_A, lora_B, magnitude))
    d = x if dropped is None else dropped.double()
    factor = magnitude / reference_norm(weight, lora_A.detach(), lora_B.detach(), scale)  # PEFT detaches the norm
    base = F.linear(x, weight, None if bias is None else bias.double())
    return base + (factor - 1) * F.linear(d, weight) + factor * scale * (d @ lora_A.t() @ lora_B.t())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 5, 3), (300, 9, 4), (1, 1, 1)])  # 300 x 9 spans several row blocks
def test_weight_norm_matches_reference(device, dtype, shape):
    weight, lora_A, lora_B = make_weights(*shape, dtype=dtype, device=device)
    got = dora_weight_norm(weight, lora_A, lora_B, 0.7)
    assert got.dtype == (torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype)
    want = reference_norm(weight, lora_A, lora_B, 0.7)
    torch.testing.assert_close(got.double(), want, rtol=TOLERANCES[dtype], atol=TOLERANCES[dtype])


def test_weight_norm_over_many_blocks_of_wide_rows():
    weight, lora_A, lora_B = make_weights(97, 4099, 5)  # blocks of 15 rows, the last one partial
    torch.testing.assert_close(dora_weight_norm(weight, lora_A, lora_B, 2.0).double(),
                               reference_norm(weight, lora_A, lora_B, 2.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_merge_matches_reference(device, dtype):
    weight, lora_A, lora_B = make_weights(300, 9, 4, dtype=dtype, device=device)
    magnitude = torch.rand(300, dtype=torch.float32, device=device) + 0.5
    folded = weight.double() + 1.5 * lora_B.double() @ lora_A.double()
    want = magnitude.double().unsqueeze(1) / reference_norm(weight, lora_A, lora_B, 1.5).unsqueeze(1) * folded
    storage = weight.data_ptr()
    dora_merge_(weight, lora_A, lora_B, magnitude, 1.5)
    assert weight.data_ptr() == storage
    assert weight.dtype == dtype
    torch.testing.assert_close(weight.double(), want, rtol=TOLERANCES[dtype], atol=TOLERANCES[dtype])


def test_merged_rows_have_the_magnitude_as_norm():
    weight, lora_A, lora_B = make_weights(6, 11, 2, dtype=torch.float64)
    magnitude = torch.rand(6, dtype=torch.float64) + 0.1
    dora_merge_(weight, lora_A, lora_B, magnitude, 0.5)
    torch.testing.assert_close(torch.linalg.vector_norm(weight, dim=1), magnitude, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    weight, lora_A, lora_B = make_weights(13, 6, 3, device=device)
    magnitude = torch.rand(13, device=device)
    torch.library.opcheck(torch.ops.d9d.dora_weight_norm.default, (weight, lora_A, lora_B, 0.5))
    torch.library.opcheck(torch.ops.d9d.dora_merge_.default, (weight, lora_A, lora_B, magnitude, 0.5))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lora_A": torch.randn(3, 7)}, r"dora_weight_norm: lora_A must be r x in"),
        ({"lora_B": torch.randn(13, 2)}, r"dora_weight_norm: lora_B must be out x r"),
        ({"weight": torch.randn(13)}, r"dora_weight_norm: weight must be out x in"),
        ({"scale": float("inf")}, r"dora_weight_norm: scale must be finite"),
    ],
)
def test_bad_input_names_the_op_and_argument(change, message):
    weight, lora_A, lora_B = make_weights(13, 6, 3)
    args = {"weight": weight, "lora_A": lora_A, "lora_B": lora_B, "scale": 0.5, **change}
    with pytest.raises(RuntimeError, match=message):
        dora_weight_norm(**args)


def test_merge_refuses_a_magnitude_of_the_wrong_size_and_changes_nothing():
    weight, lora_A, lora_B = make_weights(13, 6, 3)
    before = weight.clone()
    with pytest.raises(RuntimeError, match=r"dora_merge_: magnitude must be 1D of size out"):
        dora_merge_(weight, lora_A, lora_B, torch.rand(12), 0.5)
    assert torch.equal(weight, before)


def dora_inputs(shape, in_features=24, out_features=20, rank=4, dtype=torch.float32, bias=True):
    x = torch.randn(*shape, in_features, dtype=dtype, requires_grad=True)
    weight, lora_A, lora_B = make_weights(out_features, in_features, rank, dtype=dtype)
    b = torch.randn(out_features, dtype=dtype, requires_grad=True) if bias else None
    magnitude = (torch.rand(out_features, dtype=dtype) + 0.5).requires_grad_()
    return x, weight, b, lora_A.requires_grad_(), lora_B.requires_grad_(), magnitude


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 5), (64,), (2, 0)])  # 64 rows fold the adapters into the weight
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_linear_matches_reference_forward_and_backward(bias, shape, dropout):
    x, weight, b, lora_A, lora_B, magnitude = dora_inputs(shape, bias=bias)
    torch.manual_seed(7)
    got = dora_linear(x, weight, b, lora_A, lora_B, magnitude, 0.8, dropout, training=True)
    torch.manual_seed(7)
    # The op's draw: F.dropout's mask depends on the seed and shape only, so ones give mask / (1 - p).
    mask = F.dropout(torch.ones_like(x.detach()), dropout, training=True).double() if dropout else None
    leaves = [t for t in (x, b, lora_A, lora_B, magnitude) if t is not None]
    refs = [t.detach().double().requires_grad_() for t in leaves]
    ref_x, *rest = refs
    ref_b = rest.pop(0) if bias else None
    ref_A, ref_B, ref_m = rest
    want = reference_dora(ref_x, weight, ref_b, ref_A, ref_B, ref_m, 0.8,
                          None if mask is None else ref_x * mask)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(got)
    got.backward(grad)
    want.backward(grad.double())
    for leaf, ref in zip(leaves, refs, strict=True):
        torch.testing.assert_close(leaf.grad.double(), ref.grad, rtol=1e-4, atol=1e-4)


# bfloat16 at a shape that the base GEMM driver of AVX512_BF16 CPUs takes (see test_lora_apply_op.py): there the LoRA
# term of y, and of dx without dropout, rides the base GEMM's sums, and the factor scales y and dy around it.
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_bfloat16_dora_linear_on_many_rows_matches_reference(dropout):
    x, weight, b, lora_A, lora_B, magnitude = dora_inputs((1030,), 256, 96, 8, dtype=torch.bfloat16)
    torch.manual_seed(7)
    got = dora_linear(x, weight, b, lora_A, lora_B, magnitude, 0.8, dropout, training=True)
    torch.manual_seed(7)
    mask = F.dropout(torch.ones_like(x.detach()), dropout, training=True).double() if dropout else None
    leaves = [x, b, lora_A, lora_B, magnitude]
    refs = [t.detach().double().requires_grad_() for t in leaves]
    ref_x, ref_b, ref_A, ref_B, ref_m = refs
    want = reference_dora(ref_x, weight, ref_b, ref_A, ref_B, ref_m, 0.8, None if mask is None else ref_x * mask)

    def assert_close_scaled(got, want):  # within bfloat16's tolerance of the reference's largest magnitude
        assert (got.double() - want).abs().max() <= TOLERANCES[torch.bfloat16] * want.abs().max()

    assert_close_scaled(got, want)
    grad = torch.randn_like(got)
    got.backward(grad)
    want.backward(grad.double())
    for leaf, ref in zip(leaves, refs, strict=True):
        assert_close_scaled(leaf.grad, ref.grad)


def test_the_norm_is_a_constant_for_autograd():
    """PEFT detaches the norm: B's gradient has no term through it (it would with a differentiable norm)."""
    x, weight, _, lora_A, lora_B, magnitude = dora_inputs((5,), dtype=torch.float64, bias=False)
    dora_linear(x, weight, None, lora_A, lora_B, magnitude, 1.0, 0.0, True).sum().backward()
    factor = (magnitude / reference_norm(weight, lora_A, lora_B, 1.0)).detach()
    want_B = (factor.unsqueeze(1) * torch.ones(5, 20, dtype=torch.float64).t()) @ (x.detach() @ lora_A.detach().t())
    torch.testing.assert_close(lora_B.grad, want_B, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dropout", [0.0, 0.4])
@pytest.mark.parametrize("shape", [(3,), (40,)])
def test_gradcheck_float64(dropout, shape):
    """x, bias and magnitude: finite differences agree. lora_A and lora_B are left out on purpose: their gradients
    treat the norm as a constant (as PEFT's do), which finite differences cannot; the float64 reference test checks
    them with the norm detached."""
    x, weight, b, lora_A, lora_B, magnitude = dora_inputs(shape, in_features=6, out_features=5, rank=2,
                                                          dtype=torch.float64)

    def fn(x, b, magnitude):
        torch.manual_seed(3)  # the same dropout mask on every evaluation
        return dora_linear(x, weight, b, lora_A, lora_B, magnitude, 0.6, dropout, training=True)

    assert torch.autograd.gradcheck(fn, (x, b, magnitude))


def test_eval_mode_applies_no_dropout():
    x, weight, b, lora_A, lora_B, magnitude = dora_inputs((4,))
    torch.testing.assert_close(dora_linear(x, weight, b, lora_A, lora_B, magnitude, 0.8, 0.5, training=False),
                               dora_linear(x, weight, b, lora_A, lora_B, magnitude, 0.8, 0.0, training=True))


def test_float32_adapters_on_bfloat16_activations():
    x, weight, b, lora_A, lora_B, magnitude = dora_inputs((6,))
    y = dora_linear(x.detach().bfloat16(), weight.bfloat16(), b.detach().bfloat16(), lora_A, lora_B, magnitude,
                    0.8, 0.0, training=True)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lora_A.grad.dtype == lora_B.grad.dtype == magnitude.grad.dtype == torch.float32


def test_compile_fullgraph_matches_eager():
    x, weight, b, lora_A, lora_B, magnitude = dora_inputs((6,), in_features=8, out_features=5, rank=2)

    def forward(x):
        return dora_linear(x, weight, b, lora_A, lora_B, magnitude, 0.5, 0.0, training=True)

    eager = forward(x)
    eager.sum().backward()
    grads = [t.grad.clone() for t in (x, lora_A, lora_B, magnitude)]
    for t in (x, lora_A, lora_B, magnitude):
        t.grad = None
    compiled = torch.compile(forward, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    for t, want in zip((x, lora_A, lora_B, magnitude), grads, strict=True):
        torch.testing.assert_close(t.grad, want)


def fused_inputs(rows, in_features=24, out_features=20, rank=4, dtype=torch.float64, zero_factor=True):
    """Inputs of ``d9d::dora_forward``, whose factor may have a zero (then y holds nothing of DoRA's unscaled z)."""
    x = torch.randn(rows, in_features, dtype=dtype, requires_grad=True)
    weight, lora_A, lora_B = make_weights(out_features, in_features, rank, dtype=dtype)
    factor = torch.rand(out_features, dtype=dtype) + 0.5
    if zero_factor:
        factor[3] = 0.0
    return x, weight, lora_A.requires_grad_(), lora_B.requires_grad_(), factor.requires_grad_()


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("rows", [5, 64])  # 64 rows fold the factor and adapters into the weight
def test_fused_op_matches_reference_with_a_zero_factor(rows, with_bias):
    x, weight, lora_A, lora_B, factor = fused_inputs(rows, dtype=torch.float32)
    bias = torch.randn(20) if with_bias else None
    y = torch.ops.d9d.dora_forward(x, weight, bias, lora_A, lora_B, factor, 0.7)
    refs = [t.detach().double().requires_grad_() for t in (x, lora_A, lora_B, factor)]
    ref_x, ref_A, ref_B, ref_f = refs
    want = ref_f * (ref_x @ weight.double().t() + 0.7 * (ref_x @ ref_A.t()) @ ref_B.t())
    if with_bias:
        want = want + bias.double()
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    want.backward(grad.double())
    for leaf, ref in zip((x, lora_A, lora_B, factor), refs, strict=True):
        torch.testing.assert_close(leaf.grad.double(), ref.grad, rtol=1e-4, atol=1e-4)
    assert factor.grad[3] != 0  # the zero factor's gradient comes from z recomputed, not from y / f


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("rows", [3, 40])
def test_fused_op_gradcheck_and_gradgradcheck_float64(rows, with_bias):
    x, weight, lora_A, lora_B, factor = fused_inputs(rows, in_features=6, out_features=5, rank=2)
    bias = torch.randn(5, dtype=torch.float64) * 3 if with_bias else None

    def fn(x, lora_A, lora_B, factor):
        return torch.ops.d9d.dora_forward(x, weight, bias, lora_A, lora_B, factor, 0.6)

    assert torch.autograd.gradcheck(fn, (x, lora_A, lora_B, factor))
    assert torch.autograd.gradgradcheck(fn, (x, lora_A, lora_B, factor))


def test_fused_op_with_a_trainable_weight():
    x, weight, lora_A, lora_B, factor = fused_inputs(40, in_features=6, out_features=5, rank=2)
    weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda w: torch.ops.d9d.dora_forward(x.detach(), w, None, lora_A.detach(), lora_B.detach(), factor.detach(),
                                             0.6),
        (weight,))


@pytest.mark.parametrize("rows", [3, 40])
def test_fused_op_gradients_of_every_input(rows):
    # Weight and bias trainable next to the rest: every gradient slot of the op's autograd, and their gradients.
    x, weight, lora_A, lora_B, factor = fused_inputs(rows, in_features=6, out_features=5, rank=2)
    inputs = (x, weight.requires_grad_(), torch.randn(5, dtype=torch.float64, requires_grad=True), lora_A, lora_B,
              factor)

    def fn(x, weight, bias, lora_A, lora_B, factor):
        return torch.ops.d9d.dora_forward(x, weight, bias, lora_A, lora_B, factor, 0.6)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_fused_op_compiled_autograd_traces_the_backward():
    x, weight, lora_A, lora_B, factor = fused_inputs(40, dtype=torch.float32)
    bias = torch.randn(20)
    assert_compiled_autograd_matches_eager(
        lambda x, A, B, f: torch.ops.d9d.dora_forward(x, weight, bias, A, B, f, 0.5).square().sum(),
        (x, lora_A, lora_B, factor))


def test_fused_op_opcheck():
    x, weight, lora_A, lora_B, factor = fused_inputs(40, dtype=torch.float32)
    bias = torch.randn(20)
    torch.library.opcheck(torch.ops.d9d.dora_forward.default, (x, weight, bias, lora_A, lora_B, factor, 0.5))
    y = torch.ops.d9d.dora_forward(x, weight, bias, lora_A, lora_B, factor, 0.5).detach()
    torch.library.opcheck(torch.ops.d9d.dora_backward.default,
                          (torch.randn_like(y), x.detach(), y, weight, bias, lora_A.detach(), lora_B.detach(),
                           factor.detach(), 0.5, True))


@pytest.mark.parametrize("bias", [False, True])
def test_cpu_calls_take_the_fused_op_and_compile(bias):
    x, weight, b, lora_A, lora_B, magnitude = dora_inputs((64,), bias=bias)
    y = dora_linear(x, weight, b, lora_A, lora_B, magnitude, 0.5, 0.0, training=True)
    assert "DoRAForward" in y.grad_fn.name()  # the fused op's autograd node
    y.sum().backward()
    grads = [t.grad.clone() for t in (x, lora_A, lora_B, magnitude)]
    for t in (x, lora_A, lora_B, magnitude):
        t.grad = None
    compiled = torch.compile(
        lambda x: dora_linear(x, weight, b, lora_A, lora_B, magnitude, 0.5, 0.0, training=True), fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, y)
    out.sum().backward()
    for t, want in zip((x, lora_A, lora_B, magnitude), grads, strict=True):
        torch.testing.assert_close(t.grad, want)


def test_fused_op_names_a_factor_of_the_wrong_size():
    x, weight, lora_A, lora_B, _ = fused_inputs(4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"dora_forward: factor must be 1D of size out == 20"):
        torch.ops.d9d.dora_forward(x, weight, None, lora_A, lora_B, torch.rand(19), 0.5)


def test_fused_op_wants_adapters_in_x_dtype():
    # Unlike the LoRA op, DoRA's takes no float32 adapters on 16-bit x: dora_linear casts them first.
    x, weight, lora_A, lora_B, factor = fused_inputs(4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"dora_forward: lora_A must have x's dtype BFloat16"):
        torch.ops.d9d.dora_forward(x.detach().bfloat16(), weight.bfloat16(), None, lora_A, lora_B, factor, 0.5)


@pytest.mark.parametrize("op", ["dora_weight_norm", "dora_merge_"])
def test_one_kernel_serves_cpu_and_cuda(op):
    """The norm ops are written once over ATen (CompositeExplicitAutograd): CUDA gets the same kernel as the CPU."""
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"d9d::{op}", key), key


@pytest.mark.parametrize("bias", [False, True])
def test_cpu_autocast_runs_in_bfloat16_like_the_lora_op(bias):
    """Under CPU autocast, a float32 DoRA layer fed bfloat16 (or float32) activations runs in bfloat16, as
    nn.Linear and the LoRA op do: the fused DoRA op has no autocast kernel, so dora_linear takes the LoRA op's."""
    x, weight, b, lora_A, lora_B, magnitude = dora_inputs((64,), bias=bias)
    want = reference_dora(x.detach(), weight, None if b is None else b.detach(), lora_A.detach(), lora_B.detach(),
                          magnitude.detach(), 0.5)
    for source in (x, x.detach().bfloat16()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = dora_linear(source, weight, b, lora_A, lora_B, magnitude, 0.5, 0.0, training=True)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=5e-2)
        magnitude.grad = lora_A.grad = None
        y.float().sum().backward()
        assert torch.isfinite(magnitude.grad).all()
        assert lora_A.grad.abs().sum() > 0


def test_fused_op_bfloat16_without_bias_matches_reference():
    x, weight, _, lora_A, lora_B, magnitude = dora_inputs((64,), bias=False)
    y = dora_linear(x.detach().bfloat16().requires_grad_(), weight.bfloat16(), None, lora_A, lora_B, magnitude,
                    0.5, 0.0, training=True)
    assert "DoRAForward" in y.grad_fn.name()  # the fused op's autograd node
    want = reference_dora(x.detach().bfloat16(), weight.bfloat16(), None, lora_A.detach().bfloat16(),
                          lora_B.detach().bfloat16(), magnitude.detach(), 0.5)
    torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=5e-2)
    y.float().sum().backward()
    assert lora_A.grad.dtype == lora_B.grad.dtype == magnitude.grad.dtype == torch.float32


@pytest.mark.parametrize("rows", [5, 64])
def test_fused_backward_without_grad_x_matches_reference(rows):
    """need_grad_x false: the factor goes into B and dB only (no dy * f copy), on the skinny kernels in float32."""
    x, weight, lora_A, lora_B, factor = fused_inputs(rows, dtype=torch.float32)
    bias = torch.randn(20)
    x, lora_A, lora_B, factor = (t.detach() for t in (x, lora_A, lora_B, factor))
    y = torch.ops.d9d.dora_forward(x, weight, bias, lora_A, lora_B, factor, 0.7)
    grad = torch.randn_like(y)
    grad_x, grad_A, grad_B, grad_factor = torch.ops.d9d.dora_backward(grad, x, y, weight, bias, lora_A, lora_B,
                                                                        factor, 0.7, False)
    assert grad_x.numel() == 0
    refs = [t.double().requires_grad_() for t in (lora_A, lora_B, factor)]
    ref_A, ref_B, ref_f = refs
    want = ref_f * (x.double() @ weight.double().t() + 0.7 * (x.double() @ ref_A.t()) @ ref_B.t()) + bias.double()
    want.backward(grad.double())
    for got, ref in zip((grad_A, grad_B, grad_factor), refs, strict=True):
        torch.testing.assert_close(got.double(), ref.grad, rtol=1e-4, atol=1e-4)
