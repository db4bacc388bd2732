"""torch.distributed set-up for ``torchrun`` (NCCL on GPUs, gloo on CPUs) and gradient averaging.

Launch with ``torchrun --nproc_per_node N -m train ...``; a plain ``python -m train`` is one
process. Like EG3D/StyleGAN, modules are not wrapped in DDP (the generator is called through
several entry points); instead rank 0's weights are broadcast at start and gradients are
averaged across ranks before every optimiser step, which keeps all replicas identical.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's environment and initialise the process group when world size > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda was requested but no CUDA device is available; use device=cpu")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def broadcast_module(module: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if info.enabled:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def average_gradients(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """All-reduce the gradients of ``params`` (flattened into one buffer) and divide by world size."""
    if not info.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


class BufferAverager:
    """Averages across ranks the floating-point buffers of ``module`` that training changes, e.g.
    the mapping's running w_avg (its update is linear, so the average of the per-rank updates is
    the update with the global batch). Constants (noise inputs, resampling filters) are never
    sent: a buffer is averaged when it was written in place (its version counter moved) or
    replaced since the last call. Every rank runs the same code, so every rank finds the same
    buffers. Calling it returns the names it averaged."""

    def __init__(self, module: torch.nn.Module, info: DistInfo):
        self.module, self.info = module, info
        self.seen = self._versions()

    def _versions(self) -> dict[str, tuple[torch.Tensor, int]]:
        return {name: (b, b._version) for name, b in self.module.named_buffers() if b.is_floating_point()}

    def __call__(self) -> list[str]:
        if not self.info.enabled:
            return []
        now = self._versions()
        changed = [name for name, (b, version) in now.items()
                   if name not in self.seen or self.seen[name][0] is not b or self.seen[name][1] != version]
        if changed:
            flat = torch.cat([now[name][0].detach().flatten() for name in changed])
            dist.all_reduce(flat)
            flat /= self.info.world_size
            offset = 0
            with torch.no_grad():
                for name in changed:
                    b = now[name][0]
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()
        self.seen = self._versions()
        return changed


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
