"""The ViT building blocks of MAE, without timm.

Same parameter names, shapes and construction order (hence the same random init under a seed)
as timm 0.3.2's ``PatchEmbed`` and ``Block``, which the authors' model uses. Attention runs
through :func:`mae_fast.ops.attention`, which picks SDPA, or the CUDA extension, by backend.

:func:`forward_blocks` runs a stack of blocks and the norm after it. On a backend with the fused
block ops it fuses every residual add into the LayerNorm that follows it (``norm2`` inside a
block, the next block's ``norm1`` or the final norm across blocks), each Linear's bias into that
add or into the GELU, and under autocast the cast of each norm's output for the next Linear.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .ops._backend import autocast_dtype, check_backend_name
from .ops.residual_norm import layer_norm_op


def _pair(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


class PatchEmbed(nn.Module):
    """Image to patch embedding: a ``P x P`` conv with stride ``P``."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"patch_size must be square, got {self.patch_size}")
        for side, p in zip(self.img_size, self.patch_size):
            if side % p:
                raise ValueError(f"img_size {self.img_size} must be divisible by patch_size {p}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, L, D)


def is_plain_patch_embed(pe: nn.Module) -> bool:
    """Whether a fused op may read ``pe.proj``'s weights instead of calling ``pe``: a plain
    PatchEmbed and Conv2d with no hooks. A swapped-in module (LoRA, quantised) or a hook (feature
    taps) must see the call, as in the reference."""
    return _plain(pe, PatchEmbed) and _plain(getattr(pe, "proj", None), nn.Conv2d)


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, backend: str | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.heads(x))

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before ``proj``: ``(B, N, C)`` -> the heads' outputs ``(B, N, C)``."""
        B, N, C = x.shape
        # A view, not a permute: the fused op reads q, k, v straight from the packed layout.
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        return ops.attention(qkv, backend=self.backend)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _draw_keep(x: torch.Tensor, p: float) -> tuple[float, torch.Tensor]:
    """Stochastic depth's draw as timm 0.3.2 makes it: ``(keep, floor(keep + rand((N, 1, ...))))``
    in ``x``'s dtype, one draw per call."""
    keep = 1.0 - p
    return keep, (keep + torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)).floor_()


class DropPath(nn.Module):
    """Stochastic depth per sample (timm 0.3.2's ``DropPath``): ``x / keep * floor(keep + rand)``."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep, r = _draw_keep(x, self.drop_prob)
        return x.div(keep) * r

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Block(nn.Module):
    """Pre-norm transformer block: ``x + drop_path(attn(norm1(x)))``, then ``x +
    drop_path(mlp(norm2(x)))`` (``drop_path``: stochastic depth, an identity at rate 0)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, norm_layer=nn.LayerNorm,
                 backend: str | None = None, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, backend=backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, normed: torch.Tensor | None = None, next_norm: tuple | None = None):
        """``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``. Called by :func:`forward_blocks` on a
        fused backend with ``normed = norm1(x)`` already computed and ``next_norm = (weight, bias,
        eps, out_dtype)`` of the norm that follows (None: none follows): returns ``(x_out,
        next_norm(x_out))`` (``(x_out, None)``)."""
        if normed is None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        backend = self.attn.backend
        attn, mlp, norm2 = self.attn, self.mlp, self.norm2
        p = getattr(self.drop_path, "drop_prob", 0.0)
        a = F.linear(attn.heads(normed), attn.proj.weight)  # the bias is added with the residual
        x, normed = ops.add_layer_norm(x, a, norm2.weight, norm2.bias, norm2.eps, bias=attn.proj.bias,
                                       out_dtype=autocast_dtype(x.device), backend=backend,
                                       branch_scale=_sample_factors(a, p, self.training))
        m = ops.bias_gelu(F.linear(normed, mlp.fc1.weight), mlp.fc1.bias, backend=backend)
        if next_norm is None:  # the stack's output goes on unnormed (e.g. to global pooling)
            return x + self.drop_path(mlp.fc2(m)), None
        m = F.linear(m, mlp.fc2.weight)
        w, b, eps, out_dtype = next_norm
        return ops.add_layer_norm(x, m, w, b, eps, bias=mlp.fc2.bias, out_dtype=out_dtype, backend=backend,
                                  branch_scale=_sample_factors(m, p, self.training))


def _sample_factors(branch: torch.Tensor, p: float, training: bool) -> torch.Tensor | None:
    """The branch's stochastic-depth factors ``r / keep`` as the fused add takes them, ``(N,)``
    fp32, drawn as :class:`DropPath` draws them; None when nothing is dropped (no draw)."""
    if p == 0.0 or not training:
        return None
    keep, r = _draw_keep(branch, p)
    return r.reshape(-1).float() / keep


class BlocksMixin:
    """What a model of :class:`Block` stacks offers: ``backend``, the kernel backend of every
    block's ops (None: follow :func:`mae_fast.use_backend` / ``MAE_FAST_BACKEND``), and
    :meth:`compile_blocks`."""

    @property
    def backend(self) -> str | None:
        return self._backend

    @backend.setter
    def backend(self, name: str | None) -> None:
        if name is not None:
            check_backend_name(name)
        self._backend = name
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = name

    def compile_blocks(self, **compile_kwargs):
        """Regional compilation: ``torch.compile`` each transformer block in place. Blocks of the
        same width share one compiled graph, so compile time is a block's, not the whole model's;
        everything else runs eagerly. ``compile_kwargs`` go to ``torch.compile`` (e.g.
        ``mode="max-autotune-no-cudagraphs"``). Returns the model."""
        for m in self.modules():
            if isinstance(m, Block):
                m.compile(**compile_kwargs)
        return self


def forward_blocks(blocks: nn.ModuleList, x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
    """``norm(blocks(x))`` (``blocks(x)`` when ``norm`` is None): fused (see the module's
    docstring) when the blocks' backend has the fused ops for ``x`` and every module is the plain
    one with no hooks (a hook, a swapped-in module or FSDP's wrapping must see the calls), else
    block by block as the reference."""
    if len(blocks) == 0 or not _fuses(blocks, norm, x):
        for blk in blocks:
            x = blk(x)
        return x if norm is None else norm(x)
    cast = autocast_dtype(x.device)  # the next Linear's input dtype under autocast
    n1 = blocks[0].norm1
    normed = ops.layer_norm(x, n1.weight, n1.bias, n1.eps, out_dtype=cast, backend=blocks[0].attn.backend)
    for i, blk in enumerate(blocks):
        last = i + 1 == len(blocks)
        nxt = norm if last else blocks[i + 1].norm1
        x, normed = blk(x, normed, None if nxt is None else (nxt.weight, nxt.bias, nxt.eps, None if last else cast))
    return x if norm is None else normed


_PLAIN_BLOCK = {"": Block, "norm1": nn.LayerNorm, "attn": Attention, "attn.qkv": nn.Linear, "attn.proj": nn.Linear,
                "drop_path": (nn.Identity, DropPath), "norm2": nn.LayerNorm, "mlp": Mlp, "mlp.fc1": nn.Linear,
                "mlp.act": nn.GELU, "mlp.fc2": nn.Linear}


def _plain(module: nn.Module, cls: type | tuple) -> bool:
    classes = cls if isinstance(cls, tuple) else (cls,)
    return type(module) in classes and not (module._forward_hooks or module._forward_pre_hooks)


def _fuses(blocks: nn.ModuleList, norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`forward_blocks` may fuse: the backend picks kernels for the fused ops on
    these inputs, and every module is one whose parameters the fused path may read directly."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return False
    if norm is not None and not (_plain(norm, nn.LayerNorm) and norm.weight is not None and norm.bias is not None):
        return False
    for blk in blocks:
        mods = dict(blk.named_modules())
        if mods.keys() != _PLAIN_BLOCK.keys() or not all(_plain(mods[k], c) for k, c in _PLAIN_BLOCK.items()):
            return False
        if blk.mlp.act.approximate != "none" or any(m.bias is None for m in (blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2)):
            return False
        if blk.norm1.weight is None or blk.norm2.weight is None or blk.norm1.bias is None or blk.norm2.bias is None:
            return False
    n1 = blocks[0].norm1
    name, _ = layer_norm_op.select((x, n1.weight, n1.bias, n1.eps), blocks[0].attn.backend)
    return name != "torch"
