"""Writers never leave a partial artifact: write under a temporary name, fsync, rename.

The temporary of destination ``DIR/NAME`` is ``DIR/.NAME.partial-PID`` (a file or a folder),
guarded by the lock file ``DIR/.NAME.partial-PID.lock`` on which the writing process holds an
exclusive ``flock`` from before the temporary exists until after it is renamed or removed. A
process killed with SIGKILL cannot remove its temporary, but the kernel drops its lock: every
writer first removes, in its destination folder, the temporaries whose lock nobody holds. A
temporary without a lock file (written before locks, or its lock file lost) counts as stale only
when no process of its PID lives; a lock that is held is never touched (a live writer, even if
its PID was reused). Sets of files (split GGUF) are moved into place first shard last, after a
journal of their inodes is written, so that a run killed among the renames is rolled back by the
next writer: the moved files whose inode the journal names are removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
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

_TEMPORARY = re.compile(r"\.(?P<name>.+)\.partial-(?P<pid>\d+)(?P<lock>\.lock)?")
JOURNAL = ".gemport-moving.json"  # in a files temporary: the finals being moved and their inodes

# Lock descriptors this process holds. A forked child (a quantizing worker) closes its copies, so
# that the lock is released when the writer dies even if a worker outlives it for a moment (flock
# locks belong to the open file description, which the parent's descriptor keeps alive).
_HELD: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI timeout, `kill`): stopped as Ctrl-C stops a command, its temporaries removed."""


_SIGNALLED: list[int] = []  # SIGINT / SIGTERM received while stop_on_signals is in force


def _on_signal(signum: int, _frame) -> None:
    _SIGNALLED.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While the block runs (in the main thread), SIGINT raises KeyboardInterrupt and SIGTERM raises Terminated,
    and both are remembered: Python drops an exception raised inside a weakref callback or a ``__del__``
    ("Exception ignored in ...", as when h5py frees an object at that moment), so ``raise_if_signalled`` raises
    it again at the next progress step and before every rename into place: no destination appears after the
    signal. The previous handlers are put back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    hook = sys.unraisablehook

    def unraisable(info) -> None:  # the dropped interrupt is raised again later: no "Exception ignored" text
        if not (isinstance(info.exc_value, KeyboardInterrupt) and _SIGNALLED):
            hook(info)

    sys.unraisablehook = unraisable
    _SIGNALLED.clear()
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        sys.unraisablehook = hook
        _SIGNALLED.clear()


def forget_signals() -> None:
    """Forget the signals received so far: a caller that caught their KeyboardInterrupt and saves what was
    done before it (then raises again) would otherwise have that write undone by ``raise_if_signalled``.
    A signal received afterwards still interrupts it."""
    _SIGNALLED.clear()


def raise_if_signalled() -> None:
    """Raise the KeyboardInterrupt (Terminated for SIGTERM) of a signal received earlier, in the main thread."""
    if _SIGNALLED and threading.current_thread() is threading.main_thread():
        raise Terminated() if _SIGNALLED[-1] == signal.SIGTERM else KeyboardInterrupt()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _lock_path(tmp: Path) -> Path:
    return tmp.with_name(tmp.name + ".lock")


def _acquire(lock: Path) -> int:
    """An exclusive flock on ``lock``, created if missing; retried if a cleaner removed the file meanwhile."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            _HELD.add(fd)
            return fd
        os.close(fd)


def _release(lock: Path, fd: int) -> None:
    lock.unlink(missing_ok=True)
    _HELD.discard(fd)
    os.close(fd)


def _pid_alive(pid: int, since: float | None = None) -> bool:
    """True when a process of ``pid`` lives: not a zombie (a killed writer that nobody reaped, as under a
    container's init that does not reap), and, where ``since`` (a time.time()) is given and /proc says when
    the process started, one started before ``since`` (a later one reuses the pid of a dead writer)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    state, started = _proc_state(pid)
    if state in ("Z", "X"):
        return False
    return since is None or started is None or started <= since + 1.0  # 1 s: clock tick and mtime granularity


def _proc_state(pid: int) -> tuple[str | None, float | None]:
    """(state letter, start time as a time.time()) of ``pid`` from /proc (ref: proc(5), /proc/PID/stat fields
    3 and 22, /proc/stat btime); (None, None) where /proc cannot say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": the comm may hold spaces
        btime = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime ")
        )
        return fields[0], btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None, None


def clean_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries in ``folder`` left by dead writers (see the module docstring); return them."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    temporaries = {}
    for name in names:
        m = _TEMPORARY.fullmatch(name)
        if m:
            base = folder / f".{m['name']}.partial-{m['pid']}"
            temporaries[base] = int(m["pid"])
    removed = []
    for tmp, pid in sorted(temporaries.items()):
        # this process's own live temporaries are safe too: flock locks of two open descriptions conflict
        if _remove_if_stale(tmp, pid):
            removed.append(tmp)
    return removed


def _remove_if_stale(tmp: Path, pid: int) -> bool:
    lock = _lock_path(tmp)
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        try:
            made = tmp.lstat().st_mtime
        except OSError:
            return False  # gone meanwhile
        if _pid_alive(pid, since=made):
            return False
        return _discard(tmp)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(lock).st_ino:
                return False  # released and removed meanwhile: the name may be a new writer's now
        except (BlockingIOError, FileNotFoundError):
            return False  # a live writer holds it, or it is gone
        discarded = _discard(tmp)  # under the lock, so a writer reusing the name waits
        lock.unlink(missing_ok=True)
        return discarded
    finally:
        os.close(fd)


def _discard(tmp: Path) -> bool:
    """Roll back a half-finished move of files (journal), then remove the temporary."""
    try:
        journal = tmp / JOURNAL
        moves = json.loads(journal.read_text(encoding="utf-8")) if journal.is_file() else []
        if moves and not _is_moved(tmp, *moves[-1]):  # the last move (the first shard) completes the set
            for name, inode, size in moves:
                if _is_moved(tmp, name, inode, size):
                    (tmp.parent / name).unlink()
                    log.warning("removed %s: its writer was killed before the whole set was in place", name)
        _remove(tmp)
    except (OSError, ValueError, TypeError) as exc:
        log.warning("cannot remove the stale temporary %s: %s", tmp, exc)
        return False
    log.info("removed %s, left by a writer that was killed", tmp)
    return True


def _is_moved(tmp: Path, name: str, inode: int, size: int) -> bool:
    """Whether the journal's file ``name`` is in place beside ``tmp``, the inode and size it was written with."""
    try:
        st = (tmp.parent / Path(name).name).stat()
    except OSError:
        return False
    return st.st_ino == inode and st.st_size == size


def library_write_error(message: str, dst: Path) -> OutputError | None:
    """The OutputError for a library's write failure reported as text with the OS error code in it
    (tensorstore: ``... No space left on device [os_error_code='28']``), or None for any other."""
    code = re.search(r"os_error_code='(\d+)'", message)
    return _write_error(OSError(int(code.group(1)), message), dst) if code else None


def _write_error(exc: OSError, dst: Path) -> OutputError | None:
    if exc.errno in _WRITE_ERRNOS:
        return OutputError(f"cannot write: {_WRITE_ERRNOS[exc.errno]}", dst)
    return None


def _temporary_beside(finals: list[Path], overwrite: bool) -> tuple[Path, int]:
    """A free temporary name beside ``finals[0]`` and its held lock, once no final path is in the way
    and the stale temporaries of dead writers are gone."""
    folder = finals[0].parent
    if folder.is_dir():  # first: a set a killed writer left half-moved is rolled back, not "in the way"
        clean_stale_temporaries(folder)
    for final in finals:
        if final.exists() and not overwrite:
            raise OutputError("destination already exists (pass --overwrite to replace it)", final)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the destination folder: {exc.strerror}", finals[0]) from None
    tmp = folder / f".{finals[0].name}.partial-{os.getpid()}"
    try:
        fd = _acquire(_lock_path(tmp))
    except OSError as exc:
        raise (_write_error(exc, finals[0]) or OutputError(f"cannot write: {exc.strerror}", finals[0])) from None
    try:
        _remove(tmp)
    except BaseException:
        _release(_lock_path(tmp), fd)
        raise
    return tmp, fd


@contextmanager
def atomic_output(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path of ``dst``; on success it is renamed to ``dst``.

    The caller creates a file or a folder at the yielded path. On any error the temporary
    is removed and ``dst`` is left as it was. Write errors (disk full, permission denied)
    become one-line OutputErrors naming ``dst``.
    """
    dst = Path(dst)
    tmp, fd = _temporary_beside([dst], overwrite)
    try:
        yield tmp
        _fsync_tree(tmp)
        raise_if_signalled()  # the last moment before the destination appears
        if dst.exists():
            _remove(dst)
        os.replace(tmp, dst)
    except OSError as exc:
        _remove(tmp)
        error = _write_error(exc, dst)
        if error:
            raise error from None
        raise
    except BaseException:
        _remove(tmp)
        raise
    finally:
        _release(_lock_path(tmp), fd)


@contextmanager
def atomic_files(finals: list[Path], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``finals[0]``; the caller writes there one file per final
    path, of the same name. On success each is fsynced and renamed into place, ``finals[0]`` last
    (a reader opens a split model by its first file); on any error the folder is removed and no
    final path is touched. Write errors become one-line OutputErrors.
    """
    dst = finals[0]
    tmp, fd = _temporary_beside(finals, overwrite)
    try:
        tmp.mkdir()
        yield tmp
        _fsync_tree(tmp)
        order = finals[1:] + finals[:1]
        stats = [(tmp / final.name).stat() for final in order]
        journal = [(final.name, st.st_ino, st.st_size) for final, st in zip(order, stats, strict=True)]
        (tmp / JOURNAL).write_text(json.dumps(journal), encoding="utf-8")
        _fsync_tree(tmp / JOURNAL)
        raise_if_signalled()  # the last moment before the first file appears
        moved = []
        try:
            for final in order:
                os.replace(tmp / final.name, final)
                moved.append(final)
        except BaseException:
            for final in moved:
                final.unlink(missing_ok=True)
            raise
    except OSError as exc:
        error = _write_error(exc, dst)
        if error:
            raise error from None
        raise
    finally:
        _remove(tmp)
        _release(_lock_path(tmp), fd)


def _fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
