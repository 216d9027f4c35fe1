"""Kill a process in the middle of a save with SIGKILL, then check what a reader sees.

:func:`kill_while_saving` forks a child that saves artifact A once, then saves B and A in turn
without pause, so a kill at any moment lands inside a save. The parent kills it with SIGKILL
after a delay drawn over a few save durations, then calls ``check`` (which loads the folder and
says which artifact it found, raising on anything else). Trials continue until
``interrupted`` kills found a save in progress (a staging area on disk) and each of A and B was
seen, so the test cannot pass without exercising an interrupted save.
"""

from __future__ import annotations

import os
import random
import select
import signal
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from hf_extensions.atomic import STAGING_NAME

__all__ = ["kill_while_saving"]


def _private_tqdm_locks() -> None:
    """Give this (forked) process its own tqdm write locks.

    tqdm guards its bars with a ``multiprocessing.RLock`` created once and shared across fork:
    a child SIGKILLed while a progress bar of a save held it would leave it held for ever, and
    the next saving child (then the test session itself, at its next progress bar) would wait
    on it for ever. A process-local lock cannot outlive the child."""
    from tqdm.std import TqdmDefaultWriteLock, tqdm

    TqdmDefaultWriteLock.mp_lock = None
    pending = [tqdm]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls is tqdm or "_lock" in vars(cls):
            cls.set_lock(threading.RLock())


def _child(save_a: Callable[[], None], save_b: Callable[[], None], write_fd: int) -> None:
    try:
        _private_tqdm_locks()
        start = time.perf_counter()
        save_a()
        os.write(write_fd, struct.pack("d", time.perf_counter() - start))
        while True:
            save_b()
            save_a()
    finally:  # only reached on an error in a save: never let the child run the test session
        os._exit(1)


def kill_while_saving(
    directory: str | os.PathLike,
    save_a: Callable[[], None],
    save_b: Callable[[], None],
    check: Callable[[], str],
    *,
    interrupted: int = 3,
    max_trials: int = 60,
    seed: int = 0,
    first_save_timeout: float = 120.0,
) -> Counter:
    """Run kill trials on saves into ``directory``; ``check()`` returns ``"a"`` or ``"b"``.

    Returns the counts of what the reader saw and of ``"interrupted"`` kills."""
    if not hasattr(os, "fork"):
        raise RuntimeError("kill_while_saving needs os.fork (POSIX)")
    directory = Path(directory)
    rng = random.Random(seed)
    seen: Counter = Counter()
    for _ in range(max_trials):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _child(save_a, save_b, write_fd)
        os.close(write_fd)
        try:
            ready, _, _ = select.select([read_fd], [], [], first_save_timeout)
            if not ready:  # e.g. a forked child stuck in an OpenMP region the parent had used
                raise RuntimeError(
                    f"the saving child did not finish its first save in {first_save_timeout} s "
                    "(torch.set_num_threads(1) in the parent avoids OpenMP hangs after fork)"
                )
            data = os.read(read_fd, 8)
            if len(data) != 8:
                raise RuntimeError("the saving child died before its first save finished")
            duration = struct.unpack("d", data)[0]
            time.sleep(rng.uniform(0.0, 4.0 * duration))
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_fd)
        if (directory / STAGING_NAME).exists():
            seen["interrupted"] += 1
        found = check()
        if found not in ("a", "b"):
            raise AssertionError(f"check() must return 'a' or 'b', got {found!r}")
        seen[found] += 1
        if seen["interrupted"] >= interrupted and seen["a"] and seen["b"]:
            return seen
    raise AssertionError(
        f"after {max_trials} kills: {dict(seen)}; no trial set exercised an interrupted save "
        f"{interrupted} times with both artifacts seen"
    )
