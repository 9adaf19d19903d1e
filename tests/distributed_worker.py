"""One process of a `torchrun` launch in tests/test_distributed.py: runs the eftnas command line
unchanged and records what this rank did, for the test to check afterwards.

    torchrun --nproc_per_node 2 tests/distributed_worker.py LOG_DIR RUN_DIR <eftnas arguments>

Its stderr (the terminal output) goes to LOG_DIR/rank<N>.stderr, and it writes LOG_DIR/rank<N>.json with
- `writes`: every change this process made under RUN_DIR, seen by an audit hook (opens for
  writing, renames, folders made, files and folders removed, copies) plus safetensors' own writes
  (done in Rust, invisible to the hook), as [event, path] pairs;
- `backward_passes` and `allreduce_at`: for train-supernet, how many backward passes the sandwich
  ran and after which of them (1-based) DDP all-reduced a gradient bucket.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

log_dir, run_dir, arguments = Path(sys.argv[1]), Path(sys.argv[2]).resolve(), sys.argv[3:]
rank = int(os.environ["RANK"])
record = {"writes": [], "backward_passes": 0, "allreduce_at": []}
log_dir.mkdir(parents=True, exist_ok=True)
os.dup2(os.open(log_dir / f"rank{rank}.stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = {"os.rename": 0, "os.mkdir": 0, "os.remove": 0, "os.rmdir": 0, "shutil.rmtree": 0,
               "shutil.copyfile": 1, "os.truncate": 0}


def _under_run_dir(path) -> str | None:
    if not isinstance(path, (str, bytes, os.PathLike)):
        return None
    resolved = Path(os.fsdecode(path)).resolve()
    return str(resolved.relative_to(run_dir)) if resolved.is_relative_to(run_dir) else None


def audit(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = args
        written = (mode is not None and any(c in str(mode) for c in "wax+")) or bool(flags & WRITE_FLAGS)
        where = _under_run_dir(path) if written else None
    elif event in PATH_EVENTS:
        # os.rename's destination is what appears; its source is a temporary file it wrote before.
        where = _under_run_dir(args[1] if event == "os.rename" else args[PATH_EVENTS[event]])
    else:
        return
    if where is not None:
        record["writes"].append([event, where])


sys.addaudithook(audit)

import safetensors.torch  # noqa: E402 - patched before transformers imports it

_save_file = safetensors.torch.save_file


def save_file(tensors, filename, *args, **kwargs):
    where = _under_run_dir(filename)
    if where is not None:
        record["writes"].append(["safetensors", where])
    return _save_file(tensors, filename, *args, **kwargs)


safetensors.torch.save_file = save_file

from eftnas_cli.stages.train_supernet import SandwichTrainer  # noqa: E402

_training_step = SandwichTrainer.training_step


def training_step(self, model, *args, **kwargs):
    if not getattr(self, "_recording", False):
        self._recording = True
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):
            record["allreduce_at"].append(record["backward_passes"])
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting_hook)
        backward = self.accelerator.backward

        def counted_backward(loss, **backward_kwargs):
            record["backward_passes"] += 1
            return backward(loss, **backward_kwargs)

        self.accelerator.backward = counted_backward
    return _training_step(self, model, *args, **kwargs)


SandwichTrainer.training_step = training_step

from eftnas_cli.cli import app  # noqa: E402

try:
    app(args=arguments)
finally:
    (log_dir / f"rank{rank}.json").write_text(json.dumps(record))
