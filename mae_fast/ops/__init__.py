"""The fused ops of mae_fast and the one backend switch (see ``_backend``).

Every op has a plain-PyTorch reference (``*_reference``); models call only these functions, never
Triton or the extension directly.
"""
from ._backend import BACKENDS, ENV_VAR, BackendUnavailableError, requested_backend, use_backend
from .attention import attention, attention_reference
from .embed import embed_visible_patches, embed_visible_patches_reference, gather_patches, gather_patches_reference
from .patch_mse import patch_mse_loss, patch_mse_loss_reference
from .patches import patchify, unpatchify
from ._triton import HAS_TRITON, why_not_triton
from .unshuffle import unshuffle_mask_tokens, unshuffle_mask_tokens_reference

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendUnavailableError",
    "HAS_TRITON",
    "why_not_triton",
    "requested_backend",
    "use_backend",
    "attention",
    "attention_reference",
    "embed_visible_patches",
    "embed_visible_patches_reference",
    "gather_patches",
    "gather_patches_reference",
    "patch_mse_loss",
    "patch_mse_loss_reference",
    "patchify",
    "unpatchify",
    "unshuffle_mask_tokens",
    "unshuffle_mask_tokens_reference",
]
