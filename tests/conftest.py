"""Fixtures shared by several test files."""

import pytest
import torch

from torch_regularizers import kernels
from torch_regularizers.kernels import native as _native


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


@pytest.fixture(scope="session")
def native_mod():
    """The native kernels, built once (cached on disk); skip where no toolchain builds them."""
    try:
        return _native.load(build=True)
    except RuntimeError as e:
        pytest.skip(f"native kernels unavailable: {e}")


@pytest.fixture(params=["aten", "native"])
def backend(request):
    """Each CPU kernel backend in turn (the native one built on first use); also the
    Regularizer's per-step bookkeeping, which is in Python with ``"aten"``."""
    old = kernels.get_backend()
    if request.param == "native":
        request.getfixturevalue("native_mod")
    kernels.set_backend(request.param)
    yield request.param
    kernels.set_backend(old)

