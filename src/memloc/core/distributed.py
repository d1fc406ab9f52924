"""Data-parallel training under torchrun: one run, several processes, the result of one process.

`torchrun --nproc-per-node K -m memloc train ...` starts K processes with WORLD_SIZE,
RANK and LOCAL_RANK set; `setup` joins them into one process group (gloo on a CPU,
nccl on a GPU, one GPU per process: cuda:LOCAL_RANK) once, and leaves it at exit.
Without torchrun (WORLD_SIZE unset or 1) nothing here runs a collective: `world()`
is (0, 1) and every helper returns at once, so one process trains as it always did.

The helpers are what the trainer needs: sums of tensors across processes (in place,
one collective per dtype), a barrier, an agreement that every process got past a
step that may fail on one of them, and rank 0's value of a Python object.
"""

from __future__ import annotations

import atexit
import os
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .errors import ConfigError, RunError


def requested() -> bool:
    """Whether this process was started by torchrun with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number: start memloc with "
                          "torchrun, or unset it") from None


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group once (gloo for a CPU, nccl for CUDA); the device this process trains on.

    A CUDA process trains on cuda:LOCAL_RANK. Without torchrun: `device`, and nothing is done.
    """
    if not requested():
        return device
    if device.type == "cuda":
        local = _env_int("LOCAL_RANK")
        if local >= torch.cuda.device_count():
            raise ConfigError(f"process {local} of this machine has no GPU of its own ({torch.cuda.device_count()} "
                              "visible): start at most that many with torchrun --nproc-per-node")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        _env_int("RANK")  # a clear line when torchrun's variables are incomplete
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(shutdown)
    return device


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        raise ConfigError(f"WORLD_SIZE is set but {name} is {os.environ.get(name)!r}: start memloc with torchrun "
                          "(`torchrun --nproc-per-node K -m memloc train ...`)") from None


def shutdown() -> None:
    """Leave the process group (registered at exit by `setup`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes the run's files (rank 0, or the only process)."""
    return world()[0] == 0


def local_device(device: torch.device) -> torch.device:
    """This process's own GPU in place of a bare "cuda" under torchrun (the one `setup` chose); else `device`."""
    if device.type == "cuda" and world()[1] > 1:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Replace every tensor by its sum over the processes, in place: one all-reduce per dtype."""
    if world()[1] == 1 or not tensors:
        return
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    for same in groups.values():
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.all_reduce(flat)
        for t, part in zip(same, flat.split([t.numel() for t in same])):
            t.copy_(part.view_as(t))


def sum_grads(params: Sequence[torch.Tensor]) -> None:
    """Sum every process's gradients of `params` into each process's `.grad`.

    A parameter that no process has a gradient for keeps None (the optimizer skips
    it, as in one process); one that some have is summed with zeros for the rest (a
    process whose share of the batch is empty has no gradients at all).
    """
    if world()[1] == 1:
        return
    device = params[0].device
    have = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)  # (P,)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    sum_([*grads, have])
    for p, g, h in zip(params, grads, have.tolist()):
        p.grad = g if h > 0 else None


def broadcast_(tensors: Sequence[torch.Tensor]) -> None:
    """Overwrite every tensor with rank 0's, in place (no-op in one process)."""
    if world()[1] == 1:
        return
    for t in tensors:
        dist.broadcast(t, src=0)


def barrier() -> None:
    """Wait for every process (no-op in one process)."""
    if world()[1] > 1:
        dist.barrier()


def agree(ok: bool) -> None:
    """Every process says whether its step succeeded; those that did raise RunError when another did not.

    Keeps a failure on rank 0 (a run directory that exists, say) from leaving the
    others waiting in their first collective; the failed process raises its own error after.
    """
    if world()[1] == 1:
        return
    failed = torch.tensor([0.0 if ok else 1.0], device=_collective_device())
    dist.all_reduce(failed)
    if ok and failed.item() > 0:
        raise RunError(f"{int(failed.item())} other process(es) of this torchrun failed (see its error): "
                       "this one stops too")


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every process (`obj` itself in one process)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
