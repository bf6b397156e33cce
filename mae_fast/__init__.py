"""mae_fast: Masked Autoencoders with fused kernels, a drop-in for the authors' ``models_mae``."""
from . import models_mae, ops
from .models_mae import (
    MaskedAutoencoderViT,
    mae_vit_base_patch16,
    mae_vit_base_patch16_dec512d8b,
    mae_vit_huge_patch14,
    mae_vit_huge_patch14_dec512d8b,
    mae_vit_large_patch16,
    mae_vit_large_patch16_dec512d8b,
)
from .ops import use_backend

__version__ = "0.1.0"

__all__ = [
    "MaskedAutoencoderViT",
    "mae_vit_base_patch16",
    "mae_vit_base_patch16_dec512d8b",
    "mae_vit_large_patch16",
    "mae_vit_large_patch16_dec512d8b",
    "mae_vit_huge_patch14",
    "mae_vit_huge_patch14_dec512d8b",
    "models_mae",
    "ops",
    "use_backend",
]
