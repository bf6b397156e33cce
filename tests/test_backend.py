"""The backend switch's selection rules, on a toy op (no kernel needed)."""
import logging

import pytest
import torch

from mae_fast.ops._backend import BackendUnavailableError, Op


def make_op():
    op = Op("attention", lambda x: ("reference", x))
    op.register("cuda", lambda x: ("fast", x), why_not=lambda d: None,
                declines=lambda x: "odd last dim" if x.shape[-1] % 2 else None)
    return op


def test_auto_skips_an_impl_that_declines_the_input_and_says_so_once(caplog):
    op = make_op()
    meta = torch.device("meta")
    even, odd = torch.empty(2, 4, device=meta), torch.empty(2, 3, device=meta)
    assert op(even, backend="auto", device=meta)[0] == "fast"
    with caplog.at_level(logging.WARNING, logger="mae_fast"):
        assert op(odd, backend="auto", device=meta)[0] == "reference"
        assert op(odd, backend="auto", device=meta)[0] == "reference"
    assert len([r for r in caplog.records if "odd last dim" in r.getMessage()]) == 1
    # an explicit backend runs the implementation, which raises its own precise error
    assert op(odd, backend="cuda", device=meta)[0] == "fast"
    # auto on a CPU tensor is the reference; a backend not covering the op is the reference too
    assert op(torch.empty(2, 4), backend="auto", device=torch.device("cpu"))[0] == "reference"
    assert op(even, backend="triton", device=meta)[0] == "reference"


def test_explicit_backend_that_cannot_run_is_an_error():
    op = Op("attention", lambda x: x)
    with pytest.raises(BackendUnavailableError, match="not built"):
        op(torch.empty(1), backend="cuda", device=torch.device("cpu"))
    op.register("cuda", lambda x: x, why_not=lambda d: "no GPU here")
    with pytest.raises(BackendUnavailableError, match="no GPU here"):
        op(torch.empty(1), backend="cuda", device=torch.device("cpu"))
    with pytest.raises(ValueError, match="does not cover"):
        op.register("triton", lambda x: x, why_not=lambda d: None)
