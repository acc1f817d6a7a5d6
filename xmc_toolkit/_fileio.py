"""File-system primitives shared by every module that writes files.

* :func:`atomic_write` (and :func:`atomic_write_bytes` / :func:`atomic_write_text`): the one
  implementation of "write to a temporary name beside the target, fsync, rename into place".
  A reader never sees a half-written file; the file gets the ordinary mode of a new file
  (``0666 & ~umask``, e.g. 0644), not the 0600 of a ``mkstemp`` file; a failed write (disk
  full, permissions, a missing folder, a target such as ``/proc/x``) leaves the previous file
  untouched and raises :class:`~xmc_toolkit.errors.OutputError` naming the file.
* :func:`sha256_file`, :func:`fsync_dir`.
* :class:`OutputLock`: an exclusive, advisory lock on an output directory that names the process
  holding it, so that two runs never write into the same directory at once.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from .errors import OutputError

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "sha256_file",
           "fsync_dir", "set_default_mode", "output_error", "save_safetensors", "OutputLock",
           "LOCK_FILE"]

LOCK_FILE = ".xmc.lock"

_HINTS = {
    errno.ENOSPC: "the disk is full; free space or write elsewhere",
    errno.EDQUOT: "the disk quota is exceeded; free space or write elsewhere",
    errno.EACCES: "permission denied; choose a writable location",
    errno.EPERM: "operation not permitted; choose a writable location",
    errno.EROFS: "the file system is read-only; choose a writable location",
    errno.ENOENT: "a folder on the path does not exist; create it first or fix the path",
    errno.ENOTDIR: "a component of the path is a file, not a folder; fix the path",
    errno.EISDIR: "the path is a directory; pass a file name",
}


def output_error(path: str | os.PathLike[str], exc: OSError, what: str = "write") -> OutputError:
    """An :class:`OutputError` for a failed write of ``path`` (reason and fix in the message)."""
    reason = exc.strerror or str(exc)
    hint = _HINTS.get(exc.errno or -1, "check the path")
    return OutputError(f"cannot {what} {str(path)!r}: {reason} ({hint})")


_OS_ERROR = re.compile(r"os error (\d+)")


def save_safetensors(tensors: dict, path: str | os.PathLike[str],
                     metadata: dict[str, str] | None = None, *, numpy: bool = False) -> None:
    """``safetensors.torch.save_file`` (``safetensors.numpy`` with ``numpy``), with its I/O
    failures raised as the ``OSError`` they are.

    safetensors reports a failed write (disk full, permissions) as ``SafetensorError("... (os
    error 28)")``; callers that turn an ``OSError`` into an actionable message (the checkpoint
    writer's "disk full; the previous checkpoint is kept") get one with the right ``errno``.
    """
    if numpy:
        from safetensors.numpy import save_file
    else:
        from safetensors.torch import save_file
    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as exc:
        m = _OS_ERROR.search(str(exc))
        if type(exc).__name__ != "SafetensorError" or m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def set_default_mode(path: str | os.PathLike[str]) -> None:
    """Give a file written by a library that creates 0600 files (safetensors, ``mkstemp``)
    the mode of an ordinary new file, ``0666 & ~umask``."""
    os.chmod(path, 0o666 & ~_umask())


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory (makes a rename in it durable); a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object], *,
                 fsync: bool = True, make_parents: bool = False) -> Path:
    """Create or replace ``path`` atomically: ``write(tmp)`` writes a temporary file beside it.

    The temporary name keeps the suffix of ``path`` (``np.save`` appends ``.npy`` otherwise).
    The result has mode ``0666 & ~umask``. ``make_parents`` creates missing folders first.

    Raises:
        OutputError: the file cannot be written (disk full, permissions, missing folder,
            a path that is a directory or a special file); the previous file is untouched.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise OutputError(f"cannot write {str(path)!r}: it is {kind}; pass a regular file name")
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        if make_parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        set_default_mode(tmp)
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise output_error(path, exc) from exc
    finally:
        try:
            tmp.unlink()
        except OSError:
            pass
    if fsync:
        fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True,
                       make_parents: bool = False) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda p: p.write_bytes(data), fsync=fsync,
                        make_parents=make_parents)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, fsync: bool = True,
                      make_parents: bool = False) -> Path:
    """:func:`atomic_write` of ``text`` as UTF-8 with ``\\n`` line ends."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync,
                              make_parents=make_parents)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- output directory lock -------------------------------------------------------------------
_HELD: dict[str, list[object]] = {}  # resolved dir -> [fd, depth] (re-entrant within a process)


class OutputLock:
    """Exclusive lock on an output directory (``DIR/.xmc.lock`` holding the owner's pid).

    Re-entrant within one process (the CLI and the trainer both take it); a second process
    gets :class:`OutputError` at once, naming the pid (and host) of the holder. The lock is
    advisory (``flock``) and released by the kernel when the holder dies, so a killed run never
    leaves a stale lock. Where ``fcntl`` is unavailable (Windows) it does nothing.

    Usage::

        with OutputLock(out_dir, what="xmc train"):
            ...
    """

    def __init__(self, directory: str | os.PathLike[str], what: str = "a training run") -> None:
        self.directory = Path(directory)
        self.what = what
        self._key = ""

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock (creating the directory if needed).

        Raises:
            OutputError: another process holds it, or the directory cannot be created.
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        d = self.directory
        if d.exists() and not d.is_dir():
            raise OutputError(f"output directory {str(d)!r} is a file; pass a directory (--out)")
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise output_error(d, exc, "create the directory") from exc
        self._key = str(d.resolve())
        held = _HELD.get(self._key)
        if held is not None:
            held[1] = int(held[1]) + 1  # type: ignore[call-overload]
            return
        lock = d / LOCK_FILE
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise output_error(lock, exc, "create the lock file") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                try:
                    owner = os.read(fd, 200).decode("utf-8", "replace").split()
                finally:
                    os.close(fd)
                pid = owner[0] if owner else "?"
                host = f" on {owner[1]}" if len(owner) > 1 else ""
                raise OutputError(
                    f"{str(d)!r} is in use by another {self.what} (pid {pid}{host}, lock "
                    f"{LOCK_FILE}); wait for it to finish, stop it, or choose another --out"
                ) from None
            # the holder may have removed the file between our open and flock: retry then
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        _HELD[self._key] = [fd, 1]

    def release(self) -> None:
        """Release the lock (the outermost release removes the lock file)."""
        held = _HELD.get(self._key)
        if held is None:
            return
        held[1] = int(held[1]) - 1  # type: ignore[call-overload]
        if int(held[1]) > 0:  # type: ignore[call-overload]
            return
        del _HELD[self._key]
        fd = int(held[0])  # type: ignore[call-overload]
        try:
            os.unlink(self.directory / LOCK_FILE)
        except OSError:
            pass
        os.close(fd)
