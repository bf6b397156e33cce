"""Small, odd-shaped calls of every kernel, forward and backward, for
``compute-sanitizer --tool memcheck`` (run by device_check.sh). Exits non-zero on a CUDA error.
The attention shapes run with the default kernels and again with MAE_FAST_ATTENTION_KERNELS=short
(the short-sequence kernels: both instantiations, both dQ variants, and a fallback past N = 272)."""
import os

import torch

from mae_fast import ops


def main() -> None:
    assert torch.cuda.is_available(), "needs CUDA"
    dev = "cuda"
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        for B, N, H, D in ((2, 7, 3, 32), (1, 50, 2, 64), (1, 65, 2, 80), (1, 129, 1, 128)):
            qkv = torch.randn(B, N, 3, H, D, device=dev, dtype=dtype, requires_grad=True)
            ops.attention(qkv, backend="cuda").float().square().sum().backward()
        os.environ["MAE_FAST_ATTENTION_KERNELS"] = "short"
        for B, N, H, D in ((2, 7, 3, 32), (1, 50, 2, 64), (1, 65, 2, 80), (1, 80, 1, 128), (1, 129, 2, 32),
                           (1, 197, 2, 32), (1, 257, 1, 32), (1, 257, 1, 80), (1, 300, 1, 32)):
            qkv = torch.randn(B, N, 3, H, D, device=dev, dtype=dtype, requires_grad=True)
            ops.attention(qkv, backend="cuda").float().square().sum().backward()
        del os.environ["MAE_FAST_ATTENTION_KERNELS"]
        N, C, P, h, w, K, D = 2, 3, 14, 2, 3, 2, 40
        L = h * w
        imgs = torch.randn(N, C, h * P, w * P, device=dev, dtype=dtype, requires_grad=True)
        noise = torch.rand(N, L, device=dev)
        ids_shuffle = noise.argsort(1)
        ids_keep, ids_restore = ids_shuffle[:, :K], ids_shuffle.argsort(1)
        weight = torch.randn(D, C, P, P, device=dev, dtype=dtype, requires_grad=True)
        bias = torch.randn(D, device=dev, dtype=dtype, requires_grad=True)
        pos = torch.randn(1, 1 + L, D, device=dev, dtype=dtype)
        cls = torch.randn(1, 1, D, device=dev, dtype=dtype, requires_grad=True)
        x = ops.embed_visible_patches(imgs, ids_keep, weight, bias, pos, cls, backend="triton")
        mask_token = torch.randn(1, 1, D, device=dev, dtype=dtype, requires_grad=True)
        y = ops.unshuffle_mask_tokens(x, ids_restore, mask_token, pos, backend="triton")
        pred = y[:, 1:, : P * P * C] if D >= P * P * C else y[:, 1:].repeat(1, 1, P * P * C // D + 1)[..., : P * P * C]
        mask = torch.ones(N, L, device=dev)
        mask.scatter_(1, ids_keep, 0.0)
        for norm_pix in (False, True):
            loss = ops.patch_mse_loss(pred, imgs.detach(), mask, P, norm_pix, backend="triton")
            loss.backward(retain_graph=True)
        # pred of the removed patches only, a bool mask, and a mask that requires grad (per-patch path)
        removed = ids_shuffle[:, K:]
        pred_m = torch.randn(N, L - K, P * P * C, device=dev, dtype=dtype, requires_grad=True)
        ops.patch_mse_loss(pred_m, imgs.detach(), mask.bool(), P, True, pred_ids=removed, backend="triton").backward()
        ops.patch_mse_loss(pred_m, imgs.detach(), mask.clone().requires_grad_(), P, True, pred_ids=removed,
                           backend="triton").backward()
    torch.cuda.synchronize()
    print("all kernels ran")


if __name__ == "__main__":
    main()
