"""Local worker processes (`eftnas_cli.workers`): a failing worker's error surfaces as one line and
stops the others; an interrupted parent leaves no worker behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eftnas_cli.errors import UserError
from eftnas_cli.workers import WorkerFailed, run_workers


def fail_with(kind: str, marker: str) -> None:
    """A worker: the first to start fails with `kind`; the other waits until it is stopped."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        time.sleep(120)
        return
    raise {"user": UserError, "bug": ValueError}[kind](f"{kind} failure")


def no_progress() -> tuple[int, str]:
    return 0, ""


@pytest.mark.parametrize("kind, error, message", [
    ("user", UserError, r"^worker [01]: user failure$"),
    ("bug", WorkerFailed, r"^worker [01]: ValueError: bug failure$"),
])
def test_a_failing_worker_stops_the_others_and_its_error_surfaces(tmp_path, kind, error, message):
    started = time.perf_counter()
    with pytest.raises(error, match=message):
        run_workers(fail_with, (kind, str(tmp_path / "first")), 2, "test", 1, no_progress)
    # The other worker sleeps 120 s: it was stopped, not waited for.
    assert time.perf_counter() - started < 60


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
                children.append(int(entry.name))
    return children


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def _as_from_a_shell() -> None:
    """SIGINT handled and unblocked in the started process, as a shell starts a command. Late in the
    full suite the pytest process itself had SIGINT ignored or blocked (something it ran left it
    so; not yet found), which the child inherited: it never saw the test's SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def test_interrupting_the_parent_stops_every_worker():
    # faulthandler on SIGUSR1: should the parent hang, the failure shows where.
    code = ("import faulthandler, signal, time; faulthandler.register(signal.SIGUSR1, all_threads=True); "
            "from eftnas_cli.workers import run_workers; run_workers(time.sleep, (120,), 2, 't', 1, lambda: (0, ''))")
    parent = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                              preexec_fn=_as_from_a_shell)
    try:
        deadline = time.monotonic() + 60
        while len(children := _children(parent.pid)) < 2:
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.2)
        # Only the parent gets the signal, as from `kill -INT`: it must stop its workers itself.
        parent.send_signal(signal.SIGINT)
        try:
            _, stderr = parent.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            parent.send_signal(signal.SIGUSR1)
            time.sleep(1)
            parent.kill()
            _, stderr = parent.communicate()
            alive = [pid for pid in children if _alive(pid)]
            pytest.fail(f"the parent did not stop within 60 s of SIGINT (workers alive: {alive}); its stacks:\n{stderr}")
        assert parent.returncode != 0 and "KeyboardInterrupt" in stderr
        assert not [pid for pid in children if _alive(pid)]
    finally:
        parent.kill()
        parent.wait()
