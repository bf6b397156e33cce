"""Test set-up shared by every test file.

Triton runs on CPU tensors only under its interpreter, which must be switched on before triton is
first imported: so this file sets it before anything else when no GPU is present.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# Tolerances per dtype, stated once: (rtol, atol) for comparing a kernel with its torch reference
# evaluated in the same dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def tol(dtype: torch.dtype) -> dict:
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def assert_close(actual, expected, dtype=None, msg=""):
    dtype = dtype or expected.dtype
    torch.testing.assert_close(actual, expected.to(actual.dtype), **tol(dtype), msg=msg or None)


def assert_close_in_norm(actual, expected, dtype=None, msg=""):
    """The same per-dtype tolerances, applied to the whole tensor's norm: ``||a - e|| <=
    rtol * ||e|| + atol * sqrt(n)`` (what the elementwise rule implies for the norm). For sums over
    many rows (a weight gradient), whose elements carry rounding in proportion to the summands,
    not to the result: elements that cancel to near zero keep an absolute error of that size."""
    rtol, atol = TOLERANCES[dtype or expected.dtype]
    a, e = actual.double(), expected.double()
    err = torch.linalg.vector_norm(a - e).item()
    bound = rtol * torch.linalg.vector_norm(e).item() + atol * e.numel() ** 0.5
    assert err <= bound, f"{msg} ||actual - expected|| = {err:.3g} > {bound:.3g}"


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: slow on CPU")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture
def seed():
    """A fresh seed per test, printed on failure so a failing draw can be replayed."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s
