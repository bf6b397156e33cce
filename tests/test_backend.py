"""The backend switch's selection rules, on a toy op (no kernel needed)."""
import logging

import pytest
import torch

from mae_fast.ops._backend import BackendUnavailableError, Op, unavailable


def make_op():
    op = Op("attention", lambda x: ("reference", x))
    op.register("cuda", lambda x: ("fast", x),
                lambda x: (ValueError, "odd last dim") if x.shape[-1] % 2 else None)
    return op


def test_auto_skips_an_impl_that_declines_the_input_and_says_so_once(caplog):
    op = make_op()
    meta = torch.device("meta")
    even, odd = torch.empty(2, 4, device=meta), torch.empty(2, 3, device=meta)
    assert op(even, backend="auto")[0] == "fast"
    with caplog.at_level(logging.WARNING, logger="mae_fast"):
        assert op(odd, backend="auto")[0] == "reference"
        assert op(odd, backend="auto")[0] == "reference"
    assert len([r for r in caplog.records if "odd last dim" in r.getMessage()]) == 1
    # an explicit backend raises the problem its implementation states, with its error type
    with pytest.raises(ValueError, match="odd last dim"):
        op(odd, backend="cuda")
    assert op.unsupported("cuda", odd) == "odd last dim" and op.unsupported("cuda", even) is None
    # auto on a CPU tensor is the reference; a backend not covering the op is the reference too
    assert op(torch.empty(2, 4), backend="auto")[0] == "reference"
    assert op(even, backend="triton")[0] == "reference"
    assert op.unsupported("triton", odd) is None


def test_explicit_backend_that_cannot_run_is_an_error():
    op = Op("attention", lambda x: x)
    op.register("cuda", lambda x: x, lambda x: unavailable("no GPU here"))
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run op 'attention' on cpu: no GPU here"):
        op(torch.empty(1), backend="cuda")
    for name in ("torch", "auto"):
        with pytest.raises(ValueError, match="cannot be registered"):
            op.register(name, lambda x: x, lambda x: None)
