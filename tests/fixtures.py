"""Shared test fixtures: PEFT config builders and a small model named like the README's example.

Tests import from here (never from ``conftest``); ``conftest`` only turns these into pytest fixtures.
"""

import functools
import re
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn

from d9d.peft.all import PeftStackConfig
from d9d.peft.full_tune import FullTuneConfig
from d9d.peft.lora import LoRAConfig, LoRAParameters

ATTENTION_PROJECTIONS = r".*attention\..*_proj.*"
"""The README's LoRA pattern: every projection of the toy models' ``attention`` modules."""
NORMS = r".*norm.*"

NEEDS_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
"""Marks of a test (or a parameter) that runs on a CUDA device only; it skips cleanly elsewhere."""
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]
"""The devices every op test runs on."""


def lora(pattern: str | re.Pattern = ATTENTION_PROJECTIONS, r: int = 4, alpha: float = 8, **params) -> LoRAConfig:
    """A LoRA config; ``params`` go to :class:`LoRAParameters` (dropout, use_rslora, dtype)."""
    return LoRAConfig(module_name_pattern=re.compile(pattern) if isinstance(pattern, str) else pattern,
                      params=LoRAParameters(r=r, alpha=alpha, **params))


def full_tune(pattern: str | re.Pattern = NORMS) -> FullTuneConfig:
    return FullTuneConfig(module_name_pattern=re.compile(pattern) if isinstance(pattern, str) else pattern)


def stack(*methods) -> PeftStackConfig:
    return PeftStackConfig(methods=list(methods))


def lora_and_norms(lora_pattern: str = ATTENTION_PROJECTIONS, norm_pattern: str = NORMS, **lora_params
                   ) -> PeftStackConfig:
    """The README's stack: LoRA on the attention projections, full tuning of the norms."""
    return stack(lora(lora_pattern, **lora_params), full_tune(norm_pattern))


class ToyAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim // 2, bias=False)
        self.v_proj = nn.Linear(dim, dim // 2)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(q * torch.cat([k, v], dim=-1).tanh())


class ToyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = ToyAttention(dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class TinyModel(nn.Module):
    """Modules named like ``layers.0.attention.q_proj`` and ``layers.0.attention_norm``."""

    def __init__(self, dim: int = 16, n_layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(ToyBlock(dim) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def snapshot(model: nn.Module) -> dict:
    """Everything an injection could change: structure, values and trainability."""
    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "params": {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["params"].keys() == before["params"].keys()
    for name, (value, requires_grad) in before["params"].items():
        assert torch.equal(after["params"][name][0], value), name
        assert after["params"][name][1] == requires_grad, name


def assert_compiled_autograd_matches_eager(loss: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]) -> None:
    """The gradients of ``loss(*inputs)`` (a scalar) w.r.t. ``inputs`` under compiled autograd equal eager's, and
    compiled autograd traced the whole backward into one graph: with ``fullgraph``, a custom node it could not trace
    (a graph break) is an error."""
    grads = []
    for compiled in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        value = loss(*leaves)
        if compiled:
            torch._dynamo.reset()
            counters = torch._dynamo.utils.counters
            counters.clear()
            backend = functools.partial(torch.compile, backend="aot_eager", fullgraph=True)
            with torch._dynamo.compiled_autograd._enable(backend):
                value.backward()
            assert counters["compiled_autograd"]["captures"] == 1
        else:
            value.backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
