"""A plain Python process that runs benchmark code the way a kernel runs cells.

The orchestrator (`run_all.py`) starts one host per launcher family, sends it code as
JSON lines on stdin, and reads what the code prints. Code runs in the host's
``__main__`` namespace, so functions it defines live in ``__main__`` as they would in a
notebook. The host runs in its own session: `ProcessRunner.close` (and a timeout)
kill the whole session, every launcher's workers included.

Run as a script, this file is the host: ``python benchmarks/process_runner.py``.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
END = "@@nl-bench-end@@"


@dataclass
class CellOutput:
    ok: bool
    stdout: str
    error: str = ""


class ProcessRunner:
    """One host process. ``execute(code)`` runs code in it and returns what it printed.

    Example::

        with ProcessRunner("ours") as host:
            print(host.execute("print(1 + 1)").stdout)   # "2\\n"
    """

    kind = "plain"
    generation = 0  # how many times the host was restarted (its namespace then is empty)
    set_up_generation = None  # the generation the orchestrator last ran its setup code in

    def __init__(self, name: str) -> None:
        self.name = name
        self._start()

    def _start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("MASTER_PORT", None)
        self._process = subprocess.Popen(
            [sys.executable, "-u", os.path.abspath(__file__)], cwd=REPO, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, text=True, bufsize=1,
        )
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(self._process.stdout, self._lines), daemon=True).start()

    @staticmethod
    def _pump(stream, lines: queue.Queue) -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    def __enter__(self) -> "ProcessRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def execute(self, code: str, timeout: float = 300) -> CellOutput:
        """Run ``code``; on timeout the host is killed and restarted, and this raises."""
        self._process.stdin.write(json.dumps({"code": code}) + "\n")
        self._process.stdin.flush()
        deadline = time.monotonic() + timeout
        printed = []
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self._restart()
                raise TimeoutError(f"host {self.name}: code did not finish in {timeout}s; "
                                   f"output:\n{''.join(printed)[-2000:]}") from None
            if line is None:
                self._restart()
                raise RuntimeError(f"host {self.name} died; output:\n{''.join(printed)[-2000:]}")
            if line.startswith(END):
                status = json.loads(line[len(END):])
                return CellOutput(status["ok"], "".join(printed), status.get("error", ""))
            printed.append(line)

    def _restart(self) -> None:
        _kill_session(self._process.pid)  # workers in process groups of their own too
        self._kill()
        self._start()
        self.generation += 1

    def _kill(self) -> None:
        try:
            os.killpg(self._process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._process.wait(timeout=10)

    def close(self) -> None:
        """Stop the host and everything it started (its whole session)."""
        try:
            self._process.stdin.close()
            self._process.wait(timeout=10)
        except (subprocess.TimeoutExpired, OSError):
            pass
        _kill_session(self._process.pid)
        self._kill()


def _kill_session(sid: int) -> None:
    """SIGKILL whatever still runs in the host's session (workers a launcher left)."""
    import psutil

    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == sid:
                os.kill(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def serve() -> None:
    """Host side: read code lines from stdin, run each in ``__main__``, report the end."""
    sys.path.insert(0, REPO)
    namespace = sys.modules["__main__"].__dict__
    for line in sys.stdin:
        code = json.loads(line)["code"]
        status = {"ok": True}
        try:
            exec(compile(code, "<cell>", "exec"), namespace)
        except BaseException:
            status = {"ok": False, "error": traceback.format_exc()}
        sys.stdout.flush()
        sys.stderr.flush()
        print(END + json.dumps(status), flush=True)


if __name__ == "__main__":
    serve()
