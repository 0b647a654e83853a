"""The tools under ``torchrun --nproc_per_node P`` with ``--context-parallel ulysses``: every process runs
the same generation, and diffusers' context parallelism (Ulysses) shares each transformer call's tokens
among them, one GPU each; CAT pruning shares the recomputed tokens and the K/V caches the same way
(``catprune.engine.parallel``). Only the first process prints and writes files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from .adapters import adapter_for
from .errors import UserError


def start(device_name: str | None) -> torch.device:
    """Join the process group that ``torchrun`` set up (NCCL on CUDA, one GPU per process by its local
    rank; gloo on the CPU) and return this process's device."""
    if "LOCAL_RANK" not in os.environ:
        raise UserError(
            "--context-parallel runs one process per GPU under torchrun: "
            "torchrun --nproc_per_node P -m catprune ... --context-parallel ulysses"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available() and device_name != "cpu"
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.get_world_size() < 2:
        raise UserError(
            "--context-parallel needs at least two processes: torchrun --nproc_per_node P, P >= 2"
        )
    return device


def enable(model: torch.nn.Module) -> None:
    """diffusers' Ulysses context parallelism over every process of the group, on a model whose class has
    a context-parallel plan and whose adapter runs pruned under it; a :class:`UserError` that says so
    otherwise."""
    from diffusers import ContextParallelConfig

    name = type(model).__name__
    if getattr(model, "_cp_plan", None) is None:
        raise UserError(
            f"--context-parallel: diffusers has no context-parallel plan (_cp_plan) for {name}, the model's "
            "transformer (the shipped shapes models are SD3 and PixArt); CAT pruning runs under context "
            "parallelism on WanTransformer3DModel and FluxTransformer2DModel"
        )
    if adapter_for(model).context_parallel is None:
        raise UserError(
            f"--context-parallel: CAT pruning does not run under context parallelism on {name} yet"
        )
    with _device_count_on_cpu(model):
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=dist.get_world_size()))


@contextlib.contextmanager
def _device_count_on_cpu(model: torch.nn.Module) -> Iterator[None]:
    """diffusers places each process on device ``rank % torch.accelerator.device_count()``, which divides
    by zero on a host without an accelerator: for a model on the CPU, the count reads 1 meanwhile."""
    on_cpu = next(model.parameters()).device.type == "cpu" and not torch.accelerator.is_available()
    count = torch.accelerator.device_count
    if on_cpu:
        torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count


def is_first_process() -> bool:
    """Whether this process prints and writes: the only one, or rank 0 of a context-parallel group."""
    return not dist.is_initialized() or dist.get_rank() == 0


@contextlib.contextmanager
def quiet_unless_first() -> Iterator[None]:
    """Standard output only from the first process (the others run the same generation)."""
    if is_first_process():
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
