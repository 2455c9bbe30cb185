"""Fixtures shared by several test files."""

import pytest
import torch


@pytest.fixture(params=[{}, {"impl": "reference"}], ids=["impl-default", "impl-reference"])
def impl_kw(request):
    """Regularizer kwargs: the default implementation and the per-tensor reference loop;
    both must meet every reference."""
    return request.param


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is much faster on a shared, loaded CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
