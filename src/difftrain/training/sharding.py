"""FSDP2 for full fine-tunes: the UNet's parameters, gradients and optimizer state sharded
over the processes (`train.fsdp: true`), with checkpoints and outputs in the ordinary form.

The UNet is sharded block by block with torch's `fully_shard` (what accelerate's FSDP2 plugin
calls; accelerate ignores that plugin on the CPU, so difftrain applies it itself, the same on
CPU and GPU). Whatever leaves the run is gathered first: checkpoints hold the full UNet in
diffusers format and the full optimizer state, so a checkpoint resumes on any number of
processes with FSDP (not into a run without it, nor the reverse), and the final pipeline is a
plain diffusers folder.

Every function here that gathers is a collective: all processes must call it.
"""

from __future__ import annotations

import torch


def shard_denoiser(denoiser: torch.nn.Module, blocks: list[torch.nn.Module]) -> None:
    """Shard each of `blocks` (the family's `shard_units`), then the rest (in place).

    One FSDP unit per block: a block's parameters are gathered just before it runs and freed
    after, so at most about one block is whole at a time.
    """
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(denoiser)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict as plain CPU tensors on the main process, {} on the others (a
    collective: the whole model never sits on every process at once)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def plain_copy(unet: torch.nn.Module) -> torch.nn.Module | None:
    """An unsharded CPU copy of a sharded UNet on the main process, None on the others (a
    collective)."""
    state = full_model_state(unet)
    if not state:
        return None
    copy = original_class(unet).from_config(unet.config)
    copy.load_state_dict(state)
    return copy


def original_class(module: torch.nn.Module) -> type:
    """The model's own class: `fully_shard` swaps in a subclass that mixes in FSDPModule."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def read_denoiser_state(folder, denoiser: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """A checkpoint's `<name>/` weights (diffusers format, safetensors only) as a state dict."""
    loaded = original_class(denoiser).from_pretrained(folder, subfolder=name, use_safetensors=True)
    return loaded.state_dict()


def full_optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """The optimizer's whole state, keyed by parameter name, as plain CPU tensors, on the main
    process ({} on the others; a collective)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, _inner(optimizer), options=options)


def _from_main():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def load_full_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole state dict, given on the main process ({} elsewhere), into a sharded
    model: the main process sends each process its shard (a collective)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_from_main())


def load_full_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> None:
    """Like `load_full_model_state`, for the optimizer state (main process's, {} elsewhere)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, _inner(optimizer), state, options=_from_main())


def _inner(optimizer):
    """accelerate wraps optimizers; the state-dict helpers need torch's own."""
    return getattr(optimizer, "optimizer", optimizer)


def norm_value(norm: torch.Tensor) -> float:
    """A gradient norm as a float; a sharded run's is a (replicated) DTensor, whose full value
    is the norm."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
