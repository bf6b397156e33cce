"""Multi-head self-attention on the packed output of a qkv Linear.

``qkv`` is the ``(B, N, 3*H*D)`` output of the qkv Linear viewed as ``(B, N, 3, H, D)``, with no
permute and no copy; the result is ``(B, N, H*D)``, ready for the proj Linear. Scale ``D**-0.5``,
no mask, no dropout.

Backends: ``torch`` is the timm computation (permute + SDPA). ``cuda`` is the C++/CUDA extension
(``csrc/``, loaded by :mod:`._extension`), exposed as the custom ops
``torch.ops.mae_fast.attention_fwd`` (-> out, lse) and ``attention_bwd`` (-> dqkv in the packed
layout), with autograd and fake (meta) kernels so that ``torch.compile(fullgraph=True)`` traces
it. The extension runs on CUDA tensors (fp16/bf16, head dims 32/64/80/128) and, through its C++ CPU
twin, on CPU tensors (fp32/fp16/bf16, any head dim), which is how it is tested without a GPU;
``auto`` uses it on CUDA only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import Op, Problem, autocast_dtype, unavailable
from ._extension import after_load, why_not_extension

CUDA_HEAD_DIMS = (32, 64, 80, 128)
CUDA_DTYPES = (torch.float16, torch.bfloat16)

# ============================================================================ reference

def attention_reference(qkv: torch.Tensor) -> torch.Tensor:
    """The timm ``Attention`` computation, with SDPA for the core."""
    B, N, _, H, D = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(B, N, H * D)


attention_op = Op("attention", attention_reference)


# ============================================================================ entry point

def attention(qkv: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``(B, N, 3, H, D)`` packed q, k, v -> ``(B, N, H*D)``."""
    check_qkv(qkv)
    return attention_op(qkv, backend=backend)


def check_qkv(qkv: torch.Tensor) -> None:
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape (B, N, 3, H, D), got {tuple(qkv.shape)}")
    if not qkv.is_floating_point():
        raise TypeError(f"qkv must be a floating-point tensor, got {qkv.dtype}")


# ============================================================================ kernels
# In csrc/ (the CUDA kernels and the C++ CPU twin), registered as torch.ops.mae_fast.attention_*.

# ============================================================================ custom op + autograd
# The ops are defined by the extension; their fake kernels and autograd are added once it loads.

def _register_python_parts() -> None:
    @torch.library.register_fake("mae_fast::attention_fwd")
    def _fwd_fake(qkv):
        torch._check(qkv.dim() == 5 and qkv.shape[2] == 3, lambda: "qkv must have shape (B, N, 3, H, D)")
        B, N, _, H, D = qkv.shape
        return qkv.new_empty((B, N, H * D)), qkv.new_empty((B, H, N), dtype=torch.float32)

    @torch.library.register_fake("mae_fast::attention_bwd")
    def _bwd_fake(dout, qkv, out, lse):
        return qkv.new_empty(qkv.shape)  # contiguous, like the kernels' dqkv

    def setup_context(ctx, inputs, output):
        (qkv,) = inputs
        out, lse = output
        ctx.save_for_backward(qkv, out, lse)

    def backward(ctx, dout, dlse):
        # lse is an auxiliary output for the backward; its gradient (if any) is ignored.
        qkv, out, lse = ctx.saved_tensors
        if dout is None:
            return torch.zeros_like(qkv)
        return torch.ops.mae_fast.attention_bwd(dout, qkv, out, lse)

    torch.library.register_autograd("mae_fast::attention_fwd", backward, setup_context=setup_context)


after_load(_register_python_parts)


def _cuda_run(qkv: torch.Tensor) -> torch.Tensor:
    """Under autocast the kernels run in the autocast dtype, like SDPA would."""
    dtype = autocast_dtype(qkv.device)
    if dtype is not None and qkv.dtype != dtype:
        qkv = qkv.to(dtype)
    out, _ = torch.ops.mae_fast.attention_fwd(qkv)
    return out


# ============================================================================ registration

def _cuda_problem(qkv: torch.Tensor) -> Problem:
    """What the extension does not take, in the dtype the op runs in (the autocast dtype where
    autocast is on). Raised here, in Python: on the H200 machine (torch 2.11, cu130) some errors
    thrown inside the extension crashed the process instead of raising."""
    problem = unavailable(why_not_extension(qkv.device))
    if problem is not None:
        return problem
    on_cuda = qkv.device.type == "cuda"
    dtype = autocast_dtype(qkv.device) or qkv.dtype
    if on_cuda and dtype not in CUDA_DTYPES:
        return TypeError, f"qkv must be float16 or bfloat16 on CUDA, got {dtype}"
    if not on_cuda and dtype not in (*CUDA_DTYPES, torch.float32):
        return TypeError, f"qkv must be float16, bfloat16 or float32 on CPU, got {dtype}"
    if on_cuda and qkv.shape[-1] not in CUDA_HEAD_DIMS:
        return ValueError, f"qkv head dim (size 4) must be one of {CUDA_HEAD_DIMS} on CUDA, got {qkv.shape[-1]}"
    if qkv.stride(-1) != 1 and qkv.shape[-1] != 1:
        return ValueError, (f"qkv must have innermost (head-dim) stride 1, got strides {qkv.stride()}; "
                            f"pass qkv.contiguous() or a view of the qkv Linear's output")
    return None


attention_op.register("cuda", _cuda_run, _cuda_problem)
