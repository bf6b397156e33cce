"""Processes for pretraining: torchrun's environment, DDP or FSDP2, and the full (unsharded)
model and optimizer states that a checkpoint holds whatever the run's mode.

Under FSDP2 every function that gathers or scatters a state is a collective: all ranks call it.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import fqns_from_ids, ids_from_fqns


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_arg: str | None) -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and start the process group:
    NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg:
        device = torch.device(device_arg)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local)
    else:
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device_arg} asked for, but CUDA is not available")
        torch.cuda.set_device(device)
    info = DistInfo(rank, world, local, device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        info.initialized_here = True
    return info


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.item() / info.world_size


# ---------------------------------------------------------------------------- wrapping
def wrap_distributed(model: nn.Module, info: DistInfo, *, fsdp: bool) -> nn.Module:
    """FSDP2 (``fully_shard`` on every Block, then on the model) or DDP over the processes; on
    one process the model itself. Works for models_mae and models_vit alike."""
    if fsdp:
        import warnings

        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # forward returns pred as a slice (x[:, 1:]) as the reference does; nothing here edits it in place
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
        # An explicit mesh of our device type: left to itself, FSDP2 picks CUDA whenever it is
        # available (and fails on a 1-GPU machine running CPU ranks).
        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for blk in (*model.blocks, *getattr(model, "decoder_blocks", ())):  # models_vit has no decoder
            fully_shard(blk, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if info.distributed:
        return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model without DDP's wrapper (the authors' ``model_without_ddp``); FSDP2 wraps in place."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def grad_scaler(model: nn.Module):
    """fp16's GradScaler; FSDP2 needs the sharded one, whose inf check spans every rank's shard."""
    if is_fsdp(model):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler()
    return torch.amp.GradScaler("cuda")


def no_sync(model: nn.Module, info: DistInfo, update: bool):
    """Skip the gradient all-reduce on accumulation iterations that do not step."""
    if update or not info.distributed:
        return contextlib.nullcontext()
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return _fsdp_no_sync(model)


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# ---------------------------------------------------------------------------- full states
def full_model_state(model: nn.Module) -> dict:
    """The full (unsharded) model state dict: on rank 0 only under FSDP2 (the others get ``{}``)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict()


def sync_buffers(model: nn.Module, info: DistInfo) -> None:
    """Under FSDP2, give every rank rank 0's buffers (BatchNorm's running statistics), as DDP
    does before each forward: each rank updates them from its own batches, so without this the
    ranks evaluate, and save, different models."""
    if info.distributed and is_fsdp(model):
        for b in model.buffers():
            dist.broadcast(b, src=0)


def save_rank_state(model: nn.Module, folder: str, info: DistInfo) -> None:
    """``folder/rank{R}_state.pt``: this rank's own parameters and buffers, FSDP2 shards gathered
    (a collective: every rank calls it), so tests can compare the ranks (``--dump-rank-state``)."""
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
             for k, v in unwrap(model).state_dict().items()}
    torch.save(state, os.path.join(folder, f"rank{info.rank}_state.pt"))


def load_model_state(model: nn.Module, state: dict) -> None:
    """Load a full model state dict, given on every rank (each keeps its own shard under FSDP2)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        unwrap(model).load_state_dict(state)


def full_optimizer_state(model: nn.Module, optimizer, groups, info: DistInfo) -> dict | None:
    """The optimizer state dict keyed by position, as a single process's ``optimizer.state_dict()``
    (``groups``: the parameter names of each group); rank 0 only, None elsewhere."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(model, optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return ids_from_fqns(osd, groups) if info.is_main else None
    return optimizer.state_dict() if info.is_main else None


def load_optimizer_state(model: nn.Module, optimizer, osd: dict, groups) -> None:
    """Load a position-keyed optimizer state dict (any run's mode wrote it), given on every rank."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, fqns_from_ids(osd, groups),
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(osd)
