"""Files and directories replaced whole: a reader sees the old version or the new one, never a mix.

* :func:`atomic_write`: one file, written under a temporary name beside it, flushed, renamed over
  it. A temporary file left by a killed writer is named ``.<name>.<pid>-<random>.tmp`` and removed
  by the next write to the same file once that process is gone.
* :func:`replace_directory`: a directory whose files belong together (an adapter's config and
  weights). The new version is written into a fresh sibling ``.<name>.saving-<pid>-<random>``
  and swapped in with one ``renameat2(RENAME_EXCHANGE)`` (Linux ≥ 3.15 on ext4, xfs, btrfs,
  tmpfs...): before it, ``path`` is the old directory, after it the new one; then the old one is
  removed. Where the exchange is unavailable, the old directory is first renamed aside to
  ``.<name>.previous-<pid>-<random>``, so for a moment ``path`` is absent (never mixed); a crash
  then leaves the previous version under that name, and the next save renames it back first.
  Other entries of the old directory (a ``last/`` adapter, a README) are moved into the new one.
  Writers to one directory take an exclusive ``flock`` on its parent, so they are serialised:
  the last one wins, and every version is whole. (The lock is advisory and POSIX-only; on
  Windows writers are not serialised.)
* :func:`read_files`: readers open the directory once and each file relative to it, reading
  bytes: a swap between two reads cannot pair one version's file with the other's.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

from .errors import AdapterFileError

# ---------------------------------------------------------------------------------- one file


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then ``os.replace`` it into
    place: a crash mid-write leaves the previous file whole, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        _fsync_file(tmp)
        # Writers differ (safetensors creates 0600 files): give the file the mode a plain
        # open() would, or keep the mode of the file it replaces.
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)
    return path


def _remove_stale_temporaries(path: Path) -> None:
    """Remove ``.<name>.<pid>-<random>.tmp`` files of ``path`` whose writer no longer runs."""
    for tmp in path.parent.glob(f".{path.name}.*-*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or we cannot tell: keep its file
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    """Make renames in ``directory`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- a directory

SAVING, PREVIOUS = "saving", "previous"
"""Infixes of the sibling directories a save creates: ``.<name>.saving-<pid>-<random>`` (the new
version being written; after an exchange, the old one being removed) and
``.<name>.previous-<pid>-<random>`` (the old version, moved aside where no exchange exists)."""


def replace_directory(path: str | os.PathLike, fill: Callable[[Path], None], managed: Collection[str]) -> Path:
    """Replace directory ``path`` by a new version whose files ``fill(staging)`` writes.

    ``managed`` names the files ``fill`` writes; other entries of the old directory are carried
    into the new one. On any error before the swap, ``path`` is untouched and the staging
    directory removed. A symlink at ``path`` keeps pointing where it did: the directory it
    points to is replaced.
    """
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "a file is in the way of the directory", str(path))
    with _directory_lock(parent):
        _clean_up_after_crashes(path, managed)
        mode = path.stat().st_mode & 0o7777 if path.exists() else 0o777 & ~_umask()
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.{SAVING}-{os.getpid()}-", dir=parent))
        swapped = False
        try:
            fill(staging)
            for entry in staging.iterdir():
                if entry.is_file():
                    _fsync_file(entry)
            os.chmod(staging, mode)  # mkdtemp makes it 0700
            _fsync_directory(staging)
            if not path.exists():
                _rename_no_replace(staging, path)
                swapped = True
                _fsync_directory(parent)
                return path
            previous = staging
            if not _exchange(staging, path):
                previous = _sibling(path, PREVIOUS)
                os.rename(path, previous)
                os.rename(staging, path)
            swapped = True
            _fsync_directory(parent)
            _retire(previous, path, managed)
        finally:
            if not swapped:
                shutil.rmtree(staging, ignore_errors=True)
    return path


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _retire(old: Path, path: Path, managed: Collection[str]) -> None:
    """Move ``old``'s entries that are not ``managed`` (and not in ``path``) into ``path``, then
    remove ``old``. Safe to repeat after a crash: nothing of the user's is deleted."""
    for entry in list(old.iterdir()):
        if entry.name not in managed and not os.path.lexists(path / entry.name):
            os.rename(entry, path / entry.name)
    shutil.rmtree(old)


def _clean_up_after_crashes(path: Path, managed: Collection[str]) -> None:
    """Finish what a killed save left (called under the lock, so no live save owns these):
    a previous version moved aside while ``path`` is absent goes back; staging directories
    and retired versions are retired (their foreign entries kept)."""
    leftovers = sorted(path.parent.glob(f".{path.name}.{PREVIOUS}-*"), key=lambda p: p.stat().st_mtime)
    if leftovers and not path.exists():
        os.rename(leftovers.pop(), path)
    for old in [*leftovers, *path.parent.glob(f".{path.name}.{SAVING}-*")]:
        if old.is_dir() and path.is_dir():
            _retire(old, path, managed)
        elif old.is_dir():  # a first save that never got swapped in: only its own files
            shutil.rmtree(old)


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``directory`` (released by the kernel if the process dies)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; writers are not serialised there
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2


def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2  # glibc ≥ 2.28, musl ≥ 1.2.5
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def _exchange(a: Path, b: Path, flags: int = _RENAME_EXCHANGE) -> bool:
    """Swap (or with ``_RENAME_NOREPLACE``, move without replacing) ``a`` and ``b`` atomically.
    ``False`` where the platform or file system has no such call; other failures raise."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _rename_no_replace(src: Path, dst: Path) -> None:
    if not _exchange(src, dst, _RENAME_NOREPLACE):
        os.rename(src, dst)  # under the lock no other save creates dst meanwhile


# ------------------------------------------------------------------------------- reading

_RETRIES = 50


def read_files(path: str | os.PathLike, names: Collection[str], max_bytes: dict[str, int]) -> dict[str, bytes | None]:
    """The bytes of files ``names`` of directory ``path``, all from one version of it (``None``
    for a file that is absent). A file over ``max_bytes[name]`` is refused unread."""
    path = Path(path)
    for attempt in range(_RETRIES):
        try:
            directory = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            if attempt + 1 < _RETRIES and _save_in_progress(path):
                time.sleep(0.01)  # the short gap of a save without an atomic exchange
                continue
            raise
        try:
            found = {name: _read_at(directory, path, name, max_bytes.get(name)) for name in names}
            if any(v is None for v in found.values()) and _replaced_since(path, directory):
                continue  # a save swapped this version out and removed its files while we read
            return found
        finally:
            os.close(directory)
    raise AdapterFileError(f"{path} kept changing while it was read ({_RETRIES} tries); is a writer looping?")


def _read_at(directory: int, path: Path, name: str, limit: int | None) -> bytes | None:
    try:
        if os.open in os.supports_dir_fd:
            fd = os.open(name, os.O_RDONLY, dir_fd=directory)
        else:  # no dir_fd (Windows): by path
            fd = os.open(path / name, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if limit is not None and size > limit:
            raise AdapterFileError(
                f"{path / name} is {size:,} bytes, more than the {limit:,} such a file can need; it is not read."
            )
        return f.read()


def _replaced_since(path: Path, directory: int) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return True
    then = os.fstat(directory)
    return (now.st_dev, now.st_ino) != (then.st_dev, then.st_ino)


def _save_in_progress(path: Path) -> bool:
    return any(path.parent.glob(f".{path.name}.{PREVIOUS}-*"))


def interrupted_save_hint(path: Path) -> str:
    """A sentence for a missing directory that a killed save left aside, or ``""``."""
    leftovers = sorted(path.parent.glob(f".{path.name}.{PREVIOUS}-*")) if path.parent.is_dir() else []
    if not leftovers:
        return ""
    return (
        f" A save was interrupted: the previous version is in {str(leftovers[-1])!r}; the next save "
        f"puts it back, or rename it to {path.name!r}."
    )
