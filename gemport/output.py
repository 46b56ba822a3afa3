"""Writers never leave a partial artifact: write under a temporary name, fsync, rename."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gemport.errors import OutputError

log = logging.getLogger(__name__)

_WRITE_ERRNOS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EROFS: "read-only file system",
    errno.EPERM: "operation not permitted",
}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _temporary_beside(finals: list[Path], overwrite: bool) -> Path:
    """A free temporary name beside ``finals[0]``, once no final path is in the way."""
    for final in finals:
        if final.exists() and not overwrite:
            raise OutputError("destination already exists (pass --overwrite to replace it)", final)
    try:
        finals[0].parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the destination folder: {exc.strerror}", finals[0]) from None
    tmp = finals[0].parent / f".{finals[0].name}.partial-{os.getpid()}"
    _remove(tmp)
    return tmp


@contextmanager
def atomic_output(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path of ``dst``; on success it is renamed to ``dst``.

    The caller creates a file or a folder at the yielded path. On any error the temporary
    is removed and ``dst`` is left as it was. Write errors (disk full, permission denied)
    become one-line OutputErrors naming ``dst``.
    """
    dst = Path(dst)
    tmp = _temporary_beside([dst], overwrite)
    try:
        yield tmp
        _fsync_tree(tmp)
        if dst.exists():
            _remove(dst)
        os.replace(tmp, dst)
    except OSError as exc:
        _remove(tmp)
        if exc.errno in _WRITE_ERRNOS:
            raise OutputError(f"cannot write: {_WRITE_ERRNOS[exc.errno]}", dst) from None
        raise
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_files(finals: list[Path], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``finals[0]``; the caller writes there one file per final
    path, of the same name. On success each is fsynced and renamed into place; on any error the
    folder is removed and no final path is touched. Write errors become one-line OutputErrors.
    """
    dst = finals[0]
    tmp = _temporary_beside(finals, overwrite)
    try:
        tmp.mkdir()
        yield tmp
        _fsync_tree(tmp)
        for final in finals:
            os.replace(tmp / final.name, final)
    except OSError as exc:
        if exc.errno in _WRITE_ERRNOS:
            raise OutputError(f"cannot write: {_WRITE_ERRNOS[exc.errno]}", dst) from None
        raise
    finally:
        _remove(tmp)


def _fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
