"""Where a model's tensors live, and the CUDA bookkeeping that timings and GPU RAM figures need.

A model sits on one device, or (loaded with `device_map="auto"`) spread over several: every per-layer
tensor an editor keeps (C0, key sums, solves) is placed on the device of that layer's edited weight
(`layer_device`). Timings on CUDA are only true after `synchronize` (kernels run asynchronously); peak
GPU RAM is torch's allocator peak summed over the model's CUDA devices, 0 without CUDA; `gpu_ram_mb` is what
the RAM budget counts on CUDA (held by this process, and still usable).
"""
from __future__ import annotations

import torch
from torch import nn

from editors.arch import weight_view


def model_devices(model: nn.Module) -> list[torch.device]:
    """The distinct devices the model's parameters live on, in first-seen order."""
    seen: dict[torch.device, None] = {}
    for p in model.parameters():
        seen.setdefault(p.device, None)
    return list(seen)


def cuda_devices(model: nn.Module) -> list[int]:
    """Indices of the CUDA devices holding parts of the model (empty on CPU)."""
    return [d.index if d.index is not None else torch.cuda.current_device()
            for d in model_devices(model) if d.type == "cuda"]


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the token embedding's device (the first block's under a device map)."""
    embed = model.get_input_embeddings()
    return embed.weight.device if embed is not None else next(model.parameters()).device


def layer_device(model: nn.Module, layer: int) -> torch.device:
    """The device of the edited weight of `layer` (its solve and statistics run there)."""
    return weight_view(model, layer).device


def synchronize(model: nn.Module) -> None:
    """Wait for every queued CUDA kernel on the model's devices (no-op on CPU)."""
    for index in cuda_devices(model):
        torch.cuda.synchronize(index)


def reset_gpu_peak(model: nn.Module) -> None:
    for index in cuda_devices(model):
        torch.cuda.reset_peak_memory_stats(index)


def peak_gpu_mb(model: nn.Module) -> float:
    """Peak allocated CUDA memory (MiB) since the last reset, summed over the model's devices; 0 without CUDA."""
    return sum(torch.cuda.max_memory_allocated(i) for i in cuda_devices(model)) / 2**20


def gpu_ram_mb(model: nn.Module) -> tuple[float, float] | None:
    """(MiB this process's tensors hold on the model's CUDA devices, MiB still usable there: what each device has
    free plus what torch's caching allocator reserved and has not handed out), summed over those devices; None when
    no part of the model is on CUDA."""
    indices = cuda_devices(model)
    if not indices:
        return None
    held = usable = 0
    for i in indices:
        free, _total = torch.cuda.mem_get_info(i)
        allocated = torch.cuda.memory_allocated(i)
        held += allocated
        usable += free + torch.cuda.memory_reserved(i) - allocated
    return held / 2**20, usable / 2**20
