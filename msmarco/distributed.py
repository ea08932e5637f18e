"""Several processes (torchrun, accelerate launch): every process runs the whole script. These keep one-time work on
one process (it prepares data and writes files while the others wait) and split evaluation work across the
processes so every one gets the whole result. One process alone: every helper is a no-op."""
from __future__ import annotations

import contextlib
import os
from typing import Callable


def init_distributed() -> tuple[int, int]:
    """(rank, world size); under a launcher (WORLD_SIZE > 1) joins the process group first, before any data work,
    through accelerate's PartialState, the one the HF Trainer uses later: NCCL on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import datetime

    import torch
    import torch.distributed as dist
    if not dist.is_initialized():
        from accelerate import PartialState
        # not the Trainer's 30 min (ddp_timeout): on a first full-scale run the others wait at a barrier while the
        # main process downloads ~10 GB and prepares the stores (~20 min on 2 cores); the cost is that a process
        # hanging in training is reported after 4 hours
        PartialState(cpu=not torch.cuda.is_available(), timeout=datetime.timedelta(hours=4))
    return dist.get_rank(), dist.get_world_size()


def process_group() -> tuple[int, int]:
    """(rank, world size) of the joined process group, (0, 1) when there is none."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return process_group()[0] == 0


def barrier() -> None:
    """Wait for every process of a multi-GPU run (no-op alone)."""
    if process_group()[1] > 1:
        import torch.distributed as dist
        dist.barrier()


@contextlib.contextmanager
def main_process_first():
    """The main process runs the block first (prepares stores, writes files); the others wait, then run it
    and find the work done (they open the stores it built)."""
    main = is_main_process()
    if not main:
        barrier()
    try:
        yield
    finally:
        if main:
            barrier()


def all_gather(obj) -> list:
    import torch.distributed as dist
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def split_work(fn: Callable[[list], list], items: list) -> list:
    """fn(items), one result per item, computed across the processes of a multi-GPU run: process r takes
    items[r::world] and every process gets all results back in the items' order. One process alone: fn(items)."""
    rank, world = process_group()
    if world == 1:
        return list(fn(items))
    out: list = [None] * len(items)
    for r, part in enumerate(all_gather(list(fn(items[rank::world])) if items[rank::world] else [])):
        out[r::world] = part
    return out
