"""A real Jupyter kernel for tests: started with jupyter_client, driven like a notebook.

Fork from inside ipykernel is not fork from pytest (threads, zmq sockets, an OutStream
that forwards fd output), so launcher tests that matter run their code here.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import psutil
from jupyter_client import KernelManager

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class CellResult:
    status: str = ""                       # "ok" | "error" | "aborted"
    stdout: str = ""
    stderr: str = ""
    ename: str = ""
    evalue: str = ""
    traceback: str = ""
    displays: list = field(default_factory=list)  # display_data / execute_result data dicts
    widget_states: list = field(default_factory=list)  # comm_open / comm_msg states (ipywidgets)
    seconds: float = 0.0

    @property
    def text(self) -> str:
        return self.stdout + self.stderr

    @property
    def widget_text(self) -> str:
        """Every string a widget of this cell ever showed (a log panel's lines, labels, HTML)."""
        return "\n".join(value for state in self.widget_states for value in state.values() if isinstance(value, str))

    @property
    def display_text(self) -> str:
        """The text and HTML of everything the cell displayed (a run's final summary and log)."""
        return "\n".join(str(data.get(kind, "")) for data in self.displays for kind in ("text/plain", "text/html"))


class Kernel:
    """One ipykernel process. Use as a context manager; it is always shut down and reaped."""

    def __init__(self, startup: str = "", timeout: float = 60, own_output: Optional[str] = None) -> None:
        """``own_output``: a file that gets the kernel process's own stdout and stderr (what
        the Jupyter server's log would show), which no cell sees."""
        env = dict(os.environ)
        env.pop("PYTEST_CURRENT_TEST", None)
        self.km = KernelManager(kernel_name="python3")
        if own_output is None:
            self.km.start_kernel(cwd=REPO, env=env)
        else:
            with open(own_output, "wb") as sink:   # the kernel keeps its own copy of the fd
                self.km.start_kernel(cwd=REPO, env=env, stdout=sink, stderr=sink)
        self.client = self.km.client()
        self.client.start_channels()
        self.startup, self.timeout = startup, timeout
        self._ready()

    def _ready(self) -> None:
        """Wait for the kernel process now running, then run the startup code in it."""
        self.client.wait_for_ready(timeout=self.timeout)
        self.pid = self.km.provisioner.process.pid
        if self.startup:
            result = self.run(self.startup, timeout=self.timeout)
            assert result.status == "ok", result.traceback

    def __enter__(self) -> "Kernel":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ------------------------------------------------------------- execution
    def run(self, code: str, timeout: float = 60, on_output: Optional[Callable[[CellResult], None]] = None) -> CellResult:
        """Execute a cell and collect everything it printed or displayed."""
        start = time.monotonic()
        msg_id = self.client.execute(code, store_history=True)
        result = CellResult()
        deadline = start + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"cell did not finish in {timeout}s; output so far:\n{result.text[-3000:]}")
            try:
                msg = self.client.get_iopub_msg(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                if content["name"] == "stdout":
                    result.stdout += content["text"]
                else:
                    result.stderr += content["text"]
                if on_output is not None:
                    on_output(result)
            elif kind in ("display_data", "execute_result", "update_display_data"):
                result.displays.append(content.get("data", {}))
            elif kind in ("comm_open", "comm_msg"):
                state = content.get("data", {}).get("state")
                if isinstance(state, dict):
                    result.widget_states.append(state)
            elif kind == "error":
                result.ename, result.evalue = content["ename"], content["evalue"]
                result.traceback = "\n".join(content["traceback"])
            elif kind == "status" and content["execution_state"] == "idle":
                break
        while True:  # skip replies to anything else (e.g. widget comm requests)
            reply = self.client.get_shell_msg(timeout=max(1.0, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        result.status = reply["content"]["status"]
        result.seconds = time.monotonic() - start
        return result

    def value(self, expression: str, timeout: float = 60):
        """Evaluate an expression in the kernel and bring its repr back as a Python value."""
        result = self.run(f"print(repr({expression}))", timeout=timeout)
        assert result.status == "ok", result.traceback
        import ast

        return ast.literal_eval(result.stdout.strip().splitlines()[-1])

    def interrupt(self) -> None:
        self.km.interrupt_kernel()

    def submit(self, code: str) -> str:
        """Start a cell without waiting for it; returns its msg_id for `wait_for_output`."""
        return self.client.execute(code, store_history=True)

    def wait_for_output(self, msg_id: str, pattern: str, timeout: float = 60) -> str:
        """Read the running cell ``msg_id``'s stdout until ``pattern`` (a regex) matches
        it; returns the stdout so far. TimeoutError if the cell ends or ``timeout`` passes first."""
        stdout, deadline = "", time.monotonic() + timeout
        while not re.search(pattern, stdout):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {pattern!r} in {timeout}s; output so far:\n{stdout[-3000:]}")
            try:
                msg = self.client.get_iopub_msg(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            content = msg["content"]
            if msg["msg_type"] == "stream" and content["name"] == "stdout":
                stdout += content["text"]
            elif msg["msg_type"] == "status" and content["execution_state"] == "idle":
                raise TimeoutError(f"the cell ended without {pattern!r}; its output:\n{stdout[-3000:]}")
        return stdout

    def restart(self, now: bool) -> None:
        """jupyter_client's restart (as a notebook's restart button): ``now`` kills the kernel
        at once, else it is asked to shut down first. The startup code runs again."""
        self.km.restart_kernel(now=now)
        self._ready()

    # ------------------------------------------------------------- processes
    def descendants(self) -> list:
        """Live processes started under the kernel (zombies not yet reaped included)."""
        try:
            return [p for p in psutil.Process(self.pid).children(recursive=True) if _alive(p)]
        except psutil.NoSuchProcess:
            return []

    def wait_no_descendants(self, timeout: float = 5.0) -> list:
        deadline = time.monotonic() + timeout
        left = self.descendants()
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = self.descendants()
        return left

    def shutdown(self) -> None:
        try:
            self.client.stop_channels()
        finally:
            if self.km.is_alive():
                self.km.shutdown_kernel(now=True)
            self.km.cleanup_resources()


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def pids_alive(pids) -> list:
    """The ``pids`` still running (a zombie has exited; so has a process gone meanwhile)."""
    return [pid for pid in pids if not _exited(pid)]


def wait_pids_gone(pids, timeout: float) -> list:
    """Poll until none of ``pids`` runs or ``timeout`` passes; returns those still running."""
    deadline = time.monotonic() + timeout
    left = pids_alive(pids)
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = pids_alive(left)
    return left


def wait_until_blocked(pid: int, settle: float = 0.3, timeout: float = 20.0) -> None:
    """Wait until ``pid``'s main thread has been blocked for ``settle`` seconds: asleep in
    the kernel (state S or D) at every look and using no CPU time meanwhile.

    Used after a rank printed that it is about to enter a blocking call: a thread that
    printed and then blocks is inside that call (a thread on its way there runs, and a
    wait for the GIL ends within milliseconds). AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    since, cpu, state = None, None, "?"
    while time.monotonic() < deadline:
        state, used = _main_thread_state(pid)
        now = time.monotonic()
        if state not in ("S", "D") or used != cpu:
            since, cpu = now, used
        elif now - since >= settle:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not block within {timeout}s (state {state})")


def _main_thread_state(pid: int) -> tuple:
    """(state letter, user + system CPU ticks) of the thread whose id is ``pid``."""
    try:
        with open(f"/proc/{pid}/task/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        raise AssertionError(f"process {pid} exited while we waited for it to block") from None
    return fields[0], int(fields[11]) + int(fields[12])


def press_when(kernel: Kernel, ready, pressed: list, problems: list) -> threading.Thread:
    """A thread that presses Interrupt as soon as ``ready()`` returns, recording the
    moment in ``pressed``. If ``ready`` fails, its error goes to ``problems`` and the
    thread presses anyway, so the cell still ends.

    Example::

        presser = press_when(kernel, lambda: said.wait(30), pressed, problems)
        result = kernel.run(cell)
        presser.join(timeout=30)
    """
    def press():
        try:
            ready()
        except BaseException as exc:
            problems.append(exc)
        pressed.append(time.monotonic())
        kernel.interrupt()

    presser = threading.Thread(target=press, name="presser", daemon=True)
    presser.start()
    return presser


class ExitWatch:
    """When processes exit, seen from outside: a thread polls them every ``interval``
    seconds and records the first moment each one is gone (a zombie has exited).

    Times are ``time.monotonic()``, the same clock in every process of this machine, so
    they compare with times printed by a kernel or a worker. Use as a context manager.

    Example::

        with ExitWatch(worker_pids) as watch:
            kernel.interrupt()
            pressed = time.monotonic()
            ...
        assert watch.last_exit(timeout=5) - pressed < 2.0
    """

    def __init__(self, pids=(), interval: float = 0.01) -> None:
        self.interval = interval
        self.exits: dict = {}
        self._watched: set = set()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="exit-watch", daemon=True)
        self.add(pids)
        self._thread.start()

    def __enter__(self) -> "ExitWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, pids) -> None:
        with self._lock:
            self._watched.update(pids)

    def last_exit(self, timeout: float) -> float:
        """When the last watched process exited; AssertionError if some still run after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            time.sleep(self.interval)
        left = self.running()
        assert not left, f"still running {timeout}s later: {left}"
        with self._lock:
            assert self.exits, "no process was watched"
            return max(self.exits.values())

    def running(self) -> list:
        with self._lock:
            return sorted(self._watched - set(self.exits))

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _poll(self) -> None:
        while not self._done.is_set():
            for pid in self.running():
                if _exited(pid):
                    with self._lock:
                        self.exits.setdefault(pid, time.monotonic())
            self._done.wait(self.interval)


def _exited(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
