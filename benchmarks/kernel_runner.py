"""A real Jupyter kernel (ipykernel via jupyter_client) that runs benchmark code.

Same interface as `process_runner.ProcessRunner`: ``execute(code)`` runs the code as
a cell and returns what it printed. Launchers then fork from a real kernel (threads,
zmq sockets, ipykernel's OutStream capturing fd output), which is where users call them.
"""

from __future__ import annotations

import os
import queue
import signal
import time

from .process_runner import REPO, CellOutput


class KernelRunner:
    """One ipykernel process, always shut down and reaped by ``close``.

    Example::

        with KernelRunner("ours") as kernel:
            print(kernel.execute("print(1 + 1)").stdout)   # "2\\n"
    """

    kind = "kernel"
    generation = 0  # how many times the kernel was restarted (its namespace then is empty)
    set_up_generation = None  # the generation the orchestrator last ran its setup code in

    def __init__(self, name: str, startup_timeout: float = 120) -> None:
        from jupyter_client import KernelManager

        self.name = name
        env = dict(os.environ)
        env.pop("MASTER_PORT", None)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        self._km = KernelManager(kernel_name="python3")
        self._km.start_kernel(cwd=REPO, env=env)
        self._pid = self._km.provisioner.process.pid
        self._client = self._km.client()
        self._client.start_channels()
        try:
            self._client.wait_for_ready(timeout=startup_timeout)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "KernelRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def execute(self, code: str, timeout: float = 300) -> CellOutput:
        """Run ``code`` as a cell; on timeout the kernel is restarted (see `generation`)
        and this raises."""
        msg_id = self._client.execute(code, store_history=False)
        deadline = time.monotonic() + timeout
        printed, error = [], ""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.restart()
                raise TimeoutError(f"kernel {self.name}: cell did not finish in {timeout}s (kernel "
                                   f"restarted); output:\n{''.join(printed)[-2000:]}")
            try:
                msg = self._client.get_iopub_msg(timeout=min(remaining, 1.0))
            except queue.Empty:
                if not self._km.is_alive():
                    raise RuntimeError(f"kernel {self.name} died; output:\n{''.join(printed)[-2000:]}")
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                printed.append(content["text"])
            elif kind == "error":
                error = "\n".join(content["traceback"])
            elif kind == "status" and content["execution_state"] == "idle":
                break
        self._client.get_shell_msg(timeout=max(1.0, deadline - time.monotonic()))
        return CellOutput(not error, "".join(printed), _strip_ansi(error))

    def restart(self) -> None:
        """A fresh kernel (what it started is killed); its namespace is empty again."""
        left = self._descendants()
        self._client.stop_channels()
        self._km.restart_kernel(now=True)
        _kill(left)
        self._pid = self._km.provisioner.process.pid
        self._client = self._km.client()
        self._client.start_channels()
        self._client.wait_for_ready(timeout=120)
        self.generation += 1

    def close(self) -> None:
        """Shut the kernel down, then kill anything it started that is still alive."""
        left = self._descendants()
        try:
            self._client.stop_channels()
        finally:
            if self._km.is_alive():
                self._km.shutdown_kernel(now=True)
            self._km.cleanup_resources()
        _kill(left)

    def _descendants(self) -> list:
        import psutil

        try:
            return psutil.Process(self._pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


def _kill(processes: list) -> None:
    import psutil

    for proc in processes:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)
