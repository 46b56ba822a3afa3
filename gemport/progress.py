"""Progress of long work on stderr, and the silencing of dependencies' own progress bars.

On a terminal every running task is a row of one rich live display (a bar, or a pulsing bar for a
stage with no count). When stderr is not a terminal (a CI log, nohup, a pipe) a task prints plain
lines instead, ``gemport: validating m.gguf 3/16 windows, 12 s (95 s in all)``: the task's own time,
then the whole command's (from ``configure()``) once they differ; at most one every ``INTERVAL``
seconds as it advances, and a heartbeat thread prints the innermost running task's line whenever
``HEARTBEAT`` seconds pass without one, so a log never stays quiet through one long step (loading a
model, one GPTQ layer). Work shorter than ``INTERVAL`` prints nothing.

rich has no such plain mode (its bars are disabled off a terminal, or print a line per refresh),
hence the small reporter here.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from gemport.output import raise_if_signalled

INTERVAL = 5.0  # seconds: the least time between two plain lines while a task advances
HEARTBEAT = 7.0  # seconds: the most time without a line while a task runs (under 10, for a busy machine)
PREFIX = "gemport: "

clock: Callable[[], float] = time.monotonic  # tests may patch it


@dataclass(eq=False)
class _Task:
    description: str
    total: int | None
    unit: str
    start: float
    done: int = 0
    row: Any = None  # the rich task id on a terminal

    def line(self, now: float, started: float | None = None) -> str:
        """``<description> <done>/<total> <unit>, <seconds> s``, and ``(<seconds> s in all)`` when the
        command (``started``) began a second or more before this task."""
        count = ""
        if self.total is not None:
            count = f" {self.done}/{self.total}" + (f" {self.unit}" if self.unit else "")
        text = f"{PREFIX}{self.description}{count}, {now - self.start:.0f} s"
        if started is not None and round(now - started) > round(now - self.start):
            text += f" ({now - started:.0f} s in all)"
        return text


@dataclass(eq=False)
class _Reporter:
    """The running tasks of this process (nested: the last is the innermost) and their one output."""

    lock: threading.Condition = field(default_factory=threading.Condition)
    tasks: list[_Task] = field(default_factory=list)
    last_line: float = field(default_factory=lambda: clock())
    bar: Any = None  # the rich Progress while tasks run on a terminal
    plain: bool = False  # tasks print plain lines (stderr is not a terminal)
    beating: bool = False  # the heartbeat thread runs (set and cleared under the lock)
    started: float | None = None  # when the command began (configure()), for "N s in all"

    def enter(self, task: _Task) -> None:
        with self.lock:
            if not self.tasks:
                self.plain = not _stderr_is_terminal()
                if not self.plain:
                    self.bar = _rich_bar()
                    self.bar.start()
            self.tasks.append(task)
            if self.bar is not None:
                task.row = self.bar.add_task(task.description, total=task.total, count=_count(task))
            elif not self.beating:
                self.beating = True
                threading.Thread(target=self._beat, name="gemport-heartbeat", daemon=True).start()

    def leave(self, task: _Task) -> None:
        with self.lock:
            self.tasks.remove(task)
            if self.bar is not None:
                self.bar.remove_task(task.row)
                if not self.tasks:
                    self.bar.stop()
                    self.bar = None
            self.lock.notify_all()

    def advance(self, task: _Task, n: int) -> None:
        with self.lock:
            task.done += n
            if self.bar is not None:
                self.bar.update(task.row, advance=n, count=_count(task))
            elif clock() - self.last_line >= INTERVAL:
                self._print(task)

    def _print(self, task: _Task) -> None:
        now = clock()
        self.last_line = now
        try:
            sys.stderr.write(task.line(now, self.started) + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):  # stderr closed or a broken pipe: the work goes on without its log
            pass

    def _beat(self) -> None:
        """While tasks run: the innermost one's line whenever HEARTBEAT seconds passed without a line."""
        with self.lock:
            try:
                while self.tasks and self.bar is None:
                    wait = self.last_line + HEARTBEAT - clock()
                    if wait <= 0:
                        self._print(self.tasks[-1])
                    else:
                        self.lock.wait(min(wait, 1.0))
            finally:
                self.beating = False


_reporter = _Reporter()


def _stderr_is_terminal() -> bool:
    from rich.console import Console

    return Console(stderr=True).is_terminal  # honours FORCE_COLOR / TTY_COMPATIBLE as the bars do


def _rich_bar() -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"), TimeElapsedColumn())
    return Progress(*columns, console=Console(stderr=True), transient=True)


def _count(task: _Task) -> str:
    return "" if task.total is None else f"{task.done}/{task.total}"


@contextmanager
def progress(description: str, total: int | None, unit: str = "") -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n=1)`` while the block runs: a bar on a terminal, else occasional plain lines
    (``gemport: <description> <done>/<total> <unit>, <seconds> s (<seconds> s in all)``) and a heartbeat.
    ``unit`` names what ``total`` counts as the user would count it: when it is not what the command's
    summary counts (ONNX initializers against the summary's tensors), it must say so."""
    task = _Task(description, total, unit, clock())
    _reporter.enter(task)

    def advance(n: int = 1) -> None:
        _reporter.advance(task, n)
        raise_if_signalled()  # a Ctrl-C that Python dropped inside a callback stops the work here

    try:
        yield advance
    finally:
        _reporter.leave(task)


@contextmanager
def stage(description: str) -> Iterator[None]:
    """A long step with no count (loading a model, a reference pass): shown as running while it lasts."""
    with progress(description, None):
        yield


def log_tensor(logger: logging.Logger, name: str, shape: Sequence[int], stored: str) -> None:
    """``-v``: a writer's line for one tensor it stores: name, shape, stored type."""
    logger.info("tensor %s %s %s", name, list(shape), stored)


def configure() -> None:
    """Once per command, before dependencies load: silence their progress bars (gemport draws its
    own), and start the quiet-time count of the heartbeat and the command's clock ("N s in all")."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by huggingface_hub at import
    os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm >= 4.66 reads TQDM_* at import, as defaults only
    _silence_tqdm()
    with _reporter.lock:
        _reporter.last_line = _reporter.started = clock()


def _silence_tqdm() -> None:
    """Force ``disable=True`` on every tqdm bar. TQDM_DISABLE alone is not enough: it only changes the
    default, and compressed-tensors passes ``disable=`` itself ("Dispatching model", ref:
    compressed_tensors/offload/dispatch.py). transformers' and huggingface_hub's bars are tqdm
    subclasses (ref: transformers/utils/logging.py, huggingface_hub/utils/tqdm.py), so this covers them."""
    try:
        import tqdm.std
    except ImportError:
        return
    cls = tqdm.std.tqdm
    if getattr(cls.__init__, "_gemport_silenced", False):
        return
    original = cls.__init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    __init__._gemport_silenced = True  # type: ignore[attr-defined]
    cls.__init__ = __init__
