"""The one backend switch.

A backend names who computes the fused ops:

- ``torch``  the plain-PyTorch reference everywhere (the official semantics, our baseline);
- ``triton`` the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
- ``cuda``   the CUDA C++ extension (attention);
- ``auto``   the fastest implementation that can run on the tensor's device, else the reference.

Precedence: an explicit ``backend=`` (per model or per call), then the innermost
:func:`use_backend` scope, then the ``MAE_FAST_BACKEND`` environment variable, then ``auto``.

A backend covers the ops that registered an implementation under its name; the other ops run
their reference under it (``triton`` is the glue kernels with SDPA attention, ``cuda`` the
attention extension with the reference glue). ``auto`` combines both.

Each implementation states once, in its ``problem`` function, what it cannot take (device,
dtypes, shapes). Asked for by name, the switch raises that problem; under ``auto`` it falls back
to the reference and logs the reason once.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Tuple, Type

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
ENV_VAR = "MAE_FAST_BACKEND"

log = logging.getLogger("mae_fast")

# A plain stack rather than a ContextVar: torch.compile reads (and guards on) module globals
# without a graph break.
_SCOPES: list[str] = []


class BackendUnavailableError(RuntimeError):
    """A backend was asked for explicitly but cannot run here."""


# What an implementation cannot take: the error an explicit request raises, and why.
Problem = Optional[Tuple[Type[Exception], str]]


def unavailable(reason: str | None) -> Problem:
    """The problem of an implementation that cannot run on a device at all (None: it can)."""
    return None if reason is None else (BackendUnavailableError, reason)


def check_backend_name(name: str, argument: str = "backend") -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{argument} must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name`` (models with their own
    ``backend=`` keyword keep theirs)."""
    _SCOPES.append(check_backend_name(name))
    try:
        yield
    finally:
        _SCOPES.pop()


def requested_backend(explicit: str | None = None) -> str:
    """The backend name in force for a call, before availability is checked."""
    if explicit is not None:
        return check_backend_name(explicit)
    if _SCOPES:
        return _SCOPES[-1]
    env = os.environ.get(ENV_VAR)
    if env:
        return check_backend_name(env, argument=f"the environment variable {ENV_VAR}")
    return "auto"


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype in force for ``device``'s type, or None."""
    dt = torch.device(device).type
    if dt in ("cuda", "cpu") and torch.is_autocast_enabled(dt):
        return torch.get_autocast_dtype(dt)
    return None


@dataclass(frozen=True)
class Impl:
    """One implementation of an op: ``fn(*args)`` computes it; ``problem(*args)`` is None when
    ``fn`` takes these inputs on their device, else ``(error type, reason)``. ``fn`` may then
    assume its inputs are ones it takes."""

    fn: Callable
    problem: Callable[..., Problem]


class Op:
    """An op with a torch reference and optional fast implementations, tried by ``auto`` in the
    order they were registered. The first argument of a call is a tensor on the op's device."""

    def __init__(self, name: str, reference: Callable):
        self.name = name
        self.reference = reference
        self.impls: dict[str, Impl] = {}
        self._warned: set[tuple[str, str]] = set()

    def register(self, backend: str, fn: Callable, problem: Callable[..., Problem]) -> None:
        if backend in ("auto", "torch"):
            raise ValueError(f"backend {backend!r} cannot be registered: 'torch' is the reference, "
                             f"'auto' a choice among the others")
        self.impls[check_backend_name(backend)] = Impl(fn, problem)

    def unsupported(self, backend: str, *args) -> str | None:
        """Why ``backend``'s implementation does not take ``args`` (None: it does, or the backend
        runs the reference for this op)."""
        impl = self.impls.get(backend)
        problem = impl.problem(*args) if impl is not None else None
        return None if problem is None else problem[1]

    def select(self, args: tuple, backend: str | None = None) -> tuple[str, Callable]:
        """The (backend name, function) that computes this op on ``args``."""
        name = requested_backend(backend)
        if name == "auto":
            return self._select_auto(args)
        impl = self.impls.get(name)
        if impl is None:  # the backend does not cover this op: its reference runs
            return "torch", self.reference
        problem = impl.problem(*args)
        if problem is not None:
            error, reason = problem
            if error is BackendUnavailableError:
                reason = f"backend {name!r} cannot run op {self.name!r} on {args[0].device}: {reason}"
            raise error(reason)
        return name, impl.fn

    def _select_auto(self, args: tuple) -> tuple[str, Callable]:
        device = args[0].device
        if device.type == "cpu":  # the kernels' CPU paths (interpreter, C++ twin) are for tests
            return "torch", self.reference
        for name, impl in self.impls.items():
            problem = impl.problem(*args)
            if problem is None:
                return name, impl.fn
            key = (name, problem[1])
            if key not in self._warned:  # once per distinct reason, not once per call
                self._warned.add(key)
                log.warning("mae_fast: op %s falls back from %s to torch on %s: %s",
                            self.name, name, device, problem[1])
        return "torch", self.reference

    def __call__(self, *args, backend: str | None = None):
        return self.select(args, backend)[1](*args)
