"""IPython magics for a persistent `Session`, after ``%load_ext notebook_launcher``.

- ``%dist start -n 2 [--mixed-precision fp16] [--device cpu] ...``: start the ranks
  (the same options and checks as `notebook_launcher`); ``--nodes 2 --cluster ray`` puts
  ``-n`` ranks on each of 2 Ray nodes; ``%dist stop``; ``%dist status``.
- ``%%dist [--ranks 0,1]``: run the cell on every rank (or some), each in its own
  namespace that lasts across cells; output rank-prefixed, ``report()``/``progress()``
  drive the cell's dashboard, the last expression is shown per rank.
- ``%dist pull NAME [NAME...] [--rank R]``: bind NAME in the notebook to rank R's value;
  ``%dist push NAME...``: send notebook values to every rank.
- ``%dist auto`` / ``%dist auto off``: every following cell runs on the ranks (like
  ipyparallel's ``%autopx``), except cells that start with ``%dist``.

A failing ``%%dist`` cell raises `WorkerError` in the notebook, so "Run All" stops
there, shown as the failing rank's traceback with the cell's lines (not our frames).
"""

from __future__ import annotations

import argparse
import shlex
from typing import Optional

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class

from .errors import WorkerError
from .session import Session, SessionStatus

NO_SESSION = "No distributed session is running: start one with `%dist start -n 2` (add --device cpu without GPUs)."


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as IPython usage errors instead of exiting."""

    def error(self, message: str) -> None:
        raise UsageError(f"{self.prog}: {message}\n{self.format_usage()}")


def _parsers() -> tuple:
    top = _Parser(prog="%dist", add_help=False)
    commands = top.add_subparsers(dest="command", parser_class=_Parser)
    start = commands.add_parser("start", add_help=False)
    start.add_argument("-n", "--num-processes", type=int, default=None)
    start.add_argument("--mixed-precision", default="no")
    start.add_argument("--device", default="auto")
    start.add_argument("--backend", default="auto")
    start.add_argument("--start-method", default="auto")
    start.add_argument("--display", default="auto", help="auto | widgets | html | text | none")
    start.add_argument("--stall-timeout", type=float, default=300.0, help="seconds; 0 turns it off")
    start.add_argument("--on-stall", default="warn")
    start.add_argument("--nodes", type=int, default=1, help="nodes of the cluster (with --cluster)")
    start.add_argument("--cluster", default=None, choices=["ray", "slurm"], help="run the ranks on a cluster")
    commands.add_parser("stop", add_help=False)
    commands.add_parser("status", add_help=False)
    pull = commands.add_parser("pull", add_help=False)
    pull.add_argument("names", nargs="+")
    pull.add_argument("--rank", type=int, default=0)
    push = commands.add_parser("push", add_help=False)
    push.add_argument("names", nargs="+")
    auto = commands.add_parser("auto", add_help=False)
    auto.add_argument("switch", nargs="?", default="on", choices=["on", "off"])
    cell = _Parser(prog="%%dist", add_help=False)
    cell.add_argument("--ranks", default=None, help="comma-separated ranks, e.g. 0,1")
    return top, cell


@magics_class
class DistMagics(Magics):
    """``%dist`` and ``%%dist``; one session per kernel, in ``self.session``."""

    def __init__(self, shell) -> None:
        super().__init__(shell)
        self.session: Optional[Session] = None
        self._line_parser, self._cell_parser = _parsers()

    @line_cell_magic
    def dist(self, line: str, cell: Optional[str] = None):
        if cell is not None:
            return self._run_cell(line, cell)
        args = self._line_parser.parse_args(_split(line))
        if args.command is None:
            raise UsageError(f"%dist needs a command: start, stop, status, pull, push or auto.\n"
                             f"{self._line_parser.format_usage()}")
        return getattr(self, f"_{args.command}")(args)

    # ------------------------------------------------------------- line commands
    def _start(self, args) -> None:
        options = dict(mixed_precision=args.mixed_precision, device=args.device, backend=args.backend,
                       start_method=args.start_method, display=args.display,
                       stall_timeout=args.stall_timeout or None, on_stall=args.on_stall,
                       num_nodes=args.nodes, cluster=args.cluster)
        Session.check_options(args.num_processes, **options)  # a typo must not cost the running session
        if self._open():
            print(f"Stopping the running session first ({self.session.title}).")
            self.session.close()
        self.session = Session(args.num_processes, **options)
        print(f"Session started: {self.session.title}. Run cells on every rank with %%dist.")

    def _stop(self, args) -> None:
        if not self._open():
            print("No session to stop.")
            return
        self.session.close()
        print(f"Session stopped: {len(self.session.ranks)} ranks ended.")

    def _status(self, args) -> None:
        if self.session is None:
            print(NO_SESSION)
            return
        session = self.session
        print(f"{session.status}: {session.title}")
        if session.status == SessionStatus.BROKEN:
            print(f"  broken because {session.broken_because}; the next cell starts fresh ranks")
        for rank, where in session.labels.items():
            print(f"  rank {rank}: {where}")

    def _pull(self, args) -> None:
        session = self._require()
        for name in args.names:
            self.shell.user_ns[name] = session.pull(name, rank=args.rank)

    def _push(self, args) -> None:
        session = self._require()
        missing = [n for n in args.names if n not in self.shell.user_ns]
        if missing:
            raise UsageError(f"%dist push: {missing[0]!r} is not defined in the notebook.")
        session.push(**{name: self.shell.user_ns[name] for name in args.names})

    def _auto(self, args) -> None:
        transformers = self.shell.input_transformers_cleanup
        if args.switch == "on":
            self._require()
            if _run_on_ranks not in transformers:
                transformers.append(_run_on_ranks)
            print("Every cell now runs on the ranks (%dist auto off to stop).")
        else:
            while _run_on_ranks in transformers:
                transformers.remove(_run_on_ranks)
            print("Cells run in the notebook again.")

    # ------------------------------------------------------------- %%dist
    def _run_cell(self, line: str, cell: str) -> None:
        ranks = self._cell_ranks(line) if line.strip() else None   # a bare %%dist: no parsing (shlex, argparse)
        session = self._require()
        try:
            shown = session.execute(cell, ranks=ranks)
        except WorkerError as error:
            error._render_traceback_ = lambda error=error: _error_lines(error)  # the rank's traceback, not our frames
            raise
        for rank, text in shown.items():
            print(f"Out[rank {rank}]: {text}")

    def _cell_ranks(self, line: str) -> Optional[list]:
        args = self._cell_parser.parse_args(_split(line))
        ranks = None
        if args.ranks is not None:
            try:
                ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
            except ValueError:
                ranks = []
            if not ranks:
                raise UsageError(f"%%dist --ranks takes comma-separated rank numbers, e.g. --ranks 0,1; got {args.ranks!r}.")
        return ranks

    def _open(self) -> bool:
        return self.session is not None and self.session.status != SessionStatus.CLOSED

    def _require(self) -> Session:
        if not self._open():
            raise UsageError(NO_SESSION)
        return self.session


def _split(line: str) -> list:
    """The magic's arguments, shell-style; a stray quote is a usage error, not a crash."""
    try:
        return shlex.split(line, comments=True)
    except ValueError as exc:
        raise UsageError(f"could not read the arguments {line!r}: {exc}") from None


def _error_lines(error: WorkerError) -> list:
    head, *rest = str(error).splitlines()
    return [f"\x1b[0;31m{type(error).__name__}\x1b[0m: {head}", *rest]


def _run_on_ranks(lines: list) -> list:
    """Input transformer of ``%dist auto``: make a cell a ``%%dist`` cell."""
    first = next((line for line in lines if line.strip()), "")
    if not lines or first.lstrip().startswith(("%dist", "%%dist", "%load_ext", "%unload_ext")):
        return lines
    return ["%%dist\n", *lines]


def load_ipython_extension(ipython) -> None:
    """Register ``%dist``/``%%dist``: what ``%load_ext notebook_launcher`` runs.

    Example::

        %load_ext notebook_launcher
        %dist start -n 2 --device cpu
    """
    ipython.register_magics(DistMagics(ipython))
