"""A conversion killed with SIGKILL leaves nothing at its destination, and the next run cleans the
temporaries of dead writers (never a live writer's) and succeeds.

Conversions run in processes forked from a "zygote" that has imported gemport once, so that each
run starts in milliseconds and a seeded random kill lands anywhere in the conversion itself.
"""

from __future__ import annotations

import filecmp
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gemport import cli
from gemport.output import atomic_files, atomic_output, clean_stale_temporaries

ROOT = Path(__file__).resolve().parents[1]
KILLS = 20

# Reads one JSON argv per line; forks a child that runs `gemport ARGV` (its output to a log file) and
# answers "pid N", then "exit CODE" once the child is gone (killed: -9).
ZYGOTE = r"""
import json, os, sys
from gemport import cli
import converters.hf, converters.gguf, converters.gguf_writer, gguf, numpy, safetensors, torch  # noqa: F401
print("ready", flush=True)
for line in sys.stdin:
    argv, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            code = cli.main(argv)
        except BaseException:
            code = 99
        sys.stdout.flush()
        os._exit(code)
    print("pid", pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print("exit", os.waitstatus_to_exitcode(status), flush=True)
"""


class Zygote:
    def __init__(self, log: Path):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def start(self, argv: list[str]) -> int:
        self.proc.stdin.write(json.dumps([argv, str(self.log)]) + "\n")
        self.proc.stdin.flush()
        word, pid = self.proc.stdout.readline().split()
        assert word == "pid"
        return int(pid)

    def wait(self) -> int:
        word, code = self.proc.stdout.readline().split()
        assert word == "exit"
        return int(code)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote") / "run.log")
    yield z
    z.close()


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


def _finals(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" not in p.name)


def _same(a: Path, b: Path) -> bool:
    if a.is_file():
        return filecmp.cmp(a, b, shallow=False)
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def _complete_run(zygote: Zygote, argv: list[str], folder: Path) -> tuple[float, float | None]:
    """Run to the end: (seconds, seconds until a temporary first appeared in ``folder``)."""
    start = time.perf_counter()
    zygote.start(argv)
    first_tmp = None
    while not select.select([zygote.proc.stdout], [], [], 0.0005)[0]:  # until the "exit" line is there
        if first_tmp is None and _temporaries(folder):
            first_tmp = time.perf_counter() - start
    assert zygote.wait() == 0, zygote.log.read_text()
    return time.perf_counter() - start, first_tmp


TARGETS = {
    "gguf": ("out.gguf", ["--to", "gguf"]),
    "gguf-q8_0": ("out.gguf", ["--to", "gguf", "--quant", "q8_0", "--jobs", "2"]),
    "gguf-split": ("out.gguf", ["--to", "gguf", "--split-max-size", "60KB"]),
    "hf": ("out", ["--to", "hf"]),
    "hf-sharded": ("out", ["--to", "hf", "--max-shard-size", "60KB"]),
}


@pytest.mark.parametrize("target", list(TARGETS))
def test_sigkill_at_random_moments_leaves_nothing_and_the_next_run_cleans_up(zygote, tiny_models, tmp_path, target):
    name, options = TARGETS[target]
    src = tiny_models["gemma3"]
    expected_folder, folder = tmp_path / "expected", tmp_path / "dst"
    expected_folder.mkdir()
    folder.mkdir()
    argv = ["convert", str(src), str(expected_folder / name), *options]
    duration, first_tmp = _complete_run(zygote, argv, expected_folder)
    assert first_tmp is not None and not _temporaries(expected_folder)
    expected = {n: expected_folder / n for n in _finals(expected_folder)}
    # half the kills anywhere in the run, half once the temporary exists (the writing itself)
    rng = random.Random(f"kill-{target}")
    delays = [rng.uniform(0, duration) for _ in range(KILLS // 2)]
    delays += [rng.uniform(first_tmp, duration) for _ in range(KILLS - KILLS // 2)]
    argv = ["convert", str(src), str(folder / name), *options]
    stale_seen = 0
    for delay in delays:
        pid = zygote.start(argv)
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # already done; the zygote has not reaped it yet
            pass
        zygote.wait()
        finals = _finals(folder)
        if len(expected) > 1 and finals and finals != sorted(expected):
            # killed among a split set's renames (a window of microseconds): the first shard, the one
            # llama.cpp is given, is moved last, so the set cannot load; the next writer rolls it back
            assert sorted(expected)[0] not in finals, (delay, finals)
            clean_stale_temporaries(folder)
            finals = _finals(folder)
            assert finals == [] and not _temporaries(folder), (delay, finals)
        # all or nothing: no destination, or every final file complete (killed after the rename)
        assert finals in ([], sorted(expected)), (delay, finals)
        for n in finals:
            assert _same(expected[n], folder / n), (delay, n)
            (folder / n).unlink() if (folder / n).is_file() else shutil.rmtree(folder / n)
        stale_seen += bool(_temporaries(folder))
    assert stale_seen, "no kill landed while a temporary existed"
    zygote.start(argv)
    assert zygote.wait() == 0, zygote.log.read_text()
    assert _finals(folder) == sorted(expected) and all(_same(expected[n], folder / n) for n in expected)
    assert _temporaries(folder) == [], "the next run left a stale temporary"


# --- live and stale temporaries ---

HOLDER = r"""
import sys
from pathlib import Path
from gemport.output import atomic_output
with atomic_output(Path(sys.argv[1])) as tmp:
    tmp.write_text("live")
    print("holding", flush=True)
    sys.stdin.readline()
"""


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


def test_a_live_writers_temporary_is_never_removed(tiny_models, tmp_path, capsys):
    live = tmp_path / "live.txt"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(live)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        held = _temporaries(tmp_path)
        assert held == [f".live.txt.partial-{holder.pid}", f".live.txt.partial-{holder.pid}.lock"]
        # another conversion into the same folder, and an explicit clean, leave it alone
        assert cli.main(["convert", str(tiny_models["gemma3"]), str(tmp_path / "out"), "--to", "hf"]) == 0
        assert clean_stale_temporaries(tmp_path) == []
        assert _temporaries(tmp_path) == held
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == 0
    finally:
        holder.kill()
    assert live.read_text() == "live" and _temporaries(tmp_path) == []


def test_stale_is_told_by_the_lock_and_without_one_by_the_pid(tmp_path):
    alive = os.getppid()  # a live process that is not this one
    reused = tmp_path / f".reused.partial-{alive}"  # its lock is free: the writer died, the PID was reused
    reused.mkdir()
    (tmp_path / f".reused.partial-{alive}.lock").touch()
    unlocked_live = tmp_path / f".old.partial-{alive}"  # no lock file and a live PID: kept, to be safe
    unlocked_live.write_text("x")
    dead = _dead_pid()
    unlocked_dead = tmp_path / f".gone.gguf.partial-{dead}"
    unlocked_dead.write_text("x")
    lonely_lock = tmp_path / f".lock-only.partial-{dead}.lock"  # killed before its temporary existed
    lonely_lock.touch()
    unrelated = [tmp_path / "model.partial-1", tmp_path / ".hidden", tmp_path / ".x.partial-abc"]
    for p in unrelated:
        p.write_text("keep")
    removed = clean_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([reused.name, unlocked_dead.name, f".lock-only.partial-{dead}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([unlocked_live.name, *(p.name for p in unrelated)])


def test_without_a_lock_a_zombie_or_a_later_process_of_the_pid_is_no_writer(tmp_path):
    zombie = subprocess.Popen([sys.executable, "-c", ""])  # exits and stays unreaped until wait()
    later = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not Path(f"/proc/{zombie.pid}/stat").read_text().split(") ")[1].startswith("Z"):
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.05)
        of_zombie = tmp_path / f".z.gguf.partial-{zombie.pid}"
        of_zombie.write_text("x")
        of_later = tmp_path / f".r.gguf.partial-{later.pid}"  # written (mtime) an hour before that process began
        of_later.write_text("x")
        an_hour_ago = time.time() - 3600
        os.utime(of_later, (an_hour_ago, an_hour_ago))
        removed = clean_stale_temporaries(tmp_path)
        assert sorted(p.name for p in removed) == sorted([of_zombie.name, of_later.name])
        assert list(tmp_path.iterdir()) == []
    finally:
        later.kill()
        later.wait()
        zombie.wait()


def test_a_half_moved_split_set_is_rolled_back_and_a_moved_one_kept(tmp_path):
    from gemport.output import JOURNAL

    def killed_while_moving(moved: int) -> list[Path]:
        tmp = tmp_path / f".m-00001-of-00003.gguf.partial-{_dead_pid()}"
        tmp.mkdir()
        finals = [tmp_path / f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
        order = finals[1:] + finals[:1]  # atomic_files moves the first shard last
        journal = []
        for f in order:
            (tmp / f.name).write_text(f.name)
            st = (tmp / f.name).stat()
            journal.append((f.name, st.st_ino, st.st_size))
        (tmp / JOURNAL).write_text(json.dumps(journal))
        for f in order[:moved]:
            os.replace(tmp / f.name, f)
        return finals

    finals = killed_while_moving(2)  # shards 2 and 3 in place, shard 1 not: incomplete
    assert clean_stale_temporaries(tmp_path) and list(tmp_path.iterdir()) == []
    finals = killed_while_moving(1)  # the next writer of the set rolls it back instead of refusing it
    with atomic_files(finals) as tmp:
        for f in finals:
            (tmp / f.name).write_text("new")
    assert sorted(tmp_path.iterdir()) == finals and all(f.read_text() == "new" for f in finals)
    for f in finals:
        f.unlink()
    finals = killed_while_moving(3)  # every shard in place, killed before removing the temporary
    assert clean_stale_temporaries(tmp_path)
    assert sorted(tmp_path.iterdir()) == finals and finals[0].read_text() == finals[0].name


def test_atomic_output_writes_and_cleans_its_lock(tmp_path):
    with atomic_output(tmp_path / "a.txt") as tmp:
        tmp.write_text("a")
        assert _temporaries(tmp_path) == [tmp.name, tmp.name + ".lock"]
    assert (tmp_path / "a.txt").read_text() == "a" and _temporaries(tmp_path) == []


# --- signals: SIGTERM like Ctrl-C, and a Ctrl-C that Python dropped ---


class _RaisesInDel:
    """Sends ``signum`` to this process from ``__del__``: the handler's exception is then raised where Python
    ignores it ("Exception ignored in"), as a Ctrl-C landing in h5py's weakref callbacks was."""

    def __init__(self, signum: int):
        self.signum = signum

    def __del__(self):
        signal.raise_signal(self.signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_dropped_inside_a_callback_still_stops_the_write(tmp_path, signum, capsys):
    from gemport.output import Terminated, stop_on_signals

    dst = tmp_path / "out.bin"
    with pytest.raises(Terminated if signum == signal.SIGTERM else KeyboardInterrupt):
        with stop_on_signals(), atomic_output(dst) as tmp:
            tmp.write_bytes(b"half")
            obj = _RaisesInDel(signum)
            del obj  # the exception is dropped here; the write goes on to its end
            tmp.write_bytes(b"all of it")
    assert list(tmp_path.iterdir()) == []  # nothing renamed into place, the temporary and its lock gone
    assert "Exception ignored" not in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back


def test_sigterm_during_a_conversion_is_one_line_exit_143_and_nothing_left(tiny_models, tmp_path, monkeypatch, capsys):
    import converters.hf

    original = converters.hf.write

    def terminated_midway(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)  # as `kill` or a CI timeout sends it
        return original(*args, **kwargs)

    monkeypatch.setattr(converters.hf, "write", terminated_midway)
    dst = tmp_path / "out"
    code = cli.main(["convert", str(tiny_models["gemma3"]), str(dst), "--to", "hf"])
    err = capsys.readouterr().err
    assert code == 143 and err.strip().splitlines()[-1] == "gemport: terminated (SIGTERM)", err
    assert list(tmp_path.iterdir()) == []
