"""The authors' optimisation recipe: AdamW parameter groups, the per-iteration learning rate and
the optimizer step.

- ``lr = blr * effective_batch / 256`` (:func:`absolute_lr`), effective batch = per-process batch x
  accumulation steps x processes;
- weight decay as timm 0.3.2's ``add_weight_decay`` (the authors' ``main_pretrain.py``): every 1-D
  parameter (norm weights) and every ``.bias`` gets none, everything else (matrices and the 3-D cls /
  mask tokens) is decayed; frozen parameters (the sin-cos ``pos_embed`` tables) are left out;
- half-cycle cosine after a linear warm-up, evaluated at a fractional epoch
  (``step / steps_per_epoch + epoch``), exactly as the authors' ``util/lr_sched.adjust_learning_rate``;
- the step of their ``util/misc.NativeScalerWithGradNormCount`` (:class:`LossScaler`): backward,
  then on an update unscale (fp16), clip if asked, step.

``decay_tokens=True`` (the default) is exactly the authors' grouping, so that a mae_fast training
checkpoint's optimizer state loads in their ``misc.load_model`` and theirs in ours;
``decay_tokens=False`` (``--no-decay-tokens``, mae_fast's default before) also exempts the cls /
mask tokens from decay.
"""
from __future__ import annotations

import math

import torch

TOKEN_NAMES = ("cls_token", "mask_token", "encoder_mask_token")


def absolute_lr(blr: float, effective_batch: int) -> float:
    return blr * effective_batch / 256


def param_groups(model: torch.nn.Module, weight_decay: float, *, decay_tokens: bool = True) -> list[dict]:
    """AdamW groups ``[{no decay}, {decay}]``, in the order of timm's ``add_weight_decay`` (the
    names: :func:`param_group_names`)."""
    groups = param_group_names(model, decay_tokens=decay_tokens)
    params = dict(model.named_parameters())
    return [{"params": [params[n] for n in groups[0]], "weight_decay": 0.0},
            {"params": [params[n] for n in groups[1]], "weight_decay": weight_decay}]


def param_group_names(model: torch.nn.Module, *, decay_tokens: bool = True) -> tuple[list[str], list[str]]:
    """``(no_decay_names, decay_names)``, trainable parameters only, in ``named_parameters`` order."""
    no_decay, decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # frozen: pos_embed, decoder_pos_embed
        bare = name.removeprefix("module.").split(".")[-1]
        if p.ndim <= 1 or name.endswith(".bias") or (not decay_tokens and bare in TOKEN_NAMES):
            no_decay.append(name)
        else:
            decay.append(name)
    return no_decay, decay


def lr_at(epoch: float, *, lr: float, min_lr: float, warmup_epochs: float, epochs: int) -> float:
    """The authors' schedule at a (fractional) epoch: linear warm-up, then half-cycle cosine."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    if epochs <= warmup_epochs:
        return lr
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: float, *, lr: float, min_lr: float,
                         warmup_epochs: float, epochs: int) -> float:
    """Set every group's lr (times its ``lr_scale`` if any) for this fractional epoch; returns it."""
    value = lr_at(epoch, lr=lr, min_lr=min_lr, warmup_epochs=warmup_epochs, epochs=epochs)
    for group in optimizer.param_groups:
        group["lr"] = value * group.get("lr_scale", 1.0)
    return value


class LossScaler:
    """The authors' ``NativeScaler``: ``scaler`` is fp16's GradScaler, or None (bf16 and fp32 need
    no loss scaling). ``update_grad=False`` only accumulates gradients."""

    def __init__(self, scaler=None):
        self.scaler = scaler

    def __call__(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, *, clip_grad: float | None = None,
                 parameters=None, update_grad: bool = True) -> None:
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
        if not update_grad:
            return
        if clip_grad:
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
