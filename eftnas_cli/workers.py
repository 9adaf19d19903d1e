"""Local worker processes (`eftnas search --workers N`): N processes run the same work, the parent
shows one progress display and surfaces the first failure as one line.

Workers are spawned, never forked (torch's threads do not survive a fork), and run `target(*args)`
with their own output sent to /dev/null (EFTNAS_DEBUG=1 keeps it, tracebacks included). The parent
polls `poll()` for what it shows. The first worker that fails stops the others and its error is
raised in the parent: one of the project's errors as a `UserError` naming the worker (one line,
exit 2), anything else as `WorkerFailed`. Ctrl-C reaches every process of the terminal's process
group; the parent gives the workers a moment to end their trials, then stops those still running
with SIGTERM (which a worker turns into KeyboardInterrupt, as Ctrl-C), and re-raises.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable

from eftnas_cli.errors import EftnasError, UserError
from eftnas_cli.ui import progress

POLL_S = 1.0
# After Ctrl-C: how long workers get to end their running trials before they are stopped.
INTERRUPT_GRACE_S = 3.0
STOP_TIMEOUT_S = 30.0


class WorkerFailed(RuntimeError):
    """A worker process failed with an error that is not the user's to fix, or died."""


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _worker_main(target: Callable, args: tuple, index: int, errors) -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    debug = bool(os.environ.get("EFTNAS_DEBUG"))
    if not debug:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    try:
        target(*args)
    except KeyboardInterrupt:
        sys.exit(130)
    except EftnasError as error:
        errors.put((index, True, str(error)))
        sys.exit(2)
    except Exception as error:  # noqa: BLE001 - reported to the parent, which decides
        if debug:
            traceback.print_exc()
        errors.put((index, False, f"{type(error).__name__}: {error}"))
        sys.exit(1)


def _failure(process: multiprocessing.Process, index: int, errors) -> Exception:
    messages = {}
    while not errors.empty():
        worker, user_error, message = errors.get()
        messages.setdefault(worker, (user_error, message))
    if index in messages:
        user_error, message = messages[index]
        return UserError(f"worker {index}: {message}") if user_error else WorkerFailed(f"worker {index}: {message}")
    if process.exitcode == 130:
        return WorkerFailed(f"worker {index} was interrupted")
    if process.exitcode < 0:
        return WorkerFailed(f"worker {index} was killed by signal {-process.exitcode} (out of memory?)")
    return WorkerFailed(f"worker {index} exited with code {process.exitcode}")


def _stop(processes: list[multiprocessing.Process], interrupted: bool) -> None:
    processes = [process for process in processes if process.pid is not None]  # the started ones
    if interrupted:
        # Ctrl-C reached the workers too (one process group): let them end their trials first.
        deadline = time.monotonic() + INTERRUPT_GRACE_S
        while (alive := [p.sentinel for p in processes if p.is_alive()]) and time.monotonic() < deadline:
            multiprocessing.connection.wait(alive, timeout=deadline - time.monotonic())
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(STOP_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            process.join()


def run_workers(target: Callable, args: tuple, count: int, description: str, total: int,
                poll: Callable[[], tuple[int, str]]) -> None:
    """Run `target(*args)` in `count` processes until all end; `poll()` gives (completed, status)
    for the one progress display. Raises the first worker's failure."""
    context = multiprocessing.get_context("spawn")
    errors = context.SimpleQueue()  # put() writes before the worker exits: nothing is lost at exit
    processes = [context.Process(target=_worker_main, args=(target, args, index, errors), name=f"eftnas-worker-{index}")
                 for index in range(count)]
    interrupted = False
    try:
        # Inside the try: an interrupt while workers start must stop those already started (the
        # interpreter's exit would otherwise wait for them).
        for process in processes:
            process.start()
        with progress() as bar:
            task = bar.add_task(description, total=total, completed=0, status="")
            while True:
                completed, status = poll()
                running = sum(process.is_alive() for process in processes)
                bar.update(task, completed=completed, status=f"{status} · {running}/{count} workers")
                for index, process in enumerate(processes):
                    if process.exitcode not in (None, 0):
                        raise _failure(process, index, errors)
                if not running:
                    return
                multiprocessing.connection.wait([p.sentinel for p in processes if p.is_alive()], timeout=POLL_S)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        _stop(processes, interrupted)
