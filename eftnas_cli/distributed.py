"""Several processes, one training: what eftnas does when `torchrun` or `accelerate launch` starts it.

The launchers start the same command N times with RANK, WORLD_SIZE and LOCAL_RANK set. `init`
joins the process group (NCCL on CUDA, gloo on CPU) before a stage touches its run directory; the
Hugging Face Trainer then finds it and wraps the model in DDP. The rules every training stage
follows (docs/architecture.md, "Several processes"):

- the main process (rank 0) alone takes the run directory's lock and writes the run directory
  (stage folders, manifest, plots, checkpoint fingerprints) and the terminal; the others compute
  the same things, wait at a barrier and then see the finished files;
- what only the main process may decide (a checkpoint to continue from, "checkpoint now") is
  decided there and broadcast, so every rank takes the same path through the collectives;
- evaluation splits its rows over the ranks and gathers the predictions in row order.

Without a launcher (WORLD_SIZE unset or 1) every function here is a no-op or the identity.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def launched() -> bool:
    """Started by torchrun / accelerate launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """A process group of more than one process is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(device: str) -> None:
    """Join the launcher's process group (once; nothing without a launcher). `device` is the
    recipe's: CUDA (NCCL, one GPU per local rank) unless it says cpu, `accelerate launch --cpu`
    asks for the CPU or no GPU is there (gloo).
    The other ranks' terminal output is silenced: the main process reports for all."""
    if not launched() or dist.is_initialized():
        return
    from eftnas_cli.ui import console

    forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in {"1", "true", "yes"}  # accelerate launch --cpu
    if device != "cpu" and torch.cuda.is_available() and not forced_cpu:
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank()))
    else:
        dist.init_process_group("gloo")
    console.quiet = not is_main()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(value: T) -> T:
    """The main process's `value` on every rank (picklable objects)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class MainProcessFailed(RuntimeError):
    """What the other ranks raise when the work they waited for failed on the main process."""


def on_main(work: Callable[[], T]) -> T:
    """`work()` run by the main process only, its result (or its error) on every rank.

    An error of the project's own kind (a refused lock, a bad checkpoint) reaches every rank as
    the same error, so all of them exit with its one line instead of waiting for each other.
    """
    if not active():
        return work()
    from eftnas_cli.errors import EftnasError

    if is_main():
        try:
            result = work()
        except BaseException as error:
            error_type = type(error) if isinstance(error, EftnasError) else MainProcessFailed
            broadcast(("error", error_type, str(error)))
            raise
        return broadcast(("ok", result))[1]
    outcome = broadcast(None)
    if outcome[0] == "error":
        raise outcome[1](outcome[2])
    return outcome[1]


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block first (it fills shared caches), the others after it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def shard(count: int) -> range:
    """This rank's contiguous share of `count` items (ranks in order cover 0..count-1)."""
    size, index = world_size(), rank()
    return range(count * index // size, count * (index + 1) // size)


def gather_lists(named: dict[str, list], items: list) -> tuple[dict[str, list], list]:
    """Each rank's lists (parts of the `shard` it computed: per output name, and one more)
    concatenated in rank order on every rank."""
    if not active():
        return named, items
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, (named, items))
    return ({name: [part for rank_named, _ in gathered for part in rank_named[name]] for name in named},
            [part for _, rank_items in gathered for part in rank_items])


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over all ranks (on its own device and dtype)."""
    if not active():
        return tensor
    # NCCL reduces CUDA tensors only.
    on_backend = tensor.cuda() if dist.get_backend() == "nccl" else tensor.clone()
    dist.all_reduce(on_backend, op=dist.ReduceOp.SUM)
    return on_backend.to(tensor.device)

