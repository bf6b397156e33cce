"""Ids outside [0, L) given to the Triton ops directly (the model's come from argsort and are always
valid) are never read or written out of bounds: the rows they name read as zeros / weigh 0.
MAE_FAST_CHECK_IDS=1 turns them into errors (tested in each op's file)."""
import pytest
import torch

from mae_fast import ops
from mae_fast.ops._triton import why_not_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(why_not_triton(torch.device(DEV)) is not None, reason="triton cannot run here")
N, C, P, h, w, D = 2, 3, 4, 2, 3, 8
L = h * w
FAR = 10 ** 6


def test_embed_with_bad_ids_stays_in_bounds(seed):
    imgs = torch.randn(N, C, h * P, w * P, device=DEV, requires_grad=True)
    bad = torch.tensor([[0, FAR], [-5, 2]], device=DEV)
    pat = ops.gather_patches(imgs.detach(), bad, P, backend="triton")
    assert torch.all(pat[0, 1] == 0) and torch.all(pat[1, 0] == 0)
    torch.testing.assert_close(pat[0, 0], ops.gather_patches(imgs.detach(), bad[:, :1].abs(), P, backend="torch")[0, 0])
    params = [torch.randn(D, C, P, P, device=DEV), torch.randn(D, device=DEV), torch.randn(1, 1 + L, D, device=DEV),
              torch.randn(1, 1, D, device=DEV)]
    for t in params:
        t.requires_grad_(True)
    out = ops.embed_visible_patches(imgs, bad, *params, backend="triton")
    out.square().sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in (imgs, *params))


def test_unshuffle_and_loss_with_bad_ids_stay_in_bounds(seed):
    x = torch.randn(N, 3, D, device=DEV, requires_grad=True)
    ids = torch.tensor([[0, 1, FAR, 3, 4, 5], [-7, 1, 2, 3, 4, 5]], device=DEV)
    mt = torch.randn(1, 1, D, device=DEV, requires_grad=True)
    y = ops.unshuffle_mask_tokens(x, ids, mt, torch.randn(1, 1 + L, D, device=DEV), backend="triton")
    y.square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(mt.grad).all()

    imgs = torch.randn(N, C, h * P, w * P, device=DEV)
    pred = torch.randn(N, 2, P * P * C, device=DEV, requires_grad=True)
    pred_ids = torch.tensor([[0, FAR], [-3, 1]], device=DEV)
    loss = ops.patch_mse_loss(pred, imgs, torch.ones(N, L, device=DEV), P, True, pred_ids=pred_ids,
                              backend="triton")
    loss.backward()
    assert torch.isfinite(loss) and torch.all(pred.grad[0, 1] == 0) and torch.all(pred.grad[1, 0] == 0)


def test_loss_imgs_grad_with_bad_ids(seed):
    """With imgs requiring grad too (its gradient is taken in torch), a bad id still weighs 0:
    no out-of-bounds gather or scatter, and imgs get the gradient of the valid patches only."""
    imgs = torch.randn(N, C, h * P, w * P, device=DEV, requires_grad=True)
    pred = torch.randn(N, 2, P * P * C, device=DEV, requires_grad=True)
    bad = torch.tensor([[0, FAR], [-3, 1]], device=DEV)
    mask = torch.ones(N, L, device=DEV)
    ops.patch_mse_loss(pred, imgs, mask, P, True, pred_ids=bad, backend="triton").backward()
    # the same loss as the valid patches alone, zero-weighted others: pred rows of the bad ids set to 0
    keep = torch.tensor([[1.0, 0.0], [0.0, 1.0]], device=DEV)
    imgs2, pred2 = imgs.detach().clone().requires_grad_(), pred.detach().clone().requires_grad_()
    good = torch.tensor([[0, 2], [4, 1]], device=DEV)  # any valid, distinct ids for the dropped rows
    weights = torch.zeros(N, L, device=DEV).scatter_(1, good, keep)
    ref = ops.patch_mse_loss(pred2, imgs2, weights, P, True, pred_ids=good, backend="torch") * weights.sum() / mask.sum()
    ref.backward()
    torch.testing.assert_close(imgs.grad, imgs2.grad)
    torch.testing.assert_close(pred.grad, pred2.grad)
