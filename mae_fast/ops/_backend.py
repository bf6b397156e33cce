"""The one backend switch.

A backend names who computes the fused ops:

- ``torch``  the plain-PyTorch reference everywhere (the official semantics, our baseline);
- ``triton`` the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
- ``cuda``   the CUDA C++ extension (attention);
- ``auto``   the fastest implementation that can run on the tensor's device, else the reference.

Precedence: an explicit ``backend=`` (per model or per call), then the innermost
:func:`use_backend` scope, then the ``MAE_FAST_BACKEND`` environment variable, then ``auto``.
Asking for a backend that cannot run is an error; only ``auto`` falls back, and it says so once.

A backend covers the ops listed in :data:`COVERAGE`; under it, the other ops run their reference
(``triton`` is the glue kernels with SDPA attention, ``cuda`` the attention extension with the
reference glue). ``auto`` combines both.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
ENV_VAR = "MAE_FAST_BACKEND"
COVERAGE = {
    "triton": frozenset({"gather_patches", "embed_visible_patches", "unshuffle_mask_tokens", "patch_mse_loss"}),
    "cuda": frozenset({"attention"}),
}

log = logging.getLogger("mae_fast")

# A plain stack rather than a ContextVar: torch.compile reads (and guards on) module globals
# without a graph break.
_SCOPES: list[str] = []


class BackendUnavailableError(RuntimeError):
    """A backend was asked for explicitly but cannot run here."""


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


@dataclass(frozen=True)
class Impl:
    """One implementation of an op: ``why_not(device)`` returns ``None`` when it can run on
    that device, else the reason it cannot; ``declines(*args)``, when given, does the same for the
    call's inputs (a dtype or shape the kernels do not take). ``auto`` then uses the reference; an
    explicitly named backend runs ``fn``, which raises its own precise error."""

    fn: Callable
    why_not: Callable[[torch.device], str | None]
    declines: Callable[..., str | None] | None = None


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype in force for ``device``'s type, or None."""
    dt = torch.device(device).type
    if dt in ("cuda", "cpu") and torch.is_autocast_enabled(dt):
        return torch.get_autocast_dtype(dt)
    return None


def _always(device: torch.device) -> str | None:
    return None


class Op:
    """An op with a torch reference and optional fast implementations, tried by ``auto`` in
    the order they were registered."""

    def __init__(self, name: str, reference: Callable):
        self.name = name
        self.impls: dict[str, Impl] = {"torch": Impl(reference, _always)}
        self._fast_order: list[str] = []
        self._warned: set[tuple[str, str]] = set()

    def register(self, backend: str, fn: Callable, why_not: Callable[[torch.device], str | None],
                 declines: Callable[..., str | None] | None = None) -> None:
        if self.name not in COVERAGE.get(backend, ()):
            raise ValueError(f"backend {backend!r} does not cover op {self.name!r} (see COVERAGE)")
        self.impls[backend] = Impl(fn, why_not, declines)
        if backend not in self._fast_order:
            self._fast_order.append(backend)

    def select(self, device: torch.device, explicit: str | None = None, args: tuple | None = None
               ) -> tuple[str, Callable]:
        """The (backend name, function) that computes this op on ``device`` (for the inputs
        ``args``, when given: ``auto`` skips an implementation that declines them)."""
        name = requested_backend(explicit)
        if name == "auto":
            return self._select_auto(device, args)
        if name != "torch" and self.name not in COVERAGE[name]:
            return "torch", self.impls["torch"].fn
        impl = self.impls.get(name)
        if impl is None:
            raise BackendUnavailableError(
                f"backend {name!r} is not built into this install of mae_fast (op {self.name!r}); "
                f"use backend='torch' or 'auto'"
            )
        reason = impl.why_not(device)
        if reason is not None:
            raise BackendUnavailableError(f"backend {name!r} cannot run op {self.name!r} on {device}: {reason}")
        return name, impl.fn

    def _select_auto(self, device: torch.device, args: tuple | None) -> tuple[str, Callable]:
        if device.type != "cpu":
            for name in self._fast_order:
                impl = self.impls[name]
                reason = impl.why_not(device)
                if reason is None and args is not None and impl.declines is not None:
                    reason = impl.declines(*args)
                if reason is None:
                    return name, impl.fn
                key = (name, reason)
                if key not in self._warned:  # once per distinct reason, not once per call
                    self._warned.add(key)
                    log.warning("mae_fast: op %s falls back from %s to torch on %s: %s",
                                self.name, name, device, reason)
        return "torch", self.impls["torch"].fn

    def __call__(self, *args, backend: str | None = None, device: torch.device):
        return self.select(device, backend, args)[1](*args)
