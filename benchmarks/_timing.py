"""Small helpers shared by the measurements that run inside a host (process or kernel)."""

from __future__ import annotations

import contextlib
import gc
import glob
import os
import shutil
import tempfile
import threading
import time


@contextlib.contextmanager
def scratch():
    """A fresh directory for the workers' timestamp files, removed afterwards."""
    path = tempfile.mkdtemp(prefix="nl-bench-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def stamps(directory: str, prefix: str) -> list:
    """The ``time.time()`` values the workers wrote as ``<prefix>.<rank>``."""
    values = []
    for path in glob.glob(os.path.join(directory, f"{prefix}.*")):
        with open(path) as f:
            values.append(float(f.read()))
    return values


def settle() -> None:
    """Start each measurement from the same state: garbage collected, workers of the
    previous call gone (a launcher may return before its last child is reaped).
    multiprocessing's resource tracker, a helper that lives as long as its parent, is
    not a worker: it stays."""
    gc.collect()
    _malloc_trim()
    try:
        import psutil
    except ImportError:
        return
    deadline = time.monotonic() + 5
    me = psutil.Process()
    while time.monotonic() < deadline:
        if not [p for p in me.children(recursive=True) if _alive(p) and not _helper(p)]:
            return
        time.sleep(0.01)


def _malloc_trim() -> None:
    # Give memory freed by earlier calls back to the OS, so that a memory measurement
    # is not hidden by new allocations reusing pages that are still resident.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _helper(proc) -> bool:
    try:
        return any("resource_tracker" in part or "forkserver" in part for part in proc.cmdline())
    except Exception:
        return False


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class PeakRSS:
    """The peak resident memory of this process during a block, in bytes.

    On Linux the kernel keeps the high-water mark (VmHWM) and lets a process reset it
    (``/proc/self/clear_refs``), which catches every peak, even one reached while a C
    call holds the GIL. Elsewhere a thread samples the RSS every 2 ms (it can miss
    such peaks).

    Example::

        with PeakRSS() as mem:
            value = big_call()
        print(mem.peak - mem.baseline)
    """

    def __init__(self, interval: float = 0.002) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self._thread = None
        self.baseline = self.peak = 0

    def __enter__(self) -> "PeakRSS":
        self.baseline = _status_kb("VmRSS") * 1024
        if _reset_high_water_mark():
            self.method = "VmHWM"
        else:
            import psutil

            self.method = "sampled"
            self.peak = psutil.Process().memory_info().rss
            self._thread = threading.Thread(target=self._sample, args=(psutil.Process(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            self.peak = _status_kb("VmHWM") * 1024
            return
        self._stop.set()
        self._thread.join(timeout=5)

    def _sample(self, process) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, process.memory_info().rss)


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss // 1024
