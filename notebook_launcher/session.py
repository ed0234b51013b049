"""Sessions: ranks that stay alive across cells.

A `Session` owns the long-lived things (rank processes, the rendezvous store, the
stack-dump files, the process group inside each rank); each call on it (`Session.run`,
`Session.execute`, `pull`, `push`, a ``%%dist`` cell) is a short-lived task with its own
`RunState`, view and outcome. A call ends when every rank it ran on sent the value or the
error of THAT task. The ranks are one `ranks.base.RankGroup`, started by `ranks.start_group` and released by
its ``close``; each call goes through `calls.run_call`, as a one-shot `notebook_launcher`
attempt does (the same ranks, worker loop, channel and supervisor, with ranks that exit
after their one task).

Failure semantics (the README's "Interactive sessions" says the same to users):
- a task raises on some rank: the call raises `WorkerError` naming the rank that failed
  first; if every other rank ends the task too (the call waits while they show signs of
  life), the session stays usable, with every rank's variables kept for inspection;
- a task raises on some rank while others wait in a collective it will never join (their
  journals say so, or they stay silent for `monitor.PEER_GRACE`): every rank aborts its
  process group (`channel.AbortGroup`), which releases them (their error: "released: rank
  1 failed"), then every rank forms a fresh default group (`process_group.Regroup`) and the
  session stays usable with every variable; the error says so in one line;
- a rank dies, or stays stuck although the group was aborted (blocked outside a
  collective, or in one the abort cannot release): the session is BROKEN and its ranks are
  stopped; the next call says so in one line, starts fresh ranks, then runs;
- Interrupt: forwarded to every rank as KeyboardInterrupt; ranks still in the task after
  `INTERRUPT_LOOK` are released by aborting the process group (then rebuilt, as above);
  ranks that leave the task within `INTERRUPT_GRACE` keep the session alive, the others
  are killed and the session is BROKEN. The cell gets KeyboardInterrupt within 2 seconds
  either way;
- an idle session is never watched for stalls; a killed kernel takes every rank with it.
"""

from __future__ import annotations

import linecache
import os
import signal
import sys
import threading
import weakref
from typing import Any, Optional

from . import channel as ch
from . import shared_memory
from .calls import Call, finish, run_call
from .config import LaunchConfig, resolve
from .errors import LaunchConfigError
from .interrupts import interrupts_deferred
from .launcher import collect, new_state, show_lines, stall_watch
from .monitor import Outcome, Supervisor
from .ranks import notebook_sources, start_group
from .ranks.base import RankGroup, frame_of
from .serialization import dumps_task_parts
from .state import RunState, RunStatus, Status
from .trackers import TrackerHub
from .ui import make_view, resolve_display
from .ui.base import View
from .workers import tasks

INTERRUPT_GRACE = 1.0   # seconds ranks get to leave a task after an Interrupt (the cell promises 2 s)
INTERRUPT_LOOK = 0.3    # seconds after an Interrupt, then ranks still in the task are released (the group aborted)
REGROUP_TIMEOUT = 20.0  # seconds for every rank to form a fresh process group after an abort
START_TIMEOUT = 300.0   # seconds for every rank to form the process group
BIND_TIMEOUT = 30.0     # seconds for the ranks to bind (or drop) pushed values they already hold


class SessionStatus(Status):
    """A session's life::

        STARTING --every rank ready--> IDLE --a call starts--> RUNNING --the call ends--> IDLE
                                        |                        |
                                        |    a rank died, stayed stuck past the grace,
                                        |    or could not honour an Interrupt
                                        |                        v
                                        +--close()--> CLOSED <--close()-- BROKEN
        BROKEN --the next call--> (a fresh STARTING, with a one-line notice)
    """

    STARTING = "starting"
    IDLE = "idle"
    RUNNING = "running"
    BROKEN = "broken"
    CLOSED = "closed"


class Session:
    """N ranks kept alive between calls, with torch.distributed wired once.

    Takes the options of `notebook_launcher` that concern its ranks, with the same
    checks and errors; starting forks (or spawns) the ranks and forms the default
    process group. ``num_nodes`` and ``cluster="ray"`` put ``num_processes`` ranks on each
    of ``num_nodes`` Ray nodes, kept across calls the same way. Use it as a context manager, or call `close` (which frees the ranks'
    GPU memory).

    Example::

        with Session(2, device="cpu") as session:
            session.execute("import torch.nn as nn; model = nn.Linear(4, 1)")
            session.run(lambda: dist.get_rank())            # 0 (rank 0's value)
            session.run(lambda: dist.get_rank(), return_all=True)   # [0, 1]
            weights = session.pull("model").state_dict()
    """

    def __init__(self, num_processes: Optional[int] = None, *, mixed_precision: str = "no",
                 start_method: str = "auto", backend: str = "auto", device: str = "auto",
                 display: str = "auto", stall_timeout: Optional[float] = 300.0, on_stall: str = "warn",
                 monitor_interval: float = 0.1, log_line_prefix_template: Optional[str] = None,
                 use_port: Optional[int] = None, master_addr: str = "127.0.0.1", num_nodes: int = 1,
                 cluster: Any = None) -> None:
        self.config: LaunchConfig = self.check_options(
            num_processes, mixed_precision=mixed_precision, start_method=start_method, backend=backend,
            device=device, display=display, stall_timeout=stall_timeout, on_stall=on_stall,
            monitor_interval=monitor_interval, log_line_prefix_template=log_line_prefix_template,
            use_port=use_port, master_addr=master_addr, num_nodes=num_nodes, cluster=cluster)
        self.title = self.config.describe()
        self.status = SessionStatus.STARTING
        self.broken_because = ""
        self.state: Optional[RunState] = None      # the last call's state
        self._ranks: Optional[RankGroup] = None
        self._task_id = 0
        self._pushes = 0
        self._generation = 0
        self._rebuilds = 0                          # process groups rebuilt after an abort (each its store prefix)
        self._sent_sources: set = set()
        self._lock = threading.Lock()               # one call at a time
        self._reaper: Optional[weakref.finalize] = None  # stops the ranks if the Session is dropped unclosed
        for note in self.config.notes:
            print(note, file=sys.stderr)
        self._start()

    @staticmethod
    def check_options(num_processes: Optional[int] = None, **options) -> LaunchConfig:
        """Check a session's options without starting anything; raises `LaunchConfigError`
        saying what to do (``%dist start`` checks before it stops a running session).

        Example::

            Session.check_options(2, mixed_precision="fp61")   # LaunchConfigError: unknown mixed_precision...
        """
        if options.get("num_nodes", 1) != 1 and options.get("cluster") is None:
            raise LaunchConfigError("a session spans several nodes only on a cluster: pass cluster='ray' with num_nodes.")
        return resolve(None, num_processes=num_processes, **options)

    # ------------------------------------------------------------- life cycle
    def _start(self) -> None:
        """Start ranks and wait until each formed the process group. On failure the
        session is BROKEN (the next call tries again) and the error is raised."""
        self.status = SessionStatus.STARTING
        self._sent_sources = set()
        try:
            with interrupts_deferred():  # ranks started are owned (and reaped) before an Interrupt lands
                if self.config.start_method == "fork":
                    _preload_for_cells()
                self._ranks = start_group(self.config, self._generation, persistent=True,
                                          last_words=show_lines(View(self.config.line_prefix)))
                self._reaper = weakref.finalize(self, self._ranks.close, False, 0.0)
            outcome = self._await_ready()
        except BaseException as exc:
            self._break(f"it could not start: {type(exc).__name__}: {exc}")
            raise
        if outcome.stopped:
            self._break("its ranks did not start in time")
            raise TimeoutError(f"the ranks did not form their process group within {START_TIMEOUT:g}s")
        if outcome.root is not None:
            self._break(f"rank {outcome.root.rank} could not start")
            raise outcome.error()
        self.status = SessionStatus.IDLE

    def _await_ready(self) -> Outcome:
        call = Call(self._ranks, self._ranks.ranks, 0, new_state(self.config, self._ranks.ranks),
                    View(self.config.line_prefix), persistent=True, tick=self.config.tick, timeout=START_TIMEOUT)
        return run_call(call, _Quiet())

    def close(self) -> None:
        """Stop every rank (they leave their task loop, free their GPU memory and exit).

        Example::

            session.close()
            session.status      # "closed"; a new Session(...) starts fresh ranks
        """
        if self.status == SessionStatus.CLOSED:
            return
        self._stop_ranks(graceful=True)
        self.status = SessionStatus.CLOSED

    def _stop_ranks(self, graceful: bool, term_grace: float = 1.0) -> None:
        with interrupts_deferred():
            ranks, self._ranks = self._ranks, None
            if ranks is None:
                return
            self._reaper.detach()
            if graceful:
                try:
                    ranks.send(ranks.alive(), frame_of(ch.Shutdown()))
                except OSError:
                    graceful = False  # a rank is gone: no one to wait for
            ranks.close(graceful=graceful, term_grace=term_grace)

    def _break(self, reason: str) -> None:
        """The ranks cannot be trusted any more (one died, is stuck in C, or they could
        not start): kill them at once, since a SIGTERM would wait in the same stuck call."""
        self.broken_because = reason
        self.status = SessionStatus.BROKEN
        self._stop_ranks(graceful=False, term_grace=0.0)

    def _usable(self) -> None:
        """Raise if closed; restart (saying so) if broken or a rank died while idle."""
        if self.status == SessionStatus.CLOSED:
            raise RuntimeError("this session is closed: start a new one (Session(...) or %dist start)")
        dead = [rank for rank in self._ranks.ranks if self._ranks.exitcode(rank) is not None] if self._ranks else []
        if dead and self.status != SessionStatus.BROKEN:
            self._break(f"rank {dead[0]} died while the session was idle")
        if self.status == SessionStatus.BROKEN:
            print(f"notebook_launcher: the session was broken ({self.broken_because}); starting fresh ranks: "
                  "their variables and models were lost.", file=sys.stderr)
            self._generation += 1
            self._start()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Session {self.status}: {self.title}>"

    @property
    def ranks(self) -> list:
        """The global ranks of this session, e.g. ``[0, 1]`` (on a cluster: every node's)."""
        if self.config.cluster is not None:
            return list(range(self.config.world_size))
        return list(range(self.config.first_rank, self.config.first_rank + self.config.nproc))

    @property
    def labels(self) -> dict:
        """rank -> where it runs, e.g. ``{0: "pid 4711"}``, or ``"node 1 (host, 10.0.0.5) pid 4711"`` on a cluster."""
        return {rank: self._ranks.label(rank) for rank in self._ranks.ranks} if self._ranks else {}

    @property
    def pids(self) -> dict:
        """rank -> process id of the live ranks, e.g. ``{0: 4711, 1: 4712}`` (empty once closed)."""
        return {rank: self._ranks.pid(rank) for rank in self._ranks.ranks} if self._ranks else {}

    # ------------------------------------------------------------- calls
    def run(self, function, *args, return_all: bool = False, **kwargs) -> Any:
        """Run ``function(*args, **kwargs)`` on every rank; return rank 0's value (every
        rank's, in rank order, with ``return_all``), with the live dashboard for this call.

        Example::

            def step(lr):
                ...                      # the process group is ready, as in notebook_launcher
                return loss
            session.run(step, 0.1)
        """
        if not callable(function):
            raise LaunchConfigError(f"run() needs a function, got {type(function).__name__}.")
        results = self._call(tasks.Call(function, args, kwargs), values_from=self.ranks if return_all else [0])
        return collect(results, self.ranks, return_all)

    def execute(self, source: str, ranks: Optional[list] = None, name: Optional[str] = None) -> dict:
        """Run ``source`` on every rank (or ``ranks``) in that rank's own namespace, where
        names stay from one call to the next. Returns ``{rank: text}`` of the cell's last
        expression as IPython would show it (ranks where it is None are left out); use
        `pull` for the objects themselves.

        Example::

            session.execute("x = torch.ones(2) * rank")
            session.execute("x.sum()")        # {0: 'tensor(0.)', 1: 'tensor(2.)'}
        """
        targets = self._targets(ranks)
        filename = name or f"<dist-cell-{self._task_id + 1}>"
        # Stall reports are built here: they show the cell's lines as IPython shows a cell's.
        linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
        results = self._call(tasks.Execute(source, filename), ranks=targets, values_from=targets)
        values = collect(results, targets, True)
        return {rank: text for rank, text in zip(targets, values) if text is not None}

    def pull(self, name: str, rank: int = 0) -> Any:
        """The value of ``name`` in ``rank``'s namespace, in the notebook (tensors on the CPU).

        Example::

            session.execute("w = model.weight.detach()")
            w0 = session.pull("w")             # rank 0's
        """
        targets = self._targets([rank])
        results = self._call(tasks.Pull(name), ranks=targets, values_from=targets)
        return collect(results, targets, return_all=True)[0]

    def push(self, **values) -> None:
        """Bind ``values`` in every rank's namespace (sent by value, with dill; tensors and
        arrays through shared memory on this machine, written once for every rank).

        Every rank binds them, or none does: first every rank loads the values (the long
        step, which an Interrupt or a rank's error may cut), then, once all of them hold
        them, a second, tiny step binds them (Interrupts held for its round trip); a push
        cut in its first step drops what the ranks loaded.

        Example::

            session.push(lr=0.1, data=my_tensor)
            session.execute("print(lr, data.shape)")
        """
        self._pushes += 1
        key = self._pushes
        try:
            self._call(tasks.Push(values, key), values_from=[])
        except BaseException:
            self._end_push(key, bind=False)
            raise
        self._end_push(key, bind=True)

    def _end_push(self, key: int, bind: bool) -> None:
        """The push's second step: bind (or drop) on every rank the values they hold. A
        broken or closed session has no ranks left holding them."""
        if self.status != SessionStatus.IDLE:   # broken or closed: no rank holds them any more
            return
        if self._lock.locked():   # another thread's call came between the two steps
            if bind:
                raise RuntimeError("another call started between the push's two steps: the values were not "
                                   "bound; push them again")
            return
        with interrupts_deferred():
            self._call(tasks.Bind(key, bind), values_from=[], timeout=BIND_TIMEOUT)
        if self.status == SessionStatus.BROKEN:
            raise RuntimeError(f"the pushed values could not be bound on every rank: the session is broken "
                               f"({self.broken_because})")

    def _targets(self, ranks: Optional[list]) -> list:
        if ranks is None:
            return self.ranks
        bad = [r for r in ranks if r not in self.ranks]
        if bad:
            raise LaunchConfigError(f"rank {bad[0]} is not in this session: its ranks are {self.ranks}.")
        return sorted(set(ranks))

    def _call(self, task, ranks: Optional[list] = None, values_from: Optional[list] = None,
              timeout: Optional[float] = None) -> dict:
        """Send ``task`` to ``ranks`` (all by default) and supervise it to its end; returns
        {rank: (payload, pickler) or None}. ``values_from``: the ranks whose value is wanted
        (None: rank 0). ``timeout``: seconds, then the ranks still in it break the session."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this session is already running a call (one call at a time)")
        try:
            self._usable()
            return self._supervise(task, self._targets(ranks), [0] if values_from is None else values_from, timeout)
        finally:
            self._lock.release()

    def _supervise(self, task, targets: list, values_from: list, timeout: Optional[float] = None) -> dict:
        self._task_id += 1
        state = self.state = new_state(self.config, targets)
        owner = _SessionCall(self, task, targets, values_from)
        call = Call(self._ranks, targets, self._task_id, state, self._view(), persistent=True, tick=self.config.tick,
                    stall=stall_watch(self.config), hub=TrackerHub(),  # a call's init_trackers: a run of its own
                    timeout=timeout)
        self.status = SessionStatus.RUNNING
        try:
            outcome = run_call(call, owner)
        except BaseException:   # an Interrupt: ranks it released from a collective need a fresh group too
            self._call_ended(owner, print_rebuilt=True)
            raise
        rebuilt = self._call_ended(owner)
        if outcome.root is not None:
            error = outcome.error()
            if rebuilt:
                error.notes.append(rebuilt)
            if self.status == SessionStatus.BROKEN:
                error.notes.append(f"The session is broken ({self.broken_because}): its ranks were stopped, "
                                   "and the next call starts fresh ones.")
            raise error
        return outcome.results

    def _call_ended(self, owner: "_SessionCall", print_rebuilt: bool = False) -> Optional[str]:
        """Back to idle (unless broken); a fresh group where the call aborted the old one.
        Returns the line that says so (printed, when no error of the call will carry it)."""
        if self.status == SessionStatus.RUNNING:
            self.status = SessionStatus.IDLE
        rebuilt = self._rebuild(owner.aborted) if owner.aborted else None
        if rebuilt and print_rebuilt:
            print(f"notebook_launcher: {rebuilt}", file=sys.stderr)
        return rebuilt

    def _abort_group(self) -> None:
        """Every live rank aborts its process group now (the thread that reads its control
        pipe does it, whatever the rank's main thread is blocked in)."""
        group = self._ranks
        try:
            group.send(group.alive(), frame_of(ch.AbortGroup()))
        except OSError:
            pass   # a rank is gone: the call's end breaks the session

    def _rebuild(self, why: str) -> str:
        """After an abort: every rank forms a fresh default group (`process_group.Regroup`);
        returns the line the call's error ends with. A rebuild that fails breaks the session."""
        from .workers.process_group import Regroup

        if self.status != SessionStatus.IDLE:
            return ""   # broken: its ranks are gone, the next call starts fresh ones
        self._rebuilds += 1
        state = self.state
        try:
            moved = collect(self._supervise(Regroup(self._rebuilds), self.ranks, [0], timeout=REGROUP_TIMEOUT),
                            [0], return_all=False) or []
        except BaseException as exc:
            if self.status != SessionStatus.BROKEN:
                self._break(f"its process group could not be rebuilt ({type(exc).__name__}: {exc})")
            if isinstance(exc, KeyboardInterrupt):
                raise
            return f"The process group was aborted ({why}) and could not be rebuilt: the session is broken."
        finally:
            self.state = state   # the last call's state stays the call's, not the rebuild's
        kept = f" (moved to the new group: {', '.join(moved)})" if moved else ""
        return (f"The process group was rebuilt ({why}; the ranks waiting in a collective were released): "
                f"objects that hold the old group must be made again: subgroups (dist.new_group), and DDP "
                f"wrappers not bound to a name in the cell's namespace{kept}.")

    def _send_task(self, call: "_SessionCall") -> None:
        """Write the call's task to every target rank, whole, in one frame: an Interrupt
        waits until every frame is written (a rank with half a request would wait for the
        rest forever) and the call knows the ranks have it, then lands in the supervised
        call, which forwards it to the ranks.

        On this machine, big tensor and array data goes into one memory file that every
        rank maps (written once, whatever the number of ranks), and big values come back
        through this process's inbox (`shared_memory`); the file is the call's
        (``call.outgoing``), which closes it when the call ends. On a cluster, everything
        travels inline."""
        task, targets, values_from = call.task, call.targets, call.values_from
        by_value = getattr(task, "by_value", True)
        blob, buffers = dumps_task_parts(task, by_value)
        here = self._ranks.single_host and shared_memory.enabled()
        raws = [buffer.raw() for buffer in buffers]
        outgoing = None
        try:
            if here and sum(raw.nbytes for raw in raws) >= shared_memory.MIN_SHARED_BYTES:
                outgoing = shared_memory.Outgoing(raws)   # an Interrupt while writing: closed, nothing sent
            extra = dict(buffers=None if outgoing or not buffers else buffers, shared=outgoing and outgoing.ref,
                         inbox=shared_memory.inbox_address() if here else None, by_value=by_value)
            sources = _new_cells(self._sent_sources)
            returning = set(values_from) & set(targets)
            send_value = True if returning == set(targets) else frozenset(returning)   # one frame for every rank
            frame = frame_of(ch.TaskRequest(blob, send_value, sources, **extra), self._task_id)
            with interrupts_deferred():
                self._ranks.send(list(targets), frame)
                call.sent, call.outgoing = True, outgoing
                self._sent_sources.update(sources)
        except BaseException:
            if outgoing is not None and not call.sent:
                outgoing.close()
            raise

    def _view(self) -> View:
        """Output lines at once; the dashboard only once a rank reports or shows progress,
        so a quick cell costs nothing for it. Where this kernel shows things is found once
        (it probes the environment: 0.1-0.5 ms a cell in a kernel)."""
        display = getattr(self, "_display", None)
        if display is None:
            display = self._display = resolve_display(self.config.display)
        if display == "none":
            return View(self.config.line_prefix, self.title)
        from .ui.on_demand import OnDemandView

        return OnDemandView(lambda: make_view(display, self.config.line_prefix, self.title, show_log=False),
                            self.config.line_prefix, self.title)


def _new_cells(sent: set) -> dict:
    """The notebook's cells (linecache entries without a file: mtime None) the ranks were
    not sent yet, found from the newest entry back to the last cell already sent: a cell's
    entry is never moved or dropped (`linecache.checkcache` skips entries without an mtime)
    and every cell before it went with an earlier call. Constant time per call, where
    `ranks.notebook_sources` walks the whole cache, which grows with every cell."""
    if not sent:
        return notebook_sources()
    found = {}
    try:
        for name in reversed(linecache.cache):
            entry = linecache.cache[name]
            if len(entry) == 4 and entry[1] is None:
                if name in sent:
                    break
                found[name] = entry
    except RuntimeError:   # another thread changed linecache meanwhile (a traceback)
        return notebook_sources(skip=frozenset(sent))
    return found


def _preload_for_cells() -> None:
    """Import torch._dynamo once before forking: a session's cells are where models get
    wrapped in DDP, whose constructor would import it in every rank (about 2.5 s each
    on 2 cores); a session pays it once, at start (about 0.75 s)."""
    from .workers import preload

    preload.preload()


class _SessionCall:
    """A session's side of one call (`calls.CallOwner`): send the task; forward an
    Interrupt to the ranks still in it; release ranks stuck in a collective by aborting the
    process group (the session rebuilds it after the call); break the session when a rank
    died, stayed stuck or could not leave the task."""

    def __init__(self, session: Session, task, targets: list, values_from: list) -> None:
        self.session, self.task, self.targets, self.values_from = session, task, targets, values_from
        self.stuck: list = []
        self.sent = False
        self.aborted = ""        # why the process group was aborted during this call
        self.outgoing: Optional[shared_memory.Outgoing] = None

    def send(self) -> None:
        self.session._send_task(self)   # sets `sent` and `outgoing`

    def interrupted(self, supervisor: Supervisor) -> None:
        if not self.sent:
            return  # interrupted while pickling or writing the task: no rank has it
        group = self.session._ranks
        group.interrupt([r for r in self.targets if r not in supervisor.finished and group.exitcode(r) is None])
        self.stuck = supervisor.wind_down(INTERRUPT_LOOK)
        if self.stuck:   # blocked in C: those in a collective are freed by the abort
            self.release("interrupted")
            self.stuck = supervisor.wind_down(INTERRUPT_GRACE - INTERRUPT_LOOK)

    def release(self, why: str) -> None:
        """Abort the process group on every rank (`monitor.Supervisor` asks, after a failure)."""
        self.aborted = self.aborted or why
        self.session._abort_group()

    def ended(self, outcome: Optional[Outcome], status: RunStatus) -> None:
        if self.outgoing is not None:
            self.outgoing.close()   # the ranks have left the task: what they mapped stays theirs
        if self.stuck:
            self.session._break(f"rank {self.stuck[0]} could not be interrupted")
        elif outcome is not None and (outcome.died or outcome.unfinished):
            who = outcome.died or outcome.unfinished
            stuck = "stayed stuck after its process group was aborted" if self.aborted else "did not finish the task"
            self.session._break(f"rank {who[0]} {'died' if outcome.died else stuck}")


class _Quiet:
    """The owner of a session's start: nothing to send (ranks say they are ready), nothing
    to forward, and the session decides what a failed start means."""

    def send(self) -> None:
        pass

    def interrupted(self, supervisor: Supervisor) -> None:
        pass

    def ended(self, outcome: Optional[Outcome], status: RunStatus) -> None:
        pass
