"""pytest fixtures over the shared helpers of ``tests/fixtures.py``."""

import pytest
import torch

from tests.fixtures import TinyModel


@pytest.fixture
def tiny_model() -> TinyModel:
    torch.manual_seed(0)
    return TinyModel()
