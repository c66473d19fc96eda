"""Several processes on torch.distributed (torchrun or accelerate launch); every helper is a no-op in one process.

igprune's data parallelism keeps every rank's random numbers identical: all ranks seed the same generators and
draw every global sample, gate and loss position, and each computes only its shard of the forwards. Summing the
shards' gradients then gives the single-process update, so a fit on any number of ranks finds the same masks.
Only rank 0 writes files; the others wait on a barrier where a later step reads what it wrote.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def shows_progress(progress: bool) -> bool:
    """Whether to draw a progress bar: asked for, and on rank 0 only (every rank runs the same loops)."""
    return progress and is_main()


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK): the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env() -> bool:
    """Join the process group torchrun / accelerate launch describe in the environment (WORLD_SIZE > 1):
    nccl when CUDA is present (one GPU per local rank), gloo otherwise. Returns whether several ranks run."""
    if active():
        return world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return True


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place; returns it."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather(obj: T) -> list[T]:
    """Every rank's `obj` (picklable), in rank order."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(items: Sequence[T]) -> list[T]:
    """This rank's strided share of `items`: items[rank::world]."""
    return list(items[rank()::world_size()])


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and give every rank its result (or its error), e.g. embedding and clustering, whose
    results must agree exactly across ranks and which need not run more than once."""
    if world_size() == 1:
        return fn()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = (True, fn())
        except Exception as err:  # every rank raises it, none waits forever
            box[0] = (False, err)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


@contextlib.contextmanager
def main_writes() -> Iterator[bool]:
    """`with main_writes() as write: if write: ...`: rank 0 writes, and no rank leaves before it has written."""
    try:
        yield is_main()
    finally:
        barrier()


def map_sharded(fn: Callable[[T], Any], items: Sequence[T]) -> list[Any]:
    """[fn(x) for x in items], each rank computing its strided share; every rank gets all results, in order.
    For searches that score many candidate masks: the scores are the single-process ones, exactly."""
    if world_size() == 1:
        return [fn(x) for x in items]
    merged: dict[int, Any] = {}
    for part in all_gather({i: fn(items[i]) for i in range(rank(), len(items), world_size())}):
        merged.update(part)
    return [merged[i] for i in range(len(items))]
