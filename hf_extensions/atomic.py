"""All-or-nothing saves: a reader sees the previous artifact or the new one, never a mix.

Every hf-extensions writer stages its files and commits them through this module:

* :func:`atomic_write_bytes` / :func:`atomic_write_text` write one file: a temporary file beside
  it, then ``os.replace`` (atomic on POSIX and Windows).
* :func:`atomic_save` stages a whole save (several files and folders) in
  ``<directory>/.hfx-staging/``. When the block ends without error, a ``COMMITTED`` marker is
  written (the commit point), then each staged entry replaces its namesake in ``directory``
  (a replaced folder is first moved into the staging area's trash, so it is swapped whole), and
  the staging area is removed. Files of ``directory`` that the save does not write are kept, as
  with ``save_pretrained``.
* :func:`recover_interrupted_save` finishes what a killed process left: a committed staging
  area is rolled forward (the remaining entries are moved in), an uncommitted one is deleted
  (nothing of the new save had reached ``directory``). Every hf-extensions loader calls it before
  reading, and every save calls it before staging.

The guarantee is against a process being killed (SIGKILL, OOM, pre-emption), not against power
loss: files are not ``fsync``-ed, as with ``save_pretrained``. Concurrent recoveries (several
ranks loading at once) are serialised with an advisory lock on the staging folder itself where
``fcntl`` exists, so nothing but the artifact is ever left in ``directory``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "STAGING_NAME",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "recover_interrupted_save",
]

STAGING_NAME = ".hfx-staging"
_COMMITTED = "COMMITTED"
_TRASH = ".trash"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    The file gets the permissions a plain ``open(path, "w")`` would give (``0o666`` less the
    umask), not ``mkstemp``'s private ``0o600``. A process killed mid-write leaves its
    ``.<name>.<random>.tmp`` file behind, never a cut-short ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` for text."""
    return atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def _locked(staging: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock; single-process saves are still atomic
        yield
        return
    try:
        descriptor = os.open(staging, os.O_RDONLY)
    except FileNotFoundError:  # recovered by another process meanwhile
        yield
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _roll_forward(directory: Path, staging: Path) -> None:
    trash = staging / _TRASH
    for entry in sorted(staging.iterdir()):
        if entry.name in (_COMMITTED, _TRASH):
            continue
        target = directory / entry.name
        if target.is_dir() and not target.is_symlink():
            trash.mkdir(exist_ok=True)
            os.replace(target, trash / f"{entry.name}.{len(list(trash.iterdir()))}")
        os.replace(entry, target)
    shutil.rmtree(staging)


def recover_interrupted_save(directory: str | os.PathLike) -> bool:
    """Finish (committed) or discard (uncommitted) a save that a killed process left in
    ``directory``; returns whether there was one. Cheap when there is none (one ``stat``)."""
    directory = Path(directory)
    staging = directory / STAGING_NAME
    if not staging.is_dir():
        return False
    with _locked(staging):
        if not staging.is_dir():  # another process recovered it while this one waited
            return True
        if (staging / _COMMITTED).is_file():
            _roll_forward(directory, staging)
        else:
            shutil.rmtree(staging)
    return True


@contextlib.contextmanager
def atomic_save(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder; write the save's files there under the names they must
    have in ``directory``. On a normal exit they replace their namesakes in ``directory`` as
    one commit; on an exception nothing in ``directory`` changes.

    Example::

        with atomic_save(save_directory) as stage:
            save_file(tensors, stage / "model.safetensors")
            atomic_write_text(stage / "config.json", json.dumps(config))
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    recover_interrupted_save(directory)
    staging = directory / STAGING_NAME
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    with _locked(staging):
        (staging / _COMMITTED).touch()
        _roll_forward(directory, staging)
