"""The optimisers of the authors' fine-tuning and linear probing.

- :func:`param_groups_lrd`: their ``util/lr_decay.param_groups_lrd`` (layer-wise lr decay, as in
  BEiT): ``num_layers = depth + 1``; layer 0 for ``cls_token``, ``pos_embed`` and ``patch_embed.*``,
  ``i + 1`` for ``blocks.i.*``, ``num_layers`` for the rest (norm, fc_norm, head); each group's
  ``lr_scale = layer_decay ** (num_layers - layer_id)`` (``optim.adjust_learning_rate`` applies
  it); no weight decay for 1-D parameters and the ``no_weight_decay()`` names; one group per
  (layer, decay or not), in order of first appearance; frozen parameters are left out.
- :class:`LARS`: their ``util/lars.py``: SGD with momentum whose update of every parameter of
  more than one dimension is weight-decayed and scaled by the trust ratio
  ``trust_coefficient * |p| / |update|``; 1-D parameters (biases, norms) get neither.
"""
from __future__ import annotations

import torch


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """The authors' ``get_layer_id_for_vit``."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_group_names_lrd(model: torch.nn.Module, weight_decay: float = 0.05, no_weight_decay_list=(),
                          layer_decay: float = 0.75) -> list[dict]:
    """The groups of :func:`param_groups_lrd` with parameter names instead of tensors."""
    num_layers = len(model.blocks) + 1
    layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups: dict[str, dict] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or n in no_weight_decay_list
        layer_id = layer_id_for_vit(n, num_layers)
        key = f"layer_{layer_id}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {"lr_scale": layer_scales[layer_id], "weight_decay": 0.0 if no_decay else weight_decay,
                           "params": []}
        groups[key]["params"].append(n)
    return list(groups.values())


def param_groups_lrd(model: torch.nn.Module, weight_decay: float = 0.05, no_weight_decay_list=(),
                     layer_decay: float = 0.75) -> list[dict]:
    """AdamW groups with layer-wise lr decay (see the module docstring)."""
    params = dict(model.named_parameters())
    return [{**g, "params": [params[n] for n in g["params"]]}
            for g in param_group_names_lrd(model, weight_decay, no_weight_decay_list, layer_decay)]


class LARS(torch.optim.Optimizer):
    """LARS (the authors' ``util/lars.py``), for the linear probe with large batches."""

    def __init__(self, params, lr: float = 0, weight_decay: float = 0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:  # not a normalisation gamma/beta nor a bias
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.,
                                    torch.where(update_norm > 0, (g["trust_coefficient"] * param_norm / update_norm),
                                                one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss
