"""hf_extensions.atomic: a save killed at any moment leaves the old or the new artifact."""

from __future__ import annotations

import json
import os

import pytest

from hf_extensions.atomic import (
    STAGING_NAME,
    atomic_save,
    atomic_write_text,
    recover_interrupted_save,
)
from tests.faults import kill_while_saving

FILES = 12
PAYLOAD = 64 * 1024


class Mixed(AssertionError):
    pass


def _write(folder, letter):
    (folder / "shards").mkdir(exist_ok=True)
    for i in range(FILES):
        (folder / "shards" / f"{i}.bin").write_bytes(letter.encode() * PAYLOAD)
    (folder / "config.json").write_text(json.dumps({"letter": letter}))


def _atomic(directory, letter):
    with atomic_save(directory) as stage:
        _write(stage, letter)


def _read(directory):
    recover_interrupted_save(directory)
    try:
        letters = {json.loads((directory / "config.json").read_text())["letter"]}
    except ValueError as error:  # a config cut short by the kill
        raise Mixed(f"unreadable config: {error}") from error
    for i in range(FILES):
        data = (directory / "shards" / f"{i}.bin").read_bytes()
        letters |= {chr(data[0]) if len(data) == PAYLOAD else "truncated"}
    if len(letters) != 1:
        raise Mixed(f"the folder mixes saves: {sorted(letters)}")
    return letters.pop()


def test_a_killed_atomic_save_leaves_the_old_or_the_new_artifact(tmp_path):
    seen = kill_while_saving(
        tmp_path,
        lambda: _atomic(tmp_path, "a"),
        lambda: _atomic(tmp_path, "b"),
        lambda: _read(tmp_path),
    )
    assert seen["interrupted"] >= 3 and not (tmp_path / STAGING_NAME).exists()


def test_the_kill_harness_sees_the_mix_a_plain_save_leaves(tmp_path):
    # Control: the same files written in place are caught half old, half new.
    with pytest.raises(Mixed):
        kill_while_saving(
            tmp_path,
            lambda: _write(tmp_path, "a"),
            lambda: _write(tmp_path, "b"),
            lambda: _read(tmp_path),
        )


def test_an_exception_inside_the_block_changes_nothing(tmp_path):
    _atomic(tmp_path, "a")
    with pytest.raises(RuntimeError), atomic_save(tmp_path) as stage:
        _write(stage, "b")
        raise RuntimeError
    assert _read(tmp_path) == "a" and not (tmp_path / STAGING_NAME).exists()


def test_a_save_keeps_unrelated_files_and_swaps_folders_whole(tmp_path):
    (tmp_path / "training_args.bin").write_bytes(b"x")
    _atomic(tmp_path, "a")
    with atomic_save(tmp_path) as stage:
        (stage / "shards").mkdir()
        (stage / "shards" / "only.bin").write_bytes(b"b")
    assert (tmp_path / "training_args.bin").read_bytes() == b"x"
    assert [p.name for p in (tmp_path / "shards").iterdir()] == ["only.bin"]


def test_recovery_rolls_a_committed_save_forward_and_drops_an_uncommitted_one(tmp_path):
    _atomic(tmp_path, "a")
    staging = tmp_path / STAGING_NAME
    staging.mkdir()
    _write(staging, "b")
    assert recover_interrupted_save(tmp_path) and _read(tmp_path) == "a"
    staging.mkdir()
    _write(staging, "b")
    (staging / "COMMITTED").touch()
    assert recover_interrupted_save(tmp_path) and _read(tmp_path) == "b"
    assert not staging.exists() and not recover_interrupted_save(tmp_path)


def test_atomic_write_text_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "card" / "README.md"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and [p.name for p in path.parent.iterdir()] == ["README.md"]
    plain = tmp_path / "plain.md"
    plain.write_text("x")  # the permissions an ordinary write gives (umask applied)
    assert path.stat().st_mode == plain.stat().st_mode


def test_a_saving_child_killed_inside_a_progress_bar_leaves_tqdms_shared_lock_free():
    """tqdm's lock is a multiprocessing RLock shared across fork; the kill harness gives each
    saving child its own (else a child killed mid-bar hangs every later child and the session)."""
    import signal
    import time

    from tqdm.std import TqdmDefaultWriteLock, tqdm

    from tests.faults import _private_tqdm_locks

    tqdm.get_lock()  # the session's lock exists before the fork, as in a test session
    shared = TqdmDefaultWriteLock.mp_lock
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what a save's progress bar does, then killed holding the lock
        try:
            _private_tqdm_locks()
            tqdm.get_lock().acquire()
            os.write(ready_write, b"1")
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_read, 1) == b"1"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_read)
        os.close(ready_write)
    assert shared.acquire(timeout=5), "a killed child still holds tqdm's shared lock"
    shared.release()
