"""The fused ops of mae_fast and the one backend switch (see ``_backend``).

Every op has a plain-PyTorch reference; models call only these functions, never Triton or the
extension directly.
"""
from ._backend import BACKENDS, ENV_VAR, BackendUnavailableError, requested_backend, use_backend
from .attention import attention, attention_reference

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendUnavailableError",
    "requested_backend",
    "use_backend",
    "attention",
    "attention_reference",
]
