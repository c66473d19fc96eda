"""Run a function on several gloo processes on this machine (127.0.0.1, a free port): the multi-process tests."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(fn(), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def on_ranks(fn: Callable, world: int = 2) -> list:
    """fn() on `world` spawned processes in one gloo group; each rank's return value, in rank order."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, free_port(), fn, out), nprocs=world, join=True)
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]
