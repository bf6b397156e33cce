"""Compiling the Triton kernels for sm_90 without a GPU: a fresh process without the interpreter,
so the compiled path accepts what the interpreter accepted."""
import os
import subprocess
import sys

import pytest
import torch

COMPILE_SCRIPT = """
import warnings; warnings.simplefilter("ignore")
from mae_fast.ops._triton import compile_for_cuda as c
from mae_fast.ops import {mod} as m
{body}
print("compiled", n)
"""


def run_compile_check(mod: str, body: str) -> str:
    """Run ``body`` (calls of ``c(kernel, signature, constexprs)``, counting them in ``n``) against
    ``mae_fast.ops.<mod>`` and return its output."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT.format(mod=mod, body=body)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout


def sm90_compile_test(mod: str, body: str, count: int):
    """A test that ``body`` compiles ``count`` kernel variants of ``mae_fast.ops.<mod>`` to sm_90
    cubins (no GPU needed): the compiled path accepts what the interpreter accepted. Skipped where
    CUDA is present (the GPU tests run the compiled kernels there)."""

    @pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the compiled kernels")
    def test_kernels_compile_for_sm90():
        assert f"compiled {count}" in run_compile_check(mod, body)

    return test_kernels_compile_for_sm90
