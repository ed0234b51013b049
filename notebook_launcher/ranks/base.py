"""How ranks are started: the one narrow interface, and what every engine shares.

Above this seam, shared by every engine: the rank layout and torchrun's environment
(`plan`, `rendezvous`), the call lifecycle (`calls`), root cause, stalls, results, the
dashboard, trackers, `Session` and ``%%dist``. Below it: processes, pipes, signals, PIDs,
actors, placement groups, jobs. Engines (ipyparallel's launchers are the model: start,
signal, stop, one class per engine):

- `local.LocalRanks`: ranks forked (or spawned) from this process, today's path;
- `remote.RemoteRanks`: ranks started by a node agent (`agent.NodeAgent`) on each node,
  placed by Ray (`ray_engine`) or Slurm (`slurm_engine`).

A `RankGroup` is one generation of ranks and everything they own (rendezvous store,
stack-dump files, actors...). It hands the caller decoded arrivals (`wait`): a rank's
`Message`, its whole output `Lines`, or its `Exit`; every rank's bytes are decoded here,
in one place, whatever carried them (a pipe, a Ray call, a socket). An engine provides
the raw side: `_wait_raw` returns `Chunk`s and `Exit`s, with every chunk a rank wrote
before it exited delivered before its `Exit`.

Example::

    group = local.LocalRanks.start(plan, rdzv, ...)
    group.send([0, 1], frame)
    for arrival in group.wait(0.1):
        ...                           # Message | Lines | Exit
    group.close(graceful=True)
"""

from __future__ import annotations

import abc
import sys
from dataclasses import dataclass
from typing import Any, Optional

from .. import channel as ch

MAX_LINE = 64 * 1024   # a pending partial line (no newline yet) longer than this is emitted as is
STREAMS = ("events", "stdout", "stderr")


# ----------------------------------------------------------------- arrivals
@dataclass(frozen=True)
class Chunk:
    """Raw bytes a rank wrote on one of its streams (an engine's output, before decoding)."""

    rank: int
    stream: str    # "events" | "stdout" | "stderr"
    data: bytes


@dataclass(frozen=True)
class Message:
    """One decoded `channel.Envelope` from a rank."""

    rank: int
    envelope: ch.Envelope


@dataclass(frozen=True)
class Lines:
    """Whole output lines of a rank."""

    rank: int
    stream: str    # "stdout" | "stderr"
    lines: tuple


@dataclass(frozen=True)
class Exit:
    """A rank is gone: its process exited (``code``: exit status, negative for a signal),
    or the engine lost it with its node (``lost``: what happened, in words)."""

    rank: int
    code: int
    lost: str = ""


# ----------------------------------------------------------------- decoding
class LineSplitter:
    """Bytes in, whole lines out. A carriage return rewinds the pending line (tqdm bars)."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list:
        data = self._pending + data
        *complete, self._pending = data.split(b"\n")
        lines = [_decode(line) for line in complete]
        if len(self._pending) > MAX_LINE:
            lines.append(_decode(self._pending))
            self._pending = b""
        return lines

    def flush(self) -> list:
        rest, self._pending = self._pending, b""
        return [_decode(rest)] if rest.strip(b"\r") else []


def _decode(raw: bytes) -> str:
    if b"\r" in raw:  # keep what a terminal would show: the text after the last \r
        raw = raw.rstrip(b"\r").rsplit(b"\r", 1)[-1]
    return raw.decode("utf-8", errors="replace")


class RankStreams:
    """One rank's decoders, kept for the life of the rank: a frame or a line cut in two
    by one call is completed in the next."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.frames = ch.FrameDecoder()
        self.lines = {"stdout": LineSplitter(), "stderr": LineSplitter()}

    def decode(self, chunk: Chunk) -> list:
        if chunk.stream == "events":
            return [Message(self.rank, envelope) for envelope in self.frames.feed(chunk.data)]
        lines = self.lines[chunk.stream].feed(chunk.data)
        return [Lines(self.rank, chunk.stream, tuple(lines))] if lines else []

    def partial_lines(self) -> list:
        """A call's last line without its newline: it belongs to that call."""
        out = []
        for stream, splitter in self.lines.items():
            rest = splitter.flush()
            if rest:
                out.append(Lines(self.rank, stream, tuple(rest)))
        return out


# ----------------------------------------------------------------- the interface
class RankGroup(abc.ABC):
    """One generation of ranks, started by one engine; see the module docstring.

    ``ranks``: the global ranks it holds (this node's for a local multi-machine job).
    ``single_host``: whether every rank runs on this machine, so that their clocks can be
    compared (a root cause is never decided by comparing clocks of different machines).
    ``lost_peer_wait``: when a rank reports that it lost its peer, how long the real cause
    (a rank's error, a process exit, a lost node) may take to reach the notebook.
    """

    ranks: list
    single_host: bool = True
    lost_peer_wait: float = 0.0   # after a rank lost its peer, how long the real cause may take to show

    def __init__(self, ranks: list) -> None:
        self.ranks = list(ranks)
        self.ready: set = set()          # ranks that said RankReady (set up, waiting for tasks)
        self.exitcodes: dict = {}        # rank -> exit status, once it is gone
        self.lost: dict = {}             # rank -> what the engine said when it lost it
        self._streams = {rank: RankStreams(rank) for rank in self.ranks}

    # ------------------------------------------------------------- reading
    def wait(self, timeout: float) -> list:
        """What arrived within ``timeout`` seconds (returns as soon as anything does):
        `Message`, `Lines` and `Exit` items in arrival order."""
        return self._decoded(self._wait_raw(timeout))

    def drain(self) -> list:
        """What already arrived, without waiting, plus every rank's partial last line."""
        arrivals = self._decoded(self._wait_raw(0.0))
        for streams in self._streams.values():
            arrivals.extend(streams.partial_lines())
        return arrivals

    def _decoded(self, raw: list) -> list:
        out: list = []
        for item in raw:
            if isinstance(item, Chunk):
                decoded = self._streams[item.rank].decode(item)
                for arrival in decoded:
                    if isinstance(arrival, Message) and isinstance(arrival.envelope.message, ch.RankReady):
                        self.ready.add(arrival.rank)
                out.extend(decoded)
            else:
                self.exitcodes.setdefault(item.rank, item.code)
                if item.lost:
                    self.lost.setdefault(item.rank, item.lost)
                out.append(item)
        return out

    def alive(self) -> list:
        """Ranks not known to be gone (an engine may look without consuming arrivals)."""
        return [rank for rank in self.ranks if self.exitcode(rank) is None]

    def exitcode(self, rank: int) -> Optional[int]:
        return self.exitcodes.get(rank)

    # ------------------------------------------------------------- what an engine provides
    @abc.abstractmethod
    def _wait_raw(self, timeout: float) -> list:
        """`Chunk`s and `Exit`s that arrived within ``timeout`` (0: only what is there)."""

    @abc.abstractmethod
    def send(self, ranks: list, frame: bytes) -> None:
        """Write one control frame (`channel.encode`) to each of ``ranks``, whole, in order."""

    @abc.abstractmethod
    def interrupt(self, ranks: list) -> None:
        """SIGINT to each rank: the task it runs raises KeyboardInterrupt."""

    @abc.abstractmethod
    def dump_stacks(self, rank: int, timeout: float = 1.0) -> str:
        """Every thread's Python stack of a live rank (faulthandler's text, tidied), or why not."""

    def journal(self, rank: int) -> bytes:
        """The rank's collective journal (`workers.journal`, raw bytes: `journal.decode`),
        read without the rank's help; b"" when there is none or it cannot be reached."""
        return b""

    @abc.abstractmethod
    def kill(self, ranks: list) -> None:
        """SIGKILL, at once, to each rank and what it forked (a rank stuck in C ignores more)."""

    @abc.abstractmethod
    def close(self, graceful: bool, term_grace: float) -> None:
        """Stop every rank and free everything the group took, on every path; each step
        runs even if an earlier one fails. ``graceful``: ranks ending by themselves get
        their grace first; ``term_grace``: seconds between SIGTERM and SIGKILL. Idempotent."""

    @abc.abstractmethod
    def label(self, rank: int) -> str:
        """Where a rank runs, for people: ``pid 4711`` here, ``node 1 (10.0.0.5) pid 4711`` elsewhere."""

    @abc.abstractmethod
    def pid(self, rank: int) -> Optional[int]:
        """The rank's process id on its own machine (None if unknown)."""

    def cpu_ticks(self, rank: int) -> Optional[int]:
        """CPU time the rank's main thread has used (a sign of life); None if unknown."""
        return None

    def wait_for_exits(self, ranks: list, timeout: float) -> dict:
        """Wait up to ``timeout`` for ``ranks`` to exit by themselves (a rank that reported
        its error does): {rank: exit status} of those that did. Arrivals meanwhile are
        decoded (streams stay in step) and dropped: the call they belong to has ended."""
        import time

        deadline = time.monotonic() + timeout
        while any(self.exitcode(r) is None for r in ranks) and time.monotonic() < deadline:
            self.wait(max(0.0, min(0.05, deadline - time.monotonic())))
        return {r: self.exitcode(r) for r in ranks if self.exitcode(r) is not None}

    def where(self, rank: int) -> str:
        """The node a rank runs on, for error messages ("" when every rank is here)."""
        return ""

    def describe_lost(self, rank: int) -> str:
        return self.lost.get(rank, "")


def tear_down(steps: list) -> None:
    """Run teardown ``steps`` (callables) as independent steps, Interrupts held until every
    one ran: a step that fails is said on stderr in one line and never stops the others,
    nor hides the run's own outcome.

    Example::

        tear_down([lambda: store.close(), stacks.close])
    """
    from ..interrupts import interrupts_deferred

    with interrupts_deferred():
        for step in steps:
            try:
                step()
            except Exception as exc:
                text = str(exc).strip().splitlines()
                print(f"notebook_launcher: teardown step failed: {type(exc).__name__}"
                      f"{': ' + text[0] if text else ''}", file=sys.stderr)


def frame_of(message: Any, task_id: int = 0) -> bytes:
    """A control message as one frame, e.g. ``frame_of(channel.Shutdown())``."""
    return ch.encode(ch.Envelope(task_id, message))
