"""Python stacks of live workers, for showing where a hung rank is stuck.

Each worker registers `faulthandler` on SIGUSR1 with its own file: faulthandler runs in
C inside the signal handler, so it answers even when the main thread is blocked in a
collective and holds no GIL-visible state. The parent truncates the file, sends the
signal, reads the dump back and adds the source lines (notebook cells included: in the
kernel, linecache knows them).
"""

from __future__ import annotations

import linecache
import os
import re
import shutil
import signal
import tempfile
import time

from .frames import Frame, is_thread_entry, is_transparent, user_part

DUMP_SIGNAL = signal.SIGUSR1
_FRAME = re.compile(r'^(\s*)File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>.*)$')


def register_dump_handler(path: str) -> None:
    """Worker side: dump every thread's stack into ``path`` on SIGUSR1."""
    import faulthandler

    # Append mode: the parent truncates the file before each dump, and an append-mode
    # write always lands at the current end (no hole of NULs at the old offset).
    stream = open(path, "a")  # kept open for the life of the worker, as faulthandler requires
    faulthandler.register(DUMP_SIGNAL, file=stream, all_threads=True, chain=False)


class StackDumps:
    """Parent side: one dump file per rank in a private temporary folder, and beside it the
    rank's collective journal (`journal`), which the rank maps and the parent reads."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="notebook_launcher-stacks-")

    def path(self, rank: int) -> str:
        return os.path.join(self.folder, f"rank{rank}.txt")

    def journal(self, rank: int) -> bytes:
        """The rank's collective journal as it is now (b"" before the rank wrote one), read
        without the rank's help: a rank blocked in C, or dead, has one too."""
        from .journal import path_for, read

        return read(path_for(self.path(rank)))

    def dump(self, rank: int, pid: int, timeout: float = 1.0) -> str:
        """Ask the worker for its stacks and return them with source lines, or a reason."""
        path = self.path(rank)
        try:
            open(path, "w").close()
            os.kill(pid, DUMP_SIGNAL)
        except OSError as exc:
            return f"(no stack: {exc.strerror})"
        text, deadline = "", time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.02)
            current = _read(path)
            if current and current == text:  # stopped growing: the dump is complete
                break
            text = current
        return with_source_lines(tidy(text)) if text else "(no stack: the worker did not answer)"

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def tidy(dump: str) -> str:
    """Keep what matters to the user (`frames.user_part`'s rule): each thread's frames from
    the user's own code inward, without our see-through wrappers; our helper threads go; a
    main thread that is in the launcher's own work (the final barrier, between tasks) says
    so in one line."""
    blocks = [b for b in re.split(r"\n(?=(?:Current thread|Thread) 0x)", dump.strip()) if b.strip()]
    kept = []
    for block in blocks:
        header, *lines = block.splitlines()
        matched = [(line, m) for line in lines if (m := _FRAME.match(line))]
        stack = [Frame(m["file"], m["func"], int(m["line"])) for _, m in reversed(matched)]  # outermost first
        user, doing = user_part(stack)
        if not user:
            if not is_thread_entry(stack):
                kept.append(f"{header}\n  ({doing})")
            continue  # a helper thread of ours
        keep = len(user)
        shown = [line for line, m in matched[:keep] if not is_transparent(m["file"], m["func"])]
        kept.append("\n".join([header, *shown]))
    return "\n\n".join(kept)


def with_source_lines(dump: str) -> str:
    """Add the source line under each ``File "...", line N in f`` of a faulthandler dump
    that has none yet (a dump tidied on a node gets its files' lines there, and the
    notebook's cells' lines in the notebook)."""
    out = []
    lines = dump.splitlines()
    for index, line in enumerate(lines):
        out.append(line)
        match = _FRAME.match(line)
        following = lines[index + 1] if index + 1 < len(lines) else ""
        if match and not following.startswith(f"{match.group(1)}    "):
            source = linecache.getline(match["file"], int(match["line"])).strip()
            if source:
                out.append(f"{match.group(1)}    {source}")
    return "\n".join(out)
