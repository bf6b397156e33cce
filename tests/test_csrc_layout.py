"""The C++ sources agree with themselves and with Python on the supported CUDA head dims: the one
list in csrc/attention/head_dims.h (expanded by the binding's check, the launcher declarations
and the dispatch) has one attention_hdim<D>.cu per entry and equals the Python side's
CUDA_HEAD_DIMS (which raises the head-dim error before the op is called). Reads text only: no
compiler, no GPU.
"""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ATTN_DIR = ROOT / "csrc" / "attention"
OPS_DIR = ROOT / "mae_fast" / "ops"


def _cpp_head_dims() -> tuple[int, ...]:
    text = (ATTN_DIR / "head_dims.h").read_text()
    m = re.search(r"#define\s+MAE_FAST_FOR_EACH_HEAD_DIM\(X,\s*ARG\)\s+(.*)", text)
    assert m, "MAE_FAST_FOR_EACH_HEAD_DIM not found in head_dims.h"
    dims = tuple(int(d) for d in re.findall(r"X\(ARG,\s*(\d+)\)", m.group(1)))
    assert dims, m.group(0)
    return dims


def _python_head_dims() -> tuple[int, ...]:
    """mae_fast.ops.CUDA_HEAD_DIMS where the package exports it, else the literal
    ``CUDA_HEAD_DIMS = (...)`` of whichever module under mae_fast/ops defines it."""
    try:
        import mae_fast.ops as ops

        if hasattr(ops, "CUDA_HEAD_DIMS"):
            return tuple(ops.CUDA_HEAD_DIMS)
    except ImportError:
        pass
    found = {}
    for path in sorted(OPS_DIR.glob("*.py")):
        for m in re.finditer(r"^CUDA_HEAD_DIMS\s*=\s*(\([^)]*\))", path.read_text(), re.MULTILINE):
            found[path.name] = tuple(ast.literal_eval(m.group(1)))
    assert len(found) == 1, f"expected one `CUDA_HEAD_DIMS = (...)` under {OPS_DIR}, found {found}"
    return next(iter(found.values()))


def test_head_dims_are_sorted_and_unique():
    dims = _cpp_head_dims()
    assert list(dims) == sorted(set(dims)), dims
    # The kernels use 16-wide mma k-chunks over D.
    assert all(d % 16 == 0 for d in dims), dims


def test_one_kernel_file_per_head_dim():
    files = {int(m.group(1)) for p in ATTN_DIR.glob("attention_hdim*.cu")
             if (m := re.fullmatch(r"attention_hdim(\d+)\.cu", p.name))}
    assert files == set(_cpp_head_dims())
    for d in files:
        assert f"MAE_FAST_ATTENTION_HDIM({d})" in (ATTN_DIR / f"attention_hdim{d}.cu").read_text()


def test_cpp_and_python_head_dims_agree():
    assert _cpp_head_dims() == _python_head_dims()

