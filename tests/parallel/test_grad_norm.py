"""d9d.parallel.grad_norm.clip_grad_norm_ matches torch's on plain tensors (its mesh grouping runs under torchrun in
tests/finetune/test_finetune_parallel.py, where TP and FSDP2 put gradients on two meshes)."""

import pytest
import torch

from d9d.parallel.grad_norm import clip_grad_norm_

pytestmark = pytest.mark.local


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_same_as_torch_on_plain_tensors(max_norm: float) -> None:
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5)),
            torch.nn.Parameter(torch.randn(2))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours[:2], theirs[:2], strict=True):  # the last one has no gradient
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    total = clip_grad_norm_(ours, max_norm, foreach=True)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, foreach=True)
    torch.testing.assert_close(total, expected)
    for a, b in zip(ours[:2], theirs[:2], strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    assert ours[2].grad is None
