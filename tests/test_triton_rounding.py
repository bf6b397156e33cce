"""The Triton kernels' fp32 -> bf16 casts round as torch's do (to nearest, ties to even): on a GPU
that is the hardware's ``cvt.rn``; on CPU it is conftest's fix to the interpreter, which truncates,
and without which every bf16 check on CPU judges values biased by up to one unit."""
import pytest
import torch

from mae_fast.ops._triton import why_not_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(why_not_triton(torch.device(DEV)) is not None,
                                reason=f"triton unusable: {why_not_triton(torch.device(DEV))}")


def _cast_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def cast_kernel(src_ptr, stored_ptr, cast_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(src_ptr + offs, mask=offs < n)
        tl.store(stored_ptr + offs, v, mask=offs < n)  # the store's implicit cast
        tl.store(cast_ptr + offs, v.to(tl.bfloat16), mask=offs < n)  # an explicit one
    return cast_kernel


def test_triton_rounds_fp32_to_bf16_to_nearest_even(seed):
    # every rounding case: random values, exact ties with an even and an odd last kept bit, values
    # that carry into the exponent or overflow to inf, signed zeros, inf and NaN (not subnormals,
    # which a GPU may flush)
    low = torch.tensor([0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=torch.int64)
    high = torch.tensor([0x3F80, 0x3F81, 0x3FFF, 0x7F7F, 0xBF80, 0xBF81], dtype=torch.int64)
    bits = (high[:, None] * 65536 + low[None, :]).flatten()
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")])
    src = torch.cat([torch.randn(997) * 10.0 ** torch.randint(-30, 30, (997,)),
                     bits.to(torch.int32).view(torch.float32), special]).to(DEV)
    stored = torch.empty(src.shape, dtype=torch.bfloat16, device=DEV)
    cast = torch.empty_like(stored)
    _cast_kernels()[(-(-src.numel() // 256),)](src, stored, cast, src.numel(), BLOCK=256)
    expected = src.to(torch.bfloat16)
    for got in (stored, cast):
        nan = expected.isnan()
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan].view(torch.int16), expected[~nan].view(torch.int16))
