"""The fused ops of mae_fast and the one backend switch (see ``_backend``).

Every op has a plain-PyTorch reference (``*_reference``); models call only these functions, never
Triton or the extension directly.

The op template: one op per file, its sections always in this order.

1. **reference**: the plain-PyTorch function, the op's meaning (``*_reference``), and its
   ``Op(name, reference)``.
2. **entry point**: the public function. It checks its arguments (``_checks``: a ``TypeError`` or
   ``ValueError`` naming the argument and what was expected, whatever the backend), runs
   :func:`~._checks.debug_check_ids` on index tensors, and calls the ``Op``.
3. **kernels**: ``@triton.jit`` functions under ``if HAS_TRITON:`` (or, for the extension, a
   pointer to ``csrc/``), each with a docstring giving shapes, grid and bytes moved.
4. **host launchers**: ``_launch_*``, which allocate outputs, pick the tile and launch, assuming
   inputs that the implementation takes.
5. **custom op + autograd**: ``torch.library.custom_op`` wrappers of the launchers, their fake
   kernels, ``register_autograd``; deterministic backward passes (no float atomics).
6. **registration**: for each implementation, one ``problem(*args)`` function stating what it
   does not take (device, dtypes, shapes) as ``(error type, reason)``, and
   ``op.register(backend, fn, problem)``. A backend asked for by name raises that problem;
   ``auto`` falls back to the reference and logs the reason once.
"""
from ._backend import BACKENDS, ENV_VAR, BackendUnavailableError, requested_backend, use_backend
from ._extension import extension_info, extension_status
from ._triton import HAS_TRITON, why_not_triton
from .embed import embed_visible_patches, embed_visible_patches_reference, gather_patches, gather_patches_reference
from .gelu import bias_gelu, bias_gelu_reference
from .patch_mse import patch_mse_loss, patch_mse_loss_reference
from .patches import patchify, unpatchify
from .qkv_attention import attention, attention_reference
from .residual_norm import (
    add_layer_norm,
    add_layer_norm_reference,
    layer_norm,
    layer_norm_reference,
)
from .unshuffle import unshuffle_mask_tokens, unshuffle_mask_tokens_reference

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendUnavailableError",
    "HAS_TRITON",
    "why_not_triton",
    "requested_backend",
    "use_backend",
    "extension_info",
    "extension_status",
    "add_layer_norm",
    "add_layer_norm_reference",
    "attention",
    "attention_reference",
    "bias_gelu",
    "bias_gelu_reference",
    "embed_visible_patches",
    "embed_visible_patches_reference",
    "gather_patches",
    "gather_patches_reference",
    "layer_norm",
    "layer_norm_reference",
    "patch_mse_loss",
    "patch_mse_loss_reference",
    "patchify",
    "unpatchify",
    "unshuffle_mask_tokens",
    "unshuffle_mask_tokens_reference",
]
